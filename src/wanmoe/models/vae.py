"""Wan 2.1 causal video VAE: config, model (official checkpoint key names) and the .pth loader (spec section 10).

Axis legend: B batch, C channels, T pixel frames, Hp/Wp pixel height/width, F latent frames, H/W latent height/width.

Stride (4, 8, 8): a clip of T = 4n + 1 frames encodes to F = n + 1 latent frames (frame 0 gets its own latent, so an
image is a 1-frame clip), and F latent frames decode to 1 + 4(F - 1) frames.

Latent normalisation: encode returns (mu - mean) / std per channel and decode undoes it, so the DiT sees roughly unit
scale latents. A model trained here needs its own constants (zeros/ones, or ones measured on its latents).

Training: encode/decode are differentiable (use ``chunked=False`` for speed, ``decode(..., clamp=False)`` so
out-of-range outputs still get gradients, and ``encode(..., return_logvar=True)`` for the posterior variance).
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from wanmoe.models.state_check import mismatch_report
from wanmoe.models.vae_blocks import Cache, CausalConv3d, Decoder, Encoder
from wanmoe.models.vae_tiling import Tiling, tiled_decode, tiled_encode

# Per-channel latent statistics of the released Wan2.1 VAE (wan/modules/vae2_1.py, Wan2_1_VAE.__init__).
WAN21_LATENT_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENT_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


@dataclass(frozen=True)
class VAEConfig:
    dim: int = 96  # base width; stage widths are dim * dim_mult
    z_dim: int = 16  # latent channels
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2  # per encoder stage (decoder stages use one more)
    attn_scales: tuple[float, ...] = ()  # extra attention at these resolutions (the middle block always has one)
    temporal_downsample: tuple[bool, ...] = (False, True, True)  # per downsample; reversed for the decoder
    dropout: float = 0.0
    mean: tuple[float, ...] = field(default=WAN21_LATENT_MEAN)
    std: tuple[float, ...] = field(default=WAN21_LATENT_STD)

    @property
    def stride(self) -> tuple[int, int, int]:
        """(time, height, width) compression factors."""
        s = 2 ** (len(self.dim_mult) - 1)
        return 2 ** sum(self.temporal_downsample), s, s

    def validate(self) -> None:
        if self.dim < 1 or self.z_dim < 1 or self.num_res_blocks < 1:
            raise ValueError(
                f"dim, z_dim, num_res_blocks must be >= 1, got {self.dim}, {self.z_dim}, {self.num_res_blocks}"
            )
        if len(self.dim_mult) < 2 or min(self.dim_mult) < 1:
            raise ValueError(f"dim_mult needs >= 2 positive entries, got {self.dim_mult}")
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temporal_downsample needs len(dim_mult) - 1 = {len(self.dim_mult) - 1} entries, "
                f"got {self.temporal_downsample}"
            )
        if any((self.dim * m) % 2 for m in self.dim_mult[1:]):
            raise ValueError("dim * dim_mult[1:] must be even (the decoder's upsample convs halve the width)")
        if len(self.mean) != self.z_dim or len(self.std) != self.z_dim:
            raise ValueError(
                f"mean/std need z_dim = {self.z_dim} entries each, got {len(self.mean)} and "
                f"{len(self.std)}; a non-default z_dim needs its own constants (e.g. zeros and ones)"
            )
        if min(self.std) <= 0:
            raise ValueError(f"std entries must be > 0, got {self.std}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


VAE21 = VAEConfig()
# Tests and the small embedded model: same topology, 12x narrower; z_dim 16 so it pairs with DiT in_dim 16.
VAE_TINY = VAEConfig(dim=8, mean=(0.0,) * 16, std=(1.0,) * 16)


class WanVAE(nn.Module):
    """Wan 2.1 VAE with the official state-dict keys (encoder.*, conv1.*, conv2.*, decoder.*).

    ``chunked=True`` streams time exactly like the official code (encode: frame 0, then 4-frame chunks; decode:
    one latent frame at a time), which bounds activation memory for long or large clips. ``chunked=False`` runs
    the whole clip in one pass through the same causal convs: the same function (equal up to float rounding),
    fewer and larger conv calls, more activation memory.

    ``tiling`` (None by default: one pass over the whole frame) is a ``Tiling``: encode and decode then run over
    overlapping spatial tiles blended with linear ramps (``models/vae_tiling.py``), so their activation memory
    scales with the tile, not the frame; the result differs slightly from the untiled one (PSNR in docs/vae.md).
    """

    def __init__(self, cfg: VAEConfig = VAE21) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        args = (cfg.dim_mult, cfg.num_res_blocks, cfg.attn_scales)
        self.encoder = Encoder(cfg.dim, 2 * cfg.z_dim, *args, cfg.temporal_downsample, cfg.dropout)
        self.conv1 = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)  # posterior moments (mu | log_var)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder(cfg.dim, cfg.z_dim, *args, cfg.temporal_downsample[::-1], cfg.dropout)
        self.tiling: Tiling | None = None  # spatial tiles for encode/decode; frugal_() sets it

    # ---- encode ---------------------------------------------------------------------------------------------

    def encode_moments(self, video: Tensor, *, chunked: bool = True) -> tuple[Tensor, Tensor]:
        """Raw (un-normalised) posterior (mu, log_var), each (B, z, F, H, W), from video (B, 3, T, Hp, Wp)."""
        video = self._check_video(video)
        if self._tiled(video.shape[3] // self.cfg.stride[1], video.shape[4] // self.cfg.stride[2]):
            enc = lambda v: self._moments(v, chunked)  # noqa: E731
            mu, log_var = tiled_encode(enc, video, self.cfg.z_dim, self.tiling, self.cfg.stride)
            return mu.to(video.dtype), log_var.to(video.dtype)
        return self._moments(video, chunked)

    def _moments(self, video: Tensor, chunked: bool) -> tuple[Tensor, Tensor]:
        st = self.cfg.stride[0]
        cache: Cache = {}  # local to this call: no state survives on the module
        if chunked:
            # Frame 0 alone, then stride_t frames per chunk: each chunk yields exactly one latent frame.
            n = (video.shape[2] - 1) // st
            chunks = [video[:, :, :1]] + [video[:, :, 1 + st * i : 1 + st * (i + 1)] for i in range(n)]
            h = torch.cat([self.encoder(c, cache) for c in chunks], dim=2)  # (B, 2z, F, H, W)
        else:
            h = self.encoder(video, cache)  # (B, 2z, F, H, W)
        mu, log_var = self.conv1(h).contiguous().chunk(2, dim=1)  # 2 x (B, z, F, H, W), standard layout
        return mu, log_var

    def encode(
        self, video: Tensor, *, return_logvar: bool = False, chunked: bool = True
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Video (B, 3, T, Hp, Wp) in [-1, 1], T = 4n + 1, Hp/Wp multiples of 8 -> normalised mu (B, z, n+1, H, W).

        With ``return_logvar`` also returns the posterior log-variance of the *normalised* latent
        (log_var - 2 log std), so z = mu + exp(log_var / 2) * eps can be drawn and decoded directly."""
        mu, log_var = self.encode_moments(video, chunked=chunked)
        mean, std = self._stats(mu)
        # Official multiplies by 1/std; dividing differs by at most 1 ulp.
        mu = (mu - mean) / std
        if return_logvar:
            return mu, log_var - 2.0 * torch.log(std)
        return mu

    # ---- decode ---------------------------------------------------------------------------------------------

    def decode(self, z: Tensor, *, clamp: bool = True, chunked: bool = True) -> Tensor:
        """Normalised latent (B, z, F, H, W) -> video (B, 3, 1 + 4(F-1), 8H, 8W), clamped to [-1, 1] by default
        (pass ``clamp=False`` when training, so out-of-range pixels keep their gradient)."""
        z = self._check_latent(z)
        if self._tiled(z.shape[3], z.shape[4]):
            out = tiled_decode(lambda t: self._decode(t, chunked), z, self.tiling, self.cfg.stride).to(z.dtype)
        else:
            out = self._decode(z, chunked)
        if not clamp:
            return out
        # In place when no graph records it (the output is ours): one frame-sized copy less.
        return out.clamp_(-1.0, 1.0) if not torch.is_grad_enabled() else out.clamp(-1.0, 1.0)

    def _decode(self, z: Tensor, chunked: bool) -> Tensor:
        mean, std = self._stats(z)
        x = self.conv2(z * std + mean)  # (B, z, F, H, W)
        cache: Cache = {}  # local to this call
        if chunked:
            # One latent frame at a time, as official: bounds the decoder's (large) activations to one frame.
            out = torch.cat([self.decoder(x[:, :, i : i + 1], cache) for i in range(x.shape[2])], dim=2)
        else:
            out = self.decoder(x, cache)  # (B, 3, T, Hp, Wp)
        return out.contiguous()  # standard layout for callers, whatever layout the blocks computed in

    # ---- boundary checks and helpers ------------------------------------------------------------------------

    def _tiled(self, h: int, w: int) -> bool:
        """Whether a (latent) h x w grid goes through tiles: tiling is set and the grid exceeds one tile."""
        if self.tiling is None:
            return False
        if not isinstance(self.tiling, Tiling):
            raise TypeError(f"WanVAE.tiling must be a Tiling or None; got {type(self.tiling).__name__}")
        self.tiling.validate()
        return max(h, w) > self.tiling.tile

    def _param_dtype(self) -> torch.dtype:
        return self.conv1.weight.dtype

    def _stats(self, ref: Tensor) -> tuple[Tensor, Tensor]:
        # Built per call from the config (not buffers): nothing extra in the state dict, and no meta-device
        # buffers to re-materialise after an assign=True load.
        shape = (1, self.cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(self.cfg.mean, dtype=ref.dtype, device=ref.device).view(shape)
        std = torch.tensor(self.cfg.std, dtype=ref.dtype, device=ref.device).view(shape)
        return mean, std

    def _check_video(self, video: Tensor) -> Tensor:
        st, sh, sw = self.cfg.stride
        if not torch.is_tensor(video) or video.ndim != 5 or video.shape[1] != 3:
            got = tuple(video.shape) if torch.is_tensor(video) else type(video).__name__
            raise ValueError(f"video must be a (B, 3, T, Hp, Wp) tensor, got {got}")
        _, _, t, hp, wp = video.shape
        if (t - 1) % st != 0:
            raise ValueError(f"frame count T must be {st}n + 1 (1, {1 + st}, {1 + 2 * st}, ...), got {t}")
        if hp % sh or wp % sw or hp == 0 or wp == 0:
            raise ValueError(f"height/width must be positive multiples of {sh}, got {hp}x{wp}")
        if not video.is_floating_point():
            raise ValueError(f"video must be a float tensor in [-1, 1], got {video.dtype}")
        return video.to(self._param_dtype())  # compute in the weights' dtype

    def _check_latent(self, z: Tensor) -> Tensor:
        if not torch.is_tensor(z) or z.ndim != 5 or z.shape[1] != self.cfg.z_dim or 0 in z.shape[2:]:
            got = tuple(z.shape) if torch.is_tensor(z) else type(z).__name__
            raise ValueError(f"latent must be a (B, {self.cfg.z_dim}, F, H, W) tensor with F, H, W >= 1, got {got}")
        if not z.is_floating_point():
            raise ValueError(f"latent must be a float tensor, got {z.dtype}")
        return z.to(self._param_dtype())


# ---- checkpoint loading -------------------------------------------------------------------------------------


def _read_state_dict(path: Path) -> Mapping[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"VAE checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        # mmap needs the zip container torch.save writes by default; legacy tar-style files load without it.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"{path} contains pickled Python objects besides tensors, which torch.load(weights_only=True) refuses "
            f"to execute ({first}). Not loading it: re-save the bare state dict (or safetensors) from a trusted "
            "environment."
        ) from None
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        raise ValueError(f"{path} must hold a flat state dict of name -> tensor, got {type(obj).__name__}")
    return obj


def _check_keys(expected: Mapping[str, Tensor], got: Mapping[str, Tensor], path: Path) -> None:
    """Raise one ValueError listing every missing/unexpected key and shape mismatch (before anything loads)."""
    problems = mismatch_report({k: tuple(v.shape) for k, v in expected.items()},
                               {k: tuple(v.shape) for k, v in got.items()})
    if problems:
        raise ValueError(f"{path} does not match the VAE config:\n  " + "\n  ".join(problems))


def load_wan21_vae(
    path: str | Path, cfg: VAEConfig = VAE21, device: str | torch.device = "cpu", *, dtype: torch.dtype | None = None
) -> WanVAE:
    """Load an official-layout Wan 2.1 VAE checkpoint (``Wan2.1_VAE.pth`` or .safetensors) into a frozen, eval-mode
    WanVAE. Builds on the meta device and assigns the file's tensors (strict), so no memory is spent on a random
    init; every key/shape problem is reported in one ValueError before any tensor is assigned."""
    cfg.validate()
    path = Path(path)
    state = _read_state_dict(path)
    with torch.device("meta"):
        model = WanVAE(cfg)
    _check_keys(model.state_dict(), state, path)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
