"""Building blocks of the Wan 2.1 causal video VAE (Wan2.2 spec section 10).

Axis legend: B batch, C channels, T frames at the block's temporal rate (pixel frames in the outer stages, latent
frames F in the inner ones), H/W height/width at the block's resolution.

Streaming. The VAE feeds video through these stacks in temporal chunks (encode: frame 0 alone, then 4 frames at a
time; decode: one latent frame at a time). Each temporal conv remembers the last frames it has seen in a ``cache``
dict keyed by the module, so a chunked pass computes the same causal convolution as one pass over the whole clip.
The cache is made by the caller for every encode/decode call and is never stored on a module: one module can serve
two threads (two experts' pipelines) at once, and autograd flows through the cached frames for training.

Every block takes ``(x, cache)`` so the stacks can run them uniformly.

Kernels. The temporal convolutions call ``wanmoe.backends.conv3d``: on CPU fp32 it runs oneDNN instead of the
reference kernel PyTorch picks for these narrow shapes. The blocks work in either memory format and keep the one
they are given; ``Encoder``/``Decoder`` put their activations in the layout ``backends.activation_format`` names
(channels-last where the convs run in oneDNN: no reorder per conv, and the channel norms read contiguous memory).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from wanmoe import backends

# A per-call streaming state: module -> the history it needs from earlier chunks (None = "has seen a chunk").
Cache = dict[nn.Module, "Tensor | None"]


def _triple(v: int | tuple[int, int, int]) -> tuple[int, int, int]:
    return (v, v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


def _channels_last(x: Tensor) -> bool:
    """x (B, C, T, H, W) or (N, C, H, W) is stored channels-last (and not also plain contiguous)."""
    fmt = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
    return not x.is_contiguous() and x.is_contiguous(memory_format=fmt)


def _to_format(x: Tensor, channels_last: bool) -> Tensor:
    """x (B, C, T, H, W) or (N, C, H, W) in channels-last memory with canonical strides; unchanged if not asked.

    Canonical includes the size-1 dims (T = 1 in a decode chunk, B = 1): reshapes leave odd strides there, and
    elementwise ops and interpolation order their output by every stride, so one odd stride can turn a
    channels-last chain back into contiguous tensors. Re-striding a size-1 dim addresses the same elements, so
    it copies nothing."""
    if not channels_last:
        return x
    fmt = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
    x = x.contiguous(memory_format=fmt)
    strides = torch.empty(x.shape, device="meta", memory_format=fmt).stride()
    return x if x.stride() == strides else x.as_strided(x.shape, strides)


class CausalConv3d(nn.Conv3d):
    """Conv3d that pads time only on the left (2*pad_t zero frames) and space symmetrically, so output frame t sees
    input frames <= t. With a ``cache`` the zero frames are replaced by the real frames of the previous chunk."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 0,
    ) -> None:
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=0)
        pt, ph, pw = _triple(padding)
        self.time_pad = 2 * pt  # all temporal padding goes before the first frame (causality)
        # Symmetric spatial zero padding is the conv's own padding (no padded copy of x): the same sums.
        self.space_pad = (0, ph, pw)

    def forward(self, x: Tensor, cache: Cache | None = None) -> Tensor:
        # x (B, C, T, H, W)
        pad_t = self.time_pad
        if cache is not None and pad_t > 0:
            prev = cache.get(self)
            if prev is not None:
                x = torch.cat([prev, x], dim=2)  # (B, C, T_prev + T, H, W)
                pad_t -= prev.shape[2]
            # Keep only the history the next chunk needs; clone so the concatenated buffer can be freed.
            cache[self] = x[:, :, -self.time_pad :].clone()
        if pad_t > 0:
            x = F.pad(x, (0, 0, 0, 0, pad_t, 0))  # (B, C, pad_t + T, H, W): zero frames before the first
        return backends.conv3d(x, self.weight, self.bias, self.stride, self.space_pad)


class RMSNorm(nn.Module):
    """L2-normalise over channels (dim 1), times sqrt(C) and a learned per-channel ``gamma`` (Wan RMS_norm)."""

    def __init__(self, dim: int, spatial_dims: int = 3) -> None:
        super().__init__()
        self.scale = dim**0.5
        # (C, 1, 1, 1) for (B, C, T, H, W) inputs, (C, 1, 1) for per-frame (B*T, C, H, W) inputs: official shapes.
        self.gamma = nn.Parameter(torch.ones(dim, *([1] * spatial_dims)))

    def forward(self, x: Tensor) -> Tensor:
        # Official: F.normalize(x, dim=1) * scale * gamma (three full-size passes after the norm). Multiplying by the
        # reciprocal norm, then by gamma * scale, is two passes; it differs by a few ulp.
        inv = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-12).reciprocal()  # (B, 1, ...)
        return x * inv * (self.gamma * self.scale)


