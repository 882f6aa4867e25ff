"""Command line: `wanmoe generate | train | eval | plan | experts` and the drop-in `generate.py`.

This is the only module that touches process-wide state (logging, thread counts, process groups) and
reads or writes files named by the user. Every subcommand maps to a library function.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os
import re
import secrets
import signal
import sys
import tempfile
import time
from pathlib import Path

from wanmoe.api import Pipeline, distilled_option, resolve
from wanmoe.configs import ASSETS, DEFAULT_TASK, PRESETS, get_preset
from wanmoe.distributed.env import ParallelState, barrier, broadcast_seed, destroy_parallel, init_parallel
from wanmoe.experts import format_table, schedule_table
from wanmoe.inputs import read_inputs
from wanmoe.loading import load_components
from wanmoe.lora_stack import check_spec, parse_spec
from wanmoe.pipeline import Progress
from wanmoe.request import InputError, make_options, make_request
from wanmoe.sampling.cache import CALIBRATION_FILE
from wanmoe.sampling.schedules import SOLVERS, SPACINGS, flow_sigmas

log = logging.getLogger("wanmoe")


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
    off.add_argument("--enable_tts", action="store_true", help="s2v: speak --tts_text (implied by --tts_text)")
    off.add_argument("--tts_text", default=None, help="s2v: words to speak with espeak-ng in place of --audio")
    off.add_argument("--tts_prompt_audio", default=None, help="official CosyVoice voice prompt: refused (no download)")
    off.add_argument("--tts_prompt_text", default=None, help="official CosyVoice prompt text: refused (no download)")

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
    ours.add_argument("--clip_context", default=None, choices=["frames", "reference"],
                      help="s2v: a clip after the first starts from the previous clip's newest frames (official) "
                           "or afresh from the reference image (nothing carries over; default: task config)")
    ours.add_argument("--motion_scale", type=float, default=None,
                      help="s2v: audio guidance; 1 = plain conditioning, >1 strengthens audio motion, 0 removes it; "
                           "None = the task's (1.0; s2v-mini: 2.0)")
    ours.add_argument("--cfg_parallel", action="store_true",
                      help="run the conditional and unconditional passes on two rank groups (world = 2 x ulysses_size)")
    ours.add_argument("--device", default=None, help="compute device (default: cuda if available, else cpu)")
    ours.add_argument("--int8", action="store_true", help="weight-only int8 experts (the same as --quant int8)")
    ours.add_argument("--quant", default=None,
                      help="8-bit expert weights: int8 or fp8 for every expert, or per expert as high=fp8,low=none "
                           "(fp8 multiplies in fp8 on GPUs with fp8 tensor cores, else weight-only; "
                           "docs/performance.md)")
    ours.add_argument("--int8_activations", action="store_true",
                      help="with --int8: quantize activations per token too and multiply int8 by int8 (faster on "
                           "CPU, a little less exact; docs/performance.md)")
    ours.add_argument("--stream_staging", type=int, default=0,
                      help="with --vram_gb, when it picks a stream policy: copy blocks through N pinned staging "
                           "buffers instead of pinning the experts (less host memory; 0: pin them)")
    ours.add_argument("--vram_gb", type=float, default=None,
                      help="GPU memory budget in GB (tensor bytes; on a 24 GB card about 22): run the fastest "
                           "residency policy the planner predicts to fit (resident > offload > stream > stream+int8) "
                           "or refuse before loading; CUDA only (`wanmoe plan --vram_gb N` shows the choice)")
    ours.add_argument("--compile", action="store_true",
                      help="torch.compile each expert (compiles on first use; docs/performance.md says when it pays)")
    ours.add_argument("--tts_voice", default=None, help="s2v: espeak-ng voice for --tts_text (default: espeak-ng's)")
    ours.add_argument("--cache", type=float, default=None,
                      help="step caching per expert: skip transformer evaluations whose output the model's calibration "
                           "predicts within this accumulated relative error (e.g. 0.1); None = off (official)")
    ours.add_argument("--cache_max_skips", type=int, default=2, help="with --cache: consecutive skips per expert")
    ours.add_argument("--batch_cfg", action="store_true",
                      help="run a step's guidance passes (conditional, unconditional, audio-free) as one batch")
    ours.add_argument("--lora", action="append", default=None, metavar="PATH[:SCALE][@EXPERT]",
                      help="a LoRA (.safetensors; diffusers, kohya/ComfyUI or LightX2V keys) at SCALE (default 1) "
                           "on EXPERT (default: all; several: @high,low); repeatable (docs/lora.md)")
    ours.add_argument("--distilled", action="store_true",
                      help="the task's shipped few-step option (s2v-mini: step-distillation LoRAs per expert, 2 Euler "
                           "steps instead of 20; other flags still win; docs/lora.md)")
    ours.add_argument("--quiet", action="store_true", help="no progress bar")


# Request / load-option keyword -> the flag a CLI user typed; error messages name the flag.
FLAGS = {
    "prompt": "--prompt", "negative_prompt": "--prompt", "size": "--size", "frame_num": "--frame_num",
    "seed": "--base_seed", "steps": "--sample_steps", "shift": "--sample_shift", "solver": "--sample_solver",
    "guide_scale": "--guidance_scale/--sample_guide_scale", "boundary": "--boundary", "threshold": "--expert_threshold",
    "blend": "--expert_blend", "noise_schedule": "--noise_schedule", "motion_scale": "--motion_scale",
    "num_clip": "--num_clip", "infer_frames": "--infer_frames", "start_from_ref": "--start_from_ref",
    "clip_context": "--clip_context",
    "image": "--image", "audio": "--audio", "pose_video": "--pose_video", "ckpt_dir": "--ckpt_dir",
    "device": "--device", "offload_model": "--offload_model", "t5_cpu": "--t5_cpu", "int8": "--int8",
    "quant": "--quant", "convert_model_dtype": "--convert_model_dtype", "ulysses_size": "--ulysses_size",
    "cfg_parallel": "--cfg_parallel",
    "dit_fsdp": "--dit_fsdp", "t5_fsdp": "--t5_fsdp", "save_file": "--save_file", "model": "--task",
    "cache": "--cache", "cache_max_skips": "--cache_max_skips", "batch_cfg": "--batch_cfg", "compile": "--compile",
    "tts_text": "--tts_text", "tts_voice": "--tts_voice", "lora": "--lora", "vram_gb": "--vram_gb",
    "stream_staging": "--stream_staging", "int8_activations": "--int8_activations",
    "distilled": "--distilled",
}
TTS_CLOUD = ("needs the official CosyVoice voice-cloning model, which is fetched from the cloud; wanmoe downloads "
             "nothing and speaks --tts_text with espeak-ng (pick a voice with --tts_voice)")


_NAME_COUNTER = itertools.count()


def output_dir() -> Path:
    """Where default file names land: $WANMOE_OUTPUT_DIR, else ~/wanmoe-outputs (never the source tree)."""
    return Path(os.environ.get("WANMOE_OUTPUT_DIR") or Path.home() / "wanmoe-outputs")


def default_save_file(task: str, size: tuple[int, int], ulysses_size: int, prompt: str) -> Path:
    """The official name {task}_{size}_{ulysses}_{prompt[:50]}_{YYYYmmdd_HHMMSS}.mp4, made safe in any shell
    (W x H, prompt reduced to letters, digits, - and _) and unique per run (process id and a random suffix)."""
    stamp = time.strftime("%Y%m%d_%H%M%S")
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", prompt).strip("_")[:50] or "video"
    # The process id separates concurrent runs on one machine, a counter the calls of one process, and random
    # bits runs on machines that share the output folder.
    tag = f"{os.getpid()}-{next(_NAME_COUNTER)}{secrets.token_hex(3)}"
    return output_dir() / f"{task}_{size[0]}x{size[1]}_{ulysses_size}_{slug}_{stamp}_{tag}.mp4"


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def flag_message(e: InputError) -> str:
    """The library's message with the keyword replaced by the flag the user typed."""
    return f"{FLAGS.get(e.field, e.field)} {e.detail}"


