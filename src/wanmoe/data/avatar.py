"""Procedural talking-avatar dataset: reference image, prompt, speech-like audio and target video per seed.

Axis legend: T pixel frames, H/W pixel height/width, 3 RGB channels, N audio samples.

Every sample is a pure function of its seed. The avatar is a flat-shaded face (round / oval / square / wide)
with eyes, pupils, lips and a dark mouth interior on a softly graded background. Its animation is a pure
function of (params, loudness envelope, fps): the mouth opening at frame k is ``mouth_opening(envelope[k])``,
the eyes blink on a seeded schedule and the head moves in one of four motion styles named in the prompt.
Rendering is vectorised over (T, H, W) with torch; edges are anti-aliased with a one-pixel smoothstep on an
approximate signed distance, so any output size works. Videos are float32 (3, T, H, W) in [-1, 1].

Geometry lives in "frame units": y in [-1, 1] top to bottom, x in [-W/H, W/H]; features are placed in
face-local units (face half-height = 1) and scaled by ``AvatarParams.face_scale``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from wanmoe.data.speech import SPEECH_SR, loudness_envelope, synthesize_speech

__all__ = [
    "AvatarParams", "AvatarSample", "AvatarDataset", "FACE_COLORS", "BG_COLORS", "EYE_COLORS", "FACE_SHAPES",
    "MOTIONS", "MOUTH_INTERIOR", "sample_params", "describe", "render_reference", "render_video",
    "mouth_opening", "make_sample", "render_from_audio", "split_seeds", "SPLITS",
]

FACE_COLORS: dict[str, tuple[float, float, float]] = {
    "orange": (0.96, 0.58, 0.20), "yellow": (0.98, 0.86, 0.30), "pink": (0.97, 0.66, 0.74),
    "peach": (0.99, 0.80, 0.64), "green": (0.55, 0.84, 0.48), "blue": (0.52, 0.72, 0.97),
    "lavender": (0.78, 0.68, 0.95), "tan": (0.84, 0.69, 0.50), "white": (0.95, 0.95, 0.92),
}
# Backgrounds are never as dark as the mouth interior, so "dark pixels" stay a mouth/pupil cue.
BG_COLORS: dict[str, tuple[float, float, float]] = {
    "teal": (0.05, 0.52, 0.52), "grey": (0.52, 0.52, 0.52), "purple": (0.46, 0.28, 0.62),
    "sky blue": (0.56, 0.80, 0.96), "olive": (0.52, 0.52, 0.18), "mint": (0.70, 0.94, 0.80),
    "brown": (0.52, 0.35, 0.22), "cream": (0.96, 0.92, 0.80), "dark blue": (0.18, 0.24, 0.55),
}
EYE_COLORS: dict[str, tuple[float, float, float]] = {
    "brown": (0.33, 0.19, 0.09), "blue": (0.14, 0.34, 0.76), "green": (0.13, 0.50, 0.24), "black": (0.05, 0.05, 0.06),
}
MOUTH_INTERIOR = (0.30, 0.04, 0.08)  # dark red: the colour the mouth-sync metric looks for
_EYE_WHITE = (0.97, 0.97, 0.97)
_LIP_TINT = (0.78, 0.18, 0.24)

# (half-width a, half-height b, superellipse exponent p) in face-local units.
FACE_SHAPES: dict[str, tuple[float, float, float]] = {
    "round": (1.0, 1.0, 2.0), "oval": (0.80, 1.0, 2.0), "square": (0.92, 0.95, 4.0), "wide": (1.15, 0.90, 2.4),
}
MOTIONS: dict[str, str] = {
    "still": "keeping the head still", "nod": "nodding gently", "sway": "swaying from side to side",
    "bob": "bobbing up and down",
}

# Face-local feature layout.
_EYE_X, _EYE_Y, _EYE_RX, _EYE_RY, _PUPIL_R = 0.34, -0.20, 0.17, 0.14, 0.075
_MOUTH_Y, _MOUTH_A, _MOUTH_B0, _MOUTH_B1, _LIP = 0.42, 0.30, 0.05, 0.13, 0.05
_BLINK_S = 0.25  # blink duration in seconds


@dataclass(frozen=True)
class AvatarParams:
    """Everything that defines one avatar's look and motion; see ``sample_params``."""

    seed: int
    face_shape: str
    face_color: str
    bg_color: str
    eye_color: str
    motion: str
    face_scale: float  # face half-height in frame units
    center: tuple[float, float]  # (x, y) face centre in frame units
    motion_hz: float
    motion_phase: float  # radians
    blink_period: float  # seconds
    blink_phase: float  # seconds to the first blink

    def __post_init__(self) -> None:
        for name, value, table in (("face_shape", self.face_shape, FACE_SHAPES), ("face_color", self.face_color,
                                   FACE_COLORS), ("bg_color", self.bg_color, BG_COLORS),
                                   ("eye_color", self.eye_color, EYE_COLORS), ("motion", self.motion, MOTIONS)):
            if value not in table:
                raise ValueError(f"{name}={value!r}; expected one of {sorted(table)}")
        if not 0.2 <= self.face_scale <= 0.8:
            raise ValueError(f"face_scale must be in [0.2, 0.8], got {self.face_scale}")

    @property
    def prompt(self) -> str:
        return describe(self)


