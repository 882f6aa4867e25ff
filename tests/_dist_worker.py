"""Worker launched by tests/test_distributed.py under `torchrun --nproc_per_node=2` (gloo, CPU).

Runs every parallel mode on tiny random-weight models and writes what it computed to OUT_DIR (rank 0 only):
outputs.safetensors (tensors the test compares with its own single-process reference) and checks.json
(facts only a multi-process run can observe: seeds per rank, round trips, errors raised).
The builders (`attn_inputs`, `toy_model`, ...) are imported by the test to build the references, so both
sides use the very same inputs and weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

# ---------------------------------------------------------------- shared builders (also used by the test)


def attn_inputs(length: int = 7, heads: int = 4, head_dim: int = 8, batch: int = 2) -> tuple[Tensor, ...]:
    """q, k, v (B, L, N, D) and k_lens (B,); L odd so that two ranks need padding."""
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(batch, length, heads, head_dim, generator=g) for _ in range(3))
    k_lens = torch.tensor([length, length - 2])
    return q, k, v, k_lens


class ToyBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class ToyNet(nn.Module):
    """Stand-in with the DiT's layout (embed, blocks, head) for the FSDP checks that need no DiT."""

    def __init__(self, dim: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(5, dim)
        self.blocks = nn.ModuleList(ToyBlock(dim) for _ in range(depth))
        self.head = nn.Linear(dim, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def toy_model(seed: int = 3) -> ToyNet:
    torch.manual_seed(seed)
    return ToyNet()


def toy_input() -> Tensor:
    return torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(5))


def toy_denoisers(seed_offset: int = 0):
    """Cond/uncond denoise callables from two toy nets (velocity = net(x) * (1 + sigma))."""
    cond, uncond = toy_model(3 + seed_offset), toy_model(4 + seed_offset)

    def d_c(x: Tensor, sigma: Tensor) -> Tensor:
        return cond(x) * (1 + sigma)

    def d_u(x: Tensor, sigma: Tensor) -> Tensor:
        return uncond(x) * (1 + sigma)

    return d_c, d_u


def euler(denoise, x: Tensor, sigmas: Tensor) -> Tensor:
    """A 3-step Euler loop kept local so the collective checks do not depend on other modules."""
    for i in range(len(sigmas) - 1):
        x = x + (sigmas[i + 1] - sigmas[i]) * denoise(x, sigmas[i])
    return x


SIGMAS = torch.tensor([1.0, 0.7, 0.35, 0.0])
CFG_SCALE = 3.5


# ---------------------------------------------------------------- tiny DiTs (t2v with two experts, s2v)

GUIDE = {"high": 4.0, "low": 3.0}
LATENT = (2, 16, 3, 6, 6)  # (B, C, F, H, W): 3*3*3 = 27 tokens, odd, so two ranks need a padding token
S2V_LATENT = (2, 16, 3, 10, 10)  # 4x motion packer needs H, W >= 8; 75 + 25 + 33 = 133 tokens (odd)


def dit(task: str, seed: int):
    """A tiny DiT with every weight random (the training init zeroes the head, which would hide any error)."""
    from wanmoe.models.dit import DIT_PRESETS, DiT

    torch.manual_seed(seed)
    m = DiT(DIT_PRESETS[f"{task}-tiny"]).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def t2v_experts() -> dict:
    return {"high": dit("t2v-a14b", 21), "low": dit("t2v-a14b", 22)}


def t2v_inputs() -> tuple[Tensor, Tensor, Tensor]:
    """Noise x (B, C, F, H, W), conditional and unconditional text embeddings (B, S, text_dim)."""
    g = torch.Generator().manual_seed(31)
    return torch.randn(*LATENT, generator=g), torch.randn(2, 5, 32, generator=g), torch.randn(2, 5, 32, generator=g)


def s2v_inputs(drop_motion: bool = False):
    from wanmoe.models.dit import S2VInputs

    g = torch.Generator().manual_seed(41)
    b, c, f, h, w = S2V_LATENT
    x = torch.randn(*S2V_LATENT, generator=g)
    inp = S2VInputs(
        audio=torch.randn(b, 3, 32, 4 * f, generator=g),
        ref_latents=torch.randn(b, c, 1, h, w, generator=g),
        motion_latents=torch.randn(b, c, 19, h, w, generator=g),
        drop_motion_frames=drop_motion,
    )
    null = S2VInputs(
        audio=torch.zeros_like(inp.audio),
        ref_latents=inp.ref_latents,
        motion_latents=inp.motion_latents,
        drop_motion_frames=drop_motion,
    )  # CFG-uncond zeroes the audio (spec section 11)
    return x, torch.randn(b, 5, 32, generator=g), torch.randn(b, 5, 32, generator=g), inp, null


def denoisers(model, context: Tensor, s2v=None):
    """denoise(x, sigma) -> velocity with the official timestep t = trunc(sigma * 1000)."""
    from wanmoe.sampling.schedules import timesteps

    def d(x: Tensor, sigma: Tensor) -> Tensor:
        t = timesteps(sigma.reshape(1)).float().expand(x.shape[0])
        return model(x, t, context, s2v=s2v)

    return d


def t2v_loop(experts: dict, guided) -> Tensor:
    """4 Euler steps over two experts (3 high, 1 low) with CFG; `guided(cond, uncond, scales)` builds the CFG."""
    from wanmoe.experts import ExpertSpec, route
    from wanmoe.sampling.schedules import flow_sigmas
    from wanmoe.sampling.solvers import sample_euler

    x, ctx, neg = t2v_inputs()
    sigmas = flow_sigmas(4, 12.0, solver="euler")
    cond = {n: denoisers(m, ctx) for n, m in experts.items()}
    uncond = {n: denoisers(m, neg) for n, m in experts.items()}
    den = route(guided(cond, uncond, GUIDE), ExpertSpec(("high", "low"), boundary=0.875), sigmas)
    assert {k for w in den.plan for k in w} == {"high", "low"}, "the loop must exercise both experts"
    return sample_euler(den, x, sigmas)


def s2v_loop(model, guided) -> Tensor:
    from wanmoe.sampling.schedules import flow_sigmas
    from wanmoe.sampling.solvers import sample_euler

    x, ctx, neg, inp, null = s2v_inputs()
    cond = {"dense": denoisers(model, ctx, inp)}
    uncond = {"dense": denoisers(model, neg, null)}
    return sample_euler(guided(cond, uncond, {"dense": 4.5})["dense"], x, flow_sigmas(2, 3.0, solver="euler"))


def sequential_cfg(cond, uncond, scales):
    from wanmoe.sampling.guidance import cfg_per_expert

    return cfg_per_expert(cond, uncond, scales)


# ---------------------------------------------------------------- checks run on every rank


def check_collectives(out: dict, checks: dict) -> None:
    from wanmoe.distributed.env import broadcast_seed, init_parallel
    from wanmoe.distributed.ulysses import SeqParallel, all_to_all

    st = init_parallel("gloo", ulysses_size=2, num_heads=4)
    # Seeds: every rank asks with its own value; all must end with rank 0's.
    got = broadcast_seed(1000 + st.rank, st)
    seeds = [torch.zeros(1, dtype=torch.int64) for _ in range(st.world)]
    dist.all_gather(seeds, torch.tensor([got]))
    checks["seeds"] = [int(s) for s in seeds]
    rnd = broadcast_seed(-1, st)
    dist.all_gather(seeds, torch.tensor([rnd]))
    checks["random_seed_agrees"] = len({int(s) for s in seeds}) == 1 and rnd >= 0

    x = torch.arange(2 * 6 * 4 * 3, dtype=torch.float32).reshape(2, 6, 4, 3) + 1000 * st.rank
    y = all_to_all(x, scatter_dim=2, gather_dim=1, group=st.sp_group)  # (2, 12, 2, 3)
    back = all_to_all(y, scatter_dim=1, gather_dim=2, group=st.sp_group)
    checks["a2a_shape"] = list(y.shape)
    checks["a2a_roundtrip_exact"] = bool(torch.equal(back, x))
    sp = SeqParallel(st.sp_group)
    full = torch.randn(2, 7, 3, generator=torch.Generator().manual_seed(1))
    shard = sp.shard(full, 1)
    checks["shard_len"] = shard.shape[1]
    checks["shard_gather_exact"] = bool(torch.equal(sp.gather(shard, 1, 7), full))


def check_ulysses_attention(out: dict, checks: dict) -> None:
    from wanmoe.distributed.env import init_parallel
    from wanmoe.distributed.ulysses import SeqParallel, ulysses_attention
    from wanmoe.models.attention import sdpa_attention

    st = init_parallel("gloo", ulysses_size=2, num_heads=4)
    sp = SeqParallel(st.sp_group)
    q, k, v, k_lens = attn_inputs()
    length = q.shape[1]
    attn = ulysses_attention(sdpa_attention, st.sp_group, length=length)
    for name, kl in (("klens", k_lens), ("nolens", None)):
        o = attn(sp.shard(q, 1), sp.shard(k, 1), sp.shard(v, 1), k_lens=kl)
        out[f"attn_{name}"] = sp.gather(o, 1, length)
    try:
        ulysses_attention(sdpa_attention, st.sp_group)(*(sp.shard(t, 1)[:, :, :3] for t in (q, k, v)))
        checks["odd_heads_error"] = ""
    except ValueError as e:
        checks["odd_heads_error"] = str(e)


def check_fsdp_toy(out: dict, checks: dict) -> None:
    from torch.distributed.tensor import DTensor

    from wanmoe.distributed.env import init_parallel
    from wanmoe.distributed.fsdp import apply_fsdp

    st = init_parallel("gloo", dit_fsdp=True)
    m = apply_fsdp(toy_model(), st)
    w = m.blocks[0].fc1.weight
    checks["fsdp_dtensor"] = isinstance(w, DTensor)
    checks["fsdp_local_rows"] = w.to_local().shape[0] if isinstance(w, DTensor) else -1
    with torch.inference_mode():
        out["fsdp_toy"] = m(toy_input())
        out["fsdp_toy_again"] = m(toy_input())  # second call: params were resharded and gathered again


def check_cfg_parallel(out: dict, checks: dict) -> None:
    from wanmoe.distributed.env import cfg_parallel, init_parallel

    st = init_parallel("gloo", cfg_parallel=True)
    checks["cfg_rank"] = st.cfg_rank
    d_c, d_u = toy_denoisers()
    x = toy_input()
    with torch.no_grad():
        out["cfg_loop"] = euler(cfg_parallel(d_c, d_u, CFG_SCALE, st), x, SIGMAS)


def _modes(st_args: dict, name: str):
    from wanmoe.distributed.env import cfg_parallel_per_expert, init_parallel

    st = init_parallel("gloo", **st_args)

    def guided(cond, uncond, scales):
        return (
            cfg_parallel_per_expert(cond, uncond, scales, st)
            if st.cfg_size == 2
            else sequential_cfg(cond, uncond, scales)
        )

    return st, guided


MODES = {  # name -> init_parallel flags (world 2)
    "ulysses": dict(ulysses_size=2, num_heads=2),
    "cfgpar": dict(cfg_parallel=True),
    "fsdp": dict(dit_fsdp=True),
    "ulysses_fsdp": dict(ulysses_size=2, num_heads=2, dit_fsdp=True),
}


def _parallelise(model, st):
    from wanmoe.distributed.fsdp import apply_fsdp
    from wanmoe.distributed.ulysses import apply_ulysses

    apply_ulysses(model, st)
    if st.dit_fsdp:
        apply_fsdp(model, st)  # each expert is sharded on its own
    return model


def check_t2v(out: dict, checks: dict) -> None:
    for name, flags in MODES.items():
        st, guided = _modes(flags, name)
        experts = {n: _parallelise(m, st) for n, m in t2v_experts().items()}
        x, ctx, _ = t2v_inputs()
        with torch.inference_mode():
            if name == "ulysses":
                out["t2v_forward_ulysses"] = experts["high"](x, torch.tensor([900.0, 500.0]), ctx)
            out[f"t2v_loop_{name}"] = t2v_loop(experts, guided)


def check_s2v(out: dict, checks: dict) -> None:
    for name in ("ulysses", "cfgpar", "ulysses_fsdp"):
        st, guided = _modes(MODES[name], name)
        model = _parallelise(dit("s2v-14b", 51), st)
        x, ctx, _, inp, _ = s2v_inputs()
        with torch.inference_mode():
            if name == "ulysses":
                out["s2v_forward_ulysses"] = model(x, torch.tensor([900.0, 500.0]), ctx, s2v=inp)
                out["s2v_forward_ulysses_nomotion"] = model(
                    x, torch.tensor([900.0, 500.0]), ctx, s2v=s2v_inputs(drop_motion=True)[3]
                )
            out[f"s2v_loop_{name}"] = s2v_loop(model, guided)


def check_flag_errors(out: dict, checks: dict) -> None:
    from wanmoe.distributed.env import init_parallel

    for key, flags in (
        ("err_ulysses4", dict(ulysses_size=4)),
        ("err_heads", dict(ulysses_size=2, num_heads=3)),
        ("err_noflag", dict()),
    ):
        try:
            init_parallel("gloo", **flags)
            checks[key] = ""
        except ValueError as e:
            checks[key] = str(e)


def text_encoders():
    """Tiny umT5 (official layout) and byte-level encoders with fixed random weights, plus their inputs."""
    from wanmoe.encoders.text import T5_PRESETS, ByteTextEncoder, UMT5Encoder, tiny_byte_config

    torch.manual_seed(61)
    umt5, byte = UMT5Encoder(T5_PRESETS["tiny"]).eval(), ByteTextEncoder(tiny_byte_config()).eval()
    ids = torch.randint(1, 256, (2, 16), generator=torch.Generator().manual_seed(62))
    mask = (torch.arange(16)[None] < torch.tensor([[16], [9]])).long()
    return umt5, byte, ids, mask, ["a cat on a surfboard", "hello"]


def check_t5_fsdp(out: dict, checks: dict) -> None:
    from wanmoe.distributed.env import init_parallel
    from wanmoe.distributed.fsdp import apply_fsdp

    st = init_parallel("gloo", t5_fsdp=True)
    umt5, byte, ids, mask, prompts = text_encoders()
    apply_fsdp(umt5, st)
    apply_fsdp(byte, st, forward_methods=("encode_ids",))  # encode() bypasses forward()
    with torch.inference_mode():
        out["t5_fsdp"] = umt5(ids, mask)
        out["byte_fsdp"] = byte.encode(prompts)[0]


# ---------------------------------------------------------------- pipeline.generate() end to end

PIPE_SEED = 7


def pipeline_parts(task: str):
    """Components (tiny random-weight models, experts in a dict), Request and Inputs for pipeline.generate()."""
    import dataclasses as dc

    import numpy as np

    from wanmoe import pipeline as P
    from wanmoe.configs import PRESETS
    from wanmoe.encoders.audio import MelAudioEncoder
    from wanmoe.encoders.text import ByteTextEncoder
    from wanmoe.inputs import Inputs
    from wanmoe.models.dit import DiT
    from wanmoe.models.vae import WanVAE
    from wanmoe.request import make_request

    cfg = PRESETS[task]
    if cfg.dit.s2v is not None:  # the log-mel encoder yields one feature layer
        cfg = dc.replace(cfg, dit=dc.replace(cfg.dit, s2v=dc.replace(cfg.dit.s2v, num_audio_layers=1)))
    torch.manual_seed(70)
    text, vae = ByteTextEncoder(cfg.byte_text).eval(), WanVAE(cfg.vae).eval()
    experts = {}
    for i, name in enumerate(cfg.experts):
        torch.manual_seed(71 + i)
        experts[name] = DiT(cfg.dit).eval()
        with torch.no_grad():
            for p in experts[name].parameters():
                p.add_(0.05 * torch.randn_like(p))
    audio = MelAudioEncoder(cfg.mel) if cfg.audio_encoder == "mel" else None
    comp = P.Components(
        cfg=cfg, text_encoder=text, vae=vae, experts=experts, audio_encoder=audio, device=torch.device("cpu")
    )
    req = make_request(cfg, prompt="a cat", negative_prompt="blurry", size=(64, 64), seed=PIPE_SEED, steps=3,
                       solver="unipc", **({"infer_frames": 8, "num_clip": 2} if cfg.modality == "s2v"
                                          else {"frame_num": 5}))
    g = torch.Generator().manual_seed(72)
    inp = Inputs(
        image=torch.rand(3, 64, 64, generator=g) * 2 - 1,
        audio=(0.1 * torch.randn(16000, generator=g)).numpy().astype(np.float32),
        sr=16000,
    )
    return comp, req, inp


def check_pipeline(out: dict, checks: dict) -> None:
    import dataclasses as dc

    from wanmoe import pipeline as P
    from wanmoe.distributed.env import broadcast_seed
    from wanmoe.distributed.fsdp import apply_fsdp

    for name in ("ulysses", "fsdp", "ulysses_fsdp"):
        st, _ = _modes(dict(MODES[name], t5_fsdp=MODES[name].get("dit_fsdp", False)), name)
        for task in ("t2v-tiny", "s2v-tiny"):
            comp, req, inp = pipeline_parts(task)
            for model in comp.experts.values():
                _parallelise(model, st)
            if st.t5_fsdp:
                apply_fsdp(comp.text_encoder, st)
            # Each rank asks its own seed; rank 0's wins.
            req = dc.replace(req, seed=broadcast_seed(PIPE_SEED + 100 * st.rank, st))
            out[f"pipe_{task}_{name}"] = P.generate(comp, req, inp).video


def check_pipeline_wired(out: dict, checks: dict) -> None:
    """generate() with Components.parallel set, as the CLI wires it: CFG parallel inside pipeline.sample, and
    rank 0 alone decoding t2v (rank 1 returns an empty clip). Rank 0's video is broadcast so that every rank
    holds the same outputs; rank 1's own frame counts go to checks."""
    import dataclasses as dc

    from wanmoe import pipeline as P
    from wanmoe.distributed.env import broadcast_seed

    for name in ("cfgpar", "ulysses_fsdp"):
        st, _ = _modes(MODES[name], name)
        for task in ("t2v-tiny", "s2v-tiny"):
            comp, req, inp = pipeline_parts(task)
            for model in comp.experts.values():
                _parallelise(model, st)
            comp.parallel = st
            req = dc.replace(req, seed=broadcast_seed(PIPE_SEED + 100 * st.rank, st))
            video = P.generate(comp, req, inp).video
            checks[f"wired_{task}_{name}_frames"] = int(video.shape[1])
            box = [video]
            dist.broadcast_object_list(box, src=0)
            out[f"wired_{task}_{name}"] = box[0]


CHECKS = [
    check_collectives,
    check_ulysses_attention,
    check_fsdp_toy,
    check_cfg_parallel,
    check_flag_errors,
    check_t5_fsdp,
    check_t2v,
    check_s2v,
    check_pipeline,
    check_pipeline_wired,
]


def main() -> None:
    from safetensors.torch import save_file

    out_dir = Path(sys.argv[1])
    torch.set_num_threads(1)
    out: dict[str, Tensor] = {}
    checks: dict = {}
    for fn in CHECKS:
        fn(out, checks)
    # Per-rank facts, gathered to rank 0 as {"rank0": {...}, "rank1": {...}}.
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, checks)
    rank = dist.get_rank()
    if rank == 0:
        (out_dir / "checks.json").write_text(json.dumps({f"rank{i}": c for i, c in enumerate(every)}, indent=1))
        save_file({k: v.contiguous() for k, v in out.items()}, str(out_dir / "outputs.safetensors"))
    # Every rank must hold the same outputs (rank 1's are compared with rank 0's here).
    for k in sorted(out):
        ref = out[k].clone()
        dist.broadcast(ref, src=0)
        if not torch.equal(ref, out[k]):
            raise SystemExit(f"rank {rank}: output {k} differs from rank 0")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
