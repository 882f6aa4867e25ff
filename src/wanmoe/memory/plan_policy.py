"""Residency policies for one GPU, the modeled cost of streaming, the choice `--vram_gb` makes, and `wanmoe plan`.

A policy names where the experts live and in what precision (the phase model and the traces: `plan.py`):
- resident    : every expert stays on the GPU once loaded (bf16);
- offload     : the running expert on the GPU, the idle one in host memory (bf16; official --offload_model True);
- stream      : the running expert's non-block weights on the GPU, its transformer blocks copied from pinned host
                memory at most K at a time (`memory/stream.py`); umT5 runs on the CPU (t5_cpu); a step's guidance
                passes run as one batch, so every block crosses the bus once per step;
- stream+int8 : stream with weight-only int8 Linears (`memory/quantize.py`);
- resident+int8 and offload+int8: what `--int8` with `--vram_gb` chooses among.
All of them switch on the DiT's token chunks and the VAE's tiles (the loader does, on CUDA).

Streaming cost: bytes crossing the bus per step / a stated bandwidth, against the step's compute time = the step's
FLOPs (counted on meta by the same trace that gives the activation peak: matmuls, convolutions, attention, every
guidance pass) / a stated GPU throughput. The ratio is the overhead when copies do not overlap compute at all; the
block copies run on a side stream, so the exposed cost is smaller (zero while the bus time is the shorter one).

`--vram_gb N` takes the first policy, in the order resident > offload > stream (fastest first), whose predicted
peak fits N GB (tensor bytes, as torch.cuda.max_memory_allocated counts them: leave the CUDA context and the
allocator's slack out of N; on a 24 GB card that is about 22); int8 only when no bf16 policy fits (or with --int8).
No tensor axes are manipulated here.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace

from wanmoe.memory.offload import OffloadFlags
from wanmoe.memory.plan import GB, MemoryPlan, Residency, denoise_peak, plan_memory

__all__ = ["POLICIES", "DEFAULT_ROWS", "PCIE4_X16_GB_S", "RTX4090_BF16_TFLOPS", "ACHIEVED_FRACTION", "STREAM_AHEAD",
           "Assumptions", "Cost", "Choice", "DoesNotFit", "residency", "candidates", "streaming_cost",
           "choose_policy", "plan_json", "format_policy_rows", "FLAG_SETS", "OFFICIAL_1GPU_GB", "official_peak_gb",
           "format_rows", "main"]

# Host -> device bandwidth, GB/s: PCIe 4.0 x16 moves 31.5 GB/s raw per direction; pinned copies reach about 25
# (the figure issue 13 states for consumer boards).
PCIE4_X16_GB_S = 25.0
# Dense bf16 tensor-core peak of an RTX 4090 with fp32 accumulation, TFLOP/s (NVIDIA Ada GPU architecture
# whitepaper, RTX 4090 column: 165.2 dense, 330.4 with sparsity).
RTX4090_BF16_TFLOPS = 165.2
# Fraction of that peak a step sustains: an assumption (large bf16 GEMMs and fused attention commonly reach
# 50-70 %), not a measurement; `benchmarks/gpu_check.py` prints the achieved rate where a GPU is at hand.
ACHIEVED_FRACTION = 0.6
# K, the transformer blocks on the device at once under 'stream' (ExpertPool's stream_ahead default).
STREAM_AHEAD = 2

POLICIES: dict[str, Residency] = {
    "resident": Residency("resident"),
    "offload": Residency("offload"),
    "stream": Residency("stream", t5_cpu=True, batch_cfg=True),
    "resident+int8": Residency("resident", int8=True),
    "offload+int8": Residency("offload", int8=True),
    "stream+int8": Residency("stream", int8=True, t5_cpu=True, batch_cfg=True),
}
DEFAULT_ROWS = ("resident", "offload", "stream", "stream+int8")


# Official single-GPU peaks (GB), --offload_model True --convert_model_dtype, H100, as the Wan2.2 project publishes
# them in its computational-efficiency table. S2V has no published figure ("at least 80GB").
OFFICIAL_1GPU_GB: dict[tuple[str, str], float] = {
    ("t2v-A14B", "1280*720"): 59.8, ("t2v-A14B", "832*480"): 41.3,
    ("i2v-A14B", "1280*720"): 59.7, ("i2v-A14B", "832*480"): 41.0,
}


def official_peak_gb(task: str, size: str, flags: OffloadFlags) -> float | None:
    """The official measurement for this row, if one exists (sizes compare as an unordered pair)."""
    if not (flags.offload_model and flags.convert_model_dtype and not flags.t5_cpu):
        return None
    w, h = size.split("*")
    for (t, s), v in OFFICIAL_1GPU_GB.items():
        if t.lower() == task.lower() and sorted(s.split("*")) == sorted((w, h)):
            return v
    return None


FLAG_SETS: dict[str, OffloadFlags] = {
    "offload+bf16": OffloadFlags(offload_model=True, convert_model_dtype=True),
    "offload+bf16+t5_cpu": OffloadFlags(offload_model=True, convert_model_dtype=True, t5_cpu=True),
    "offload": OffloadFlags(offload_model=True),
    "resident+bf16": OffloadFlags(offload_model=False, convert_model_dtype=True),
}


def format_rows(plans: Sequence[MemoryPlan]) -> str:
    """The official flag sets, one row each, beside the official measurement where one exists."""
    head = (f"{'task':10s} {'size':9s} {'frames':>6s} {'flags':20s} {'tokens':>7s} {'weights GB':>10s} "
            f"{'text':>6s} {'denoise':>8s} {'decode':>7s} {'peak GB':>8s} {'official GB':>11s}")
    lines = [head, "-" * len(head)]
    for p in plans:
        flags = p.flags if isinstance(p.flags, OffloadFlags) else None
        name = next((k for k, v in FLAG_SETS.items() if v == flags), str(p.flags))
        off = official_peak_gb(p.task, p.size, flags) if flags is not None else None
        lines.append(
            f"{p.task:10s} {p.size:9s} {p.frames:6d} {name:20s} {p.tokens:7d} {sum(p.weights.values()) / GB:10.1f} "
            f"{p.phases['text'] / GB:6.1f} {denoise_peak(p) / GB:8.1f} {p.phases['decode'] / GB:7.1f} "
            f"{p.peak / GB:8.1f} {'' if off is None else f'{off:.1f}':>11s}")
    return "\n".join(lines)


class DoesNotFit(ValueError):
    """No allowed policy's predicted peak fits the budget (`request.make_options` turns it into an InputError)."""


