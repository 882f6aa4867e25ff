"""One generation path for T2V, I2V and S2V: text -> conditioning per task -> one clip sampler -> decode.

Each task prepares its conditioning (`T2VClips`, `I2VClips`, `S2VClips`: what the DiT sees for clip r, and how
a clip's latent becomes pixel frames); `sample_clip` runs the solver through the expert router with per-expert
guidance for every task; `generate` is a thin loop over clips (one clip for T2V/I2V, as many as the audio fills
for S2V). The pipeline takes tensors (`wanmoe.inputs.Inputs`) and a validated `wanmoe.request.Request`; it
reads no files, writes none, and reports progress only through a callback.

Axis legend: B batch (1 here), C latent channels, F latent frames, H/W latent height/width, T pixel frames,
Hp/Wp pixel height/width, S text tokens, K audio layers, A audio frames (at video fps).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from wanmoe import experts as ex
from wanmoe.configs import PipelineConfig
from wanmoe.distributed.env import ParallelState, cfg_parallel_per_expert
from wanmoe.encoders.audio import audio_clips
from wanmoe.inputs import Inputs
from wanmoe.models.s2v import S2VInputs
from wanmoe.models.vae import WanVAE
from wanmoe.request import InputError, Request
from wanmoe.sampling import guidance, solvers
from wanmoe.sampling.cache import CALIBRATION_FILE, CacheStats, Calibration, Recorder, StepCache
from wanmoe.sampling.schedules import flow_sigmas, log_snr_float, timesteps

log = logging.getLogger(__name__)

SOLVERS = {"unipc": solvers.sample_unipc, "dpm++": solvers.sample_dpmpp_2m, "euler": solvers.sample_euler}


@dataclass
class Components:
    cfg: PipelineConfig
    text_encoder: Callable[[list[str]], Tensor]  # prompts -> (B, S, text_dim)
    vae: WanVAE
    experts: object  # an ExpertPool: .get(name) -> DiT on the compute device, .names, .prefetch(name)
    audio_encoder: Callable | None  # (audio, sr, fps) -> (K, Dm, A)
    device: torch.device
    dtype: torch.dtype = torch.float32  # DiT compute dtype (wanmoe.numerics.compute_dtype)
    parallel: ParallelState = field(default_factory=ParallelState)  # world 1 unless launched with torchrun
    cache_calibration: Calibration | None = None  # the model's step-cache calibration (step_cache.json), if any


@dataclass(frozen=True)
class Progress:
    """One progress report: `stage` is text | encode | sample | decode; `done` of `total` in that stage."""

    stage: str
    done: int
    total: int
    clip: int = 0  # 0-based clip index (S2V); 0 for T2V/I2V
    clips: int = 1
    expert: str = ""  # sample: the active expert(s), "+"-joined inside a blend band
    sigma: float | None = None


ProgressFn = Callable[[Progress], None]


@dataclass(frozen=True)
class Preview:
    """A look at the clip being made, for live displays: after each sampling step its x0 prediction (`latent`);
    while it decodes, each group of pixel frames as soon as the VAE has made it (`frames`: only frames the video
    keeps, in order, so the groups of a clip concatenate to its frames)."""

    clip: int
    clips: int
    latent: Tensor | None = None  # (1, C, F, H, W) x0 prediction after sampling step `step` (1-based) of this clip
    step: int = 0
    frames: Tensor | None = None  # (3, t, Hp, Wp) float32 in [-1, 1] on the CPU: this clip's next t frames


PreviewFn = Callable[[Preview], None]


@dataclass
class Result:
    video: Tensor  # (3, T, Hp, Wp) float32 in [-1, 1] on the CPU
    fps: int
    timings: dict[str, float] = field(default_factory=dict)
    expert_steps: dict[str, int] = field(default_factory=dict)
    expert_calls: dict[str, int] = field(default_factory=dict)  # transformer evaluations run (fewer with caching)


@dataclass
class Conditioning:
    """What the DiT sees for one clip: keyword arguments for the conditional and unconditional passes."""

    cond: dict
    uncond: dict
    latent_shape: tuple[int, ...]  # (1, C, F, H, W)
    no_audio: dict | None = None  # S2V audio guidance: the conditional pass with the audio zeroed


# ------------------------------------------------------------------------------------------------ sampling


def _denoiser(c: Components, name: str, kwargs: dict) -> Callable[[Tensor, Tensor], Tensor]:
    """denoise(x, sigma) -> velocity for one expert and one conditioning (the model timestep is trunc(1000 sigma))."""

    def f(x: Tensor, sigma: Tensor) -> Tensor:
        model = c.experts.get(name)
        t = timesteps(sigma.reshape(1)).to(device=x.device, dtype=torch.float32).expand(x.shape[0])  # (B,)
        return model(x.to(c.dtype), t, **kwargs).to(x.dtype)

    return f


def _stack(kwargs: list[dict]) -> dict:
    """Several passes' DiT keyword arguments as one batch (contexts zero-padded to one length, as the DiT pads)."""
    out: dict = {}
    ctx = [k["context"] for k in kwargs]
    s = max(t.shape[1] for t in ctx)
    out["context"] = torch.cat([F.pad(t, (0, 0, 0, s - t.shape[1])) for t in ctx])  # (P, S, text_dim)
    if "y" in kwargs[0]:
        out["y"] = torch.cat([k["y"] for k in kwargs])
    if "s2v" in kwargs[0]:
        ins = [k["s2v"] for k in kwargs]
        pose = None if ins[0].pose_latents is None else torch.cat([i.pose_latents for i in ins])
        out["s2v"] = S2VInputs(audio=torch.cat([i.audio for i in ins]),
                               ref_latents=torch.cat([i.ref_latents for i in ins]),
                               motion_latents=torch.cat([i.motion_latents for i in ins]), pose_latents=pose,
                               drop_motion_frames=ins[0].drop_motion_frames)
    return out


