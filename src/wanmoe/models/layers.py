"""Layers shared by the DiT and its S2V extension.

Axis legend: B batch, L tokens, N heads, D head dim (``dim`` = model width), S context tokens, P positions.

Numerics: norms and the sinusoid are computed in fp32/fp64 and cast back; RoPE tables are built in float64
(angles pos * inv_freq exactly as the reference) and applied in the dtype of the table handed in (fp32 by default).

Kernels: ``Linear`` and ``Conv3d`` are the torch modules (same parameters, same state-dict keys, still
``isinstance`` of them) whose products go through ``wanmoe.backends``, which picks the faster exact CPU kernel
for fp32 and leaves every other device and dtype on PyTorch's default path.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from wanmoe import backends

from .attention import AttnFn, attention

__all__ = [
    "Linear",
    "Conv3d",
    "RMSNorm",
    "LayerNorm32",
    "Attention",
    "linear_fp32",
    "sinusoidal_embedding",
    "rope_split",
    "rope_inv_freqs",
    "grid_positions",
    "stretched_positions",
    "rope_table",
    "apply_rope",
]


class Linear(nn.Linear):
    """nn.Linear whose product runs through ``backends.linear`` (oneDNN where it measured faster on this CPU)."""

    def forward(self, x: Tensor) -> Tensor:
        return backends.linear(x, self.weight, self.bias)


class Conv3d(nn.Conv3d):
    """nn.Conv3d through ``backends.conv3d`` (oneDNN for narrow fp32 CPU inputs PyTorch would send to its
    reference kernel); dilated, grouped or non-zero-padded convolutions keep nn.Conv3d's own path."""

    def forward(self, x: Tensor) -> Tensor:
        if self.groups != 1 or self.dilation != (1, 1, 1) or self.padding_mode != "zeros" or isinstance(
            self.padding, str
        ):
            return super().forward(x)
        return backends.conv3d(x, self.weight, self.bias, self.stride, self.padding)


class RMSNorm(nn.Module):
    """RMS norm over the last dim: computed in fp32, cast back, then times the weight (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        # Cast back before the weight multiply, matching the reference's order of rounding under bf16.
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerNorm32(nn.Module):
    """LayerNorm computed in fp32 (affine params, if any, also upcast) and cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = False) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), (self.dim,), w, b, self.eps).type_as(x)


def linear_fp32(layer: nn.Linear, x: Tensor) -> Tensor:
    """Run a Linear in fp32 whatever its parameter dtype (timestep MLPs and the head stay fp32)."""
    bias = None if layer.bias is None else layer.bias.float()
    return backends.linear(x.float(), layer.weight.float(), bias)