class ResidualBlock(nn.Module):
    """[RMS, SiLU, conv3, RMS, SiLU, Dropout, conv3] + shortcut (1x1x1 conv when the width changes).

    Kept as an ``nn.Sequential`` only so parameter names match the checkpoint (residual.0/2/3/6, shortcut)."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim),
            nn.SiLU(),
            nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, cache: Cache) -> Tensor:
        norm1, act1, conv1, norm2, act2, drop, conv2 = self.residual
        h = conv1(act1(norm1(x)), cache)  # (B, C_out, T, H, W)
        h = conv2(drop(act2(norm2(h))), cache)
        return h + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame separately (no temporal mixing)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, spatial_dims=2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        # Zero output projection: the block starts as the identity, as the official init does.
        nn.init.zeros_(self.proj.weight)

    def forward(self, x: Tensor, cache: Cache | None = None) -> Tensor:
        # Per-frame op: needs no history, so ``cache`` is unused (kept for the uniform block signature).
        b, c, t, h, w = x.shape
        y = self.norm(_to_format(rearrange(x, "b c t h w -> (b t) c h w"), _channels_last(x)))  # (B*T, C, H, W)
        # qkv channels are laid out [q | k | v], each C wide.
        q, k, v = rearrange(self.to_qkv(y), "n (three c) h w -> three n 1 (h w) c", three=3)  # 3 x (B*T, 1, HW, C)
        y = F.scaled_dot_product_attention(q, k, v)  # (B*T, 1, HW, C), scale 1/sqrt(C)
        y = rearrange(y, "n 1 (h w) c -> n c h w", h=h)  # (B*T, C, H, W)
        y = rearrange(self.proj(y), "(b t) c h w -> b c t h w", t=t)  # (B, C, T, H, W)
        return y + x


class _NearestUp2x(nn.Module):
    """x2 nearest-exact upsampling of (N, C, H, W), computed in float32 (nearest is unsupported for bf16 on some
    backends; the op is exact, so the cast changes nothing numerically)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").type_as(x)