@dataclass
class AvatarSample:
    """One training/eval example. ``video`` is a deterministic function of (params, audio, fps, size)."""

    ref: torch.Tensor  # (3, H, W) in [-1, 1], rest pose (mouth closed, eyes open, no motion)
    prompt: str
    audio: np.ndarray  # (N,) float32 mono
    sr: int
    video: torch.Tensor  # (3, T, H, W) in [-1, 1]
    mouth: torch.Tensor  # (T,) ground-truth mouth opening in [0, 1]
    envelope: torch.Tensor  # (T,) loudness envelope in [0, 1] that drove the mouth
    fps: float
    params: AvatarParams


def sample_params(seed: int) -> AvatarParams:
    """Draw an avatar from the seed (numpy default_rng, so identical across platforms)."""
    rng = np.random.default_rng([int(seed), 0xA7A7A])
    face = str(rng.choice(list(FACE_COLORS)))
    # Keep a visible face/background contrast (RGB distance > 0.35).
    bgs = [b for b in BG_COLORS if np.linalg.norm(np.subtract(BG_COLORS[b], FACE_COLORS[face])) > 0.35]
    period = float(rng.uniform(2.5, 4.5))
    motion = str(rng.choice(list(MOTIONS)))
    hz = {"still": 0.0, "nod": rng.uniform(0.8, 1.3), "sway": rng.uniform(0.4, 0.7), "bob": rng.uniform(1.0, 1.5)}
    return AvatarParams(
        seed=int(seed), face_shape=str(rng.choice(list(FACE_SHAPES))), face_color=face,
        bg_color=str(rng.choice(bgs)), eye_color=str(rng.choice(list(EYE_COLORS))), motion=motion,
        face_scale=float(rng.uniform(0.58, 0.70)),
        center=(float(rng.uniform(-0.06, 0.06)), float(rng.uniform(-0.04, 0.06))),
        motion_hz=float(hz[motion]), motion_phase=float(rng.uniform(0, 2 * math.pi)),
        blink_period=period, blink_phase=float(rng.uniform(0.3, period)),
    )


def describe(params: AvatarParams) -> str:
    """Prompt text, e.g. 'a round orange face with brown eyes on a teal background, nodding gently while talking'."""
    article = "an" if params.face_shape[0] in "aeiou" else "a"
    return (f"{article} {params.face_shape} {params.face_color} face with {params.eye_color} eyes on a "
            f"{params.bg_color} background, {MOTIONS[params.motion]} while talking")


