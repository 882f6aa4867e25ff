"""Cheap evaluation metrics for generated videos, plus timing and peak-memory helpers.

Axis legend: T pixel frames, H/W pixel height/width, 3 RGB channels.

Videos are float (3, T, H, W) in [-1, 1] (torch or numpy); every metric first maps them to [0, 1]. Each metric
is a pure function whose docstring states its exact definition, so numbers in reports can be reproduced.
OpenCV (optical flow) is imported lazily (it is in the ``eval`` extra).
"""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "psnr", "ssim", "flow_consistency", "MouthRegion", "locate_mouth", "measure_mouth", "pearson", "mouth_sync",
    "identity_similarity", "Timing", "timed", "peak_rss_mb", "cuda_peak_mb", "reset_cuda_peak",
]

_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma weights
# Mouth-interior colour of wanmoe.data.avatar (kept as a literal so eval does not import the dataset).
_MOUTH_RGB = (0.30, 0.04, 0.08)


def _video01(video: torch.Tensor | np.ndarray, name: str = "video") -> torch.Tensor:
    """(3, T, H, W) in [-1, 1] -> float32 (3, T, H, W) in [0, 1]; a single image (3, H, W) becomes T = 1."""
    v = torch.as_tensor(np.asarray(video) if not isinstance(video, torch.Tensor) else video).detach().float().cpu()
    if v.ndim == 3:
        v = v.unsqueeze(1)  # (3, 1, H, W)
    if v.ndim != 4 or v.shape[0] != 3:
        raise ValueError(f"{name} must be (3, T, H, W) or (3, H, W), got {tuple(v.shape)}")
    return ((v + 1) / 2).clamp(0, 1)


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"videos differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")


def psnr(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, *, max_db: float = 100.0) -> float:
    """PSNR in dB: 10 log10(1 / MSE) with MSE over all channels, frames and pixels on the [0, 1] scale.

    Identical videos (MSE = 0) give ``max_db`` (default 100 dB) rather than inf, so averages stay finite.
    """
    x, y = _video01(a, "a"), _video01(b, "b")
    _same_shape(x, y)
    mse = float(((x.double() - y.double()) ** 2).mean())
    return max_db if mse <= 10 ** (-max_db / 10) else min(max_db, 10 * math.log10(1.0 / mse))


def _gauss_window(size: int, sigma: float) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    return g / g.sum()  # (size,)