class Resample(nn.Module):
    """Spatial x2 down/upsampling per frame, plus (``*3d`` modes) a temporal x2 step through a causal time conv."""

    MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"Resample mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        if mode.startswith("up"):
            # The 3x3 conv after the upsample halves the width: that is the decoder's per-stage channel drop.
            self.resample = nn.Sequential(_NearestUp2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            # Pad right/bottom by one so the stride-2 3x3 conv maps an even H to exactly H/2.
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            # Emits 2C channels per frame: the two halves become two consecutive output frames.
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: Tensor, cache: Cache) -> Tensor:
        # x (B, C, T, H, W)
        if self.mode == "upsample3d":
            x = self._time_up(x, cache)  # (B, C, T', H, W), T' = 2T (or 2T - 1 on the first chunk)
        t = x.shape[2]
        x = _to_format(rearrange(x, "b c t h w -> (b t) c h w"), _channels_last(x))  # (B*T, C, H, W)
        x = self.resample(x)  # (B*T, C', H', W')
        x = rearrange(x, "(b t) c h w -> b c t h w", t=t)
        if self.mode == "downsample3d":
            x = self._time_down(x, cache)
        return x

    def _time_up(self, x: Tensor, cache: Cache) -> Tensor:
        if self not in cache:
            # First chunk: frame 0 (the clip's anchor image) maps to one frame and never enters the time conv's
            # history; the later frames see zero history, as the official 'Rep' marker arranges.
            cache[self] = None
            first, rest = x[:, :, :1], x[:, :, 1:]
            if rest.shape[2] == 0:
                return first
            return torch.cat([first, self._double(rest, cache)], dim=2)
        return self._double(x, cache)

    def _double(self, x: Tensor, cache: Cache) -> Tensor:
        y = self.time_conv(x, cache)  # (B, 2C, T, H, W)
        b, c2, t, h, w = y.shape
        # "b (r c) t h w -> b c (t r) h w" (halves interleaved in time), written into an output of y's memory
        # format: einops' reshape would return a contiguous tensor and drop a channels-last layout.
        fmt = torch.channels_last_3d if _channels_last(y) else torch.contiguous_format
        out = torch.empty((b, c2 // 2, 2 * t, h, w), dtype=y.dtype, device=y.device, memory_format=fmt)
        out.view(b, c2 // 2, t, 2, h, w).copy_(y.unflatten(1, (2, c2 // 2)).permute(0, 2, 3, 1, 4, 5))
        return out  # (B, C, 2T, H, W)

    def _time_down(self, x: Tensor, cache: Cache) -> Tensor:
        prev = cache.get(self)
        cache[self] = x[:, :, -1:].clone()  # stride-2 windows overlap by one frame
        if prev is None:
            # First chunk: frame 0 passes through alone; later frames pair up in windows (0,1,2), (2,3,4), ...
            assert x.shape[2] % 2 == 1, "first chunk must hold an odd number of frames"
            if x.shape[2] == 1:
                return x
            return torch.cat([x[:, :, :1], self.time_conv(x)], dim=2)  # (B, C, 1 + (T-1)/2, H, W)
        assert x.shape[2] % 2 == 0, "later chunks must hold an even number of frames"
        return self.time_conv(torch.cat([prev, x], dim=2))  # (B, C, T/2, H, W)


class Encoder(nn.Module):
    """conv1 -> [ResidualBlock x n (+attn), Resample] per stage -> middle (res, attn, res) -> head (to z_out)."""

    def __init__(
        self,
        dim: int,
        z_out: int,
        dim_mult: tuple[int, ...],
        num_res_blocks: int,
        attn_scales: tuple[float, ...],
        temporal_downsample: tuple[bool, ...],
        dropout: float,
    ) -> None:
        super().__init__()
        dims = [dim] + [dim * m for m in dim_mult]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        scale = 1.0  # current resolution relative to the input, matched against attn_scales
        for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                blocks.append(ResidualBlock(c_in, c_out, dropout))
                if scale in attn_scales:
                    blocks.append(AttentionBlock(c_out))
                c_in = c_out
            if i < len(dim_mult) - 1:
                blocks.append(Resample(c_out, "downsample3d" if temporal_downsample[i] else "downsample2d"))
                scale /= 2.0
        c = dims[-1]
        self.downsamples = nn.Sequential(*blocks)
        self.middle = nn.Sequential(ResidualBlock(c, c, dropout), AttentionBlock(c), ResidualBlock(c, c, dropout))
        self.head = nn.Sequential(RMSNorm(c), nn.SiLU(), CausalConv3d(c, z_out, 3, padding=1))

    def forward(self, x: Tensor, cache: Cache) -> Tensor:
        # x (B, 3, T, H, W) -> (B, z_out, F, H/8, W/8) for the frames of this chunk
        cl = backends.activation_format(x) == torch.channels_last_3d  # see "Kernels" in the module docstring
        x = self.conv1(_to_format(x, cl), cache)
        for block in (*self.downsamples, *self.middle):
            x = _to_format(block(x, cache), cl)
        norm, act, conv = self.head
        return conv(act(norm(x)), cache)


class Decoder(nn.Module):
    """conv1 -> middle -> [ResidualBlock x (n+1) (+attn), Resample] per stage -> head (to RGB); mirrors Encoder."""

    def __init__(
        self,
        dim: int,
        z_dim: int,
        dim_mult: tuple[int, ...],
        num_res_blocks: int,
        attn_scales: tuple[float, ...],
        temporal_upsample: tuple[bool, ...],
        dropout: float,
    ) -> None:
        super().__init__()
        dims = [dim * m for m in (dim_mult[-1], *reversed(dim_mult))]
        scale = 1.0 / 2 ** (len(dim_mult) - 2)
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(
            ResidualBlock(dims[0], dims[0], dropout), AttentionBlock(dims[0]), ResidualBlock(dims[0], dims[0], dropout)
        )
        blocks: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                c_in //= 2  # the previous stage's upsample conv halved the width
            for _ in range(num_res_blocks + 1):
                blocks.append(ResidualBlock(c_in, c_out, dropout))
                if scale in attn_scales:
                    blocks.append(AttentionBlock(c_out))
                c_in = c_out
            if i < len(dim_mult) - 1:
                blocks.append(Resample(c_out, "upsample3d" if temporal_upsample[i] else "upsample2d"))
                scale *= 2.0
        self.upsamples = nn.Sequential(*blocks)
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1))

    def forward(self, x: Tensor, cache: Cache) -> Tensor:
        # x (B, z, F, H, W) -> (B, 3, T, 8H, 8W) for the latent frames of this chunk
        cl = backends.activation_format(x) == torch.channels_last_3d  # see "Kernels" in the module docstring
        x = self.conv1(_to_format(x, cl), cache)
        for block in (*self.middle, *self.upsamples):
            x = _to_format(block(x, cache), cl)
        norm, act, conv = self.head
        return conv(act(norm(x)), cache)
