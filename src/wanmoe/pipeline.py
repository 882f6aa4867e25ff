"""One generation pipeline for T2V, I2V and S2V: encode -> noise -> sample through the expert router -> decode.

Tasks differ only in conditioning preparation (`_prepare_*` return a `Conditioning` of tensors); the sampling
path is shared. The pipeline takes tensors: reading the user's files is `read_inputs` (called by the CLI) and
writing the mp4 is the CLI's job.

Axis legend: B batch (1 here), C latent channels, F latent frames, H/W latent height/width, T pixel frames,
Hp/Wp pixel height/width, S text tokens, K audio layers, A audio frames (at video fps).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from wanmoe import experts as ex
from wanmoe.configs import PipelineConfig
from wanmoe.distributed.env import ParallelState, cfg_parallel_per_expert, validate_parallel_flags
from wanmoe.models.s2v import S2VInputs
from wanmoe.models.vae import WanVAE
from wanmoe.sampling import guidance, solvers
from wanmoe.sampling.schedules import flow_sigmas, timesteps

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"
SOLVERS = {"unipc": solvers.sample_unipc, "dpm++": solvers.sample_dpmpp_2m, "euler": solvers.sample_euler}
NOT_YET = "is not yet supported in a single process; run under torchrun (see docs/distributed.md)"


@dataclass
class Request:
    """Every setting of one generation, validated (the JSON sidecar is written from it)."""

    task: str
    prompt: str
    neg_prompt: str
    size: tuple[int, int]  # (W, H)
    frame_num: int
    seed: int
    steps: int
    shift: float
    solver: str
    guide_scale: dict[str, float]
    experts: ex.ExpertSpec
    noise_schedule: str = "linear"
    motion_scale: float = 1.0
    num_clip: int | None = None
    infer_frames: int = 80
    start_from_ref: bool = False
    image: str | None = None
    audio: str | None = None
    pose_video: str | None = None
    ckpt_dir: str | None = None
    device: str = "cpu"
    offload_model: bool = True
    t5_cpu: bool = False
    convert_model_dtype: bool = False
    int8: bool = False
    # Multi-process flags (docs/distributed.md); the process group itself lives in Components.parallel.
    ulysses_size: int = 1
    cfg_parallel: bool = False
    dit_fsdp: bool = False
    t5_fsdp: bool = False

    @property
    def size_str(self) -> str:
        return f"{self.size[0]}*{self.size[1]}"

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["experts"] = {"names": list(self.experts.names), "thresholds": list(self.experts.thresholds),
                        "boundary": list(self.experts.boundary), "blend": self.experts.blend,
                        "cuts_log_snr": list(self.experts.cuts)}
        return json.loads(json.dumps(d, default=str))


@dataclass
class Inputs:
    image: Tensor | None = None  # (3, Hp, Wp) in [-1, 1]
    audio: np.ndarray | None = None  # (N,) float32 mono
    sr: int = 16000
    pose: Tensor | None = None  # (3, T, Hp, Wp) in [-1, 1]


@dataclass
class Components:
    cfg: PipelineConfig
    text_encoder: Callable[[list[str]], Tensor]  # prompts -> (B, S, text_dim)
    vae: WanVAE
    experts: object  # an ExpertPool: .get(name) -> DiT on the compute device, .names, .prefetch(name)
    audio_encoder: Callable | None  # (audio, sr, fps) -> (K, Dm, A)
    device: torch.device
    dtype: torch.dtype = torch.float32  # DiT compute dtype
    parallel: ParallelState = field(default_factory=ParallelState)  # world 1 unless launched with torchrun


@dataclass
class Result:
    video: Tensor  # (3, T, Hp, Wp) in [-1, 1]
    timings: dict[str, float] = field(default_factory=dict)
    expert_steps: dict[str, int] = field(default_factory=dict)
    audio_offset_s: float = 0.0  # S2V: the first clip drops frames, so the video starts this far into the audio


# ---------------------------------------------------------------------------------------------------- request


def expert_spec(cfg: PipelineConfig, boundary: float | None = None, threshold: float | None = None,
                blend: float = 0.0) -> ex.ExpertSpec:
    """The task's experts with the switch given as an official boundary (default) or a log-SNR threshold."""
    n = len(cfg.experts)
    if n == 1:
        if threshold is not None or boundary is not None or blend:
            raise ValueError(f"task {cfg.task} has a single expert: --boundary/--expert_threshold/--expert_blend "
                             "do not apply")
        return ex.ExpertSpec(names=cfg.experts)
    if (threshold is not None or boundary is not None) and n != 2:
        # One flag value is one cut: it only defines the split of a two-expert model. More experts take their
        # cuts (a tuple of boundaries or thresholds) from the preset.
        raise ValueError(f"--expert_threshold/--boundary set the single cut between two experts; {cfg.task} has "
                         f"{n} experts {cfg.experts}")
    if threshold is not None:
        return ex.ExpertSpec(names=cfg.experts, thresholds=(threshold,), blend=blend)
    b = cfg.boundary if boundary is None else boundary
    return ex.ExpertSpec(names=cfg.experts, boundary=b, blend=blend)


