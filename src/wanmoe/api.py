"""The Python API: `pipe = wanmoe.load("s2v-mini")`, `video = pipe(prompt=..., image=..., audio=...)`,
`video.save(path)`.

`load` resolves a task name or a checkpoint folder through the task registry, validates the load options and
loads the components once; calling the pipeline builds a validated `Request` from the task's preset plus the
keyword overrides, reads and checks the inputs (paths, PIL images, numpy arrays or tensors), and runs the one
generation path. Every bad input raises `InputError` (a ValueError) before any model runs. `Video.save` writes
the mp4 with its sound and the JSON sidecar together, or neither.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from wanmoe import loading, media
from wanmoe.configs import PRESETS, Distilled, PipelineConfig, get_preset
from wanmoe.distributed.env import ParallelState
from wanmoe.inputs import Inputs, read_inputs
from wanmoe.pipeline import Components, PreviewFn, ProgressFn, generate
from wanmoe.request import InputError, LoadOptions, Request, make_options, make_request
from wanmoe.sampling.cache import Recorder
from wanmoe.version import __version__


def versions() -> dict[str, str]:
    return {"wanmoe": __version__, "torch": torch.__version__, "python": platform.python_version()}


@dataclass
class Video:
    """A generated video: frames, fps, the audio it belongs with, timings and every setting."""

    frames: Tensor  # (3, T, Hp, Wp) float32 in [-1, 1]
    fps: int
    audio: np.ndarray | None  # mono float32 at `sr`, already aligned with frame 0 (S2V), or None
    sr: int
    request: Request
    options: LoadOptions
    timings: dict[str, float] = field(default_factory=dict)
    expert_steps: dict[str, int] = field(default_factory=dict)
    expert_calls: dict[str, int] = field(default_factory=dict)  # transformer evaluations (fewer with `cache`)
    inputs: dict[str, str] = field(default_factory=dict)
    world_size: int = 1
    loras: list[dict] = field(default_factory=list)  # Pipeline.loras when it ran: file, scale per expert, mode

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[1])

    def frames_uint8(self) -> np.ndarray:
        """(T, Hp, Wp, 3) uint8, as written to the file."""
        return media.to_uint8_frames(self.frames)

    def sidecar(self, file: str | None = None, frames_written: int | None = None) -> dict:
        return {
            "file": file,
            "task": self.request.task,
            "settings": self.request.to_json(),
            "load": self.options.to_json(),
            "inputs": self.inputs,
            "seed": self.request.seed,
            "world_size": self.world_size,
            "frames": self.num_frames if frames_written is None else frames_written,
            "fps": self.fps,
            "timings": self.timings,
            "expert_steps": self.expert_steps,
            "expert_calls": self.expert_calls,
            "loras": self.loras,
            "versions": versions(),
        }

    def save(self, path: str | os.PathLike, *, sidecar: bool = True) -> Path:
        """Write the mp4 (H.264, with AAC sound when there is audio) and `<name>.json`: both appear, or neither."""
        path = Path(path)
        if path.suffix.lower() != ".mp4":
            raise InputError("save_file", f"must end in .mp4, got {str(path)!r}")
        media.write_video_with_sidecar(path, self.frames, fps=self.fps, audio=self.audio, sr=self.sr,
                                       sidecar=(lambda n: self.sidecar(str(path), n)) if sidecar else None)
        return path


class Pipeline:
    """A loaded task: call it with a prompt and inputs (and any setting of `make_request`) to get a `Video`."""

    def __init__(self, cfg: PipelineConfig, components: Components, options: LoadOptions) -> None:
        self.cfg, self.components, self.options = cfg, components, options
        self._plans: dict = {}  # planner traces, reused by check_budget across calls
        self.defaults: dict[str, object] = {}  # request settings a loaded option brings (use_distilled); callers win

    @property
    def task(self) -> str:
        return self.cfg.task

    def request(self, **overrides: object) -> Request:
        """The validated request these overrides make (the task's preset for everything not given)."""
        return make_request(self.cfg, **{**self.defaults, **overrides})

    def __call__(
        self,
        prompt: str | None = None,
        *,
        image: object = None,
        audio: object = None,
        sr: int | None = None,
        pose_video: object = None,
        tts_text: str | None = None,
        tts_voice: str | None = None,
        progress: ProgressFn | None = None,
        preview: PreviewFn | None = None,
        save: str | os.PathLike | None = None,
        keep_frames: bool = True,
        **settings: object,
    ) -> Video:
        """Generate one video. `settings` are `make_request` keywords (steps, seed, size, guide_scale, ...);
        `tts_text` (S2V, in place of `audio`) is spoken by espeak-ng in `tts_voice`; `preview` receives each step's
        x0 prediction and the decoded frames as they appear (`wanmoe.pipeline.Preview`). With `save`, each clip is
        muxed into that mp4 as soon as it is decoded, and the sidecar written beside it at the end (with
        `keep_frames=False` the frames are not also kept: memory stays flat however long the audio)."""
        req = self.request(prompt=prompt, **settings)
        inputs = read_inputs(self.cfg, image=image, audio=audio, sr=sr, pose_video=pose_video, tts_text=tts_text,
                             tts_voice=tts_voice)
        return self.run(req, inputs, progress=progress, preview=preview, save=save, keep_frames=keep_frames)

    def run(self, req: Request, inputs: Inputs, *, progress: ProgressFn | None = None,
            preview: PreviewFn | None = None, save: str | os.PathLike | None = None,
            keep_frames: bool = True) -> Video:
        """Generate from an already validated request and inputs (what `__call__` and the CLI use)."""
        check_budget(self.cfg, req, self.options, self._plans)
        audio = None
        if inputs.audio is not None:
            # The official mux starts the audio at 0 although the first clip dropped frames; the audio here starts
            # where the kept frames start, so lips and sound line up (docs/api.md).
            offset = self.cfg.dropped_frames(req.start_from_ref) / self.cfg.sample_fps
            audio = inputs.audio[int(round(offset * inputs.sr)) :]
        writer = None
        if save is not None and self.components.parallel.is_main:  # rank 0 alone writes the file
            if Path(save).suffix.lower() != ".mp4":
                raise InputError("save_file", f"must end in .mp4, got {str(save)!r}")
            writer = media.VideoWriter(save, self.cfg.sample_fps, audio, inputs.sr)
        t0 = time.perf_counter()
        try:
            res = generate(self.components, req, inputs, progress=progress, preview=preview,
                           on_clip=None if writer is None else writer.add, keep_frames=keep_frames)
            timings = dict(res.timings, total_s=time.perf_counter() - t0)
            video = Video(frames=res.video, fps=res.fps, audio=audio, sr=inputs.sr, request=req, options=self.options,
                          timings=timings, expert_steps=res.expert_steps, expert_calls=res.expert_calls,
                          inputs=dict(inputs.sources or {}), world_size=self.components.parallel.world,
                          loras=self.loras)
            if writer is not None:
                writer.close(lambda n: video.sidecar(str(save), n))
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        return video

    def load_lora(self, path: str | os.PathLike, scale: float | dict[str, float] = 1.0,
                  experts: str | tuple[str, ...] | list[str] | None = None, *, mode: str = "auto",
                  skip_wan21_image: bool = False) -> None:
        """Add a LoRA (safetensors; diffusers, kohya/ComfyUI, LightX2V key formats) to `experts` (None: all) at
        `scale` (one number, or per expert: {"high": 1.0, "low": 0.5}). Merged into float weights, run beside int8
        ones (`mode`: auto | merge | runtime); it survives every reload of an expert. docs/lora.md."""
        self._lora_stack().load(path, scale, experts, mode=mode, skip_wan21_image=skip_wan21_image)

    def use_distilled(self) -> None:
        """Switch to the task's shipped few-step option (`PipelineConfig.distilled`): load its step-distillation LoRA
        into each expert and make its settings (e.g. 2 Euler steps) this pipeline's defaults; a call's own settings
        still win. InputError("distilled") as `distilled_option`. docs/lora.md, "Step distillation"."""
        from wanmoe.configs import ASSETS

        d = distilled_option(self.cfg, self.options.ckpt_dir)
        for expert, name in d.loras.items():
            self.load_lora(ASSETS / "loras" / name, 1.0, (expert,))
        self.defaults = dict(d.settings)

    def unload_lora(self, path: str | os.PathLike | None = None) -> None:
        """Remove one LoRA file (every expert it was loaded into) or, with None, all; the experts it touched
        reload their own weights from disk on next use (bit-exact)."""
        self._lora_stack().unload(path)

    @property
    def loras(self) -> list[dict]:
        """The loaded LoRAs in the order applied: file, scale per expert, mode."""
        stack = getattr(self.components.experts, "transform", None)
        return stack.describe() if hasattr(stack, "describe") else []

    def _lora_stack(self):  # noqa: ANN202 (a wanmoe.lora_stack.LoraStack, installed as the pool's transform)
        from wanmoe.lora_stack import LoraStack

        pool = self.components.experts
        if not isinstance(pool.transform, LoraStack):
            if self.components.parallel.dit_fsdp:
                raise InputError("lora", "cannot be used with dit_fsdp: sharded experts are never reloaded")
            pool.transform = LoraStack(pool, self.cfg.dit)
        return pool.transform

    def calibrate_cache(self, runs: list[dict] | None = None, path: str | os.PathLike | None = None) -> dict:
        """Calibrate step caching for this model from uncached runs (`runs`: keyword dicts for `__call__`; default:
        three seeds with the task's example inputs); returns the calibration and writes it to `path` if given.

        The calibration is a function of log-SNR per expert, so it serves any step count, shift and solver.
        """
        rec = Recorder()
        for kw in runs if runs is not None else [{"seed": s} for s in range(3)]:
            kw = dict(kw)
            inputs = read_inputs(self.cfg, image=kw.pop("image", None), audio=kw.pop("audio", None),
                                 sr=kw.pop("sr", None), pose_video=kw.pop("pose_video", None))
            req = make_request(self.cfg, **kw)
            generate(self.components, req, inputs, recorder=rec)
        cal = rec.calibration()
        self.components.cache_calibration = cal
        data = cal.to_json()
        if path is not None:
            Path(path).write_text(json.dumps(data, indent=1))
        return data


def distilled_option(cfg: PipelineConfig, ckpt_dir: str | os.PathLike | None) -> Distilled:
    """The task's shipped few-step option; InputError('distilled') when the task ships none or other weights are
    loaded (its LoRAs fit the shipped weights only)."""
    if cfg.distilled is None or ckpt_dir is not None:
        have = ", ".join(sorted(n for n, c in PRESETS.items() if c.distilled is not None))
        raise InputError("distilled", f"ships only with the embedded weights of {have}")
    return cfg.distilled


def check_budget(cfg: PipelineConfig, req: Request, opts: LoadOptions, cache: dict | None = None) -> None:
    """With a vram_gb budget: a request at another size, frame count or number of guidance passes than the policy
    was planned for is planned again under that policy; InputError('vram_gb') if it would not fit."""
    if opts.vram_gb is None or opts.policy is None:
        return
    from wanmoe.memory.plan import GB
    from wanmoe.memory.plan_policy import residency
    from wanmoe.request import plan_passes

    frames = req.infer_frames if cfg.modality == "s2v" else req.frame_num
    passes = plan_passes(cfg, req)
    if (req.size_str, frames, passes) == (opts.plan_size, opts.plan_frames, opts.plan_passes):
        return
    from wanmoe.memory.plan import plan_memory

    p = plan_memory(cfg, req.size_str, residency(opts.policy, t5_cpu=opts.t5_cpu, passes=passes), frames=frames,
                    cache=cache)
    if p.peak > opts.vram_gb * GB:
        raise InputError("vram_gb", f"{opts.vram_gb:g} GB was planned for {opts.plan_size}, {opts.plan_frames} frames "
                                    f"({opts.policy}); {req.size_str}, {frames} frames needs {p.peak / GB:.1f} GB "
                                    f"under {opts.policy}: load with plan_size={req.size_str!r}")


def resolve(model: str | os.PathLike, ckpt_dir: str | os.PathLike | None = None,
            task: str | None = None) -> tuple[PipelineConfig, str | None]:
    """A task name (`s2v-mini`, `t2v-A14B`) or a checkpoint folder -> (task config, checkpoint folder or None)."""
    name = str(model)
    if task is not None or any(name.lower() == t.lower() for t in PRESETS):
        cfg = get_preset(task if task is not None else name)
        # The folder the weights come from (a small model's own latent width is read there: loading.fit_to_folder).
        folder = str(ckpt_dir) if ckpt_dir is not None else name if task is not None and Path(name).is_dir() else None
        root = loading.ckpt_root(cfg, folder) if folder is not None or cfg.embedded else None
        return loading.fit_to_folder(cfg, root), None if ckpt_dir is None else str(ckpt_dir)
    if Path(name).is_dir():
        return loading.detect_task(Path(name)), name
    raise InputError("model", f"{name!r} is neither a task ({', '.join(sorted(PRESETS))}) nor a checkpoint folder")


def load(
    model: str | os.PathLike = "s2v-mini",
    *,
    ckpt_dir: str | os.PathLike | None = None,
    task: str | None = None,
    device: str | None = None,
    offload_model: bool | None = None,
    convert_model_dtype: bool = False,
    int8: bool = False,
    t5_cpu: bool = False,
    compile: bool = False,
    vram_gb: float | None = None,
    plan_size: str | tuple[int, int] | None = None,
    stream_staging: int = 0,
    int8_activations: bool = False,
    quant: str | dict[str, str | None] | None = None,
    distilled: bool = False,
    parallel: ParallelState | None = None,
    **parallel_flags: object,
) -> Pipeline:
    """Load a task's models once. `model` is a task name or a checkpoint folder (the task is then detected from it;
    `task=` names it when the folder is ambiguous). Options are checked before anything loads.

    vram_gb (CUDA): run the fastest residency policy the planner predicts to fit this many GB, planned at
    `plan_size` (default: the task's default size) and the task's frames; a call whose size or frames need more
    raises InputError('vram_gb') before any work. docs/performance.md, "Planning and --vram_gb".
    stream_staging (with vram_gb): when a stream policy is chosen, copy blocks through this many pinned buffers
    instead of pinning the experts (wanmoe.memory.stream, "Staging ring").
    quant: 8-bit expert weights, "int8" or "fp8" for every expert, or per expert ({"high": "fp8", "low": None} or
    "high=fp8,low=none"); int8=True is quant="int8".
    distilled: the task's shipped few-step option (`Pipeline.use_distilled`)."""
    cfg, root = resolve(model, ckpt_dir, task)
    if task is not None and ckpt_dir is None and Path(str(model)).is_dir():
        root = str(model)
    if distilled:
        distilled_option(cfg, root)  # refused before anything loads
    parallel = parallel or ParallelState()
    plan_for = None
    if vram_gb is not None and plan_size is not None:
        plan_for = make_request(cfg, size=plan_size, seed=0)
    opts = make_options(cfg, ckpt_dir=root, device=device, offload_model=offload_model,
                        convert_model_dtype=convert_model_dtype, int8=int8, t5_cpu=t5_cpu, compile=compile,
                        world=parallel.world, vram_gb=vram_gb, plan_for=plan_for, stream_staging=stream_staging,
                        int8_activations=int8_activations, quant=quant,
                        **parallel_flags)  # type: ignore[arg-type]
    pipe = Pipeline(cfg, loading.load_components(cfg, opts, parallel), opts)
    if distilled:
        pipe.use_distilled()
    return pipe


__all__ = ["load", "resolve", "check_budget", "distilled_option", "Pipeline", "Video", "InputError", "Request",
           "LoadOptions"]