def ssim(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, *, mode: str = "luma", window: int = 11,
         sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004, eq. 13) with an 11x11 Gaussian window (sigma 1.5), C1=(0.01)^2, C2=(0.03)^2.

    Computed per frame on [0, 1] values over 'valid' window positions (no padding), then averaged over
    positions, frames and (mode='rgb') the three channels; mode='luma' uses BT.601 luma Y = .299R+.587G+.114B.
    1 for identical inputs; typically in [0, 1] (negative only for anti-correlated images).
    """
    if mode not in ("luma", "rgb"):
        raise ValueError(f"mode={mode!r}; expected 'luma' or 'rgb'")
    x, y = _video01(a, "a").double(), _video01(b, "b").double()
    _same_shape(x, y)
    if mode == "luma":
        w = torch.tensor(_LUMA, dtype=torch.float64).view(3, 1, 1, 1)
        x, y = (x * w).sum(0, keepdim=True), (y * w).sum(0, keepdim=True)  # (1, T, H, W)
    c, t, h, wd = x.shape
    win = min(window, h, wd)
    x = x.reshape(c * t, 1, h, wd)  # (C*T, 1, H, W) frames as a batch
    y = y.reshape(c * t, 1, h, wd)
    g = _gauss_window(win, sigma)
    kh, kw = g.view(1, 1, win, 1), g.view(1, 1, 1, win)

    def blur(z: torch.Tensor) -> torch.Tensor:  # separable Gaussian, valid region
        return F.conv2d(F.conv2d(z, kh), kw)

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(s.mean())


def flow_consistency(video: torch.Tensor | np.ndarray) -> float:
    """Temporal consistency in [0, 1], higher = smoother: mean over k of 1 - mean|warp(f_k) - f_{k+1}|.

    For each consecutive pair, dense optical flow is estimated from frame k+1 to frame k with OpenCV
    Farneback on 8-bit luma (pyr_scale 0.5, 3 levels, window 15, 3 iterations, poly_n 5, poly_sigma 1.2);
    frame k (RGB, [0, 1]) is backward-warped onto frame k+1's grid with ``cv2.remap`` (bilinear, replicated
    border) and compared with frame k+1 by the mean absolute difference over pixels and channels. A video
    that a smooth motion field explains scores near 1; flicker and jumps that flow cannot explain score lower.
    Needs T >= 2.
    """
    import cv2

    v = _video01(video)
    if v.shape[1] < 2:
        raise ValueError(f"flow_consistency needs at least 2 frames, got {v.shape[1]}")
    frames = v.permute(1, 2, 3, 0).contiguous().numpy().astype(np.float32)  # (T, H, W, 3)
    gray = np.clip((frames @ np.asarray(_LUMA, np.float32)) * 255 + 0.5, 0, 255).astype(np.uint8)  # (T, H, W)
    h, w = gray.shape[1:]
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    sims = []
    for k in range(len(frames) - 1):
        flow = cv2.calcOpticalFlowFarneback(gray[k + 1], gray[k], None, 0.5, 3, 15, 3, 5, 1.2, 0)  # (H, W, 2)
        warped = cv2.remap(frames[k], gx + flow[..., 0], gy + flow[..., 1], cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REPLICATE)
        sims.append(1.0 - float(np.abs(warped - frames[k + 1]).mean()))
    return float(np.mean(sims))


@dataclass(frozen=True)
class MouthRegion:
    """Pixel box (rows y0:y1, cols x0:x1) in which mouth-interior pixels are counted, and that colour."""

    y0: int
    y1: int
    x0: int
    x1: int
    rgb: tuple[float, float, float]


def _mouth_weight(frames: torch.Tensor, rgb: Sequence[float], tol: float) -> torch.Tensor:
    """Soft membership 1 - ||pixel - rgb|| / tol clipped to [0, 1]; frames (3, ..., H, W) in [0, 1]."""
    ref = torch.tensor(rgb, dtype=frames.dtype).view(3, *([1] * (frames.ndim - 1)))
    return (1 - torch.linalg.vector_norm(frames - ref, dim=0) / tol).clamp(0, 1)


def locate_mouth(ref: torch.Tensor | np.ndarray, *, rgb: Sequence[float] = _MOUTH_RGB, tol: float = 0.35
                 ) -> MouthRegion:
    """Find the mouth in a reference render (3, H, W) in [-1, 1].

    Pixels with soft mouth-colour weight > 0.1 (see ``_mouth_weight``) are candidates; the mouth is the lowest
    run of consecutive rows that contain candidates (eyes/pupils sit above it). The search box is that run's
    bounding box padded by one mouth half-width vertically (room for the open mouth and head motion) and half a
    half-width horizontally, clipped to the image.
    """
    img = _video01(ref, "ref")[:, 0]  # (3, H, W)
    h, w = img.shape[1:]
    cand = _mouth_weight(img, rgb, tol) > 0.1  # (H, W)
    rows = torch.nonzero(cand.any(1)).flatten().tolist()
    if not rows:
        raise ValueError(f"no mouth-coloured pixels (rgb={tuple(rgb)}, tol={tol}) found in the reference image")
    bottom = rows[-1]
    top = bottom
    while top - 1 in rows:
        top -= 1
    cols = torch.nonzero(cand[top: bottom + 1].any(0)).flatten()
    x0, x1 = int(cols.min()), int(cols.max()) + 1
    half_w = (x1 - x0) / 2
    yc = (top + bottom + 1) / 2
    pad_y, pad_x = max(2.0, half_w), max(1.0, 0.5 * half_w)
    return MouthRegion(y0=max(0, int(yc - pad_y)), y1=min(h, int(math.ceil(yc + pad_y))),
                       x0=max(0, int(x0 - pad_x)), x1=min(w, int(math.ceil(x1 + pad_x))),
                       rgb=tuple(float(c) for c in rgb))


def measure_mouth(video: torch.Tensor | np.ndarray, region: MouthRegion, *, tol: float = 0.35) -> np.ndarray:
    """Mouth opening measured from frames (T,): mean soft mouth-colour weight inside ``region`` per frame."""
    v = _video01(video)[:, :, region.y0: region.y1, region.x0: region.x1]  # (3, T, h, w)
    return _mouth_weight(v, region.rgb, tol).mean(dim=(1, 2)).numpy().astype(np.float64)


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Pearson correlation of two equal-length series; 0.0 when either is constant (no linear relation)."""
    a, b = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"pearson needs two series of equal length >= 2, got {a.shape} and {b.shape}")
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return 0.0 if den < 1e-12 else float((a * b).sum() / den)