class Attention(nn.Module):
    """Multi-head attention with q/k RMSNorm over the full width (before the head split).

    Keys q, k, v, o, norm_q, norm_k match the reference's self- and cross-attention modules.
    Runs in the dtype of its weights: callers cast inputs in and outputs out.
    """

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q, self.k, self.v, self.o = (Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        rope: Tensor | None = None,
        k_lens: Tensor | None = None,
        attn_fn: AttnFn = attention,
    ) -> Tensor:
        # x (B, L, dim); context (B, S, dim) or None for self-attention; rope (B|1, L, D/2, 2)
        q = self.project_q(x)  # (B, L, N, D)
        k, v = self.project_kv(x if context is None else context)  # (B, S, N, D) each
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = attn_fn(q, k, v, k_lens=k_lens)  # (B, L, N, D)
        return self.o(out.flatten(2))  # (B, L, dim)

    # The pieces of forward, for callers that run the query side over token chunks (the DiT's token_chunk):
    # queries are token-local, keys/values are computed once.
    def project_q(self, x: Tensor) -> Tensor:
        return self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, self.head_dim))  # (B, L, N, D)

    def project_kv(self, ctx: Tensor) -> tuple[Tensor, Tensor]:
        k = self.norm_k(self.k(ctx)).unflatten(-1, (self.num_heads, self.head_dim))  # (B, S, N, D)
        return k, self.v(ctx).unflatten(-1, (self.num_heads, self.head_dim))  # (B, S, N, D)

    def attend(self, x: Tensor, k: Tensor, v: Tensor, *, attn_fn: AttnFn = attention) -> Tensor:
        """Unmasked attention of x's queries (B, L, dim) to precomputed k, v (B, S, N, D), no RoPE -> (B, L, dim)."""
        return self.o(attn_fn(self.project_q(x), k, v).flatten(2))


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """(P,) positions -> (P, dim) float64 [cos | sin], freqs 10000^(-k/half) (Vaswani et al. 2017; cos first)."""
    if dim % 2:
        raise ValueError(f"sinusoid dim must be even, got {dim}")
    half = dim // 2
    t = t.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    ang = t[:, None] * freqs[None, :]  # (P, half)
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=1)


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Complex channels per axis (t, h, w): c - 2*(c//3), c//3, c//3 with c = head_dim/2 (22/21/21 for 128)."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def rope_inv_freqs(head_dim: int, theta: float = 10000.0) -> list[Tensor]:
    """Per-axis float64 inverse frequencies theta^(-2i/n_axis) (Su et al. 2021, RoFormer eq. 15)."""
    out = []
    for n in rope_split(head_dim):
        dim = 2 * n
        out.append(1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    return out


def grid_positions(f: int, h: int, w: int, *, t0: int = 0, device: torch.device | None = None) -> Tensor:
    """(f*h*w, 3) int64 (t, h, w) positions in token order (f-major, then h, then w); t starts at t0."""
    ft = torch.arange(t0, t0 + f, device=device)
    hh = torch.arange(h, device=device)
    ww = torch.arange(w, device=device)
    return torch.stack(torch.meshgrid(ft, hh, ww, indexing="ij"), dim=-1).reshape(-1, 3)


def stretched_positions(start: int, stop: int, n: int) -> Tensor:
    """n integer positions spread from start to stop inclusive (evenly, then truncated toward zero).

    Reproduces the numerics of ``int(linspace(start, stop, n))`` bit for bit: arange * step + start in float64,
    with the last sample pinned to ``stop`` and a single sample equal to ``start``.
    """
    if n <= 0:
        return torch.zeros(0, dtype=torch.long)
    if n == 1:
        return torch.tensor([start], dtype=torch.long)
    pos = torch.arange(n, dtype=torch.float64) * ((stop - start) / (n - 1)) + start
    pos[-1] = stop
    return pos.long()


def rope_table(
    positions: Tensor, head_dim: int, *, theta: float = 10000.0, dtype: torch.dtype = torch.float32
) -> Tensor:
    """(P, 3) integer (t, h, w) positions -> (P, head_dim/2, 2) [cos, sin] table.

    Angles are pos * inv_freq in float64 like the reference's complex128 table. A negative temporal position gives
    the complex conjugate of the positive one (cos even, sin odd), which is how motion tokens get "past" indices.
    """
    inv = [f.to(positions.device) for f in rope_inv_freqs(head_dim, theta)]
    pos = positions.to(torch.float64)
    ang = torch.cat([pos[:, i : i + 1] * inv[i][None, :] for i in range(3)], dim=1)  # (P, D/2)
    return torch.stack([torch.cos(ang), torch.sin(ang)], dim=-1).to(dtype)  # (P, D/2, 2)


def _pairs_viewable(t: Tensor) -> bool:
    """view_as_complex's requirements: a last dim of 2 at stride 1, every other stride and the offset even."""
    return t.stride(-1) == 1 and t.storage_offset() % 2 == 0 and all(st % 2 == 0 for st in t.stride()[:-1])


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) of x (B, L, N, D) by rope (B|1, L, D/2, 2); returns x's dtype."""
    xf = x.to(rope.dtype).unflatten(-1, (-1, 2))  # (B, L, N, D/2, 2)
    rope = rope.contiguous()
    if rope.dtype in (torch.float32, torch.float64) and _pairs_viewable(xf) and _pairs_viewable(rope):
        # One complex multiply (x0 + i x1)(cos + i sin): the same products and sums as the real form below, in
        # one kernel instead of eight (~9x faster at 1088 tokens; bit-identical on CPU).
        xc, rc = torch.view_as_complex(xf), torch.view_as_complex(rope)  # (B, L, N, D/2), (B|1, L, D/2)
        return torch.view_as_real(xc * rc.unsqueeze(2)).flatten(-2).type_as(x)  # (B, L, N, D)
    x0, x1 = xf[..., 0], xf[..., 1]  # (B, L, N, D/2)
    cos, sin = rope[..., 0].unsqueeze(2), rope[..., 1].unsqueeze(2)  # (B|1, L, 1, D/2)
    # Complex product (x0 + i x1)(cos + i sin), written in reals so it also runs in bf16/fp32 and compiles.
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)  # (B, L, N, D/2, 2)
    return out.flatten(-2).type_as(x)