def check_writable(save: Path) -> None:
    """The output folder exists (or can be made) and takes a file: found now, not after minutes of work."""
    if save.suffix.lower() != ".mp4":
        raise InputError("save_file", f"must end in .mp4, got {str(save)!r}")
    if save.is_dir():
        raise InputError("save_file", f"{str(save)!r} is a folder")
    try:
        save.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".wanmoe-probe.", dir=save.parent)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise InputError("save_file", f"cannot write into {str(save.parent)!r}: {e.strerror or e}") from None


def request_kwargs(args: argparse.Namespace) -> dict:
    """Flags -> `make_request` keywords (None = the task's default)."""
    guide = args.guidance_scale if args.guidance_scale is not None else args.sample_guide_scale
    return dict(prompt=args.prompt, size=args.size, frame_num=args.frame_num, seed=args.base_seed,
                steps=args.sample_steps, shift=args.sample_shift, solver=args.sample_solver, guide_scale=guide,
                boundary=args.boundary, threshold=args.expert_threshold, blend=args.expert_blend,
                noise_schedule=args.noise_schedule, motion_scale=args.motion_scale, num_clip=args.num_clip,
                infer_frames=args.infer_frames, start_from_ref=args.start_from_ref,
                clip_context=args.clip_context, cache=args.cache,
                cache_max_skips=args.cache_max_skips, batch_cfg=args.batch_cfg)


