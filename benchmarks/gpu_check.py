"""GPU check (issue 13): full-size random-weight experts, two denoising steps per task, size and residency policy;
seconds per step, the measured peak and the planner's prediction side by side.

    python benchmarks/gpu_check.py             # CUDA: S2V-14B and T2V-A14B at 832*480 and 1280*720 (S2V 1024*704)
    python benchmarks/gpu_check.py --reduced   # CPU, tiny models: the same code path in seconds (CI)

On CUDA every expert is built in bf16 directly on the device (meta build, `numerics.cast_`, `to_empty`, random
normal weights: no files) with the memory knobs the loader switches on (`loading.enable_frugal`), then parked in
host memory. Each row hands the experts to a fresh `ExpertPool` under the policy (stream+int8: the experts are
quantized by `quantize_` on the device first) and runs one step per expert as the pipeline runs it: guidance passes
batched under stream, two forwards otherwise (S2V-14B has one expert: two steps with it). Reported:
  s/step  : the mean of the two steps, each timed after its expert was fetched (steady state; `switch s` is the
            fetch of the second expert: a swap under offload, the non-block parts under stream);
  peak GB : torch.cuda.max_memory_allocated over the whole row (GB = 1e9 bytes);
  plan GB : the planner's denoise peak for the same policy, size and frames, less the VAE (no VAE runs here);
  TFLOP/s : the step's FLOPs (the planner's count) over s/step.
Each row runs in try/except OutOfMemoryError (an OOM is a result row); memory is freed and the peak reset between
rows, and so is PyTorch's cache of pinned host memory (it keeps freed pinned blocks, rounded up to powers of two;
on a 128 GB host the cached pins of earlier rows once ran the process out of memory). The status column reports
the pinned host bytes held after each row. At the default frame count (41; S2V 40) the S2V-14B rows took about
6 minutes on an H200 and the T2V-A14B rows as long again (at 81 frames the attention alone grows 4x): give a short
lease `--task` or `--budget_s`, which skips rows that would start after that many seconds. `--frames 81` plans and
runs the issue's length. In `--reduced` mode (CPU) the seconds mean nothing, `peak` counts the tensors
created during the steps (activations and block copies; a live-bytes tracker), `plan` the planner's prediction of
that part (in MB), and their ratio is no check: the CPU's SDPA may take its math path, which materialises the scores
the planner (fused kernels) leaves out.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

from wanmoe import numerics
from wanmoe.configs import get_preset
from wanmoe.loading import enable_frugal
from wanmoe.memory.offload import ExpertPool
from wanmoe.memory.plan import GB, LiveBytes, MemoryPlan, _dit_inputs, plan_memory
from wanmoe.memory.plan_policy import DEFAULT_ROWS, STREAM_AHEAD, residency
from wanmoe.memory.quantize import quantize_, set_int8_activations
from wanmoe.models.attention import flash_available
from wanmoe.models.dit import DiT

FULL = {"s2v-14B": ("832*480", "1024*704"), "t2v-A14B": ("832*480", "1280*720")}
REDUCED = {"s2v-tiny": ("64*64", "128*64"), "t2v-tiny": ("64*64", "128*64")}
DTYPE = torch.bfloat16


def build_expert(cfg, device: torch.device, seed: int) -> nn.Module:  # noqa: ANN001 (DiTConfig)
    """A random-weight expert in bf16 (fp32 modules kept, as the loader casts) made on `device` itself."""
    with torch.device("meta"):
        m = numerics.cast_(DiT(cfg), DTYPE)
    m = m.to_empty(device=device)  # no fp32 copy ever exists on the device
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.02, generator=g)  # ~ the xavier scale of a 5120-wide layer; values do not matter here
    enable_frugal(dit=m)  # as the loader does on CUDA
    return m.eval().requires_grad_(False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        # Pinned host memory freed by a row stays in PyTorch's host cache (blocks rounded up to a power of two):
        # without this the next row's or task's host copies ran a 128 GB host out of memory.
        empty_host = getattr(torch._C, "_accelerator_emptyHostCache", None) or getattr(torch._C, "_host_emptyCache",
                                                                                       None)
        if empty_host is not None:
            empty_host()


def host_pinned_gb() -> float:
    """Pinned host bytes PyTorch's host allocator holds now (allocated and cached), GB; nan where not reported."""
    try:
        stats = torch.cuda.host_memory_stats()
    except (AttributeError, RuntimeError):
        return float("nan")
    return stats.get("allocated_bytes.current", float("nan")) / GB  # active + cached pinned blocks, rounded up


