"""Speech-to-video extension composed onto the DiT (no forked trunk).

Axis legend: B batch, C channels, F latent frames, H/W latent height/width, L tokens, D model width,
A audio frames (video-rate audio features), K audio layers (wav2vec2 hidden states), G audio tokens per frame.

When ``DiTConfig.s2v`` is set, ``DiT`` calls :func:`attach_s2v_modules` (official key names: cond_encoder,
casual_audio_encoder, audio_injector.*, trainable_cond_mask, frame_packer.*), then per forward
:func:`s2v_tokens` to extend the token stream with [ref | motion] tokens and :func:`s2v_inject_audio` after
each listed block. Source: the official Wan2.2 S2V model (``WanModel_S2V`` and its audio, auxiliary and motioner
blocks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .layers import Attention, grid_positions, linear_fp32, stretched_positions

__all__ = [
    "S2VConfig",
    "S2VInputs",
    "S2VState",
    "CausalAudioEncoder",
    "FramePacker",
    "AudioInjector",
    "attach_s2v_modules",
    "s2v_tokens",
    "s2v_inject_audio",
]


@dataclass(frozen=True)
class S2VConfig:
    """S2V extras. Defaults are the official S2V-14B (framepack motion, AdaIN "attn_norm" audio injection)."""

    cond_dim: int = 16  # pose latent channels
    audio_dim: int = 1024  # wav2vec2 hidden width
    num_audio_layers: int = 25  # wav2vec2 hidden states fused (embeddings + 24 layers)
    num_audio_token: int = 4  # local audio tokens per latent frame (a 5th, learned padding token is appended)
    audio_inject_layers: tuple[int, ...] = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)
    motion_frames: int = 73  # pixel frames of motion context; audio is prefixed with this many copies
    zip_frame_buckets: tuple[int, int, int] = (1, 2, 16)  # newest -> oldest motion latents at 1x / 2x / 4x
    drop_first_motion: bool = True  # pipeline policy: clip 0 has no motion tokens
    zero_timestep: bool = True  # ref/motion tokens are modulated with t = 0
    ref_rope_t: int = 30  # temporal RoPE index of the reference-image tokens
    adain_eps: float = 1e-5  # LayerNorm eps inside the audio AdaIN

    @property
    def lat_motion_frames(self) -> int:
        """Latent frames covered by the motion pixels (VAE temporal stride 4, causal first frame)."""
        return (self.motion_frames + 3) // 4

    def validate(self, num_layers: int, dim: int) -> None:
        layers = self.audio_inject_layers
        if list(layers) != sorted(set(layers)) or (layers and (layers[0] < 0 or layers[-1] >= num_layers)):
            raise ValueError(f"audio_inject_layers must be strictly increasing within [0, {num_layers}); got {layers}")
        b0, b1, b2 = self.zip_frame_buckets
        if b0 != 1 or b1 % 2 or b2 % 4 or b1 <= 0 or b2 <= 0:
            raise ValueError(
                f"zip_frame_buckets must be (1, 2k, 4m) for the 1x/2x/4x packers; got {self.zip_frame_buckets}"
            )
        if dim % 4:
            raise ValueError(f"S2V needs dim divisible by 4 (audio encoder widths dim/4, dim/2); got {dim}")
        if self.motion_frames < 1 or self.num_audio_token < 1:
            raise ValueError("motion_frames and num_audio_token must be >= 1")


@dataclass
class S2VInputs:
    """Per-clip S2V conditioning, batched."""

    audio: Tensor  # (B, K, audio_dim, A) wav2vec2 features at video fps for this clip
    ref_latents: Tensor  # (B, C, 1, H, W) VAE latent of the reference image
    motion_latents: Tensor  # (B, C, Fm, H, W) VAE latents of the previous frames (any Fm; last sum(buckets) used)
    pose_latents: Tensor | None = None  # (B, cond_dim, F, H, W); None = no pose (the encoder's bias still applies)
    drop_motion_frames: bool = False  # True on the first clip: no motion tokens at all


@dataclass
class S2VState:
    """What the trunk needs from the S2V preparation, per forward."""

    tokens: Tensor  # (B, L_all, D) fp32: [noisy | ref | motion] tokens incl. the cond-type embedding
    positions: Tensor  # (L_all, 3) int64 RoPE (t, h, w) positions
    num_noisy: int  # tokens before this index are the noisy video (modulated with t; the rest with t = 0)
    audio_local: Tensor  # (B, F, G+1, D) per-frame local audio tokens
    audio_global: Tensor  # (B, F, 1, D) per-frame global audio token (AdaIN condition)


class CausalConv1d(nn.Module):
    """Conv1d with (k-1) replicate padding on the left only, so frame t never sees frames > t."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.pad = kernel - 1
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride=stride)

    def forward(self, x: Tensor) -> Tensor:  # x (B, C, A)
        x = F.pad(x.float(), (self.pad, 0), mode="replicate")
        bias = None if self.conv.bias is None else self.conv.bias.float()
        return F.conv1d(x, self.conv.weight.float(), bias, stride=self.conv.stride)