def mouth_sync(video: torch.Tensor | np.ndarray, envelope: Sequence[float] | np.ndarray | torch.Tensor,
               ref: torch.Tensor | np.ndarray, *, max_lag: int = 2) -> dict[str, float]:
    """Audio-mouth sync from pixels: Pearson r between ``measure_mouth`` (region from ``locate_mouth(ref)``)
    and the audio loudness envelope (T,) (``wanmoe.data.speech.loudness_envelope`` at the video fps).

    Returns {'sync': r at lag 0, 'sync_best': max r over lags -max_lag..max_lag, 'sync_lag': that lag}. A
    positive lag L pairs frame k with envelope k - L (video late). Lengths must match.
    """
    env = np.asarray(torch.as_tensor(envelope).float().cpu(), dtype=np.float64).ravel()
    mouth = measure_mouth(video, locate_mouth(ref))
    if mouth.size != env.size:
        raise ValueError(f"envelope has {env.size} frames but the video has {mouth.size}")
    if mouth.size < 2 * max_lag + 3:
        raise ValueError(f"need at least {2 * max_lag + 3} frames for max_lag={max_lag}, got {mouth.size}")
    best, best_lag = -2.0, 0
    for lag in range(-max_lag, max_lag + 1):
        m, e = (mouth[lag:], env[: env.size - lag]) if lag >= 0 else (mouth[:lag], env[-lag:])
        r = pearson(m, e)
        if r > best:
            best, best_lag = r, lag
    return {"sync": pearson(mouth, env), "sync_best": best, "sync_lag": float(best_lag)}


def _colour_hist(pixels: torch.Tensor, bins: int) -> torch.Tensor:
    """Joint RGB histogram (bins^3,) of pixels (3, P) in [0, 1]."""
    q = (pixels * bins).long().clamp(0, bins - 1)  # (3, P)
    idx = (q[0] * bins + q[1]) * bins + q[2]  # (P,)
    return torch.bincount(idx, minlength=bins**3).double()


def identity_similarity(video: torch.Tensor | np.ndarray, ref: torch.Tensor | np.ndarray, *, bins: int = 8,
                        exclude_mouth: bool = True) -> float:
    """Identity consistency in [0, 1]: mean over frames of the cosine similarity between the frame's joint RGB
    histogram (bins^3 cells on [0, 1]) and the reference image's, computed over the whole image except, when
    ``exclude_mouth``, the ``locate_mouth(ref)`` box (speech legitimately changes the mouth). 1 = same colours.
    """
    v, r = _video01(video), _video01(ref, "ref")[:, 0]
    if v.shape[2:] != r.shape[1:]:
        raise ValueError(f"video frames {tuple(v.shape[2:])} and reference {tuple(r.shape[1:])} differ in size")
    keep = torch.ones(r.shape[1:], dtype=torch.bool)  # (H, W)
    if exclude_mouth:
        m = locate_mouth(ref)
        keep[m.y0: m.y1, m.x0: m.x1] = False
    href = _colour_hist(r[:, keep], bins)
    sims = []
    for k in range(v.shape[1]):
        hk = _colour_hist(v[:, k][:, keep], bins)
        sims.append(float((hk * href).sum() / (hk.norm() * href.norm()).clamp_min(1e-12)))
    return float(np.mean(sims))


@dataclass
class Timing:
    """Filled in by ``timed``: wall seconds of the block (CUDA synchronised on entry and exit when present)."""

    seconds: float = float("nan")


def _sync_cuda() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextmanager
def timed() -> Iterator[Timing]:
    """``with timed() as t: ...`` then ``t.seconds``; synchronises CUDA so queued kernels are counted."""
    out = Timing()
    _sync_cuda()
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        _sync_cuda()
        out.seconds = time.perf_counter() - t0


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (resource.getrusage; ru_maxrss is KiB on Linux, B on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def cuda_peak_mb(device: torch.device | str | int | None = None) -> float | None:
    """Peak CUDA memory allocated by torch since the last reset, in MiB; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def reset_cuda_peak(device: torch.device | str | int | None = None) -> None:
    """Reset the CUDA peak counter (no-op without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(device)
