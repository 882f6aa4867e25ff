"""Command line: `wanmoe generate | train | eval | plan | experts` and the drop-in `generate.py`.

This is the only module that touches process-wide state (logging, thread counts, process groups) and
reads or writes files named by the user. Every subcommand maps to a library function.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

log = logging.getLogger("wanmoe")

# The official size table ("W*H" -> (W, H)); our embedded task adds its own small sizes in configs.py.
OFFICIAL_SIZES = ("720*1280", "1280*720", "480*832", "832*480", "704*1280", "1280*704", "1024*704", "704*1024")


def _str2bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "y", "t"):
        return True
    if v.lower() in ("0", "false", "no", "n", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {v!r}")


def _guidance(v: str) -> float | dict[str, float]:
    """`4.5` (both experts) or `high=4.0,low=3.0` (per expert, by name)."""
    if "=" not in v:
        return float(v)
    out: dict[str, float] = {}
    for part in v.split(","):
        name, _, val = part.partition("=")
        if not name or not val:
            raise argparse.ArgumentTypeError(f"per-expert guidance must look like high=4.0,low=3.0, got {v!r}")
        out[name.strip()] = float(val)
    return out


def add_generate_args(p: argparse.ArgumentParser) -> None:
    from wanmoe.configs import DEFAULT_TASK, PRESETS

    off = p.add_argument_group("official flags (generate.py of Wan2.2)")
    off.add_argument("--task", default=DEFAULT_TASK, choices=sorted(PRESETS), help="task / model preset")
    off.add_argument("--size", default=None, help="output size W*H (default: the task's default size)")
    off.add_argument("--frame_num", type=int, default=None, help="frames for t2v/i2v, 4n+1 (default: task config)")
    off.add_argument("--ckpt_dir", default=None, help="checkpoint folder (default: the embedded model for its task)")
    off.add_argument("--offload_model", type=_str2bool, default=None,
                     help="keep idle models off the compute device (default: true on one process)")
    off.add_argument("--ulysses_size", type=int, default=1, help="Ulysses sequence-parallel degree (= world size)")
    off.add_argument("--t5_fsdp", action="store_true", help="shard the text encoder with FSDP")
    off.add_argument("--t5_cpu", action="store_true", help="run the text encoder on the CPU")
    off.add_argument("--dit_fsdp", action="store_true", help="shard each expert DiT with FSDP")
    off.add_argument("--save_file", default=None, help="output mp4 path (default: the official file name)")
    off.add_argument("--prompt", default=None, help="text prompt (default: the task's example prompt)")
    off.add_argument("--base_seed", type=int, default=-1, help="seed; -1 draws a random one")
    off.add_argument("--image", default=None, help="input image (i2v) or reference image (s2v)")
    off.add_argument("--sample_solver", default="unipc", choices=["unipc", "dpm++", "euler"], help="ODE solver")
    off.add_argument("--sample_steps", type=int, default=None, help="sampling steps (default: task config)")
    off.add_argument("--sample_shift", type=float, default=None,
                      help="flow-matching sigma shift (default: task config)")
    off.add_argument("--sample_guide_scale", type=float, default=None,
                     help="classifier-free guidance scale for every expert (default: task config, per expert)")
    off.add_argument("--convert_model_dtype", action="store_true", help="cast the DiT weights to bf16")
    off.add_argument("--num_clip", type=int, default=None, help="s2v: at most this many clips (default: audio length)")
    off.add_argument("--audio", default=None, help="s2v: driving audio (wav/mp3; default: the task's example)")
    off.add_argument("--pose_video", default=None, help="s2v: pose video driving the body")
    off.add_argument("--start_from_ref", action="store_true", help="s2v: start the video from the reference image")
    off.add_argument("--infer_frames", type=int, default=None,
                      help="s2v: frames per clip, multiple of 4 (default: task)")

    ours = p.add_argument_group("noise-expert flags (wanmoe)")
    ours.add_argument("--boundary", type=float, default=None,
                      help="expert switch as the official timestep fraction (default: task config)")
    ours.add_argument("--expert_threshold", type=float, default=None,
                      help="expert switch as a log-SNR threshold (overrides --boundary)")
    ours.add_argument("--expert_blend", type=float, default=0.0,
                      help="half-width in log-SNR of the band where both experts run and blend (0 = hard switch)")
    ours.add_argument("--noise_schedule", default="linear", choices=["linear", "cosine"], help="sigma spacing")
    ours.add_argument("--guidance_scale", type=_guidance, default=None,
                      help="CFG scale: one value, or per expert as high=4.0,low=3.0 (overrides --sample_guide_scale)")
    ours.add_argument("--motion_scale", type=float, default=None,
                      help="s2v: audio guidance; 1 = plain conditioning, >1 strengthens audio motion, 0 removes it; "
                           "None = the task's (1.0; s2v-mini: 2.0)")
    ours.add_argument("--cfg_parallel", action="store_true",
                      help="run the conditional and unconditional passes on two rank groups (world = 2 x ulysses_size)")
    ours.add_argument("--device", default=None, help="compute device (default: cuda if available, else cpu)")
    ours.add_argument("--int8", action="store_true", help="weight-only int8 experts")
    ours.add_argument("--quiet", action="store_true", help="no progress bar")


def default_save_file(task: str, size: str, ulysses_size: int, prompt: str) -> str:
    """The official default name: {task}_{size}_{ulysses}_{prompt[:50]}_{YYYYmmdd_HHMMSS}.mp4."""
    stamp = time.strftime("%Y%m%d_%H%M%S")
    safe = prompt.replace(" ", "_").replace("/", "_")[:50]
    if sys.platform.startswith("win"):
        size = size.replace("*", "x")
    return f"{task}_{size}_{ulysses_size}_{safe}_{stamp}.mp4"


def parse_size(size: str, multiple: int) -> tuple[int, int]:
    """'W*H' -> (W, H); both must be positive multiples of `multiple` (VAE stride x patch size)."""
    parts = size.split("*")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"--size must look like W*H (for example 1280*720), got {size!r}")
    w, h = int(parts[0]), int(parts[1])
    if w <= 0 or h <= 0 or w % multiple or h % multiple:
        raise ValueError(f"--size {size}: width and height must be positive multiples of {multiple} "
                         f"(VAE stride x patch size)")
    return w, h


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def cmd_generate(args: argparse.Namespace) -> int:
    from wanmoe import pipeline
    from wanmoe.configs import PRESETS
    from wanmoe.distributed.env import ParallelState, broadcast_seed, destroy_parallel, init_parallel

    cfg = PRESETS[args.task]
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun; 1 for a plain `python generate.py`
    try:
        req = pipeline.request_from_args(args, cfg, world=world)  # validates everything before any weights load
        inputs = pipeline.read_inputs(req, cfg)  # reads image/audio/pose; raises ValueError on bad media
    except (ValueError, FileNotFoundError) as e:
        return _fail(str(e))
    save = Path(args.save_file or default_save_file(args.task, req.size_str, args.ulysses_size, req.prompt))
    if save.suffix.lower() != ".mp4":
        return _fail(f"--save_file must end in .mp4, got {save}")
    if world == 1:
        return _generate(args, cfg, req, inputs, save, ParallelState())
    # NCCL on GPUs, gloo when the user runs on the CPU (or there is no GPU).
    state = init_parallel("gloo" if req.device == "cpu" else None, ulysses_size=req.ulysses_size,
                          cfg_parallel=req.cfg_parallel, dit_fsdp=req.dit_fsdp, t5_fsdp=req.t5_fsdp,
                          num_heads=cfg.dit.num_heads)
    try:
        if state.device.type == "cuda":
            req.device = str(state.device)  # one GPU per rank
        req.seed = broadcast_seed(req.seed, state)  # every rank draws rank 0's noise
        return _generate(args, cfg, req, inputs, save, state)
    finally:
        destroy_parallel(state)


def _generate(args: argparse.Namespace, cfg, req, inputs, save: Path, state) -> int:  # noqa: ANN001
    """Load, generate and (rank 0 only) write the mp4 and its JSON sidecar."""
    from wanmoe import pipeline

    try:
        components = pipeline.load_components(cfg, req, state)
    except (ValueError, FileNotFoundError) as e:
        return _fail(str(e))
    t0 = time.perf_counter()
    result = pipeline.generate(components, req, inputs, progress=not args.quiet and state.is_main)
    timings = dict(result.timings, total_s=time.perf_counter() - t0)
    if not state.is_main:
        return 0  # rank 0 alone writes the output
    from wanmoe.media import write_video

    save.parent.mkdir(parents=True, exist_ok=True)
    audio = None
    if cfg.modality == "s2v":
        # The official mux starts the audio at 0 although the first clip dropped 3 frames; we start it where the
        # kept frames start, so lips and sound line up (documented in docs/api.md).
        audio = inputs.audio[int(round(result.audio_offset_s * inputs.sr)) :]
    write_video(save, result.video, fps=cfg.sample_fps, audio=audio, sr=inputs.sr)
    sidecar = {
        "file": str(save),
        "task": args.task,
        "settings": req.to_json(),
        "seed": req.seed,
        "world_size": state.world,
        "frames": int(result.video.shape[1]),
        "fps": cfg.sample_fps,
        "timings": timings,
        "expert_steps": result.expert_steps,
        "versions": _versions(),
    }
    tmp = save.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(sidecar, indent=2))
    tmp.replace(save.with_suffix(".json"))
    log.info("wrote %s (%d frames, %.1f s)", save, result.video.shape[1], timings["total_s"])
    print(save)
    return 0


def _versions() -> dict[str, str]:
    import torch

    import wanmoe

    return {"wanmoe": wanmoe.__version__, "torch": torch.__version__, "python": platform.python_version()}


def _setup_process(args: argparse.Namespace) -> None:
    quiet = getattr(args, "quiet", False) or int(os.environ.get("RANK", "0")) != 0  # under torchrun rank 0 logs
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wanmoe", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a video", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_generate_args(g)
    g.set_defaults(func=cmd_generate)
    for name, module in (("train", "wanmoe.train.cli"), ("eval", "wanmoe.eval.cli"),
                         ("plan", "wanmoe.memory.plan"), ("experts", "wanmoe.experts")):
        s = sub.add_parser(name, help=f"see `wanmoe {name} --help`", add_help=False)
        s.set_defaults(func=None, module=module)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = build_parser()
    if argv and argv[0] in ("train", "eval", "plan", "experts"):
        import importlib

        mod = importlib.import_module({"train": "wanmoe.train.cli", "eval": "wanmoe.eval.cli",
                                       "plan": "wanmoe.memory.plan", "experts": "wanmoe.experts"}[argv[0]])
        return int(mod.main(argv[1:]) or 0)
    args = p.parse_args(argv)
    _setup_process(args)
    return int(args.func(args) or 0)


def generate_main(argv: list[str] | None = None) -> int:
    """`python generate.py ...`: the official command line, i.e. `wanmoe generate ...`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return main(["generate", *argv])


__all__ = ["main", "generate_main", "parse_size", "default_save_file"]
