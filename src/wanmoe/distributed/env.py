"""Process-group setup for multi-process generation, carried in a `ParallelState` (no module globals).

Layout of the ranks (world = U * C, U = Ulysses degree, C = 2 with CFG parallel else 1):
rank = c * U + u. Ranks with the same c form one sequence-parallel group (they share one denoiser
pass, each holding L/U tokens); ranks with the same u form one CFG group (c = 0 runs the conditional
pass, c = 1 the unconditional one). FSDP shards over all ranks. With world 1 nothing is initialised.

Axis legend: tensors in cfg_parallel have the caller's latent shape (B, C, F, H, W); elementwise only.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class ParallelState:
    """Who this process is and which groups it talks to. Pass it around; never store it globally."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None when world == 1 (no process group)
    ulysses_size: int = 1
    cfg_size: int = 1  # 2 with CFG parallel
    dit_fsdp: bool = False
    t5_fsdp: bool = False
    sp_group: dist.ProcessGroup | None = None  # this rank's Ulysses group (None when ulysses_size == 1)
    cfg_group: dist.ProcessGroup | None = None  # this rank's cond/uncond pair (None without CFG parallel)

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs at INFO and writes outputs."""
        return self.rank == 0

    @property
    def sp_rank(self) -> int:
        return self.rank % self.ulysses_size

    @property
    def cfg_rank(self) -> int:
        """0: this rank runs the conditional pass; 1: the unconditional one."""
        return self.rank // self.ulysses_size


def validate_parallel_flags(
    world: int,
    ulysses_size: int = 1,
    dit_fsdp: bool = False,
    t5_fsdp: bool = False,
    cfg_parallel: bool = False,
    num_heads: int | None = None,
) -> None:
    """Raise ValueError when the flags and the world size disagree (before any weights load).

    Rules: one process takes no parallel flag; with Ulysses or CFG parallel the world must be exactly
    ulysses_size * (2 if cfg_parallel else 1); num_heads must divide by ulysses_size (each rank gets
    whole heads after the all-to-all); several processes with no parallel flag would only repeat work.
    """
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    if ulysses_size < 1:
        raise ValueError(f"--ulysses_size must be >= 1, got {ulysses_size}")
    flags = [
        f
        for f, on in (
            ("--dit_fsdp", dit_fsdp),
            ("--t5_fsdp", t5_fsdp),
            ("--cfg_parallel", cfg_parallel),
            (f"--ulysses_size {ulysses_size}", ulysses_size > 1),
        )
        if on
    ]
    if world == 1:
        if flags:
            raise ValueError(
                f"{', '.join(flags)} need several processes, but world size is 1; "
                f"launch with torchrun --nproc_per_node=N or drop the flag(s)"
            )
        return
    if not flags:
        raise ValueError(
            f"world size is {world} but no parallel mode is set; pass --ulysses_size {world}, "
            f"--cfg_parallel, --dit_fsdp and/or --t5_fsdp, or launch a single process"
        )
    cfg_size = 2 if cfg_parallel else 1
    if (ulysses_size > 1 or cfg_parallel) and world != ulysses_size * cfg_size:
        raise ValueError(
            f"world size {world} must equal ulysses_size ({ulysses_size}) x "
            f"{'2 (cfg_parallel)' if cfg_parallel else '1'} = {ulysses_size * cfg_size}"
        )
    if num_heads is not None and num_heads % ulysses_size:
        ok = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
        raise ValueError(
            f"num_heads ({num_heads}) must be divisible by ulysses_size ({ulysses_size}); allowed ulysses sizes: {ok}"
        )


def init_parallel(
    backend: str | None = None,
    *,
    ulysses_size: int = 1,
    cfg_parallel: bool = False,
    dit_fsdp: bool = False,
    t5_fsdp: bool = False,
    num_heads: int | None = None,
    timeout_s: float = 600.0,
) -> ParallelState:
    """Read RANK/WORLD_SIZE/LOCAL_RANK (set by torchrun), validate the flags, create the groups.

    backend None picks nccl when CUDA is available, else gloo. Collective only when world > 1:
    every rank must call it with the same arguments.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    validate_parallel_flags(world, ulysses_size, dit_fsdp, t5_fsdp, cfg_parallel, num_heads)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if world == 1:
        if device.type == "cuda":
            device = torch.device("cuda", 0)
        return ParallelState(device=device)
    if device.type == "cuda":
        # Bind before init so NCCL picks this rank's GPU and not GPU 0 on every rank.
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend,
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    cfg_size = 2 if cfg_parallel else 1
    sp_group = cfg_group = None
    # new_group is collective over the whole world: every rank creates every group, in the same order.
    if ulysses_size > 1:
        for c in range(cfg_size):
            g = dist.new_group(list(range(c * ulysses_size, (c + 1) * ulysses_size)))
            if rank // ulysses_size == c:
                sp_group = g
    if cfg_parallel:
        for u in range(ulysses_size):
            g = dist.new_group([u, ulysses_size + u])
            if rank % ulysses_size == u:
                cfg_group = g
    return ParallelState(
        world=world,
        rank=rank,
        local_rank=local_rank,
        device=device,
        backend=backend,
        ulysses_size=ulysses_size,
        cfg_size=cfg_size,
        dit_fsdp=dit_fsdp,
        t5_fsdp=t5_fsdp,
        sp_group=sp_group,
        cfg_group=cfg_group,
    )