def request_from_args(args, cfg: PipelineConfig, *, world: int = 1) -> Request:  # noqa: ANN001 (argparse namespace)
    """Validate the command line against the task before anything heavy happens; raise ValueError.

    world: the number of processes (WORLD_SIZE under torchrun; the CLI reads it). One process rejects the
    parallel flags, as the official generate.py does; several check them against the world size.
    """
    from wanmoe.cli import parse_size

    cfg_par = bool(getattr(args, "cfg_parallel", False))
    if world == 1:
        for flag in ("dit_fsdp", "t5_fsdp", "cfg_parallel"):
            if getattr(args, flag, False):
                raise ValueError(f"--{flag} {NOT_YET}")
        if args.ulysses_size != 1:
            raise ValueError(f"--ulysses_size {args.ulysses_size} {NOT_YET}")
    else:
        validate_parallel_flags(world, args.ulysses_size, args.dit_fsdp, args.t5_fsdp, cfg_par, cfg.dit.num_heads)
        if args.t5_fsdp and args.t5_cpu:
            raise ValueError("--t5_fsdp and --t5_cpu cannot be combined: the sharded encoder runs on each GPU")
    size = parse_size(args.size or cfg.default_size, cfg.size_multiple)
    if cfg.sizes and cfg.modality in ("t2v", "i2v") and f"{size[0]}*{size[1]}" not in cfg.sizes:
        raise ValueError(f"--size {args.size} is not supported by {cfg.task}; choose one of {', '.join(cfg.sizes)}")
    frame_num = cfg.frame_num if args.frame_num is None else args.frame_num  # 0 is an error, not 'default'
    if frame_num < 1 or (frame_num - 1) % 4:
        raise ValueError(f"--frame_num must be 4n+1 (5, 9, ..., 81), got {frame_num}")
    infer_frames = cfg.infer_frames if args.infer_frames is None else args.infer_frames
    if infer_frames < 4 or infer_frames % 4:
        raise ValueError(f"--infer_frames must be a positive multiple of 4, got {infer_frames}")
    steps = cfg.sample_steps if args.sample_steps is None else args.sample_steps
    if steps < 1:
        raise ValueError(f"--sample_steps must be >= 1, got {steps}")
    shift = cfg.sample_shift if args.sample_shift is None else args.sample_shift
    if shift <= 0:
        raise ValueError(f"--sample_shift must be > 0, got {shift}")
    if args.num_clip is not None and args.num_clip < 1:
        raise ValueError(f"--num_clip must be >= 1, got {args.num_clip}")
    if args.expert_blend < 0:
        raise ValueError(f"--expert_blend must be >= 0, got {args.expert_blend}")
    if args.boundary is not None and not 0 < args.boundary < 1:
        raise ValueError(f"--boundary must lie in (0, 1), got {args.boundary}")
    spec = expert_spec(cfg, args.boundary, args.expert_threshold, args.expert_blend)
    scale = args.guidance_scale if args.guidance_scale is not None else args.sample_guide_scale
    scales = guidance.per_expert_scale(cfg.guide_scale if scale is None else scale, spec.names)
    if cfg.modality != "s2v":
        # Refuse rather than silently ignore: a t2v/i2v run has no audio, clips or motion frames to apply these to.
        given = {"--audio": args.audio, "--pose_video": args.pose_video, "--num_clip": args.num_clip,
                 "--infer_frames": args.infer_frames, "--start_from_ref": args.start_from_ref,
                 "--motion_scale": args.motion_scale is not None}
        bad = [flag for flag, v in given.items() if v not in (None, False)]
        if bad:
            raise ValueError(f"{', '.join(bad)} only apply to s2v tasks, not {cfg.task}")
    if cfg.modality == "t2v" and args.image:
        raise ValueError(f"--image does not apply to {cfg.task} (text-to-video); use an i2v task")
    if cfg.modality == "s2v" and args.frame_num is not None:
        raise ValueError(f"--frame_num does not apply to {cfg.task}: the audio sets the length "
                         "(use --infer_frames and --num_clip)")
    if cfg.modality == "i2v" and not args.image:
        raise ValueError(f"{cfg.task} needs --image")
    seed = args.base_seed if args.base_seed >= 0 else random.randint(0, sys.maxsize)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available (use --device cpu)")
    return Request(
        task=cfg.task, prompt=args.prompt or cfg.example_prompt, neg_prompt=cfg.neg_prompt, size=size,
        frame_num=frame_num, seed=seed, steps=steps, shift=shift,
        solver=args.sample_solver, guide_scale=scales, experts=spec, noise_schedule=args.noise_schedule,
        motion_scale=cfg.motion_scale if args.motion_scale is None else args.motion_scale,
        num_clip=args.num_clip, infer_frames=infer_frames,
        start_from_ref=args.start_from_ref, image=args.image, audio=args.audio, pose_video=args.pose_video,
        ckpt_dir=args.ckpt_dir, device=device,
        # Official default: offload on one process only; FSDP experts must stay resident (loading.py enforces it).
        offload_model=world == 1 if args.offload_model is None else args.offload_model,
        t5_cpu=args.t5_cpu, convert_model_dtype=args.convert_model_dtype, int8=args.int8,
        ulysses_size=args.ulysses_size, cfg_parallel=cfg_par, dit_fsdp=args.dit_fsdp, t5_fsdp=args.t5_fsdp,
    )