def _progress_bars(enabled: bool):  # noqa: ANN202 (returns a progress callback and a closer)
    """A tqdm bar per stage, fed from the pipeline's progress callback."""
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def on(p: Progress) -> None:
        if not enabled:
            return
        bar = bars.get(p.stage)
        if bar is None:
            desc = {"sample": f"sampling {p.clips} clip(s)" if p.clips > 1 else "sampling"}.get(p.stage, p.stage)
            bar = bars[p.stage] = tqdm(total=p.total, desc=desc, leave=False)
        bar.total = p.total
        bar.n = p.done
        if p.stage == "sample":
            bar.set_postfix(expert=p.expert, sigma=f"{p.sigma:.3f}" if p.sigma is not None else "", refresh=False)
        bar.refresh()

    def close() -> None:
        for bar in bars.values():
            bar.close()

    return on, close


def cmd_generate(args: argparse.Namespace) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun; 1 for a plain `python generate.py`
    for flag in ("tts_prompt_audio", "tts_prompt_text"):
        if getattr(args, flag) is not None:
            return _fail(f"--{flag} {TTS_CLOUD}")
    if args.enable_tts and args.tts_text is None:
        return _fail("--enable_tts needs --tts_text (the words to speak)")
    try:
        cfg, _ = resolve(args.task, args.ckpt_dir)  # the preset, with a small model's own latent width
        kwargs = request_kwargs(args)
        if args.distilled:
            settings = distilled_option(cfg, args.ckpt_dir).settings
            kwargs.update({k: v for k, v in settings.items() if kwargs.get(k) is None})
        req = make_request(cfg, **kwargs)  # every setting checked before any weights load
        opts = make_options(cfg, ckpt_dir=args.ckpt_dir, device=args.device, offload_model=args.offload_model,
                            t5_cpu=args.t5_cpu, convert_model_dtype=args.convert_model_dtype, int8=args.int8,
                            compile=args.compile,
                            ulysses_size=args.ulysses_size, cfg_parallel=args.cfg_parallel, dit_fsdp=args.dit_fsdp,
                            t5_fsdp=args.t5_fsdp, world=world, vram_gb=args.vram_gb, plan_for=req,
                            stream_staging=args.stream_staging, int8_activations=args.int8_activations,
                            quant=args.quant)
        inputs = read_inputs(cfg, image=args.image, audio=args.audio, pose_video=args.pose_video,
                             tts_text=args.tts_text, tts_voice=args.tts_voice)
        for spec in args.lora or ():  # syntax, expert names, then the file's keys and shapes (header only)
            check_spec(spec, cfg.experts, cfg.dit)
        root = Path(opts.ckpt_dir) if opts.ckpt_dir else ASSETS / cfg.task
        if req.cache is not None and not (root / CALIBRATION_FILE).is_file():
            raise InputError("cache", f"needs a step-cache calibration for this model ({root / CALIBRATION_FILE}); "
                                      "make one with Pipeline.calibrate_cache (docs/performance.md)")
        save = Path(args.save_file) if args.save_file else default_save_file(cfg.task, req.size, opts.ulysses_size,
                                                                              req.prompt)
        if int(os.environ.get("RANK", "0")) == 0:
            check_writable(save)
    except InputError as e:
        return _fail(flag_message(e))
    if world == 1:
        return _generate(args, cfg, req, opts, inputs, save, ParallelState())
    # NCCL on GPUs, gloo when the user runs on the CPU (or there is no GPU).
    state = init_parallel("gloo" if opts.device == "cpu" else None, ulysses_size=opts.ulysses_size,
                          cfg_parallel=opts.cfg_parallel, dit_fsdp=opts.dit_fsdp, t5_fsdp=opts.t5_fsdp,
                          num_heads=cfg.dit.num_heads)
    try:
        if state.device.type == "cuda":
            opts = dataclasses.replace(opts, device=str(state.device))  # one GPU per rank
        req = dataclasses.replace(req, seed=broadcast_seed(req.seed, state))  # every rank draws rank 0's noise
        code = _generate(args, cfg, req, opts, inputs, save, state)
        # Tear the group down together: a gloo rank that destroys it while rank 0 is still muxing the video can
        # abort at exit ("terminate called without an active exception"), and torchrun then kills rank 0.
        barrier(state)
        return code
    finally:
        destroy_parallel(state)