@dataclass(frozen=True)
class Assumptions:
    bandwidth_gb_s: float = PCIE4_X16_GB_S
    peak_tflops: float = RTX4090_BF16_TFLOPS
    fraction: float = ACHIEVED_FRACTION
    stream_ahead: int = STREAM_AHEAD

    def to_json(self) -> dict:
        return {"bus_bandwidth_gb_s": self.bandwidth_gb_s, "gpu_peak_tflops": self.peak_tflops,
                "achieved_fraction": self.fraction, "effective_tflops": self.peak_tflops * self.fraction,
                "stream_ahead_blocks": self.stream_ahead,
                "sources": {"bandwidth": "PCIe 4.0 x16, pinned host memory (issue 13)",
                            "throughput": "RTX 4090 dense bf16, fp32 accumulate (NVIDIA Ada whitepaper)"},
                "units": "GB = 1e9 bytes; peaks are tensor bytes (torch.cuda.max_memory_allocated)"}


@dataclass(frozen=True)
class Cost:
    bus_bytes: int  # per step
    bus_s: float  # per step, at the stated bandwidth
    compute_s: float  # per step, at the stated throughput
    overhead: float  # bus_s / compute_s (0 when nothing streams)

    def to_json(self) -> dict:
        return {"fraction": self.overhead, "bytes_per_step": self.bus_bytes, "bus_s_per_step": self.bus_s,
                "compute_s_per_step": self.compute_s}