def example_files(cfg: PipelineConfig) -> dict[str, Path]:
    """The example reference image / audio / prompt that ship with an embedded task."""
    d = ASSETS / cfg.task / "example"
    return {"image": d / "ref.png", "audio": d / "audio.wav", "prompt": d / "prompt.txt"}


def read_inputs(req: Request, cfg: PipelineConfig) -> Inputs:
    """Read and check the user's media; ValueError with a clear message on anything unusable."""
    from wanmoe import media

    if cfg.modality == "s2v" and cfg.embedded:
        ex_files = example_files(cfg)
        req.image = req.image or str(ex_files["image"])
        req.audio = req.audio or str(ex_files["audio"])
        if req.prompt == cfg.example_prompt and ex_files["prompt"].exists():
            req.prompt = ex_files["prompt"].read_text().strip()
    out = Inputs()
    if req.image:
        out.image = media.read_image(req.image)
    if cfg.modality == "s2v":
        if not req.image:
            raise ValueError(f"{cfg.task} needs --image (the reference image)")
        if not req.audio:
            raise ValueError(f"{cfg.task} needs --audio (the driving speech)")
        out.audio = media.read_audio(req.audio, sr=16000)
        if len(out.audio) < 1600:
            raise ValueError(f"audio {req.audio} is shorter than 0.1 s")
        if media.audio_is_silent(out.audio):
            raise ValueError(f"audio {req.audio} is silent: nothing to drive the video")
        if req.pose_video:
            out.pose = media.read_video(req.pose_video)[0]
    return out


# ------------------------------------------------------------------------------------------------ components


def load_components(cfg: PipelineConfig, req: Request, parallel: ParallelState | None = None) -> Components:
    from wanmoe.loading import load_components as _load

    return _load(cfg, req, parallel)


# ------------------------------------------------------------------------------------------------ sampling


def _denoiser(c: Components, name: str, kwargs: dict) -> Callable[[Tensor, Tensor], Tensor]:
    """denoise(x, sigma) -> velocity for one expert and one conditioning (the model timestep is trunc(1000 sigma))."""

    def f(x: Tensor, sigma: Tensor) -> Tensor:
        model = c.experts.get(name)
        t = timesteps(sigma.reshape(1)).to(device=x.device, dtype=torch.float32).expand(x.shape[0])  # (B,)
        return model(x.to(c.dtype), t, **kwargs).to(x.dtype)

    return f


