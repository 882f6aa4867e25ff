"""Per-step time of one guided denoising step (cond + uncond DiT passes) against world size and parallel mode.

    python benchmarks/parallel.py                       # world sizes 1 and 2, every mode, CPU (gloo)
    python benchmarks/parallel.py --worlds 1 2 4 --modes ulysses cfgpar --dim 512 --layers 8 --frames 9

Without RANK in the environment this script is the launcher: for each (mode, world) it runs itself under
`torchrun --standalone --nproc_per_node=world` and prints one table. Under torchrun it is the worker: it
builds a random-weight DiT (the t2v wiring at the chosen size), applies the mode with wanmoe.distributed,
runs warm-up steps, then times `--steps` steps; rank 0 prints a JSON line. On CPU each rank gets
cpu_count // world threads, so every row uses the same cores. On GPU (NCCL) world must not exceed the
number of visible GPUs.

Modes: single (world 1 only), ulysses (sequence parallel over all ranks), cfgpar (cond/uncond on two
ranks; world 2), fsdp (sharded weights, every rank computes everything: saves memory, not time),
ulysses_fsdp.
Axis legend: B batch, C channels, F latent frames, H/W latent height/width, S text tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace

MODES = {
    "single": {},
    "ulysses": {"ulysses": True},
    "cfgpar": {"cfg_parallel": True},
    "fsdp": {"dit_fsdp": True},
    "ulysses_fsdp": {"ulysses": True, "dit_fsdp": True},
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2], help="world sizes to run")
    p.add_argument(
        "--modes",
        nargs="+",
        default=["ulysses", "cfgpar", "fsdp"],
        choices=sorted(MODES),
        help="parallel modes for world > 1 (world 1 always runs 'single')",
    )
    p.add_argument("--dim", type=int, default=256, help="DiT width")
    p.add_argument("--heads", type=int, default=4, help="attention heads (must divide by the Ulysses size)")
    p.add_argument("--layers", type=int, default=4, help="DiT blocks")
    p.add_argument("--frames", type=int, default=5, help="latent frames F")
    p.add_argument("--size", type=int, default=32, help="latent height = width (tokens = F * (size/2)^2)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weight/compute dtype")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per rank (0: cpu_count // world)")
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)  # worker only
    return p.parse_args(argv)


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from wanmoe.distributed.env import broadcast_seed, cfg_parallel, destroy_parallel, init_parallel
    from wanmoe.distributed.fsdp import apply_fsdp
    from wanmoe.distributed.ulysses import apply_ulysses
    from wanmoe.models.dit import DIT_PRESETS, DiT

    flags = MODES[args.mode]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    st = init_parallel(
        ulysses_size=world if flags.get("ulysses") else 1,
        cfg_parallel=flags.get("cfg_parallel", False),
        dit_fsdp=flags.get("dit_fsdp", False),
        num_heads=args.heads,
    )
    if st.device.type == "cpu":
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // st.world))
    dtype = getattr(torch, args.dtype)
    cfg = replace(
        DIT_PRESETS["t2v-a14b-tiny"],
        dim=args.dim,
        ffn_dim=4 * args.dim,
        num_heads=args.heads,
        num_layers=args.layers,
        text_dim=64,
        text_len=32,
    )
    seed = broadcast_seed(0, st)
    torch.manual_seed(seed)
    model = DiT(cfg).eval().to(st.device, dtype)
    apply_ulysses(model, st)
    if st.dit_fsdp:
        apply_fsdp(model, st)
    g = torch.Generator().manual_seed(seed)  # CPU generator, then moved: same noise on every rank and device
    x = torch.randn(1, 16, args.frames, args.size, args.size, generator=g).to(st.device)
    ctx, neg = (torch.randn(1, 20, 64, generator=g).to(st.device, dtype) for _ in range(2))
    t = torch.tensor([900.0], device=st.device)

    def cond(x, s):
        return model(x, t, ctx)

    def uncond(x, s):
        return model(x, t, neg)

    step = cfg_parallel(cond, uncond, 5.0, st)
    sync = torch.cuda.synchronize if st.device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        for _ in range(args.warmup):
            step(x, t)
        sync()
        if st.world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(x, t)
        sync()
        dt = (time.perf_counter() - t0) / args.steps
    if st.is_main:
        tokens = args.frames * (args.size // 2) ** 2
        print(
            "RESULT "
            + json.dumps(
                {
                    "mode": args.mode,
                    "world": st.world,
                    "step_ms": 1000 * dt,
                    "tokens": tokens,
                    "device": str(st.device),
                    "threads": torch.get_num_threads(),
                }
            ),
            flush=True,
        )
    destroy_parallel(st)


def launch(args: argparse.Namespace, mode: str, world: int) -> dict | None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={world}",
        __file__,
        "--mode",
        mode,
        "--dim",
        str(args.dim),
        "--heads",
        str(args.heads),
        "--layers",
        str(args.layers),
        "--frames",
        str(args.frames),
        "--size",
        str(args.size),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--dtype",
        args.dtype,
        "--threads",
        str(args.threads),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads or max(1, (os.cpu_count() or 1) // world)))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    print(f"[{mode} world={world}] failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
    return None


def main() -> None:
    args = parse()
    if "RANK" in os.environ:
        worker(args)
        return
    rows = []
    for world in args.worlds:
        for mode in ["single"] if world == 1 else args.modes:
            if mode == "cfgpar" and world != 2:
                continue  # CFG parallel alone needs exactly two ranks
            r = launch(args, mode, world)
            if r:
                rows.append(r)
    base = next((r["step_ms"] for r in rows if r["world"] == 1), None)
    print(
        f"DiT dim {args.dim}, {args.layers} layers, {args.heads} heads, {rows[0]['tokens'] if rows else '?'} tokens, "
        f"{args.dtype}; one step = cond + uncond pass"
    )
    print(f"{'mode':<14}{'world':>6}{'step ms':>10}{'speedup':>9}  device (threads/rank)")
    for r in rows:
        sp = f"{base / r['step_ms']:.2f}x" if base else "-"
        print(f"{r['mode']:<14}{r['world']:>6}{r['step_ms']:>10.1f}{sp:>9}  {r['device']} ({r['threads']})")


if __name__ == "__main__":
    main()
