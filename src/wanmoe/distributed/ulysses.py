"""Ulysses sequence parallelism (Jacobs et al. 2023, DeepSpeed-Ulysses, arXiv:2309.14509).

Each of the P ranks of a sequence-parallel group holds L/P tokens of the DiT token stream. Everything
per token (linear layers, norms, modulation, RoPE with this shard's positions, cross-attention on the
full text) runs locally. Self-attention needs every key, so around the one attention function:
  all-to-all (scatter heads, gather sequence) -> attention over all L tokens with N/P heads
  -> all-to-all (scatter sequence, gather heads).
The DiT exposes two seams (docs/architecture.md): `seq_parallel` (shard after the embeddings, gather
before the head) and `attn_fn` (self-attention only). RoPE positions, the S2V reference/motion
tokens and per-token timesteps are per-token tensors, so the DiT shards them with the same `shard`
and each rank applies exactly its tokens' values.

Padding: `shard` pads the token axis to a multiple of P. The padded keys must get zero weight, so the
wrapped attention always passes the true key count (the global k_lens, or the unpadded length).

Axis legend: B batch, L tokens (global, padded to a multiple of P), Ll = L/P tokens on this rank,
N heads, D head dim, P ranks in the sequence-parallel group.
Inference only: the collectives here carry no autograd rule.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from wanmoe.distributed.env import ParallelState

AttnFn = Callable[..., Tensor]


def all_to_all(x: Tensor, scatter_dim: int, gather_dim: int, group: dist.ProcessGroup | None) -> Tensor:
    """Split `scatter_dim` into P chunks, send chunk j to rank j, concatenate what arrives on `gather_dim`."""
    world = dist.get_world_size(group)
    if world == 1:
        return x
    if x.shape[scatter_dim] % world:
        raise ValueError(f"all_to_all: dim {scatter_dim} of size {x.shape[scatter_dim]} does not split into {world}")
    inputs = [c.contiguous() for c in x.chunk(world, dim=scatter_dim)]
    outputs = [torch.empty_like(c) for c in inputs]
    dist.all_to_all(outputs, inputs, group=group)  # list form: supported by both NCCL and gloo
    return torch.cat(outputs, dim=gather_dim)


class SeqParallel:
    """The DiT's sequence-parallel seam: this rank's slice of the token axis, and the way back.

    Stateless apart from the group, so one instance can serve several experts (and both CFG passes).
    """

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def padded(self, length: int) -> int:
        """Length rounded up to a multiple of world (ceil(L / P) * P)."""
        return -(-length // self.world) * self.world

    def shard(self, x: Tensor, dim: int) -> Tensor:
        """Zero-pad `dim` to a multiple of world and return this rank's contiguous chunk (rank-major order)."""
        length = x.shape[dim]
        pad = self.padded(length) - length
        if pad:
            shape = list(x.shape)
            shape[dim] = pad
            x = torch.cat([x, x.new_zeros(shape)], dim=dim)
        return x.chunk(self.world, dim=dim)[self.rank].contiguous()

    def gather(self, x: Tensor, dim: int, length: int) -> Tensor:
        """All-gather the chunks along `dim` (every rank gets the full tensor), then cut the padding to `length`."""
        if self.world == 1:
            return x.narrow(dim, 0, length)
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=dim).narrow(dim, 0, length)


def ulysses_attention(
    attn_fn: AttnFn, group: dist.ProcessGroup | None, *, length: int | None = None
) -> AttnFn:
    """Wrap `attn_fn(q, k, v, *, k_lens)` so that it runs on sequence shards.

    q/k/v arrive as (B, Ll, N, D) with this rank's tokens; k_lens, when given, counts valid keys of the
    *global* sequence. When k_lens is None every real token is valid, but the tokens added by padding to
    a multiple of P are not; `length` (if given) is the unpadded global length, so they can be masked.
    Without it (and without k_lens) the sequence must not have been padded.
    """
    world = dist.get_world_size(group)

    def attn(q: Tensor, k: Tensor, v: Tensor, *, k_lens: Tensor | None = None) -> Tensor:
        n = q.shape[2]
        if n % world:
            raise ValueError(f"Ulysses needs num_heads ({n}) divisible by the sequence-parallel size ({world})")
        if k.shape[1] != q.shape[1]:
            raise ValueError(
                "ulysses_attention wraps self-attention only (q and k hold the same token shard); "
                f"got Lq={q.shape[1]}, Lk={k.shape[1]}"
            )
        # (B, Ll, N, D) -> (B, L, N/P, D): every rank sees all tokens for its N/P heads.
        q, k, v = (all_to_all(t, scatter_dim=2, gather_dim=1, group=group) for t in (q, k, v))
        if k_lens is None and length is not None and length < k.shape[1]:
            # Padding keys must get zero weight, exactly as if the sequence had never been padded.
            k_lens = torch.full((q.shape[0],), length, dtype=torch.int64, device=q.device)
        out = attn_fn(q, k, v, k_lens=k_lens)  # (B, L, N/P, D)
        return all_to_all(out, scatter_dim=1, gather_dim=2, group=group).contiguous()  # (B, Ll, N, D)

    return attn


def apply_ulysses(model: nn.Module, state: ParallelState) -> nn.Module:
    """Turn on Ulysses for one DiT in place: set `model.seq_parallel` and wrap `model.attn_fn`.

    Call once per expert. Raises ValueError when the model's heads do not split over the group.
    """
    if state.ulysses_size == 1:
        return model
    if not hasattr(model, "seq_parallel") or not hasattr(model, "attn_fn"):
        raise TypeError(f"{type(model).__name__} has no `seq_parallel`/`attn_fn` seam; apply_ulysses expects a DiT")
    if getattr(model.attn_fn, "_ulysses", False):
        raise ValueError("apply_ulysses was already applied to this model")
    cfg = getattr(model, "cfg", None)
    heads = getattr(cfg, "num_heads", None)
    if heads is not None and heads % state.ulysses_size:
        raise ValueError(f"num_heads ({heads}) must be divisible by ulysses_size ({state.ulysses_size})")
    # The DiT passes k_lens = the unpadded global length under sequence parallel, so no `length` hook is needed.
    sp = SeqParallel(state.sp_group)
    attn = ulysses_attention(model.attn_fn, state.sp_group)
    attn._ulysses = True  # type: ignore[attr-defined]
    model.seq_parallel = sp
    model.attn_fn = attn
    return model