def sample(c: Components, req: Request, noise: Tensor, cond: dict, uncond: dict, *,
           no_audio: dict | None = None, progress: Callable | None = None) -> tuple[Tensor, dict[str, int]]:
    """Run the solver from `noise` through the expert router with per-expert CFG; returns (latent, steps per expert)."""
    sigmas = flow_sigmas(req.steps, req.shift, solver=req.solver, spacing=req.noise_schedule)
    names = req.experts.names
    conds = {n: _denoiser(c, n, cond) for n in names}
    if no_audio is not None and req.motion_scale != 1.0:
        # Audio guidance: v = v(audio=0) + m (v(audio) - v(audio=0)); m > 1 strengthens audio-driven motion.
        conds = guidance.cfg_per_expert(conds, {n: _denoiser(c, n, no_audio) for n in names}, req.motion_scale)
    unconds = {n: _denoiser(c, n, uncond) for n in names}
    if c.parallel.cfg_size == 2:  # --cfg_parallel: the two ranks of a CFG pair run one branch each
        den = cfg_parallel_per_expert(conds, unconds, req.guide_scale, c.parallel)
    else:
        den = guidance.cfg_per_expert(conds, unconds, req.guide_scale)
    hook = None
    if hasattr(c.experts, "prefetch"):
        def hook(i: int, active: tuple[str, ...]) -> None:
            for n in router.needs(i + 1):
                if n not in active:
                    c.experts.prefetch(n)  # load the next expert while this one computes
    router = ex.route(den, req.experts, sigmas, hook=hook)
    counts = {n: sum(1 for w in router.plan if n in w) for n in names}
    fn = SOLVERS[req.solver]
    x = fn(router, noise, sigmas.to(noise.device), callback=progress)
    return x, counts


