"""Spatial tiling of the VAE's encode and decode: overlapping tiles blended with linear ramps.

Axis legend: B batch, C channels, T pixel frames, Hp/Wp pixel height/width, F latent frames, H/W latent height/width.

Why: the decoder's activations at full resolution dominate a decode's memory (18.1 GB at 1280*720 x 81 frames for
the Wan 2.1 VAE, even one latent frame at a time). Decoding a few latent cells at a time makes that peak scale with
the tile instead. Each tile runs the whole clip through the usual causal time chunking (full time per tile), so time
stays exact; only space is cut. The network is not spatially local (3x3 convs at every scale, a per-frame attention
in the middle block), so a tile's border differs from the untiled result; neighbours therefore overlap and, across
the overlap, each tile's weight ramps linearly from ~0 at its edge to 1 (the usual tiled-VAE seam blend). The blend
is the weighted mean of every tile covering a pixel, so any overlap pattern sums to 1.

Tile and overlap are in latent cells (pixels = cells * 8) for both directions; the defaults are measured in
docs/vae.md (PSNR against the untiled result and the activation peak).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Tiling", "DEFAULT_TILING", "tile_spans", "ramp", "tiled_decode", "tiled_encode"]


@dataclass(frozen=True)
class Tiling:
    tile: int = 32  # at most this many latent cells per tile side (256 px at the Wan 2.1 VAE's stride 8)
    overlap: int = 8  # latent cells neighbouring tiles share at least (64 px); the blend ramps across them

    def validate(self) -> None:
        for name in ("tile", "overlap"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"Tiling.{name} must be an int; got {type(v).__name__}")
        if self.tile < 2 or not 0 <= self.overlap < self.tile:
            raise ValueError(
                f"Tiling needs tile >= 2 and 0 <= overlap < tile; got tile={self.tile}, overlap={self.overlap}"
            )


DEFAULT_TILING = Tiling()


def tile_spans(n: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """[start, stop) spans covering 0..n: the fewest tiles of at most `tile` cells that overlap by >= `overlap`,
    all of one length (so every tile has the same shapes), shrunk until neighbours share about `overlap` cells
    (less redundant work than full-size tiles with larger overlaps), and spread evenly. n <= tile: one span."""
    if n <= tile:
        return [(0, n)]
    k = math.ceil((n - overlap) / (tile - overlap))  # fewest tiles: k * tile - (k - 1) * overlap >= n
    length = math.ceil((n + (k - 1) * overlap) / k)  # <= tile by the choice of k
    return [(s, s + length) for s in (round(i * (n - length) / (k - 1)) for i in range(k))]


def ramp(spans: list[tuple[int, int]], i: int, scale: int) -> Tensor:
    """Blend weights (length * scale,) fp32 of span i along one axis: linear over its overlaps with the previous
    and next spans (in cells * scale output units), 1 elsewhere; never 0 inside the span."""
    start, stop = spans[i]
    n = (stop - start) * scale
    pos = torch.arange(n, dtype=torch.float32) + 0.5  # pixel centres
    w = torch.ones(n)
    if i > 0 and spans[i - 1][1] > start:
        w = torch.minimum(w, pos / ((spans[i - 1][1] - start) * scale))
    if i + 1 < len(spans) and spans[i + 1][0] < stop:
        w = torch.minimum(w, (n - pos) / ((stop - spans[i + 1][0]) * scale))
    return w


def _blend(
    run: Callable[[Tensor], list[Tensor]],
    x: Tensor,
    hw: tuple[int, int],
    outs: list[tuple[int, int]],
    tiling: Tiling,
    scale_in: int,
    scale_out: int,
) -> list[Tensor]:
    """Run `run` on every spatial tile of x (B, C, T, H, W) and blend its outputs, one per (C', T') in `outs`, each
    (B, C', T', h, w) per tile.

    hw: the grid the tiles are cut on (latent cells); a tile of cells [a, b) is x[..., a*scale_in : b*scale_in] and
    covers output pixels [a*scale_out, b*scale_out)."""
    tiling.validate()
    rows, cols = (tile_spans(n, tiling.tile, tiling.overlap) for n in hw)
    # Accumulators in fp32 whatever the VAE computes in, allocated before the first tile runs (as they are alive
    # during every tile); the weight sum is one (Hout, Wout) map.
    size = (hw[0] * scale_out, hw[1] * scale_out)
    acc = [x.new_zeros((x.shape[0], c, t, *size), dtype=torch.float32) for c, t in outs]
    wsum = x.new_zeros(size, dtype=torch.float32)
    for i, (h0, h1) in enumerate(rows):
        wh = ramp(rows, i, scale_out).to(x.device)
        for j, (w0, w1) in enumerate(cols):
            w = wh[:, None] * ramp(cols, j, scale_out).to(x.device)[None, :]  # (h, w) fp32
            ys = run(x[..., h0 * scale_in : h1 * scale_in, w0 * scale_in : w1 * scale_in])
            box = (..., slice(h0 * scale_out, h1 * scale_out), slice(w0 * scale_out, w1 * scale_out))
            for a, y in zip(acc, ys):
                a[box] += y.float() * w  # (B, C', T', h, w)
            del ys, y  # free this tile's outputs before the next tile runs
            wsum[box] += w
    # Weighted mean; in place where no autograd graph records the accumulators.
    return [a.div_(wsum) if not torch.is_grad_enabled() else a / wsum for a in acc]


def tiled_decode(decode: Callable[[Tensor], Tensor], x: Tensor, tiling: Tiling, stride: tuple[int, int, int]) -> Tensor:
    """decode (B, C, F, h, w) -> (B, 3, T, h*sh, w*sw), run per tile of x (B, C, F, H, W); fp32 result.
    stride: the VAE's (time, height, width) stride, T = 1 + st * (F - 1); tiles are square, so sh == sw."""
    frames = 1 + stride[0] * (x.shape[2] - 1)
    return _blend(lambda t: [decode(t)], x, tuple(x.shape[3:]), [(3, frames)], tiling, 1, stride[1])[0]


def tiled_encode(
    encode: Callable[[Tensor], tuple[Tensor, Tensor]], video: Tensor, z_dim: int, tiling: Tiling,
    stride: tuple[int, int, int],
) -> tuple[Tensor, Tensor]:
    """encode (B, 3, T, hp, wp) -> (mu, log_var) (B, z, F, hp/sh, wp/sw), run per tile of video; fp32 results."""
    hw = (video.shape[3] // stride[1], video.shape[4] // stride[1])
    f = 1 + (video.shape[2] - 1) // stride[0]
    mu, log_var = _blend(lambda t: list(encode(t)), video, hw, [(z_dim, f)] * 2, tiling, stride[1], 1)
    return mu, log_var
