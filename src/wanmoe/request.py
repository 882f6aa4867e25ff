"""A generation request: the task's preset plus keyword overrides, validated in one place, before any work.

`make_request(cfg, **overrides) -> Request` is the only place sampling settings are defaulted and checked;
`make_options(cfg, **overrides) -> LoadOptions` does the same for how the models are loaded (device, offload,
precision, parallel flags). Nothing here knows argparse: errors are `InputError(field, detail)` (a ValueError)
naming the keyword, and the CLI translates the keyword into its flag name (`steps` -> `--sample_steps`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from wanmoe import experts as ex
from wanmoe.configs import PipelineConfig
from wanmoe.distributed.env import validate_parallel_flags
from wanmoe.sampling.guidance import per_expert_scale
from wanmoe.sampling.schedules import SOLVERS, SPACINGS

log = logging.getLogger(__name__)

MAX_SIDE = 4096  # pixels; beyond this no preset or GPU of today is meant to go
MAX_SEED = 2**63 - 1


class InputError(ValueError):
    """A bad input: `field` is the keyword (request/load option or input name), `detail` says what is allowed."""

    def __init__(self, field: str, detail: str) -> None:
        self.field, self.detail = field, detail
        super().__init__(f"{field} {detail}")


# S2V: what each clip after the first starts from. "frames": the newest decoded frames of the clip before, as
# motion frames (official: the clips join up, but errors and colour casts carry over from clip to clip);
# "reference": the reference image, as the first clip does (no motion frames, and the first clip's noise: each clip
# is drawn afresh from the reference, that noise and its own audio, so nothing accumulates, and the clips need not
# join up smoothly).
CLIP_CONTEXTS = ("frames", "reference")


@dataclass(frozen=True)
class Request:
    """Every sampling setting of one generation, validated (the JSON sidecar is written from it)."""

    task: str
    prompt: str
    negative_prompt: str
    size: tuple[int, int]  # (W, H) in pixels
    frame_num: int  # t2v/i2v pixel frames (4n + 1); s2v: unused, the audio sets the length
    seed: int
    steps: int
    shift: float
    solver: str
    guide_scale: dict[str, float]  # per expert, by name
    experts: ex.ExpertSpec
    noise_schedule: str = "linear"
    motion_scale: float = 1.0  # s2v audio guidance (1 = plain conditioning)
    num_clip: int | None = None  # s2v: at most this many clips (None: as many as the audio fills)
    infer_frames: int = 80  # s2v pixel frames per clip
    start_from_ref: bool = False  # s2v: the first clip's motion frames are the reference image
    clip_context: str = "frames"  # s2v: what a clip after the first starts from (CLIP_CONTEXTS)
    cache: float | None = None  # step caching threshold (accumulated |1 - ratio|); None = off (the official path)
    cache_max_skips: int = 2  # consecutive skipped evaluations at most, per expert
    batch_cfg: bool = False  # guidance passes of a step in one batch (one transformer call); off = official order

    @property
    def size_str(self) -> str:
        return f"{self.size[0]}*{self.size[1]}"

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["experts"] = {"names": list(self.experts.names), "thresholds": list(self.experts.thresholds),
                        "boundary": list(self.experts.boundary), "blend": self.experts.blend,
                        "cuts_log_snr": list(self.experts.cuts)}
        return json.loads(json.dumps(d, default=str))


@dataclass(frozen=True)
class LoadOptions:
    """How the models are loaded and where they run (the sidecar records these too)."""

    ckpt_dir: str | None = None  # None: the embedded weights of an embedded task
    device: str = "cpu"
    offload_model: bool = True  # keep idle experts off the compute device
    t5_cpu: bool = False
    convert_model_dtype: bool = False  # DiT weights in bf16 (fp32 modules kept; wanmoe.numerics)
    int8: bool = False  # weight-only int8 experts
    compile: bool = False  # torch.compile each expert (measured in docs/performance.md; off by default)
    ulysses_size: int = 1
    cfg_parallel: bool = False
    dit_fsdp: bool = False
    t5_fsdp: bool = False
    vram_gb: float | None = None  # GPU memory budget the residency policy was planned for (None: not planned)
    policy: str | None = None  # residency policy chosen for vram_gb (wanmoe.memory.plan_policy); None: offload_model
    plan_size: str | None = None  # the size, frames and guidance passes the policy was planned at
    plan_frames: int | None = None
    plan_passes: int = 2
    stream_staging: int = 0  # under a stream policy: pinned staging buffers instead of pinned experts (0: pin them)
    int8_activations: bool = False  # with int8: quantize activations per token too, int8 x int8 matmuls
    # 8-bit expert weights (check_quant): "int8" / "fp8" for every expert, or per expert as "high=fp8,low=none";
    # None: none. int8=True is quant "int8".
    quant: str | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def _modes(self) -> dict[str, str | None]:
        return quant_modes(self.quant or ("int8" if self.int8 else None))  # int8=True alone still means int8

    def expert_quant(self, name: str) -> str | None:
        """The 8-bit mode of expert `name` ("int8", "fp8") or None (float weights)."""
        modes = self._modes()
        return modes.get(name, modes.get("*"))

    @property
    def all_quantized(self) -> bool:
        """Every expert has 8-bit weights (what the planner's 8-bit policies assume: int8 and fp8 cost the same)."""
        modes = self._modes()
        return bool(modes) and all(m is not None for m in modes.values())


# ------------------------------------------------------------------------------------------------ checks


def check_int(field: str, v: object, lo: int, hi: int, what: str = "an integer") -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer() and math.isfinite(v):
            v = int(v)
        else:
            raise InputError(field, f"must be {what} in [{lo}, {hi}], got {v!r}")
    if not lo <= v <= hi:
        raise InputError(field, f"must be {what} in [{lo}, {hi}], got {v}")
    return v


def check_float(field: str, v: object, lo: float, hi: float, *, open_lo: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InputError(field, f"must be a number, got {v!r}")
    v = float(v)
    low_ok = v > lo if open_lo else v >= lo
    if not (math.isfinite(v) and low_ok and v <= hi):
        rng = f"({lo:g}, {hi:g}]" if open_lo else f"[{lo:g}, {hi:g}]"
        raise InputError(field, f"must be a finite number in {rng}, got {v}")
    return v


def check_choice(field: str, v: object, choices: tuple[str, ...] | list[str]) -> str:
    if v not in choices:
        raise InputError(field, f"must be one of {', '.join(choices)}, got {v!r}")
    return str(v)


def parse_size(field: str, size: object, multiple: int) -> tuple[int, int]:
    """'W*H' or (W, H) -> (W, H); both positive multiples of `multiple` (VAE stride x patch size), <= MAX_SIDE."""
    if isinstance(size, str):
        parts = size.split("*")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise InputError(field, f"must look like W*H (for example 1280*720), got {size!r}")
        wh = (int(parts[0]), int(parts[1]))
    elif isinstance(size, (tuple, list)) and len(size) == 2:
        wh = (check_int(field, size[0], 1, MAX_SIDE, "a width"), check_int(field, size[1], 1, MAX_SIDE, "a height"))
    else:
        raise InputError(field, f"must be 'W*H' or a (W, H) pair, got {size!r}")
    w, h = wh
    if not (0 < w <= MAX_SIDE and 0 < h <= MAX_SIDE) or w % multiple or h % multiple:
        raise InputError(field, f"{w}*{h}: width and height must be multiples of {multiple} (VAE stride x patch "
                                f"size) between {multiple} and {MAX_SIDE}")
    return w, h


def _guidance(v: object, names: tuple[str, ...]) -> dict[str, float]:
    if isinstance(v, Mapping):
        unknown = sorted(set(v) - set(names))
        if unknown:
            raise InputError("guide_scale", f"names unknown experts {unknown}; this task has {list(names)}")
        vals = {str(k): check_float("guide_scale", x, 0.0, 100.0) for k, x in v.items()}
    else:
        vals = check_float("guide_scale", v, 0.0, 100.0)
    try:
        return per_expert_scale(vals, names)
    except ValueError as e:
        raise InputError("guide_scale", str(e)) from e


QUANT_MODES = ("int8", "fp8")
FLOAT_WEIGHTS = ("", "none", "float")  # spellings of "no 8-bit weights" (--quant, the web form, the HTTP field)


def quant_modes(spec: str | None) -> dict[str, str | None]:
    """A normalized quant spec -> {expert name or "*": mode or None}."""
    if not spec:
        return {}
    if "=" not in spec:
        return {"*": spec}
    return {k: (None if v == "none" else v) for k, _, v in (p.partition("=") for p in spec.split(","))}


def check_quant(quant: object, names: tuple[str, ...], int8: bool = False) -> str | None:
    """8-bit expert weights -> the normalized spec LoadOptions keeps, or InputError('quant').

    quant: None (or "none" / "float"), "int8" / "fp8" (every expert), per expert as a mapping {"high": "fp8", "low":
    None} or the string "high=fp8,low=none" (experts not named keep float weights). int8=True (the --int8 flag)
    means "int8"."""
    if quant is None or quant in FLOAT_WEIGHTS or quant == {}:
        return "int8" if int8 else None
    if isinstance(quant, str) and "=" in quant:
        pairs = [p.partition("=") for p in quant.split(",")]
        if any(not k.strip() or not sep for k, sep, _ in pairs):
            raise InputError("quant", f"per expert it looks like high=fp8,low=int8; got {quant!r}")
        quant = {k.strip(): v.strip() for k, _, v in pairs}
    if isinstance(quant, Mapping):
        unknown = sorted(set(map(str, quant)) - set(names))
        if unknown:
            raise InputError("quant", f"names unknown experts {unknown}; this task has {list(names)}")
        modes = {n: quant.get(n) for n in names}
        modes = {n: None if m is None or m in FLOAT_WEIGHTS else check_choice("quant", m, QUANT_MODES)
                 for n, m in modes.items()}
    else:
        modes = dict.fromkeys(names, check_choice("quant", quant, QUANT_MODES))
    if int8 and set(modes.values()) != {"int8"}:
        raise InputError("quant", f"int8 asks for int8 on every expert; quant says {modes} (give one of them)")
    if set(modes.values()) == {None}:
        return None
    if len(set(modes.values())) == 1:
        return next(iter(modes.values()))
    return ",".join(f"{n}={m or 'none'}" for n, m in modes.items())


# ------------------------------------------------------------------------------------------------ builders


def make_request(
    cfg: PipelineConfig,
    *,
    prompt: str | None = None,
    negative_prompt: str | None = None,
    size: str | tuple[int, int] | None = None,
    frame_num: int | None = None,
    seed: int | None = None,
    steps: int | None = None,
    shift: float | None = None,
    solver: str | None = None,
    guide_scale: float | Mapping[str, float] | None = None,
    boundary: float | None = None,
    threshold: float | None = None,
    blend: float = 0.0,
    noise_schedule: str = "linear",
    motion_scale: float | None = None,
    num_clip: int | None = None,
    infer_frames: int | None = None,
    start_from_ref: bool = False,
    clip_context: str | None = None,
    cache: float | None = None,
    cache_max_skips: int = 2,
    batch_cfg: bool = False,
) -> Request:
    """The task's preset with these overrides (None = the task's value), validated; raises InputError."""
    s2v = cfg.modality == "s2v"
    if not s2v:
        # Refuse rather than silently ignore: a t2v/i2v run has no clips or motion frames to apply these to.
        given = {"num_clip": num_clip, "infer_frames": infer_frames, "start_from_ref": start_from_ref or None,
                 "motion_scale": motion_scale, "clip_context": clip_context}
        bad = [k for k, v in given.items() if v is not None]
        if bad:
            raise InputError(bad[0], f"only applies to s2v tasks, not {cfg.task}")
    elif frame_num is not None:
        raise InputError("frame_num", f"does not apply to {cfg.task}: the audio sets the length "
                                      "(use infer_frames and num_clip)")
    if prompt is None:
        prompt = cfg.example_prompt
        example = cfg.example_files()["prompt"] if cfg.embedded else None
        if example is not None and example.is_file():
            prompt = example.read_text().strip()
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("prompt", "is empty: give a prompt, or leave it out to use the task's example prompt")
    negative_prompt = cfg.neg_prompt if negative_prompt is None else negative_prompt
    if not isinstance(negative_prompt, str):
        raise InputError("negative_prompt", f"must be a string, got {negative_prompt!r}")
    wh = parse_size("size", cfg.default_size if size is None else size, cfg.size_multiple)
    if cfg.sizes and not s2v and f"{wh[0]}*{wh[1]}" not in cfg.sizes:
        raise InputError("size", f"{wh[0]}*{wh[1]} is not supported by {cfg.task}; "
                                 f"choose one of {', '.join(cfg.sizes)}")
    frames = cfg.frame_num if frame_num is None else check_int("frame_num", frame_num, 1, 1001)
    if (frames - 1) % cfg.vae_stride[0]:
        raise InputError("frame_num", f"must be 4n+1 (5, 9, ..., 81), got {frames}")
    inf = cfg.infer_frames if infer_frames is None else check_int("infer_frames", infer_frames, 4, 1000)
    if inf % cfg.vae_stride[0]:
        raise InputError("infer_frames", f"must be a positive multiple of 4, got {inf}")
    if seed is None or (not isinstance(seed, bool) and isinstance(seed, int) and seed == -1):
        seed = random.randint(0, sys.maxsize)  # -1 (official) or None: a random seed, recorded in the sidecar
    seed = check_int("seed", seed, 0, MAX_SEED, "-1 (random) or an integer")
    n_steps = cfg.sample_steps if steps is None else check_int("steps", steps, 1, 1000)
    sh = cfg.sample_shift if shift is None else check_float("shift", shift, 0.0, 100.0, open_lo=True)
    sol = check_choice("solver", cfg.sample_solver if solver is None else solver, tuple(SOLVERS))
    sched = check_choice("noise_schedule", noise_schedule, tuple(SPACINGS))
    if boundary is not None:
        boundary = check_float("boundary", boundary, 0.0, 1.0, open_lo=True)
        if boundary >= 1.0:
            raise InputError("boundary", f"must lie in (0, 1), got {boundary}")
    if threshold is not None:
        threshold = check_float("threshold", threshold, -50.0, 50.0)
    blend = check_float("blend", blend, 0.0, 50.0)
    try:
        spec = cfg.expert_spec(boundary, threshold, blend)
    except ValueError as e:
        field = "threshold" if threshold is not None else "boundary" if boundary is not None else "blend"
        raise InputError(field, f"cannot be applied: {e}") from e
    scales = _guidance(cfg.guide_scale if guide_scale is None else guide_scale, spec.names)
    ms = cfg.motion_scale if motion_scale is None else check_float("motion_scale", motion_scale, 0.0, 20.0)
    nc = None if num_clip is None else check_int("num_clip", num_clip, 1, 10000)
    if cache is not None:
        cache = check_float("cache", cache, 0.0, 10.0, open_lo=True)
    cache_max_skips = check_int("cache_max_skips", cache_max_skips, 1, 10)
    if not isinstance(batch_cfg, bool):
        raise InputError("batch_cfg", f"must be true or false, got {batch_cfg!r}")
    if not isinstance(start_from_ref, bool):
        raise InputError("start_from_ref", f"must be true or false, got {start_from_ref!r}")
    context = check_choice("clip_context", cfg.clip_context if clip_context is None else clip_context, CLIP_CONTEXTS)
    return Request(task=cfg.task, prompt=prompt, negative_prompt=negative_prompt, size=wh, frame_num=frames,
                   seed=seed, steps=n_steps, shift=sh, solver=sol, guide_scale=scales, experts=spec,
                   noise_schedule=sched, motion_scale=ms, num_clip=nc, infer_frames=inf, start_from_ref=start_from_ref,
                   clip_context=context, cache=cache, cache_max_skips=cache_max_skips, batch_cfg=batch_cfg)


NOT_YET = "is not supported in a single process; run under torchrun (see docs/distributed.md)"


def check_device(device: str | torch.device | None) -> str:
    """'cpu', 'cuda' or 'cuda:N' that exists here (None: cuda if available, else cpu)."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError("device", f"must be cpu, cuda or cuda:N, got {device!r}") from None
    if d.type == "cpu":
        return "cpu"
    if d.type != "cuda":
        raise InputError("device", f"must be cpu, cuda or cuda:N, got {device!r}")
    if not torch.cuda.is_available():
        raise InputError("device", f"{device}: no CUDA device is available (use cpu)")
    if d.index is not None and d.index >= torch.cuda.device_count():
        raise InputError("device", f"{device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return str(d)


def make_options(
    cfg: PipelineConfig,
    *,
    ckpt_dir: str | None = None,
    device: str | None = None,
    offload_model: bool | None = None,
    t5_cpu: bool = False,
    convert_model_dtype: bool = False,
    int8: bool = False,
    compile: bool = False,
    ulysses_size: int = 1,
    cfg_parallel: bool = False,
    dit_fsdp: bool = False,
    t5_fsdp: bool = False,
    world: int = 1,
    vram_gb: float | None = None,
    plan_for: Request | None = None,
    stream_staging: int = 0,
    int8_activations: bool = False,
    quant: str | Mapping[str, str | None] | None = None,
) -> LoadOptions:
    """Load options, validated against the task and the number of processes (`world`, from torchrun).

    vram_gb: choose the fastest residency policy whose predicted peak fits this many GB (CUDA only, one process),
    planned for `plan_for` (a request: size, frames, guidance passes) or else the task's default size and frames;
    raises InputError('vram_gb', ...) before anything loads when nothing fits. docs/performance.md.
    stream_staging: when vram_gb picks a stream policy, copy blocks through this many pinned buffers instead of
    pinning the experts (less pinned host memory, no pinning time; the host copies cost time on short steps).
    quant: 8-bit expert weights, "int8" or "fp8" for every expert or per expert (`check_quant`); int8=True is
    quant="int8".
    """
    for name, v in (("offload_model", offload_model), ("t5_cpu", t5_cpu), ("int8", int8),
                    ("convert_model_dtype", convert_model_dtype), ("cfg_parallel", cfg_parallel),
                    ("dit_fsdp", dit_fsdp), ("t5_fsdp", t5_fsdp), ("compile", compile),
                    ("int8_activations", int8_activations)):
        if v is not None and not isinstance(v, bool):
            raise InputError(name, f"must be true or false, got {v!r}")
    ulysses_size = check_int("ulysses_size", ulysses_size, 1, 1024)
    stream_staging = check_int("stream_staging", stream_staging, 0, 64)
    quant = check_quant(quant, tuple(cfg.experts), bool(int8))
    int8 = quant == "int8"
    if int8_activations and "int8" not in quant_modes(quant).values():
        raise InputError("int8_activations", "needs int8 weights on some expert (int8, or quant with int8): give both")
    if stream_staging and vram_gb is None:
        raise InputError("stream_staging", "applies to the stream policies, which vram_gb chooses: give vram_gb too")
    if world == 1:
        for name, v in (("dit_fsdp", dit_fsdp), ("t5_fsdp", t5_fsdp), ("cfg_parallel", cfg_parallel)):
            if v:
                raise InputError(name, NOT_YET)
        if ulysses_size != 1:
            raise InputError("ulysses_size", f"{ulysses_size} {NOT_YET}")
    else:
        try:
            validate_parallel_flags(world, ulysses_size, dit_fsdp, t5_fsdp, cfg_parallel, cfg.dit.num_heads)
        except ValueError as e:
            raise InputError("ulysses_size", f"does not fit {world} processes: {e}") from e
        if t5_fsdp and t5_cpu:
            raise InputError("t5_fsdp", "cannot be combined with t5_cpu: the sharded encoder runs on each GPU")
    if ckpt_dir is None and not cfg.embedded:
        raise InputError("ckpt_dir", f"is needed for task {cfg.task} (a folder with the official Wan2.2 weights)")
    if ckpt_dir is not None:
        if not Path(ckpt_dir).is_dir():
            raise InputError("ckpt_dir", f"{ckpt_dir} is not a folder")
        ckpt_dir = str(ckpt_dir)
    dev = check_device(device)
    opts = LoadOptions(
        ckpt_dir=ckpt_dir, device=dev,
        # Official default: offload on one process only; FSDP experts must stay resident (loading.py enforces it).
        offload_model=world == 1 if offload_model is None else offload_model,
        t5_cpu=t5_cpu, convert_model_dtype=convert_model_dtype, int8=int8, compile=compile, ulysses_size=ulysses_size,
        cfg_parallel=cfg_parallel, dit_fsdp=dit_fsdp, t5_fsdp=t5_fsdp, stream_staging=stream_staging,
        int8_activations=int8_activations, quant=quant,
    )
    if vram_gb is None:
        return opts
    return plan_options(cfg, opts, vram_gb, offload_model=offload_model, world=world, plan_for=plan_for)


def plan_passes(cfg: PipelineConfig, req: Request | None) -> int:
    """Transformer passes per step (pipeline._batched_guidance): the conditional one, the unconditional one unless
    every guidance scale is 1, and S2V's audio-free one when motion_scale != 1."""
    scales = (cfg.guide_scale if req is None else req.guide_scale).values()
    motion = cfg.motion_scale if req is None else req.motion_scale
    return 1 + any(s != 1.0 for s in scales) + (cfg.modality == "s2v" and motion != 1.0)


def plan_options(cfg: PipelineConfig, opts: LoadOptions, vram_gb: object, *, offload_model: bool | None = None,
                 world: int = 1, plan_for: Request | None = None) -> LoadOptions:
    """opts with the residency policy `--vram_gb` chooses (wanmoe.memory.plan_policy), or InputError('vram_gb').

    Planned policies run the DiT in bf16 (convert_model_dtype is set); int8 and t5_cpu follow the policy. An explicit
    offload_model narrows the choice (False: resident only; True: never resident) and says so when nothing fits.
    """
    from wanmoe.memory import plan_policy as pp

    budget = check_float("vram_gb", vram_gb, 0.0, 100_000.0, open_lo=True)
    if torch.device(opts.device).type != "cuda":
        raise InputError("vram_gb", f"plans GPU memory and needs a CUDA device; the device here is {opts.device} "
                                    "(leave it out on the CPU)")
    if world != 1:
        raise InputError("vram_gb", "plans one GPU; under torchrun set the memory flags (offload_model, t5_cpu, "
                                    "int8) yourself")
    if opts.quant and not opts.all_quantized:
        raise InputError("quant", f"{opts.quant}: with vram_gb give one mode for every expert (the planner plans "
                                  "one precision for all of them)")
    size = plan_for.size_str if plan_for is not None else cfg.default_size
    if plan_for is None:
        frames = cfg.infer_frames if cfg.modality == "s2v" else cfg.frame_num
    else:
        frames = plan_for.infer_frames if cfg.modality == "s2v" else plan_for.frame_num
    passes = plan_passes(cfg, plan_for)
    eight = opts.all_quantized  # int8 and fp8 weights cost the same bytes: the planner's 8-bit policies
    try:
        choice = pp.choose_policy(cfg, size, budget, frames=frames, offload_model=offload_model, int8=eight,
                                  t5_cpu=opts.t5_cpu, passes=passes)
    except pp.DoesNotFit as e:
        hint = ""
        if offload_model is not None:  # the explicit flag narrowed the choice: say which way
            hint = (f"; offload_model={offload_model} allows only "
                    f"{', '.join(pp.candidates(offload_model, eight))} (leave it out to let vram_gb choose)")
        raise InputError("vram_gb", f"{e}{hint}") from None
    r, p = choice.plan.residency, choice.plan
    quant = opts.quant or ("int8" if r.int8 else None)  # the planner's 8-bit policies: int8 unless fp8 was asked
    why = " (no bf16 policy fits: weight-only int8 experts)" if choice.int8_fallback else ""
    if quant and quant != "int8":  # the policy names say int8; fp8 weights cost the same bytes
        why += f" (8-bit weights: {quant})"
    log.info("vram_gb %g: residency policy %s%s, predicted peak %.1f GB (phase %s) for %s at %s, %d frames", budget,
             choice.policy, why, p.peak / 1e9, max(p.phases, key=p.phases.get), cfg.task, size, frames)
    return dataclasses.replace(opts, vram_gb=budget, policy=choice.policy, offload_model=r.experts != "resident",
                               int8=quant == "int8", quant=quant, t5_cpu=r.t5_cpu, convert_model_dtype=True,
                               plan_size=size, plan_frames=frames, plan_passes=passes)