def _batched_guidance(c: Components, name: str, cond: Conditioning, scale: float,
                      motion: float | None) -> Callable[[Tensor, Tensor], Tensor]:
    """The guided velocity of one expert with all its passes (conditional, audio-free, unconditional) in one batch:
    the arithmetic of `guidance.cfg`, one transformer call instead of two or three."""
    passes = [cond.cond] + ([cond.no_audio] if motion is not None else []) + ([cond.uncond] if scale != 1.0 else [])
    f = _denoiser(c, name, _stack(passes))

    def den(x: Tensor, sigma: Tensor) -> Tensor:
        out = f(x.expand(len(passes), *x.shape[1:]), sigma)  # (P, C, F, H, W)
        v, k = out[:1], 1
        if motion is not None:
            v, k = out[1:2] + motion * (v - out[1:2]), 2
        if scale != 1.0:
            v = out[k : k + 1] + scale * (v - out[k : k + 1])
        return v

    return den


def draw_noise(shape: tuple[int, ...], seed: int, device: torch.device) -> Tensor:
    """Seeded on a CPU generator, then moved: the same seed gives the same noise on every device."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device)


def sample_clip(c: Components, req: Request, cond: Conditioning, seed: int,
                on_step: Callable[[solvers.StepInfo], None] | None = None, *, stats: CacheStats | None = None,
                recorder: Recorder | None = None) -> tuple[Tensor, dict[str, int]]:
    """Noise from `seed`, then the solver through the expert router with per-expert CFG.

    Returns (latent, steps per expert)."""
    noise = draw_noise(cond.latent_shape, seed, c.device)
    sigmas = flow_sigmas(req.steps, req.shift, solver=req.solver, spacing=req.noise_schedule)
    names = req.experts.names
    audio_guided = cond.no_audio is not None and req.motion_scale != 1.0
    # Under the 'stream' policy every transformer call copies each block to the device: batching the guidance
    # passes makes that once per step instead of two or three times.
    batched = req.batch_cfg or getattr(c.experts, "policy", None) == "stream"
    if batched and c.parallel.cfg_size != 2:
        motion = req.motion_scale if audio_guided else None
        den = {n: _batched_guidance(c, n, cond, req.guide_scale[n], motion) for n in names}
    else:
        conds = {n: _denoiser(c, n, cond.cond) for n in names}
        if audio_guided:
            # Audio guidance: v = v(audio=0) + m (v(audio) - v(audio=0)); m > 1 strengthens audio-driven motion.
            conds = guidance.cfg_per_expert(conds, {n: _denoiser(c, n, cond.no_audio) for n in names},
                                            req.motion_scale)
        unconds = {n: _denoiser(c, n, cond.uncond) for n in names}
        if c.parallel.cfg_size == 2:  # cfg_parallel: the two ranks of a CFG pair run one branch each
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
    if recorder is not None:  # calibration: every evaluation's magnitude, uncached
        recorder.start_run()
        router.denoisers = {n: recorder.wrap(n, d) for n, d in router.denoisers.items()}
    elif req.cache is not None:  # generate() checked that the model has a calibration
        lams = [log_snr_float(s) for s in sigmas.tolist()]
        sc = StepCache(c.cache_calibration, router.plan, lams, req.cache, req.cache_max_skips,
                       step=lambda: router.step - 1, stats=stats)
        router.denoisers = {n: sc.wrap(n, d) for n, d in router.denoisers.items()}
    counts = {n: sum(1 for w in router.plan if n in w) for n in names}
    x = SOLVERS[req.solver](router, noise, sigmas.to(noise.device), callback=on_step)
    return x, counts


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


class T2VClips:
    """Text-to-video: one clip of `frame_num` frames, conditioned on the text alone."""

    def __init__(self, c: Components, req: Request, inputs: Inputs, ctx: Tensor, ctx_null: Tensor) -> None:
        self.c, self.req = c, req
        w, h = req.size
        st = c.cfg.vae_stride
        self.lat_hw = (h // st[1], w // st[2])
        self.extra: dict = {}
        self.ctx, self.ctx_null = ctx, ctx_null
        self.n_clips = 1

    def conditioning(self, r: int) -> Conditioning:
        shape = (1, self.c.cfg.vae.z_dim, self.c.cfg.latent_frames(self.req.frame_num), *self.lat_hw)
        return Conditioning({"context": self.ctx, **self.extra}, {"context": self.ctx_null, **self.extra}, shape)

    def decode_input(self, r: int, lat: Tensor) -> Tensor:
        """The latent the VAE decodes for clip r, given its sampled latent."""
        return lat.float()

    def decode(self, r: int, lat: Tensor, emit: Callable[[Tensor], None] | None = None) -> Tensor:
        if not self.c.parallel.is_main:  # only rank 0 writes the video: the other ranks skip the decode (T = 0)
            st = self.c.cfg.vae_stride
            return lat.new_zeros(3, 0, self.lat_hw[0] * st[1], self.lat_hw[1] * st[2]).cpu()
        with _streamed(self.c.vae, 0, emit):
            return self.c.vae.decode(self.decode_input(r, lat))[0].cpu()  # (3, T, Hp, Wp)


class I2VClips(T2VClips):
    """Image-to-video: the first frame VAE-encoded with zeros after it, plus a first-frame mask, on the channels."""

    def __init__(self, c: Components, req: Request, inputs: Inputs, ctx: Tensor, ctx_null: Tensor) -> None:
        super().__init__(c, req, inputs, ctx, ctx_null)
        w, h = req.size
        st, p = c.cfg.vae_stride, c.cfg.dit.patch_size
        # Official I2V sizing: keep the image's aspect within the area; latent dims a multiple of the patch.
        ih, iw = inputs.image.shape[1:]
        lat_h = round(math.sqrt(w * h * ih / iw) // st[1] // p[1] * p[1])
        lat_w = round(math.sqrt(w * h * iw / ih) // st[2] // p[2] * p[2])
        self.lat_hw = (lat_h, lat_w)
        hp, wp = lat_h * st[1], lat_w * st[2]
        img = _resize(inputs.image, (hp, wp)).clamp(-1, 1).to(c.device)
        frames = torch.cat([img[:, None], img.new_zeros(3, req.frame_num - 1, hp, wp)], dim=1)  # (3, T, Hp, Wp)
        y_lat = c.vae.encode(frames[None].float())  # (1, z, F, H, W)
        # Mask: pixel frame 0 is given; frame 0 repeated `stride` times, then folded into (F, stride) channels.
        lat_f = c.cfg.latent_frames(req.frame_num)
        m = torch.zeros(lat_f * st[0], lat_h, lat_w, device=c.device)
        m[: st[0]] = 1
        mask = m.view(lat_f, st[0], lat_h, lat_w).transpose(0, 1)[None]  # (1, stride, F, H, W)
        self.extra = {"y": torch.cat([mask, y_lat], dim=1).to(c.dtype)}  # (1, stride + z, F, H, W)


class S2VClips:
    """Speech-to-video: clips of `infer_frames`, each conditioned on its audio, the reference image and the
    newest decoded frames of the clip before (motion frames), as the official S2V pipeline does. With
    `req.clip_context == "reference"` every clip is made as the first one is: no motion frames, the same noise
    (`generate`), decoded after the reference latent (nothing of the clip before is read, so the motion frames are
    never encoded)."""

    def __init__(self, c: Components, req: Request, inputs: Inputs, ctx: Tensor, ctx_null: Tensor) -> None:
        self.c, self.req, self.ctx, self.ctx_null = c, req, ctx, ctx_null
        cfg, s2v = c.cfg, c.cfg.dit.s2v
        st = cfg.vae_stride
        w, h = req.size
        ih, iw = inputs.image.shape[1:]
        self.hw = (h, w) if cfg.embedded else s2v_size(ih, iw, w * h)
        ref = _resize_crop(inputs.image, self.hw).to(c.device)  # (3, Hp, Wp)
        feats = c.audio_encoder(inputs.audio, inputs.sr, cfg.sample_fps)  # (K, Dm, A)
        self.audio = audio_clips(feats, req.infer_frames, None)  # (n, K, Dm, infer_frames)
        n = self.audio.shape[0]
        self.n_clips = n if req.num_clip is None else min(req.num_clip, n)
        self.ref_lat = c.vae.encode(ref[None, :, None].float())  # (1, z, 1, H, W)
        self.mf = s2v.motion_frames
        self.drop = cfg.dropped_frames(req.start_from_ref)  # pixel frames clip 0 loses
        self.fresh = req.clip_context == "reference"  # every clip starts from the reference, as clip 0 does
        lat_hw = (self.hw[0] // st[1], self.hw[1] // st[2])
        self.buf = torch.zeros(1, 3, self.mf, *self.hw, device=c.device)  # pixel motion buffer, oldest first
        if req.start_from_ref:
            self.buf[:, :, -6:] = ref[None, :, None]
        if self.drop or self.fresh:
            # Clip 0 runs without motion tokens (drop_motion_frames) and decodes after the reference latent: its
            # motion latents are never read, so they are not encoded.
            self.motion_lat = torch.zeros(1, cfg.vae.z_dim, s2v.lat_motion_frames, *lat_hw, device=c.device)
        else:
            self.motion_lat = c.vae.encode(self.buf)  # (1, z, Fm, H, W)
        self.pose = _pose_latents(c, req, inputs, self.n_clips, self.hw)
        lat_f = -(-(req.infer_frames + self.mf) // st[0]) - s2v.lat_motion_frames
        self.shape = (1, cfg.vae.z_dim, lat_f, *lat_hw)

    def conditioning(self, r: int) -> Conditioning:
        c = self.c
        audio = self.audio[r][None].to(c.device, c.dtype)  # (1, K, Dm, infer_frames)

        def s2v(a: Tensor) -> S2VInputs:
            return S2VInputs(audio=a, ref_latents=self.ref_lat.to(c.dtype), motion_latents=self.motion_lat.to(c.dtype),
                             pose_latents=None if self.pose is None else self.pose[r],
                             drop_motion_frames=self._from_ref(r))

        zero = audio * 0  # official uncond: negative prompt and zero audio
        return Conditioning({"context": self.ctx, "s2v": s2v(audio)}, {"context": self.ctx_null, "s2v": s2v(zero)},
                            self.shape, no_audio={"context": self.ctx, "s2v": s2v(zero)})

    def _from_ref(self, r: int) -> bool:
        """Clip r runs without motion tokens and decodes after the reference latent."""
        return (bool(self.drop) and r == 0) or self.fresh

    def decode_input(self, r: int, lat: Tensor) -> Tensor:
        """The latent the VAE decodes for clip r: the reference latent (or the motion latents) before its own."""
        prefix = self.ref_lat if self._from_ref(r) else self.motion_lat
        return torch.cat([prefix, lat.float()], dim=2)  # (1, z, 1 or Fm, + F, H, W)

    def decode(self, r: int, lat: Tensor, emit: Callable[[Tensor], None] | None = None) -> Tensor:
        first = bool(self.drop) and r == 0  # clip 0 also loses its first `drop` frames
        z = self.decode_input(r, lat)
        # Decoded frames before the first one kept: all but the last infer_frames, and clip 0's dropped frames.
        skip = 1 + self.c.cfg.vae_stride[0] * (z.shape[2] - 1) - self.req.infer_frames + (self.drop if first else 0)
        with _streamed(self.c.vae, skip, emit):
            dec = self.c.vae.decode(z)
        frames = dec[:, :, -self.req.infer_frames :]  # (1, 3, infer_frames, Hp, Wp)
        if first:
            frames = frames[:, :, self.drop :]
        if r + 1 < self.n_clips and not self.fresh:  # carry the newest frames over as the next clip's motion context
            k = min(self.mf, frames.shape[2])
            self.buf = torch.cat([self.buf[:, :, k:], frames[:, :, -k:]], dim=2)
            self.motion_lat = self.c.vae.encode(self.buf)
        return frames[0].cpu()


@contextmanager
def _streamed(vae: WanVAE, skip: int, emit: Callable[[Tensor], None] | None) -> Iterator[None]:
    """While the VAE decodes: emit(frames) for each group of frames its decoder makes (one latent frame at a time),
    leaving out the first `skip`. A forward hook, so the VAE itself is unchanged; nothing happens without `emit`."""
    if emit is None:
        yield
        return
    seen = 0

    def hook(module: torch.nn.Module, args: tuple, out: Tensor) -> None:
        nonlocal seen
        start, seen = max(0, skip - seen), seen + out.shape[2]
        if start < out.shape[2]:
            emit(out[0, :, start:].clamp(-1.0, 1.0).float().contiguous().cpu())  # (3, t, Hp, Wp)

    handle = vae.decoder.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


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


CLIPS = {"t2v": T2VClips, "i2v": I2VClips, "s2v": S2VClips}


# ------------------------------------------------------------------------------------------------ generate


def _experts_off(c: Components) -> None:
    """Before the last clip's decode, as the official code does with --offload_model: idle experts off the device
    (every policy but 'resident'; FSDP-sharded experts stay where they are)."""
    pool = c.experts
    if getattr(pool, "policy", "resident") != "resident" and hasattr(pool, "offload_all") and not c.parallel.dit_fsdp:
        pool.offload_all()


def _contexts(c: Components, req: Request) -> tuple[Tensor, Tensor]:
    """The prompt's and the negative prompt's text embeddings, (1, S, text_dim) each."""
    return (c.text_encoder([req.prompt]).to(c.device, c.dtype),
            c.text_encoder([req.negative_prompt]).to(c.device, c.dtype))


def first_clip_latent(c: Components, req: Request, inputs: Inputs) -> Tensor:
    """The latent `generate` decodes for the first clip (S2V: the reference latent, then the sampled latent), made
    the same way but never decoded: training on the model's own output needs the latent, not the video."""
    with torch.no_grad():
        clips = CLIPS[c.cfg.modality](c, req, inputs, *_contexts(c, req))
        lat, _ = sample_clip(c, req, clips.conditioning(0), req.seed)
        return clips.decode_input(0, lat)