def predicted(plan: MemoryPlan, reduced: bool) -> float:
    """The planner's number for what this check measures (see the module docstring), GB."""
    denoise = max(v for k, v in plan.phases.items() if k.startswith("denoise:")) - plan.weights["vae"]
    if not reduced:
        return denoise / GB
    blocks = STREAM_AHEAD * plan.block_bytes if plan.residency.experts == "stream" else 0
    return (plan.dit_activation + blocks) / GB


def run_row(cfg, experts: dict[str, nn.Module], policy: str, size: str, frames: int, device: torch.device,  # noqa: ANN001
            reduced: bool, warmup: bool, staging: int = 0) -> dict:
    """Two denoising steps under `policy`; the timings, the switch and the peak (raises OutOfMemoryError)."""
    res = residency(policy)
    w, h = (int(v) for v in size.split("*"))
    steps = list(cfg.experts) if len(cfg.experts) > 1 else [cfg.experts[0]] * 2
    batch = res.passes if res.batch_cfg else 1
    forward = _dit_inputs(cfg, frames, w, h, batch, device=device, dtype=DTYPE)
    # Resident experts cross the bus once, untimed: not pinning them saves the run ~5 s per expert and row.
    pool = ExpertPool({n: (lambda m=m: m) for n, m in experts.items()}, device, res.experts,
                      stream_ahead=STREAM_AHEAD, pin_memory=None if res.experts != "resident" else False,
                      stream_staging=staging if res.experts == "stream" else 0)
    times, switch = [], 0.0
    tracker = LiveBytes() if reduced else None
    try:
        with torch.no_grad(), tracker if tracker is not None else contextlib.nullcontext():
            if warmup:  # kernels, cuBLAS handles, autotuning: not part of any timing
                forward(pool.get(steps[0]))
                _sync(device)
            for i, name in enumerate(steps):
                t0 = time.perf_counter()
                model = pool.get(name)
                _sync(device)
                if i == 1:
                    switch = time.perf_counter() - t0
                t0 = time.perf_counter()
                for _ in range(res.passes // batch):
                    out = forward(model)
                    del out
                _sync(device)
                times.append(time.perf_counter() - t0)
        peak = tracker.peak if tracker is not None else torch.cuda.max_memory_allocated(device)
        pinned = host_pinned_gb() if device.type == "cuda" else float("nan")
    finally:
        pool.offload_all()  # every expert back to host memory (and un-streamed) for the next row
        pool.close()
        del pool
    return {"s_per_step": sum(times) / len(times), "steps_s": times, "switch_s": switch, "peak_gb": peak / GB,
            "host_pinned_gb": pinned}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--reduced", action="store_true", help="CPU, tiny models (CI): the code path, not the numbers")
    p.add_argument("--frames", type=int, default=None, help="pixel frames (default: 41, S2V 40; reduced: the task's)")
    p.add_argument("--policy", action="append", choices=DEFAULT_ROWS, help=f"policies (default: {DEFAULT_ROWS})")
    p.add_argument("--task", action="append", help="tasks (default: s2v-14B, t2v-A14B; reduced: the tiny ones)")
    p.add_argument("--size", action="append", help="W*H sizes (default: the two of each task listed above)")
    p.add_argument("--budget_s", type=float, default=450.0, help="start no row after this many seconds")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--int8_activations", action="store_true",
                   help="int8 rows also quantize activations and multiply int8 by int8 (torch._int_mm)")
    p.add_argument("--fp8", action="store_true",
                   help="the +int8 rows hold fp8 (e4m3) weights instead (the same bytes; on GPUs with fp8 tensor "
                        "cores the product runs in fp8)")
    p.add_argument("--staging", type=int, default=0,
                   help="stream rows copy blocks through this many pinned staging buffers instead of pinning the "
                        "experts (wanmoe.memory.stream, 'Staging ring'; 0: pin them)")
    a = p.parse_args(argv)
    t_start = time.perf_counter()
    if not a.reduced and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --reduced on a CPU)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if a.reduced else "cuda")
    table = REDUCED if a.reduced else FULL
    tasks = a.task or list(table)
    # int8 rows last: quantizing replaces the experts' bf16 weights.
    policies = sorted(set(a.policy or DEFAULT_ROWS), key=DEFAULT_ROWS.index)
    gpu = "cpu" if a.reduced else torch.cuda.get_device_name(device)
    print(f"gpu_check: device {gpu}, torch {torch.__version__}, flash-attn "
          f"{'available' if flash_available() else 'not installed (SDPA)'}, K = {STREAM_AHEAD}, bf16"
          + (f", stream rows through a staging ring of {a.staging} pinned buffers" if a.staging else "")
          + (", +int8 rows in fp8 (e4m3)" if a.fp8 else ""))
    unit = "MB" if a.reduced else "GB"  # the tiny models' numbers are a few MB
    head = (f"{'task':9s} {'size':9s} {'frames':>6s} {'policy':12s} {'s/step':>8s} {'switch s':>8s} "
            f"{'peak ' + unit:>8s} {'plan ' + unit:>8s} {'peak/plan':>9s} {'TFLOP/s':>8s} status")
    print(head)
    print("-" * len(head))
    rows, cache = [], {}
    for task in tasks:
        cfg = get_preset(task)
        sizes = a.size or table.get(task, (cfg.default_size,))
        if a.frames is not None:
            frames = a.frames
        elif a.reduced:
            frames = cfg.infer_frames if cfg.modality == "s2v" else cfg.frame_num
        else:
            frames = 40 if cfg.modality == "s2v" else 41
        experts = {n: build_expert(cfg.dit, device, i).to("cpu") for i, n in enumerate(cfg.experts)}
        _free(device)
        quantized = False
        for policy in policies:
            if policy.endswith("+int8") and not quantized:
                for m in experts.values():  # on the device: quantizing 14B weights on the host takes minutes
                    q = quantize_(m.to(device), "fp8" if a.fp8 else "int8")
                    set_int8_activations(q, a.int8_activations)
                    q.to("cpu")
                _free(device)
                quantized = True
            for k, size in enumerate(sizes):
                row = {"task": task, "size": size, "frames": frames, "policy": policy,
                       "staging": a.staging if policy.startswith("stream") else 0}
                plan = plan_memory(cfg, size, residency(policy, t5_cpu=True), frames=frames, cache=cache)
                row["plan_gb"] = predicted(plan, a.reduced)
                if time.perf_counter() - t_start > a.budget_s:
                    row["status"] = "skipped (time budget)"
                else:
                    try:
                        row.update(run_row(cfg, experts, policy, size, frames, device, a.reduced,
                                           warmup=policy == policies[0] or (policy.endswith("int8") and k == 0),
                                           staging=a.staging))
                        row["status"] = "ok" if math.isnan(row["host_pinned_gb"]) else \
                            f"ok (pinned host {row['host_pinned_gb']:.1f} GB)"
                        row["tflops"] = plan.step_flops / row["s_per_step"] / 1e12
                    except torch.cuda.OutOfMemoryError as e:
                        row["status"] = f"OOM ({str(e).splitlines()[0][:60]})"
                    except Exception as e:  # noqa: BLE001 (one broken row must not hide the others' results)
                        row["status"] = f"error ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})"
                _free(device)
                rows.append(row)
                print(_format(row, 1e3 if a.reduced else 1.0), flush=True)
        del experts
        _free(device)
    ok = [r for r in rows if r["status"].startswith("ok")]
    worst = max((abs(r["peak_gb"] / r["plan_gb"] - 1) for r in ok if r["plan_gb"] > 0), default=float("nan"))
    if a.json:
        Path(a.json).write_text(json.dumps({"device": gpu, "flash_attn": flash_available(), "rows": rows}, indent=1))
    print(f"SUMMARY gpu_check: {len(rows)} rows, {len(ok)} ok, {sum(r['status'].startswith('OOM') for r in rows)} OOM, "
          f"{sum(r['status'].startswith('skipped') for r in rows)} skipped; largest |peak/plan - 1| = {worst:.3f}; "
          f"flash_attn={'yes' if flash_available() else 'no'}; {time.perf_counter() - t_start:.0f} s")
    return 0 if len(ok) == len(rows) or not a.reduced else 1


def _format(r: dict, scale: float) -> str:
    def num(key: str, fmt: str, k: float = 1.0) -> str:
        v = r.get(key)
        return format(v * k, fmt) if isinstance(v, float) and math.isfinite(v) else f"{'-':>{int(fmt.split('.')[0])}s}"

    ratio = r["peak_gb"] / r["plan_gb"] if r.get("peak_gb") is not None and r["plan_gb"] > 0 else float("nan")
    return (f"{r['task']:9s} {r['size']:9s} {r['frames']:6d} {r['policy']:12s} {num('s_per_step', '8.3f')} "
            f"{num('switch_s', '8.3f')} {num('peak_gb', '8.3f', scale)} {num('plan_gb', '8.3f', scale)} "
            f"{format(ratio, '9.3f') if math.isfinite(ratio) else '-':>9s} {num('tflops', '8.2f')} {r['status']}")


if __name__ == "__main__":
    raise SystemExit(main())