class _MotionEncoderTC(nn.Module):
    """Two-path causal conv audio encoder, time stride 4 (conv2, conv3 stride 2): G local tokens + 1 global."""

    def __init__(self, in_dim: int, dim: int, num_token: int) -> None:
        super().__init__()
        self.num_token = num_token
        self.conv1_local = CausalConv1d(in_dim, dim // 4 * num_token)
        self.conv1_global = CausalConv1d(in_dim, dim // 4)
        self.conv2 = CausalConv1d(dim // 4, dim // 2, stride=2)  # shared by both paths
        self.conv3 = CausalConv1d(dim // 2, dim, stride=2)
        self.final_linear = nn.Linear(dim, dim)  # global path only
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def _trunk(self, x: Tensor) -> Tensor:
        # x (B', C, A) after conv1 -> (B', A/4, dim); affine-free LN + SiLU after each conv.
        for i, conv in enumerate((None, self.conv2, self.conv3)):
            if conv is not None:
                x = conv(x)
            x = F.silu(F.layer_norm(x.transpose(1, 2), (x.shape[1],), eps=1e-6))  # (B', A', C')
            x = x.transpose(1, 2) if i < 2 else x
        return x

    def forward(self, feat: Tensor) -> tuple[Tensor, Tensor]:
        # feat (B, A, audio_dim) -> global (B, A/4, 1, D), local (B, A/4, G+1, D)
        b = feat.shape[0]
        x = feat.transpose(1, 2)  # (B, audio_dim, A)
        loc = rearrange(self.conv1_local(x), "b (n c) a -> (b n) c a", n=self.num_token)
        loc = rearrange(self._trunk(loc), "(b n) a c -> b a n c", b=b)  # (B, A', G, D)
        pad = self.padding_tokens.float().expand(b, loc.shape[1], 1, -1)
        loc = torch.cat([loc, pad], dim=2)  # (B, A', G+1, D)
        glob = linear_fp32(self.final_linear, self._trunk(self.conv1_global(x)))  # (B, A', D)
        return glob[:, :, None], loc


class CausalAudioEncoder(nn.Module):
    """Learned softmax-free layer fusion sum_k silu(w_k) feat_k / sum_k silu(w_k), then the causal encoder."""

    def __init__(self, audio_dim: int, num_layers: int, dim: int, num_token: int) -> None:
        super().__init__()
        self.weights = nn.Parameter(torch.full((1, num_layers, 1, 1), 0.01))
        self.encoder = _MotionEncoderTC(audio_dim, dim, num_token)

    def forward(self, audio: Tensor) -> tuple[Tensor, Tensor]:
        # audio (B, K, audio_dim, A); the whole encoder runs in fp32 (as the reference's fp32 autocast).
        w = F.silu(self.weights.float())  # (1, K, 1, 1)
        fused = (audio.float() * w / w.sum(dim=1, keepdim=True)).sum(dim=1)  # (B, audio_dim, A)
        return self.encoder(fused.transpose(1, 2))


class _AdaLN(nn.Module):
    """out = LN(x) * (1 + scale) + shift, (shift, scale) = Linear(SiLU(c)) -- shift first (key ``.linear``)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: Tensor, cond: Tensor, dtype: torch.dtype) -> Tensor:
        # x (B', n, D) fp32; cond (B', D); dtype: the model's weight dtype (self.linear may be int8: no .weight)
        mod = self.linear(F.silu(cond).to(dtype)).float()
        shift, scale = mod[:, None].chunk(2, dim=-1)  # (B', 1, D) each
        return F.layer_norm(x.float(), (x.shape[-1],), eps=self.eps) * (1 + scale) + shift


class AudioInjector(nn.Module):
    """Per listed block: AdaIN (by the frame's global audio token) + cross-attention to its local audio tokens."""

    def __init__(self, dim: int, num_heads: int, n: int, eps: float, adain_eps: float) -> None:
        super().__init__()
        self.injector = nn.ModuleList(Attention(dim, num_heads, eps) for _ in range(n))
        self.injector_adain_layers = nn.ModuleList(_AdaLN(dim, adain_eps) for _ in range(n))


class FramePacker(nn.Module):
    """Motion latents -> tokens at three resolutions: newest b0 frames 1x, next b1 at 2x, oldest b2 at 4x
    (FramePack, Zhang & Agrawala 2025). Frame/space compression is (1,2,2), (2,4,4), (4,8,8)."""

    def __init__(self, in_dim: int, dim: int, buckets: tuple[int, int, int]) -> None:
        super().__init__()
        self.buckets = buckets
        self.proj = nn.Conv3d(in_dim, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.proj_2x = nn.Conv3d(in_dim, dim, kernel_size=(2, 4, 4), stride=(2, 4, 4))
        self.proj_4x = nn.Conv3d(in_dim, dim, kernel_size=(4, 8, 8), stride=(4, 8, 8))

    def forward(self, motion: Tensor) -> tuple[Tensor, Tensor]:
        # motion (B, C, Fm, H, W) -> tokens (B, Lm, D), positions (Lm, 3)
        b0, b1, b2 = self.buckets
        total = b0 + b1 + b2
        fm, h, w = motion.shape[2:]
        # Keep the newest `total` frames; if there are fewer, zero-fill the oldest slots.
        motion = motion[:, :, -total:] if fm >= total else F.pad(motion, (0, 0, 0, 0, total - fm, 0))
        x4, x2, x1 = motion.split([b2, b1, b0], dim=2)  # oldest -> newest
        wd = self.proj.weight.dtype
        toks = [
            p(v.to(wd)).flatten(2).transpose(1, 2) for p, v in ((self.proj, x1), (self.proj_2x, x2), (self.proj_4x, x4))
        ]
        # RoPE: group g starts at temporal index -start_g (conjugate rotation = "in the past") and its coarse
        # spatial grid is stretched over the full-resolution range 0..h/2-1, 0..w/2-1.
        groups = ((b0, b0, 1, 2), (b0 + b1, b1, 2, 4), (total, b2, 4, 8))  # (start, frames, t-stride, s-stride)
        pos = []
        for start, frames, ts, ss in groups:
            nt, nh, nw = frames // ts, h // ss, w // ss
            t_idx = -stretched_positions(start, start - frames + 1, nt)
            h_idx = stretched_positions(0, h // 2 - 1, nh)
            w_idx = stretched_positions(0, w // 2 - 1, nw)
            grid = torch.stack(torch.meshgrid(t_idx, h_idx, w_idx, indexing="ij"), dim=-1).reshape(-1, 3)
            pos.append(grid)
        # Positions follow from the shapes alone: they stay on the host (no device round trip, and a meta-device
        # model, as the memory planner builds, can trace this).
        return torch.cat(toks, dim=1).float(), torch.cat(pos)  # (B, Lm, D), (Lm, 3)


def attach_s2v_modules(model: nn.Module, cfg) -> None:  # cfg: DiTConfig (not imported: dit.py imports this module)
    """Create the S2V submodules on the DiT under their official names."""
    s: S2VConfig = cfg.s2v
    s.validate(cfg.num_layers, cfg.dim)
    model.cond_encoder = nn.Conv3d(s.cond_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
    model.casual_audio_encoder = CausalAudioEncoder(s.audio_dim, s.num_audio_layers, cfg.dim, s.num_audio_token)
    model.audio_injector = AudioInjector(cfg.dim, cfg.num_heads, len(s.audio_inject_layers), cfg.eps, s.adain_eps)
    # Token type: 0 noisy, 1 ref, 2 motion. A meta build gets an uninitialised table: a random init on meta runs
    # PyTorch's Python reference kernels, whose first use imports the compiler stack (a second of start-up).
    meta = model.patch_embedding.weight.device.type == "meta"
    model.trainable_cond_mask = nn.Embedding(3, cfg.dim, _weight=torch.empty(3, cfg.dim) if meta else None)
    model.frame_packer = FramePacker(cfg.in_dim, cfg.dim, s.zip_frame_buckets)


def _check_inputs(inp: S2VInputs, s: S2VConfig, x: Tensor) -> None:
    b, _, f, h, w = x.shape
    if inp.audio.dim() != 4 or inp.audio.shape[0] != b or inp.audio.shape[1:3] != (s.num_audio_layers, s.audio_dim):
        raise ValueError(f"audio must be (B={b}, {s.num_audio_layers}, {s.audio_dim}, A); got {tuple(inp.audio.shape)}")
    if inp.ref_latents.shape != (b, x.shape[1], 1, h, w):
        raise ValueError(f"ref_latents must be {(b, x.shape[1], 1, h, w)}; got {tuple(inp.ref_latents.shape)}")
    m = inp.motion_latents
    if m.dim() != 5 or m.shape[0] != b or m.shape[1] != x.shape[1] or m.shape[3:] != (h, w):
        raise ValueError(f"motion_latents must be (B={b}, {x.shape[1]}, Fm, {h}, {w}); got {tuple(m.shape)}")
    if not inp.drop_motion_frames and (h < 8 or w < 8):
        raise ValueError(f"motion packing needs latent H, W >= 8 (4x group is 8x8 patches); got {(h, w)}")
    if inp.pose_latents is not None and inp.pose_latents.shape != (b, s.cond_dim, f, h, w):
        raise ValueError(f"pose_latents must be {(b, s.cond_dim, f, h, w)}; got {tuple(inp.pose_latents.shape)}")


def s2v_tokens(
    model: nn.Module, s: S2VConfig, x: Tensor, noisy: Tensor, grid: tuple[int, int, int], inp: S2VInputs
) -> S2VState:
    """Build the full S2V token stream. x (B, C, F, H, W) latent; noisy (B, L, D) its patch-embedded tokens (fp32)."""
    _check_inputs(inp, s, x)
    f, hp, wp = grid
    wd = model.patch_embedding.weight.dtype
    # Tokens [noisy | ref | motion] written into one buffer, each part plus its token-type embedding, with in-place
    # adds in the reference's order ((noisy + pose) + type): no full-length temporaries besides the buffer.
    ref = model.patch_embedding(inp.ref_latents.to(wd)).flatten(2).transpose(1, 2)  # (B, h*w, D)
    parts: list[Tensor] = [ref]
    positions = [grid_positions(f, hp, wp), grid_positions(1, hp, wp, t0=s.ref_rope_t)]
    if not inp.drop_motion_frames:
        mot, mot_pos = model.frame_packer(inp.motion_latents)  # (B, Lm, D) fp32
        parts.append(mot)
        positions.append(mot_pos)
    lens = [noisy.shape[1]] + [p.shape[1] for p in parts]
    type_emb = model.trainable_cond_mask(torch.arange(len(lens), device=x.device)).float()  # (types, D): 0 noisy
    tokens = noisy.new_empty((noisy.shape[0], sum(lens), noisy.shape[2]))  # (B, L_all, D) fp32
    dst = tokens[:, : lens[0]]
    # Pose: the cond encoder is always applied; with no pose its input would be zeros, i.e. only its bias.
    if inp.pose_latents is not None:
        dst.copy_(model.cond_encoder(inp.pose_latents.to(wd)).flatten(2).transpose(1, 2)).add_(noisy)
    else:
        dst.copy_(noisy).add_(model.cond_encoder.bias.float())
    dst.add_(type_emb[0])
    start = lens[0]
    for i, part in enumerate(parts, start=1):
        tokens[:, start : start + lens[i]].copy_(part).add_(type_emb[i])
        start += lens[i]

    # Audio: prefix the clip with `motion_frames` copies of its first frame (the motion context's audio), encode at
    # stride 4, then drop the latent frames that belong to the motion context.
    audio = inp.audio
    audio = torch.cat([audio[..., :1].expand(-1, -1, -1, s.motion_frames), audio], dim=-1)  # (B, K, Da, Mf + A)
    glob, loc = model.casual_audio_encoder(audio)  # (B, A', 1, D), (B, A', G+1, D)
    glob, loc = glob[:, s.lat_motion_frames :], loc[:, s.lat_motion_frames :]
    if loc.shape[1] != f:
        raise ValueError(
            f"audio gives {loc.shape[1]} latent frames but the latent has F={f}; pass A = 4*F audio frames "
            f"(got A={inp.audio.shape[-1]})"
        )
    return S2VState(tokens, torch.cat(positions).to(x.device), lens[0], loc, glob)


def s2v_inject_audio(model: nn.Module, idx: int, x: Tensor, st: S2VState, chunk: int | None = None) -> Tensor:
    """Residual audio injection into the noisy tokens of x (B, L_all, D), per latent frame; ref/motion untouched.

    chunk (tokens, None = all): frames are independent here, so whole frames are injected a group at a time; without
    autograd the sums go back into x in place (x is the DiT's own residual stream)."""
    n, f = st.num_noisy, st.audio_local.shape[1]
    per = max(1, (chunk or n) // max(1, n // f))  # frames per pass
    if per >= f:
        return torch.cat([x[:, :n] + _injection(model, idx, x[:, :n], st, 0, f), x[:, n:]], dim=1)
    hw = n // f
    out = x if not torch.is_grad_enabled() else x.clone()
    for f0 in range(0, f, per):
        f1 = min(f, f0 + per)
        xs = x[:, f0 * hw : f1 * hw]  # (B, (f1-f0)*h*w, D)
        out[:, f0 * hw : f1 * hw] = xs + _injection(model, idx, xs, st, f0, f1)
    return out


def _injection(model: nn.Module, idx: int, x: Tensor, st: S2VState, f0: int, f1: int) -> Tensor:
    # x (B, (f1-f0)*h*w, D) fp32, the noisy tokens of latent frames [f0, f1) -> their audio update, same shape.
    adain = model.audio_injector.injector_adain_layers[idx]
    attn = model.audio_injector.injector[idx]
    f = f1 - f0
    h = rearrange(x, "b (t n) c -> (b t) n c", t=f)  # (B*F, h*w, D)
    wd = model.patch_embedding.weight.dtype  # never quantized, unlike the injector's Linears
    h = adain(h, rearrange(st.audio_global[:, f0:f1], "b t n c -> (b t) n c")[:, 0], wd)  # (B*F, h*w, D) fp32
    ctx = rearrange(st.audio_local[:, f0:f1], "b t n c -> (b t) n c")  # (B*F, G+1, D)
    out = attn(h.to(wd), ctx.to(wd)).float()  # every frame sees all its G+1 audio tokens: no mask
    return rearrange(out, "(b t) n c -> b (t n) c", t=f)  # (B, F*h*w, D)