def generate(c: Components, req: Request, inputs: Inputs, *, progress: ProgressFn | None = None,
             preview: PreviewFn | None = None, on_clip: Callable[[Tensor], None] | None = None,
             keep_frames: bool = True, recorder: Recorder | None = None) -> Result:
    """Text -> the task's clips (conditioning, sampling, decode) -> one video, for every task.

    `on_clip(frames)` receives each clip's decoded frames (3, T, Hp, Wp) as soon as the clip is done (a muxer
    streams them to the file); with `keep_frames=False` they are not also collected, so memory stays flat however
    long the audio is and `Result.video` holds no frames. `recorder` (step-cache calibration) sees every
    transformer evaluation, with caching off."""
    if req.cache is not None and recorder is None and c.cache_calibration is None:  # refused before any work
        raise InputError("cache", f"needs a step-cache calibration for this model ({CALIBRATION_FILE} in its "
                                  "folder); make one with Pipeline.calibrate_cache")
    say = progress or (lambda p: None)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    say(Progress("text", 0, 1))
    with torch.no_grad():
        ctx, ctx_null = _contexts(c, req)
        timings["text_s"] = time.perf_counter() - t0
        say(Progress("text", 1, 1))
        t1 = time.perf_counter()
        say(Progress("encode", 0, 1))
        clips = CLIPS[c.cfg.modality](c, req, inputs, ctx, ctx_null)
        timings["encode_s"] = time.perf_counter() - t1
        say(Progress("encode", 1, 1))
        out, counts, t_s, t_d, stats = [], {}, 0.0, 0.0, CacheStats()
        n = clips.n_clips
        for r in range(n):
            def on_step(info: solvers.StepInfo, _r: int = r) -> None:
                say(Progress("sample", _r * req.steps + info.i + 1, n * req.steps, _r, n,
                             "+".join(info.experts), float(info.sigma)))
                if preview is not None:
                    preview(Preview(_r, n, latent=info.denoised, step=info.i + 1))

            t1 = time.perf_counter()
            # Noise seed + r per clip; under clip_context "reference" every clip is made as the first one is, from
            # the same noise too, so the clips differ only by their audio.
            seed = req.seed if req.clip_context == "reference" else req.seed + r
            lat, cnt = sample_clip(c, req, clips.conditioning(r), seed, on_step, stats=stats, recorder=recorder)
            t_s += time.perf_counter() - t1
            counts = {k: counts.get(k, 0) + v for k, v in cnt.items()}
            if r == n - 1:
                _experts_off(c)  # official order: the experts leave the device before the last decode
            t1 = time.perf_counter()
            frames = clips.decode(r, lat, None if preview is None else
                                  lambda f, _r=r: preview(Preview(_r, n, frames=f)))
            t_d += time.perf_counter() - t1
            if on_clip is not None:
                on_clip(frames)
            # Not kept: an empty tensor of its own (a slice would be a view keeping the clip's storage alive).
            out.append(frames if keep_frames else frames.new_zeros(3, 0, *frames.shape[2:]))
            say(Progress("decode", r + 1, n, r, n))
    if hasattr(c.experts, "offload_all") and not c.parallel.dit_fsdp:  # FSDP-sharded experts stay where they are
        c.experts.offload_all()
    timings.update(sample_s=t_s, decode_s=t_d, clips=n, generate_s=time.perf_counter() - t0)
    calls = counts if req.cache is None or recorder is not None else \
        {n: stats.computed.get(n, 0) for n in counts}
    return Result(video=torch.cat(out, dim=1).float(), fps=c.cfg.sample_fps, timings=timings, expert_steps=counts,
                  expert_calls=calls)