def broadcast_seed(seed: int, state: ParallelState) -> int:
    """Rank 0's seed on every rank (a negative seed draws a random one on rank 0), so all ranks draw
    the same noise: Ulysses shards one shared latent and CFG ranks must denoise the same x."""
    if seed < 0 and state.is_main:
        seed = random.randint(0, 2**63 - 1)
    if state.world == 1:
        return seed
    # NCCL only moves device tensors; gloo only host tensors.
    t = torch.tensor([seed], dtype=torch.int64, device=state.device)
    dist.broadcast(t, src=0)
    return int(t.item())


def barrier(state: ParallelState) -> None:
    """Wait for all ranks (e.g. before rank 0 reads what others wrote); a no-op on one process."""
    if state.world > 1:
        dist.barrier()


def destroy_parallel(state: ParallelState) -> None:
    """Tear down the default process group (call at the end of cli.main)."""
    if state.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def cfg_parallel(
    denoise_cond: Callable[[Tensor, Tensor], Tensor],
    denoise_uncond: Callable[[Tensor, Tensor], Tensor],
    scale: float,
    state: ParallelState,
) -> Callable[[Tensor, Tensor], Tensor]:
    """Classifier-free guidance with the two passes on the two ranks of this rank's CFG group.

    Same arithmetic as wanmoe.sampling.guidance.cfg (v_u + s * (v_c - v_u), Ho & Salimans 2022 eq. 6),
    so results match the single-process path; scale 1 skips the unconditional pass there, and here too.
    Without CFG parallel (cfg_size 1) both passes run locally, one after the other.
    """
    scale = float(scale)
    if scale == 1.0:
        return denoise_cond

    def guided(x: Tensor, sigma: Tensor) -> Tensor:
        if state.cfg_size == 1:
            v_u = denoise_uncond(x, sigma)
            return v_u + scale * (denoise_cond(x, sigma) - v_u)
        mine = (denoise_cond if state.cfg_rank == 0 else denoise_uncond)(x, sigma).contiguous()
        both = [torch.empty_like(mine) for _ in range(2)]
        dist.all_gather(both, mine, group=state.cfg_group)  # [cond, uncond] by cfg rank
        v_c, v_u = both
        return v_u + scale * (v_c - v_u)

    return guided


def cfg_parallel_per_expert(
    cond: Mapping[str, Callable[[Tensor, Tensor], Tensor]],
    uncond: Mapping[str, Callable[[Tensor, Tensor], Tensor]],
    scale: float | Mapping[str, float],
    state: ParallelState,
) -> dict[str, Callable[[Tensor, Tensor], Tensor]]:
    """`cfg_parallel` for each named expert, with a shared or a per-expert (named) scale."""
    if set(cond) != set(uncond):
        raise ValueError(f"cond and uncond must name the same experts, got {sorted(cond)} and {sorted(uncond)}")
    if isinstance(scale, Mapping):
        if set(scale) != set(cond):
            raise ValueError(f"guidance scales must name exactly the experts {sorted(cond)}, got {sorted(scale)}")
        scales = {n: float(scale[n]) for n in cond}
    else:
        scales = {n: float(scale) for n in cond}
    return {n: cfg_parallel(cond[n], uncond[n], scales[n], state) for n in cond}
