"""Peak process memory of two-expert sampling with and without the residency manager (issue 6).

Builds a medium two-expert DiT pair with random weights (dim 1024, 24 layers, ffn 4096: ~420M parameters per
expert), saves each in the official layout (config.json + safetensors) under a temporary folder, then runs every
configuration in a FRESH subprocess
(peak RSS only grows, so runs must not share a process) and reads the peak RSS of the child's own address space
(VmHWM; ru_maxrss is also printed, see peak_rss_kb). The latent is tiny (1 x 16 x 1 x 4 x 4: 4 tokens) so compute is
small and weights dominate. Sampling is the library path: flow sigmas -> Euler -> expert routing at the official
T2V boundary, with each expert fetched from an ExpertPool (experts load lazily from memory-mapped safetensors).

Usage: python benchmarks/memory.py [--steps 6] [--layers 24] [--workdir DIR]
Last line: two_over_one=<peak RSS of the two-expert run with the manager / peak RSS of a one-expert run>.

Axis legend: B batch, C channels, F latent frames, H/W latent height/width, S text tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

EXPERTS = ("high", "low")


def medium_config(layers: int):
    from wanmoe.models.dit import DiTConfig

    # text_len 16: the DiT zero-pads the prompt to text_len and cross-attends to all of it; 512 positions would
    # make the (weight-independent) cross-attention the dominant compute of this memory benchmark.
    return DiTConfig("t2v", 16, 16, dim=1024, ffn_dim=4096, num_heads=8, num_layers=layers, text_len=16)


def n_params(cfg) -> int:
    from wanmoe.models.dit import DiT

    with torch.device("meta"):
        return sum(p.numel() for p in DiT(cfg).parameters())


def prepare(workdir: Path, layers: int) -> None:
    """Random weights for both experts, official layout, fp32 (as the official A14B shards)."""
    from wanmoe.checkpoint import save_dit
    from wanmoe.memory.quantize import quantize_, save_quantized
    from wanmoe.models.dit import DiT

    cfg = medium_config(layers)
    for i, name in enumerate(EXPERTS):
        if (workdir / name / "config.json").is_file():
            continue
        torch.manual_seed(i)
        model = DiT(cfg)
        # init_weights zeroes the head: give it weights so outputs depend on every layer.
        torch.nn.init.normal_(model.head.head.weight, std=0.02)
        save_dit(model, workdir / name, max_shard_size=None, overwrite=True)
        quantize_(model, "int8")
        save_quantized(model, workdir / f"{name}.int8.safetensors")
        del model


def child(args: argparse.Namespace) -> None:
    """One configuration, in its own process: sample, print a JSON line with peak RSS and the output."""
    from wanmoe.checkpoint import load_dit
    from wanmoe.experts import ExpertSpec, route
    from wanmoe.memory.offload import ExpertPool
    from wanmoe.memory.quantize import load_quantized
    from wanmoe.models.dit import DiT
    from wanmoe.sampling.schedules import flow_sigmas
    from wanmoe.sampling.solvers import sample_euler

    torch.set_num_threads(2)
    work = Path(args.workdir)
    cfg = medium_config(args.layers)
    names = EXPERTS if args.experts == 2 else ("high",)

    def loader(name: str):
        if args.int8:
            return lambda: load_quantized(lambda: DiT(cfg), work / f"{name}.int8.safetensors")
        return lambda: load_dit(work / name)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 1, 4, 4, generator=g)  # (B, C, F, H, W)
    ctx = torch.randn(1, 8, cfg.text_dim, generator=g)  # (B, S, text_dim)
    sigmas = flow_sigmas(args.steps, 12.0)
    spec = ExpertSpec(names=names, boundary=(0.875,) if len(names) == 2 else ())
    pool = ExpertPool({n: loader(n) for n in names}, "cpu", args.policy)

    def denoiser(name: str):
        def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            t = torch.trunc(sigma * 1000).float().reshape(1)  # official timestep: trunc(sigma * 1000)
            return pool.get(name)(x, t, ctx)

        return denoise

    def hook(i: int, running: tuple[str, ...]) -> None:
        nxt = router.needs(i + 1)
        if args.prefetch and nxt and nxt != running:
            pool.prefetch(nxt[0])

    router = route({n: denoiser(n) for n in names}, spec, sigmas, hook=hook)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = sample_euler(router, x, sigmas)
    wall = time.perf_counter() - t0
    pool.close()
    steps = {n: sum(1 for w in router.plan if n in w) for n in names}
    print(json.dumps({"maxrss_kb": peak_rss_kb(), "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "wall_s": wall,
                      "steps": steps, "loads": pool.loads, "out": out.flatten().tolist()}))


def peak_rss_kb() -> int:
    """Peak RSS of this process image (VmHWM).

    ru_maxrss is not enough on its own here: Linux carries the pre-exec high-water mark across execve, so a child
    of a parent holding 2 GB reports at least 2 GB. VmHWM belongs to the new address space only. Both are
    printed; they agree whenever the parent is smaller than the child.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_child(workdir: Path, layers: int, steps: int, experts: int, policy: str, *, int8: bool = False,
              prefetch: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", "--workdir", str(workdir), "--layers", str(layers),
           "--steps", str(steps), "--experts", str(experts), "--policy", policy]
    cmd += ["--int8"] * int8 + ["--prefetch"] * prefetch
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"child {cmd} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def int8_over_bf16(cfg) -> float:
    """Weight bytes of the int8 expert over the bf16 expert (--convert_model_dtype), counted on meta."""
    from wanmoe.memory.offload import cast_
    from wanmoe.memory.quantize import quantize_, weight_bytes
    from wanmoe.models.dit import DiT

    with torch.device("meta"):
        bf16 = cast_(DiT(cfg), torch.bfloat16)
        q8 = quantize_(cast_(DiT(cfg), torch.bfloat16), "int8")
    return weight_bytes(q8) / weight_bytes(bf16)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    peak = b.abs().max()
    return float(10 * torch.log10(peak**2 / (a - b).pow(2).mean()))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--workdir", default=None, help="where the random experts are written (default: a temp dir)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--experts", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--policy", default="free", help=argparse.SUPPRESS)
    p.add_argument("--int8", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--prefetch", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        cfg = medium_config(args.layers)
        print(f"medium expert: {n_params(cfg) / 1e6:.0f}M parameters, fp32 on disk "
              f"({json.dumps(dataclasses.asdict(cfg))})")
        t0 = time.perf_counter()
        prepare(work, args.layers)
        disk = {n: (work / n / "diffusion_pytorch_model.safetensors").stat().st_size for n in EXPERTS}
        q8 = {n: (work / f"{n}.int8.safetensors").stat().st_size for n in EXPERTS}
        print(f"wrote experts in {time.perf_counter() - t0:.1f} s: fp32 {disk['high'] / 2**20:.0f} MiB each, "
              f"int8 {q8['high'] / 2**20:.0f} MiB each")
        rows = {
            "one expert": run_child(work, args.layers, args.steps, 1, "free"),
            "two experts, resident": run_child(work, args.layers, args.steps, 2, "resident"),
            "two experts, offload": run_child(work, args.layers, args.steps, 2, "offload"),
            "two experts, free + prefetch": run_child(work, args.layers, args.steps, 2, "free", prefetch=True),
            "two experts, int8, free": run_child(work, args.layers, args.steps, 2, "free", int8=True),
            "two experts, free": run_child(work, args.layers, args.steps, 2, "free"),
        }
        one = rows["one expert"]["maxrss_kb"]
        print(f"{'configuration':32s} {'peak RSS MiB':>12s} {'/ one':>7s} {'ru_maxrss MiB':>13s} {'wall s':>7s}  "
              "steps / loads")
        for k, r in rows.items():
            print(f"{k:32s} {r['maxrss_kb'] / 1024:12.0f} {r['maxrss_kb'] / one:7.3f} {r['ru_maxrss_kb'] / 1024:13.0f} "
                  f"{r['wall_s']:7.1f}  {r['steps']} / {r['loads']}")
        ref = torch.tensor(rows["two experts, resident"]["out"])
        for k in ("two experts, offload", "two experts, free", "two experts, free + prefetch"):
            same = torch.equal(torch.tensor(rows[k]["out"]), ref)
            print(f"output of '{k}' identical to resident: {same}")
        print(f"int8 file / fp32 file: {q8['high'] / disk['high']:.3f}; int8 weights / bf16 weights (same model, "
              f"float parts bf16 except the declared fp32 modules): {int8_over_bf16(cfg):.3f}")
        print(f"int8 vs float output PSNR (two experts, {args.steps} steps): "
              f"{psnr(torch.tensor(rows['two experts, int8, free']['out']), ref):.1f} dB")
        print(f"two_over_one_resident={rows['two experts, resident']['maxrss_kb'] / one:.3f}")
        print(f"two_over_one={rows['two experts, free']['maxrss_kb'] / one:.3f}")


if __name__ == "__main__":
    main()