def _generate(args: argparse.Namespace, cfg, req, opts, inputs, save: Path, state: ParallelState) -> int:  # noqa: ANN001
    """Load, generate and (rank 0 only) write the mp4 and its JSON sidecar together."""
    try:
        components = load_components(cfg, opts, state)
    except InputError as e:
        return _fail(flag_message(e))
    except ValueError as e:  # a checkpoint problem found before any weights loaded
        return _fail(str(e))
    pipe = Pipeline(cfg, components, opts)
    try:
        if args.distilled:
            pipe.use_distilled()
        for spec in map(lambda s: parse_spec(s, cfg.experts), args.lora or ()):
            pipe.load_lora(spec.path, spec.scale, spec.experts)
    except InputError as e:
        return _fail(flag_message(e))
    on, close = _progress_bars(not args.quiet and state.is_main)
    try:
        # Each clip is muxed into the file as soon as it is decoded (rank 0 only); nothing else keeps the frames.
        video = pipe.run(req, inputs, progress=on, save=save, keep_frames=False)
    except OSError as e:  # a full disk, a folder removed meanwhile: neither file was left behind
        print(f"error: cannot write {save}: {e.strerror or e}", file=sys.stderr)
        return 1
    finally:
        close()
    if not state.is_main:
        return 0  # rank 0 alone writes the output
    written = json.loads(save.with_suffix(".json").read_text())["frames"]
    log.info("wrote %s (%d frames at %d fps, %.1f s)", save, written, video.fps, video.timings["total_s"])
    print(save)
    return 0


def cmd_experts(argv: list[str]) -> int:
    """`wanmoe experts`: which expert serves each step of a task's schedule (any task of the registry)."""
    p = argparse.ArgumentParser(prog="wanmoe experts", description="Print which expert serves each step.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", default="t2v-A14B", choices=sorted(PRESETS), help="task whose defaults to use")
    p.add_argument("--sample_steps", type=int, default=None, help="sampling steps (default: the task's)")
    p.add_argument("--sample_shift", type=float, default=None, help="sigma shift (default: the task's)")
    p.add_argument("--sample_solver", default=None, choices=sorted(SOLVERS), help="solver (default: the task's)")
    p.add_argument("--noise_schedule", default="linear", choices=SPACINGS, help="sigma spacing before the shift")
    p.add_argument("--boundary", type=float, default=None, help="expert switch as a timestep fraction")
    p.add_argument("--expert_threshold", type=float, default=None, help="expert switch as a log-SNR threshold")
    p.add_argument("--expert_blend", type=float, default=0.0, help="mixing band half-width in log-SNR")
    a = p.parse_args(argv)
    cfg = get_preset(a.task)
    try:
        req = make_request(cfg, steps=a.sample_steps, shift=a.sample_shift, solver=a.sample_solver,
                           noise_schedule=a.noise_schedule, boundary=a.boundary, threshold=a.expert_threshold,
                           blend=a.expert_blend, seed=0)
    except InputError as e:
        return _fail(flag_message(e))
    sigmas = flow_sigmas(req.steps, req.shift, solver=req.solver, spacing=req.noise_schedule)
    print(format_table(schedule_table(req.experts, sigmas, req.guide_scale)))
    return 0


def _setup_process(args: argparse.Namespace) -> None:
    quiet = getattr(args, "quiet", False) or int(os.environ.get("RANK", "0")) != 0  # under torchrun rank 0 logs
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


SUBCOMMANDS = {"train": "wanmoe.train.cli", "eval": "wanmoe.eval.cli", "plan": "wanmoe.memory.plan_policy",
               "verify": "wanmoe.verify", "serve": "wanmoe.app.server"}


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so every temporary file is cleaned up on the way out."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wanmoe", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a video", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_generate_args(g)
    g.set_defaults(func=cmd_generate)
    for name in (*SUBCOMMANDS, "experts"):
        s = sub.add_parser(name, help=f"see `wanmoe {name} --help`", add_help=False)
        s.set_defaults(func=None)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; bad input exits 2 with one line, Ctrl-C 130 and SIGTERM 143, without a traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    previous = None
    if _main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        # Ctrl-C raises KeyboardInterrupt even when the parent started us with SIGINT ignored (a shell's background
        # job does): the run then stops cleanly instead of not at all.
        previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if argv and argv[0] == "experts":
            return cmd_experts(argv[1:])
        if argv and argv[0] in SUBCOMMANDS:
            import importlib

            return int(importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:]) or 0)
        args = build_parser().parse_args(argv)
        _setup_process(args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
            signal.signal(signal.SIGINT, previous_int)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def generate_main(argv: list[str] | None = None) -> int:
    """`python generate.py ...`: the official command line, i.e. `wanmoe generate ...`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return main(["generate", *argv])


__all__ = ["main", "generate_main", "default_save_file", "FLAGS"]