@dataclass(frozen=True)
class Choice:
    policy: str
    plan: MemoryPlan
    tried: tuple[tuple[str, int], ...]  # (policy, predicted peak bytes) in the order tried
    int8_fallback: bool  # int8 chosen because no bf16 policy fits (not because --int8 asked for it)


def residency(name: str, *, t5_cpu: bool = False, stream_ahead: int = STREAM_AHEAD, passes: int = 2) -> Residency:
    """The policy `name` with the user's t5_cpu (the stream policies always run umT5 on the CPU)."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    r = POLICIES[name]
    return replace(r, t5_cpu=r.t5_cpu or t5_cpu, stream_ahead=stream_ahead, passes=passes)


def candidates(offload_model: bool | None = None, int8: bool = False) -> tuple[str, ...]:
    """Policies `--vram_gb` may choose, fastest first. An explicit offload_model narrows them: False keeps every
    expert on the GPU (resident only), True keeps the idle one off it (not resident). Without int8, stream+int8
    comes last, taken only when nothing in bf16 fits; with int8 only int8 policies."""
    order = ("resident+int8", "offload+int8", "stream+int8") if int8 else ("resident", "offload", "stream",
                                                                          "stream+int8")
    if offload_model is False:
        return tuple(p for p in order if p.startswith("resident"))
    if offload_model is True:
        return tuple(p for p in order if not p.startswith("resident"))
    return order


def streaming_cost(plan: MemoryPlan, a: Assumptions = Assumptions()) -> Cost:
    compute = plan.step_flops / (a.peak_tflops * a.fraction * 1e12)
    bus = plan.bus_bytes / (a.bandwidth_gb_s * GB)
    return Cost(plan.bus_bytes, bus, compute, bus / compute if compute > 0 else 0.0)


def choose_policy(cfg, size: str, vram_gb: float, *, frames: int | None = None,  # noqa: ANN001
                  offload_model: bool | None = None, int8: bool = False, t5_cpu: bool = False, passes: int = 2,
                  stream_ahead: int = STREAM_AHEAD, cache: dict | None = None) -> Choice:
    """The fastest allowed policy whose predicted peak fits vram_gb; DoesNotFit (naming the smallest) otherwise.
    Plans are made lazily in order, so a generous budget costs one trace."""
    cache = {} if cache is None else cache  # the candidates share their models and traces
    tried: list[tuple[str, int]] = []
    plans: dict[str, MemoryPlan] = {}
    for name in candidates(offload_model, int8):
        r = residency(name, t5_cpu=t5_cpu, stream_ahead=stream_ahead, passes=passes)
        p = plan_memory(cfg, size, r, frames=frames, cache=cache)
        plans[name] = p
        tried.append((name, p.peak))
        if p.peak <= vram_gb * GB:
            return Choice(name, p, tuple(tried), int8_fallback=r.int8 and not int8)
    best = min(plans, key=lambda n: plans[n].peak)
    p = plans[best]
    phase = max(p.phases, key=p.phases.get)
    allowed = ", ".join(f"{n} {v / GB:.1f} GB" for n, v in tried)
    raise DoesNotFit(f"{vram_gb:g} GB is too little for {cfg.task} at {size}, {p.frames} frames: the smallest "
                     f"prediction is {best} at {p.peak / GB:.1f} GB (peak in phase {phase}); predicted: {allowed}")


def format_policy_rows(plans: Sequence[tuple[str, MemoryPlan]], a: Assumptions = Assumptions(),
                       vram_gb: float | None = None) -> str:
    head = (f"{'task':9s} {'size':9s} {'frames':>6s} {'policy':13s} {'text':>5s} {'encode':>6s} {'denoise':>7s} "
            f"{'decode':>6s} {'peak GB':>7s} {'bus GB/step':>11s} {'step s':>7s} {'stream %':>8s}"
            + (f" {'fits':>4s}" if vram_gb is not None else ""))
    lines = [head, "-" * len(head)]
    for name, p in plans:
        c = streaming_cost(p, a)
        enc = p.phases.get("vae_encode")
        row = (f"{p.task:9s} {p.size:9s} {p.frames:6d} {name:13s} {p.phases['text'] / GB:5.1f} "
               f"{'' if enc is None else f'{enc / GB:.1f}':>6s} {denoise_peak(p) / GB:7.1f} "
               f"{p.phases['decode'] / GB:6.1f} {p.peak / GB:7.1f} {c.bus_bytes / GB:11.1f} {c.compute_s:7.1f} "
               f"{100 * c.overhead:8.2f}")
        lines.append(row + (f" {'yes' if p.peak <= vram_gb * GB else 'no':>4s}" if vram_gb is not None else ""))
    return "\n".join(lines)


def plan_json(plans: Sequence[tuple[str, MemoryPlan]], a: Assumptions, vram_gb: float | None,
              choice: Choice | None, error: str | None = None, eight_bit: str = "int8") -> dict:
    """One JSON object: the chosen policy's phases, peak and streaming cost, every policy's, and the assumptions.
    eight_bit: what the 8-bit ("+int8") policies hold, "int8" or "fp8" (the same bytes)."""

    def one(p: MemoryPlan) -> dict:
        r = p.residency
        return {"peak_gb": p.peak / GB, "phases_gb": {k: v / GB for k, v in p.phases.items()},
                "expert_gpu_gb": {k: v / GB for k, v in p.expert_gpu.items()},
                "text_encoder": "cpu" if r.t5_cpu else "gpu", "int8": r.int8,
                "weights": eight_bit if r.int8 else "bf16", "cfg_batched": r.batch_cfg,
                "streaming": streaming_cost(p, a).to_json()}

    first = plans[0][1]
    out: dict = {"task": first.task, "size": first.size, "frames": first.frames, "tokens": first.tokens,
                 "step_flops": first.step_flops, "vram_gb": vram_gb,
                 "chosen": None if choice is None else choice.policy}
    if choice is not None:
        out.update(one(choice.plan), int8_fallback=choice.int8_fallback)
    if error is not None:
        out["error"] = error
    out["policies"] = {name: one(p) for name, p in plans}
    out["assumptions"] = a.to_json()
    return out


def _parser() -> argparse.ArgumentParser:
    from wanmoe.configs import PRESETS

    p = argparse.ArgumentParser(prog="wanmoe plan", description="Predicted peak GPU memory per phase and residency "
                                "policy, and the policy --vram_gb would choose (meta-device traces; no weights).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", action="append", choices=sorted(PRESETS), help="task(s) (default: the official ones)")
    p.add_argument("--size", action="append", help="W*H size(s) (default: 1280*720 and 832*480; S2V: 1024*704)")
    p.add_argument("--frames", type=int, default=None, help="pixel frames (default: the task's; S2V: per clip)")
    p.add_argument("--policy", action="append", choices=list(POLICIES), help=f"policies (default: {DEFAULT_ROWS})")
    p.add_argument("--flags", action="append", choices=sorted(FLAG_SETS),
                   help="official flag sets, as this engine ran them before the memory knobs (for comparison with "
                        "the official table; default: none unless no --policy/--vram_gb is given)")
    p.add_argument("--vram_gb", type=float, default=None, help="choose the fastest policy that fits this many GB")
    p.add_argument("--offload_model", choices=("true", "false"), default=None,
                   help="with --vram_gb: keep the idle expert off the GPU (true) or every expert on it (false)")
    p.add_argument("--int8", action="store_true", help="with --vram_gb: choose among int8 policies only")
    p.add_argument("--quant", choices=("int8", "fp8"), default=None,
                   help="with --vram_gb: choose among the 8-bit policies only, holding these weights (fp8 costs the "
                        "bytes of int8: the policies keep their +int8 names)")
    p.add_argument("--t5_cpu", action="store_true", help="umT5 on the CPU under every policy")
    p.add_argument("--json", action="store_true", help="print one JSON object (needs one task and one size)")
    p.add_argument("--bandwidth_gb_s", type=float, default=PCIE4_X16_GB_S, help="host->device bandwidth, GB/s")
    p.add_argument("--peak_tflops", type=float, default=RTX4090_BF16_TFLOPS, help="GPU dense bf16 peak, TFLOP/s")
    p.add_argument("--fraction", type=float, default=ACHIEVED_FRACTION, help="fraction of the peak a step sustains")
    p.add_argument("--stream_ahead", type=int, default=STREAM_AHEAD, help="K: blocks on the GPU at once (stream)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from wanmoe.configs import get_preset

    args = _parser().parse_args(argv)
    a = Assumptions(args.bandwidth_gb_s, args.peak_tflops, args.fraction, args.stream_ahead)
    if min(a.bandwidth_gb_s, a.peak_tflops, a.fraction) <= 0 or a.stream_ahead < 1 or (
            args.vram_gb is not None and args.vram_gb <= 0):
        print("error: --bandwidth_gb_s, --peak_tflops, --fraction, --vram_gb must be > 0 and --stream_ahead >= 1",
              file=sys.stderr)
        return 2
    tasks = args.task or ["t2v-A14B", "i2v-A14B", "s2v-14B"]
    if args.json and (len(tasks) != 1 or len(args.size or [None]) != 1):
        print("error: --json plans one task at one size: give --task once and --size at most once", file=sys.stderr)
        return 2
    offload = None if args.offload_model is None else args.offload_model == "true"
    if args.int8 and args.quant not in (None, "int8"):
        print(f"error: --int8 and --quant {args.quant} name different weights; give one of them", file=sys.stderr)
        return 2
    args.int8 = args.int8 or args.quant is not None  # 8-bit policies only
    names = args.policy or (list(candidates(offload, args.int8)) if args.vram_gb is not None else list(DEFAULT_ROWS))
    flag_rows = args.flags or ([] if args.policy or args.vram_gb is not None or args.json else list(FLAG_SETS))
    cache: dict = {}
    for task in tasks:
        cfg = get_preset(task)
        default_sizes = [cfg.default_size] if args.json else list(dict.fromkeys([cfg.default_size, "832*480"]))
        for size in args.size or default_sizes:
            plans = [(n, plan_memory(cfg, size, residency(n, t5_cpu=args.t5_cpu, stream_ahead=a.stream_ahead),
                                     frames=args.frames, cache=cache)) for n in names]
            choice, error = None, None
            if args.vram_gb is not None:
                try:
                    choice = choose_policy(cfg, size, args.vram_gb, frames=args.frames, offload_model=offload,
                                           int8=args.int8, t5_cpu=args.t5_cpu, stream_ahead=a.stream_ahead,
                                           cache=cache)
                except DoesNotFit as e:
                    error = str(e)
            if args.json:
                print(json.dumps(plan_json(plans, a, args.vram_gb, choice, error, args.quant or "int8"), indent=1))
                return 0 if error is None else 1
            print(format_policy_rows(plans, a, args.vram_gb))
            if args.vram_gb is not None:
                print(f"--vram_gb {args.vram_gb:g}: " + (error or f"{choice.policy} (predicted peak "
                                                                   f"{choice.plan.peak / GB:.1f} GB)"))
            print()
            if flag_rows:
                print(format_rows([plan_memory(cfg, size, FLAG_SETS[f], frames=args.frames, cache=cache)
                                   for f in flag_rows]))
                print()
    print(f"assumptions: bus {a.bandwidth_gb_s:g} GB/s, GPU {a.peak_tflops:g} TFLOP/s x {a.fraction:g}, "
          f"K = {a.stream_ahead}; peaks are tensor bytes (max_memory_allocated), GB = 1e9 bytes; 'stream %' = bus "
          "time / compute time per step, copies not overlapped")
    if flag_rows:
        print("official GB = measured process peak, H100, --offload_model True --convert_model_dtype (the Wan2.2 "
              "computational-efficiency table)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