def mouth_opening(envelope: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Mouth opening in [0, 1] from loudness in [0, 1]: smoothstep e^2 (3 - 2e), so quiet frames stay nearly shut."""
    e = torch.as_tensor(np.asarray(envelope, dtype=np.float32)).clamp(0, 1)
    return e * e * (3 - 2 * e)


def _size_hw(size: int | Sequence[int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    if h < 16 or w < 16:
        raise ValueError(f"size must be >= 16 pixels on each side, got {(h, w)}")
    return h, w


def _cov(d: torch.Tensor, px: float) -> torch.Tensor:
    """Anti-aliased coverage from a signed distance (negative inside): smoothstep across one pixel."""
    x = (0.5 - d / px).clamp(0, 1)
    return x * x * (3 - 2 * x)


def _superellipse_sd(u: torch.Tensor, v: torch.Tensor, a: float, b: torch.Tensor | float, p: float) -> torch.Tensor:
    """Approximate signed distance to |u/a|^p + |v/b|^p = 1: first-order (r - 1) / |grad r|."""
    au, av = u.abs() / a, v.abs() / b
    if p == 2.0:
        r = torch.sqrt(au * au + av * av).clamp_min(1e-4)
        gu, gv = au / (a * r), av / (b * r)
    else:
        r = (au**p + av**p).clamp_min(1e-12) ** (1 / p)
        rr = r.clamp_min(1e-4) ** (1 - p)
        gu, gv = au ** (p - 1) / a * rr, av ** (p - 1) / b * rr
    return (r - 1) / torch.sqrt(gu * gu + gv * gv).clamp_min(1e-6)


def _head_motion(params: AvatarParams, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(dx, dy) in frame units, roll angle (rad) and feature shift fy (face-local) per frame, each (T,)."""
    z = torch.zeros_like(t)
    w = 2 * math.pi * params.motion_hz * t + params.motion_phase
    if params.motion == "nod":
        # Features slide further than the outline, a cheap stand-in for the pitch of a real nod.
        return z, 0.035 * torch.sin(w), z, 0.05 * torch.sin(w)
    if params.motion == "sway":
        return 0.06 * torch.sin(w), z, 0.08 * torch.sin(w), z
    if params.motion == "bob":
        return z, -0.05 * torch.sin(0.5 * w).abs(), z, z
    return z, z, z, z


def _blink(params: AvatarParams, t: torch.Tensor) -> torch.Tensor:
    """Eye closure in [0, 1] per frame: a sin^2 bump of 0.25 s every ``blink_period`` seconds."""
    tau = torch.remainder(t - params.blink_phase, params.blink_period)
    return torch.where(tau < _BLINK_S, torch.sin(math.pi * tau / _BLINK_S) ** 2, torch.zeros_like(tau))


def _render(params: AvatarParams, opening: torch.Tensor, t: torch.Tensor | None, size: int | Sequence[int]
            ) -> torch.Tensor:
    """Render (3, T, H, W) in [0, 1]; ``t`` None means the rest pose (no motion, no blink)."""
    h, w = _size_hw(size)
    n = opening.shape[0]
    if t is None:
        z = torch.zeros(n)
        dx, dy, roll, fy, blink = z, z, z, z, z
    else:
        dx, dy, roll, fy = _head_motion(params, t)
        blink = _blink(params, t)
    s = params.face_scale
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h * 2 - 1  # (H,)
    xs = ((torch.arange(w, dtype=torch.float32) + 0.5) / w * 2 - 1) * (w / h)  # (W,)
    col = lambda a: a.view(-1, 1, 1)  # noqa: E731  (T,) -> (T, 1, 1) for broadcasting
    gx = xs.view(1, 1, w) - params.center[0] - col(dx)  # (T, 1, W)
    gy = ys.view(1, h, 1) - params.center[1] - col(dy)  # (T, H, 1)
    c, si = col(torch.cos(roll)), col(torch.sin(roll))
    u = (c * gx + si * gy) / s  # (T, H, W) face-local
    v = (-si * gx + c * gy) / s  # (T, H, W)
    px = 2.0 / h / s  # one pixel in face-local units

    bg = torch.tensor(BG_COLORS[params.bg_color]).view(3, 1, 1, 1)
    img = bg * (1.06 - 0.12 * (ys.view(1, 1, h, 1) + 1) / 2)  # (3, 1, H, 1) soft vertical gradient
    img = img.expand(3, n, h, w).clone()  # (3, T, H, W)

    def paint(cov: torch.Tensor, rgb: Sequence[float]) -> None:
        nonlocal img
        img = img + cov.unsqueeze(0) * (torch.tensor(rgb).view(3, 1, 1, 1) - img)

    fa, fb, fp = FACE_SHAPES[params.face_shape]
    paint(_cov(_superellipse_sd(u, v, fa, fb, fp), px), FACE_COLORS[params.face_color])
    vf = v - col(fy)  # features shifted for the nod
    ue = u.abs() - _EYE_X  # both eyes at once: the layout is left/right symmetric in face-local units
    ve = vf - _EYE_Y
    eye_ry = col(_EYE_RY * (1 - 0.93 * blink))  # (T, 1, 1) lids close vertically
    white = _cov(_superellipse_sd(ue, ve, _EYE_RX, eye_ry, 2.0), px)
    paint(white, _EYE_WHITE)
    paint(white * _cov(_superellipse_sd(ue, ve, _PUPIL_R, _PUPIL_R, 2.0), px), EYE_COLORS[params.eye_color])
    vm = vf - _MOUTH_Y
    # Rest half-height of at least 0.75 px so the closed mouth stays a visible line at small sizes.
    mb = col(max(_MOUTH_B0, 0.75 * px) + _MOUTH_B1 * opening)  # (T, 1, 1) mouth half-height
    lip_rgb = [0.55 * f + 0.45 * l for f, l in zip(FACE_COLORS[params.face_color], _LIP_TINT)]
    paint(_cov(_superellipse_sd(u, vm, _MOUTH_A + _LIP, mb + _LIP, 2.0), px), lip_rgb)
    paint(_cov(_superellipse_sd(u, vm, _MOUTH_A, mb, 2.0), px), MOUTH_INTERIOR)
    return img.clamp(0, 1)


def render_reference(params: AvatarParams, size: int | Sequence[int] = 128) -> torch.Tensor:
    """Reference image (3, H, W) in [-1, 1]: rest pose, mouth closed (a thin dark line), eyes open."""
    return _render(params, torch.zeros(1), None, size)[:, 0] * 2 - 1


def render_video(params: AvatarParams, envelope: torch.Tensor | np.ndarray, fps: float = 16.0,
                 size: int | Sequence[int] = 128) -> torch.Tensor:
    """Target video (3, T, H, W) in [-1, 1], T = len(envelope); mouth = mouth_opening(envelope), t_k = k / fps."""
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    opening = mouth_opening(envelope).reshape(-1)
    t = torch.arange(opening.shape[0], dtype=torch.float32) / fps
    return _render(params, opening, t, size) * 2 - 1


def render_from_audio(params: AvatarParams, audio: np.ndarray, sr: int, fps: float = 16.0,
                      size: int | Sequence[int] = 128) -> AvatarSample:
    """Target video for ANY audio (e.g. real speech) and a given avatar; T = round(len(audio) / sr * fps)."""
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    env = torch.from_numpy(loudness_envelope(audio, sr, fps))
    return AvatarSample(
        ref=render_reference(params, size), prompt=describe(params), audio=audio, sr=int(sr),
        video=render_video(params, env, fps, size), mouth=mouth_opening(env), envelope=env, fps=float(fps),
        params=params,
    )


def make_sample(seed: int, seconds: float = 4.0, size: int | Sequence[int] = 128, fps: float = 16.0, *,
                frames: int | None = None) -> AvatarSample:
    """The sample for ``seed``. ``frames`` (e.g. 4k+1 for the VAE) overrides ``seconds`` as frames / fps."""
    if frames is not None:
        if frames < 1:
            raise ValueError(f"frames must be >= 1, got {frames}")
        seconds = frames / fps
    params = sample_params(seed)
    audio = synthesize_speech(seed, seconds, SPEECH_SR)
    return render_from_audio(params, audio, SPEECH_SR, fps, size)


# Seed ranges: disjoint by construction, so held-out avatars/voices are never seen in training.
SPLITS: dict[str, range] = {"train": range(0, 1_000_000), "heldout": range(1_000_000, 1_010_000)}


def split_seeds(split: str, n: int | None = None) -> range:
    """The first ``n`` seeds (all if None) of 'train' (0..999999) or 'heldout' (1000000..1009999)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; expected one of {sorted(SPLITS)}")
    seeds = SPLITS[split]
    if n is None:
        return seeds
    if not 0 <= n <= len(seeds):
        raise ValueError(f"n must be in [0, {len(seeds)}] for split {split!r}, got {n}")
    return seeds[:n]


class AvatarDataset:
    """Indexable view over a split: ``ds[i]`` is ``make_sample(seeds[i], ...)``, rendered on demand."""

    def __init__(self, split: str = "train", n: int | None = None, *, seconds: float = 4.0,
                 size: int | Sequence[int] = 128, fps: float = 16.0, frames: int | None = None) -> None:
        self.seeds = split_seeds(split, n)
        self.seconds, self.size, self.fps, self.frames = seconds, size, fps, frames

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, i: int) -> AvatarSample:
        return make_sample(self.seeds[i], self.seconds, self.size, self.fps, frames=self.frames)
