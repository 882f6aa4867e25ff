"""Cheap pictures of a job in progress: the x0 prediction of a sampling step, mapped to colours without the VAE,
and decoded frames, as small PNGs the page shows inline.

The map from latent channels to RGB is linear (as ComfyUI-style live previews do): a (F*H*W, C) x (C, 3) product per
step instead of a decode. It is learned by least squares from this model's own output, each decoded clip paired with
its final latent (`RGBFit`), so it needs no table per model. Fitting it on VAE-encoded images instead does not work
for the small embedded model: its sampled latents lie where the encoder's never do (mean error 0.86 on [-1, 1]
against 0.14 for a map learned from another job's decode, and 0.29 for one flat colour).

Axis legend: C latent channels, F latent frames, H/W latent height/width, T pixel frames, Hp/Wp pixel height/width.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class LatentRGB:
    """latent (.., C, F, H, W) -> (F, H, W, 3) uint8 through one (C + 1, 3) linear map (weights and a bias)."""

    weight: Tensor  # (C + 1, 3)

    def __call__(self, latent: Tensor) -> np.ndarray:
        z = latent.detach().float().cpu()
        z = z[0] if z.ndim == 5 else z  # (C, F, H, W)
        x = z.permute(1, 2, 3, 0)  # (F, H, W, C)
        out = x @ self.weight[:-1] + self.weight[-1]  # (F, H, W, 3) in about [-1, 1]
        return ((out.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


class RGBFit:
    """Least squares for `LatentRGB` from decoded clips, accumulated as normal equations (any number of clips)."""

    def __init__(self, ridge: float = 1e-3) -> None:
        self.ata: Tensor | None = None  # (C + 1, C + 1)
        self.atb: Tensor | None = None  # (C + 1, 3)
        self.ridge = ridge

    def add(self, latent: Tensor, groups: list[Tensor], stride: int) -> bool:
        """One clip: its final latent (1, C, F, H, W) and the groups of frames its decode streamed, (3, t, Hp, Wp)
        each. The decoder makes one group per latent frame, in order, and the groups a clip keeps are its last
        latent frames' (the first may be cut short): so group k pairs with latent frame F - len(groups) + k.
        Returns False (and learns nothing) for a layout that does not fit that rule."""
        z = latent.detach().float().cpu()[0]  # (C, F, H, W)
        k = len(groups)
        if not groups or k > z.shape[1]:
            return False
        pix = torch.stack([g.float().mean(1) for g in groups])  # (k, 3, Hp, Wp): each group's mean frame
        if pix.shape[2] != z.shape[2] * stride or pix.shape[3] != z.shape[3] * stride:
            return False
        a = z[:, -k:].permute(1, 2, 3, 0).reshape(-1, z.shape[0])  # (k*H*W, C)
        a = torch.cat([a, torch.ones(a.shape[0], 1)], dim=1)  # (k*H*W, C + 1)
        b = F.avg_pool2d(pix, stride).permute(0, 2, 3, 1).reshape(-1, 3)  # (k*H*W, 3)
        ata, atb = a.T @ a, a.T @ b
        self.ata = ata if self.ata is None else self.ata + ata
        self.atb = atb if self.atb is None else self.atb + atb
        return True

    def map(self) -> LatentRGB | None:
        if self.ata is None:
            return None
        eye = torch.eye(self.ata.shape[0])
        return LatentRGB(torch.linalg.solve(self.ata + self.ridge * eye, self.atb))


def frames_uint8(frames: Tensor) -> np.ndarray:
    """(3, T, Hp, Wp) in [-1, 1] -> (T, Hp, Wp, 3) uint8."""
    return ((frames.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()


def strip(frames: np.ndarray, count: int = 4, height: int = 128) -> np.ndarray:
    """Up to `count` evenly spaced frames of (T, h, w, 3) side by side, each scaled to `height` pixels (nearest)."""
    t = frames.shape[0]
    idx = sorted({round(i * (t - 1) / max(1, count - 1)) for i in range(min(count, t))})
    scale = max(1, math.ceil(height / frames.shape[1]))
    tiles = [frames[i].repeat(scale, axis=0).repeat(scale, axis=1) for i in idx]
    gap = np.full((tiles[0].shape[0], 4, 3), 255, np.uint8)
    row = [tiles[0]]
    for tile in tiles[1:]:
        row += [gap, tile]
    return np.concatenate(row, axis=1)


def png_data_uri(img: np.ndarray) -> str:
    """(h, w, 3) uint8 -> a data: URI the page shows inline (no file written, nothing to serve)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


__all__ = ["LatentRGB", "RGBFit", "frames_uint8", "strip", "png_data_uri"]