def draw_noise(shape: tuple[int, ...], seed: int, device: torch.device) -> Tensor:
    """Seeded on a CPU generator, then moved: the same seed gives the same noise on every device."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device)


# -------------------------------------------------------------------------------------------- conditioning


def _resize(img: Tensor, hw: tuple[int, int], mode: str = "bicubic") -> Tensor:
    """(3, Hp, Wp) -> (3, h, w), no crop."""
    return F.interpolate(img[None], size=hw, mode=mode, align_corners=False, antialias=mode != "nearest")[0]


def _resize_crop(img: Tensor, hw: tuple[int, int]) -> Tensor:
    """Resize the short side to min(h, w) then centre-crop to (h, w) (the official S2V reference transform)."""
    h, w = hw
    ih, iw = img.shape[1:]
    s = min(h, w) / min(ih, iw)
    nh, nw = max(h, round(ih * s)), max(w, round(iw * s))
    img = _resize(img, (nh, nw)) if (nh, nw) != (ih, iw) else img
    top, left = (nh - h) // 2, (nw - w) // 2
    return img[:, top : top + h, left : left + w].clamp(-1, 1)


def s2v_size(h: int, w: int, area: int, divisor: int = 64) -> tuple[int, int]:
    """Largest (H, W), multiples of `divisor`, with H*W <= area and the image's aspect (official S2V sizing)."""
    scale = math.sqrt(area / (h * w))
    for i in range(100):
        s = scale * (1 - i / 200)
        nh, nw = math.ceil(h * s / divisor) * divisor, math.ceil(w * s / divisor) * divisor
        if nh * nw <= area:
            return nh, nw
    return max(divisor, int(h * scale) // divisor * divisor), max(divisor, int(w * scale) // divisor * divisor)


def _text(c: Components, req: Request) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        ctx = c.text_encoder([req.prompt]).to(c.device, c.dtype)  # (1, S, text_dim)
        ctx_null = c.text_encoder([req.neg_prompt]).to(c.device, c.dtype)
    return ctx, ctx_null


# ------------------------------------------------------------------------------------------------ generate


def generate(c: Components, req: Request, inputs: Inputs, *, progress: bool = True) -> Result:
    """Encode -> noise -> sample -> decode, for every task."""
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    ctx, ctx_null = _text(c, req)
    timings["text_s"] = time.perf_counter() - t0
    with torch.no_grad():
        if c.cfg.modality == "s2v":
            video, counts = _generate_s2v(c, req, inputs, ctx, ctx_null, progress, timings)
        else:
            video, counts = _generate_single(c, req, inputs, ctx, ctx_null, progress, timings)
    if hasattr(c.experts, "offload_all") and not c.parallel.dit_fsdp:  # FSDP-sharded experts stay where they are
        c.experts.offload_all()
    timings["generate_s"] = time.perf_counter() - t0
    offset = 0.0
    if c.cfg.modality == "s2v" and c.cfg.dit.s2v.drop_first_motion and not req.start_from_ref:
        offset = 3 / c.cfg.sample_fps  # frames 0..2 of the first clip are dropped (official)
    return Result(video=video.float().cpu(), timings=timings, expert_steps=counts, audio_offset_s=offset)


def _bar(total: int, desc: str, enabled: bool):  # noqa: ANN202
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def _step_callback(bar) -> Callable:  # noqa: ANN001
    def cb(info: solvers.StepInfo) -> None:
        bar.set_postfix(expert="+".join(info.experts) if info.experts else "", sigma=f"{info.sigma:.3f}")
        bar.update(1)

    return cb


def _generate_single(c: Components, req: Request, inputs: Inputs, ctx: Tensor, ctx_null: Tensor, progress: bool,
                     timings: dict) -> tuple[Tensor, dict]:
    """T2V / I2V: one latent clip."""
    w, h = req.size
    z = c.cfg.vae.z_dim
    lat_f = (req.frame_num - 1) // 4 + 1
    y = None
    if c.cfg.modality == "i2v":
        # Official I2V sizing: keep the image's aspect within the area, latent dims even; resize without crop.
        ih, iw = inputs.image.shape[1:]
        area = w * h
        lat_h = round(math.sqrt(area * ih / iw) // 8 // 2 * 2)
        lat_w = round(math.sqrt(area * iw / ih) // 8 // 2 * 2)
        img = _resize(inputs.image, (lat_h * 8, lat_w * 8)).clamp(-1, 1).to(c.device)
        frames = torch.cat([img[:, None], img.new_zeros(3, req.frame_num - 1, lat_h * 8, lat_w * 8)], dim=1)
        t1 = time.perf_counter()
        y_lat = c.vae.encode(frames[None].float())  # (1, z, F, H, W)
        timings["vae_encode_s"] = time.perf_counter() - t1
        # Mask: first pixel frame 1, the rest 0; frame 0 repeated 4x, then folded into (F, 4) -> 4 channels.
        m = torch.zeros(req.frame_num + 3, lat_h, lat_w, device=c.device)
        m[:4] = 1
        mask = m.view(lat_f, 4, lat_h, lat_w).transpose(0, 1)[None]  # (1, 4, F, H, W)
        y = torch.cat([mask, y_lat], dim=1).to(c.dtype)  # (1, 20, F, H, W)
    else:
        lat_h, lat_w = h // 8, w // 8
    noise = draw_noise((1, z, lat_f, lat_h, lat_w), req.seed, c.device)
    bar = _bar(req.steps, "sampling", progress)
    t1 = time.perf_counter()
    kw = {} if y is None else {"y": y}
    lat, counts = sample(c, req, noise, {"context": ctx, **kw}, {"context": ctx_null, **kw},
                         progress=_step_callback(bar))
    bar.close()
    timings["sample_s"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    if c.parallel.is_main:
        video = c.vae.decode(lat.float())[0]  # (3, T, Hp, Wp)
    else:  # only rank 0 writes the video, so the other ranks skip the decode (an empty clip, T = 0)
        video = lat.new_zeros(3, 0, lat_h * 8, lat_w * 8)
    timings["vae_decode_s"] = time.perf_counter() - t1
    return video, counts


def _generate_s2v(c: Components, req: Request, inputs: Inputs, ctx: Tensor, ctx_null: Tensor, progress: bool,
                  timings: dict) -> tuple[Tensor, dict]:
    """S2V long video: clips of `infer_frames`, motion frames carried over (wan/speech2video.py, spec 11)."""
    from wanmoe.encoders.audio import audio_clips

    s2v_cfg = c.cfg.dit.s2v
    w, h = req.size
    ih, iw = inputs.image.shape[1:]
    hp, wp = (h, w) if c.cfg.embedded else s2v_size(ih, iw, w * h)
    ref = _resize_crop(inputs.image, (hp, wp)).to(c.device)  # (3, Hp, Wp)
    t1 = time.perf_counter()
    feats = c.audio_encoder(inputs.audio, inputs.sr, c.cfg.sample_fps)  # (K, Dm, A)
    clips = audio_clips(feats, req.infer_frames, None)  # (n, K, Dm, infer_frames)
    n_clips = clips.shape[0] if req.num_clip is None else min(req.num_clip, clips.shape[0])
    ref_lat = c.vae.encode(ref[None, :, None].float())  # (1, z, 1, H, W)
    mf = s2v_cfg.motion_frames
    buf = torch.zeros(1, 3, mf, hp, wp, device=c.device)  # pixel motion buffer, oldest first
    drop_first = s2v_cfg.drop_first_motion and not req.start_from_ref
    if req.start_from_ref:
        buf[:, :, -6:] = ref[None, :, None]
    motion_lat = c.vae.encode(buf)  # (1, z, Fm, H, W)
    pose = _pose_latents(c, req, inputs, n_clips, (hp, wp))
    timings["encode_s"] = time.perf_counter() - t1
    lat_f = (req.infer_frames + 3 + mf) // 4 - s2v_cfg.lat_motion_frames
    out, counts = [], {}
    bar = _bar(req.steps * n_clips, f"sampling {n_clips} clip(s)", progress)
    t_s = t_d = 0.0
    for r in range(n_clips):
        drop = drop_first and r == 0
        audio = clips[r][None].to(c.device, c.dtype)  # (1, K, Dm, infer_frames)

        def inputs_for(a: Tensor, _motion: Tensor = motion_lat, _drop: bool = drop, _r: int = r) -> S2VInputs:
            return S2VInputs(audio=a, ref_latents=ref_lat.to(c.dtype), motion_latents=_motion.to(c.dtype),
                             pose_latents=None if pose is None else pose[_r], drop_motion_frames=_drop)

        noise = draw_noise((1, c.cfg.vae.z_dim, lat_f, hp // 8, wp // 8), req.seed + r, c.device)
        t1 = time.perf_counter()
        lat, cnt = sample(
            c, req, noise, {"context": ctx, "s2v": inputs_for(audio)},
            {"context": ctx_null, "s2v": inputs_for(audio * 0)},  # official uncond: negative prompt and zero audio
            no_audio={"context": ctx, "s2v": inputs_for(audio * 0)}, progress=_step_callback(bar),
        )
        t_s += time.perf_counter() - t1
        counts = {k: counts.get(k, 0) + v for k, v in cnt.items()}
        t1 = time.perf_counter()
        dec = c.vae.decode(torch.cat([ref_lat if drop else motion_lat, lat.float()], dim=2))  # (1, 3, T, Hp, Wp)
        frames = dec[:, :, -req.infer_frames:]
        if drop:
            frames = frames[:, :, 3:]  # official: the first clip loses 3 more frames
        out.append(frames[0].cpu())
        if r + 1 < n_clips:
            k = min(mf, frames.shape[2])
            buf = torch.cat([buf[:, :, k:], frames[:, :, -k:]], dim=2)
            motion_lat = c.vae.encode(buf)
        t_d += time.perf_counter() - t1
    bar.close()
    timings.update(sample_s=t_s, vae_s=t_d, clips=n_clips)
    return torch.cat(out, dim=1), counts


def _pose_latents(c: Components, req: Request, inputs: Inputs, n_clips: int, hw: tuple[int, int]) -> list | None:
    """Per clip: the pose frames (resized, padded with -1), frame 0 prepended, VAE-encoded, first latent dropped."""
    if inputs.pose is None:
        return None
    n = req.infer_frames * n_clips
    pose = inputs.pose[:, :n]
    pose = torch.stack([_resize_crop(pose[:, i], hw) for i in range(pose.shape[1])], dim=1)  # (3, T, Hp, Wp)
    if pose.shape[1] < n:
        pose = torch.cat([pose, -pose.new_ones(3, n - pose.shape[1], *hw)], dim=1)
    out = []
    for r in range(n_clips):
        chunk = pose[:, r * req.infer_frames : (r + 1) * req.infer_frames]
        chunk = torch.cat([chunk[:, :1], chunk], dim=1)[None].to(c.device)  # (1, 3, 1 + infer_frames, Hp, Wp)
        out.append(c.vae.encode(chunk)[:, :, 1:].to(c.dtype))  # (1, z, F, H, W)
    return out
