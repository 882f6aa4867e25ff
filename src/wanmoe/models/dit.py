"""Wan2.2 diffusion transformer (the "noise expert" network), as a pure tensor function.

Axis legend: B batch, C channels, F latent frames, H/W latent height/width, L tokens, N heads,
D model width (``dim``), S text tokens.

Structure (spec section 6; Wan2.2 ``wan/modules/model.py``): patchify (Conv3d) -> text / timestep embeddings ->
``num_layers`` x [AdaLN-modulated self-attention with 3-D RoPE, cross-attention to text, modulated FFN]
-> modulated head -> unpatchify. State-dict keys and shapes equal the official checkpoints (1095 keys for
A14B; 1260 with the S2V extension of ``models/s2v.py``).

Sequence-parallel seam: ``DiT.seq_parallel`` (None by default) may hold an object with ``world``,
``shard(x, dim)`` and ``gather(x, dim, length)``; see docs/architecture.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from einops import rearrange
from torch import Tensor

from .attention import AttnFn, attention
from .layers import (
    Attention,
    Conv3d,
    LayerNorm32,
    Linear,
    grid_positions,
    linear_fp32,
    rope_table,
    sinusoidal_embedding,
)
from .s2v import S2VConfig, S2VInputs, attach_s2v_modules, s2v_inject_audio, s2v_tokens

__all__ = ["DiTConfig", "DiT", "DIT_PRESETS", "tiny", "S2VConfig", "S2VInputs"]

MODEL_TYPES = ("t2v", "i2v", "ti2v", "s2v")


@dataclass(frozen=True)
class DiTConfig:
    model_type: str = "t2v"  # "t2v" | "i2v" | "ti2v" | "s2v"
    in_dim: int = 16
    out_dim: int = 16
    dim: int = 5120
    ffn_dim: int = 13824
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    num_heads: int = 40
    num_layers: int = 40
    eps: float = 1e-6
    patch_size: tuple[int, int, int] = (1, 2, 2)
    s2v: S2VConfig | None = None  # set exactly when model_type == "s2v"

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def validate(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}; got {self.model_type!r}")
        if self.dim % self.num_heads or self.head_dim % 2:
            raise ValueError(f"dim {self.dim} / num_heads {self.num_heads} must give an even head dim")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim must be even; got {self.freq_dim}")
        if (self.model_type == "s2v") != (self.s2v is not None):
            raise ValueError("s2v config must be set exactly when model_type == 's2v'")
        if self.s2v is not None:
            self.s2v.validate(self.num_layers, self.dim)


_A14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
DIT_PRESETS: dict[str, DiTConfig] = {
    "t2v-a14b": DiTConfig("t2v", 16, 16, **_A14B),
    "i2v-a14b": DiTConfig("i2v", 36, 16, **_A14B),  # [noise 16 | mask 4 | image latent 16]
    "ti2v-5b": DiTConfig("ti2v", 48, 48, dim=3072, ffn_dim=14336, num_heads=24, num_layers=30),
    "s2v-14b": DiTConfig("s2v", 16, 16, **_A14B, s2v=S2VConfig()),
}


def tiny(cfg: DiTConfig) -> DiTConfig:
    """Same wiring, toy sizes (2 layers, 2 heads, width 64): for CPU tests and smoke runs."""
    s2v = None
    if cfg.s2v is not None:
        s2v = replace(cfg.s2v, audio_dim=32, num_audio_layers=3, audio_inject_layers=(0, 1), motion_frames=9)
    return replace(cfg, dim=64, ffn_dim=128, num_heads=2, num_layers=2, freq_dim=32, text_dim=32, text_len=16, s2v=s2v)


DIT_PRESETS.update({f"{k}-tiny": tiny(v) for k, v in list(DIT_PRESETS.items())})


def _pick(m: Tensor, seg: Tensor | None) -> Tensor:
    # m (B, Le, D). With seg (1, L, 1) bool, Le == 2: level 0 for noisy tokens, level 1 (t = 0) for the rest.
    return m if seg is None else torch.where(seg, m[:, 0:1], m[:, 1:2])


def _randn_over_sqrt(shape: tuple[int, ...], d: int) -> Tensor:
    """randn(shape) / sqrt(d), the reference's modulation init; on the meta device (models built to be loaded) no
    draw happens: a random op on meta runs PyTorch's Python reference kernels, whose first use imports the
    compiler stack (about a second of start-up for nothing)."""
    t = torch.empty(shape)
    return t if t.device.type == "meta" else torch.randn(shape) / d**0.5


class Block(nn.Module):
    """AdaLN-zero style DiT block (Peebles & Xie 2023) with qk-norm, 3-D RoPE and unmodulated text cross-attention."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.norm1 = LayerNorm32(d, cfg.eps)
        self.self_attn = Attention(d, cfg.num_heads, cfg.eps)
        self.norm3 = LayerNorm32(d, cfg.eps, affine=True)
        self.cross_attn = Attention(d, cfg.num_heads, cfg.eps)
        self.norm2 = LayerNorm32(d, cfg.eps)
        self.ffn = nn.Sequential(Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), Linear(cfg.ffn_dim, d))
        self.modulation = nn.Parameter(_randn_over_sqrt((1, 6, d), d))

    def forward(
        self,
        x: Tensor,
        e0: Tensor,
        rope: Tensor,
        context: Tensor,
        *,
        attn_fn: AttnFn = attention,
        k_lens: Tensor | None = None,
        seg: Tensor | None = None,
    ) -> Tensor:
        # x (B, L, D) fp32 residual stream; e0 (B, Le, 6, D) fp32 with Le in {1, L} (or 2 with seg);
        # rope (1, L, D/N/2, 2); context (B, S, D) in compute dtype.
        # The blocks' float weight dtype, read from a tensor int8 never replaces (an Int8Linear has no .weight).
        wd = self.modulation.dtype
        mod = self.modulation.float() + e0  # (B, Le, 6, D): modulation table stays fp32
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (_pick(m, seg) for m in mod.unbind(2))
        h = self.norm1(x) * (1 + scale_sa) + shift_sa
        y = self.self_attn(h.to(wd), rope=rope, k_lens=k_lens, attn_fn=attn_fn)
        x = x + y.float() * gate_sa  # gated residual adds in fp32
        # Cross-attention is local to each token (no all-to-all under Ulysses), so it uses the plain backend.
        x = x + self.cross_attn(self.norm3(x).to(wd), context).float()
        y = self.ffn((self.norm2(x) * (1 + scale_ff) + shift_ff).to(wd))
        return x + y.float() * gate_ff


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.norm = LayerNorm32(cfg.dim, cfg.eps)
        self.head = Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(_randn_over_sqrt((1, 2, cfg.dim), cfg.dim))

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        # x (B, L, D); e (B, Le, D) time embedding (not e0): (shift, scale) = modulation + e; all fp32.
        shift, scale = (self.modulation.float()[:, None] + e[:, :, None]).unbind(2)  # (B, Le, D) each
        return linear_fp32(self.head, self.norm(x.float()) * (1 + scale) + shift)


class DiT(nn.Module):
    """forward(x, t, context, *, y=None, s2v=None) -> velocity (B, out_dim, F, H, W) float32."""

    # Numerics policy: these parts run in fp32 regardless of the parameter dtype (casts are explicit in code):
    # the sinusoid (float64), time_embedding/time_projection, the modulation tables, all norms, RoPE, the
    # residual stream and gated adds, the head, and the S2V audio encoder. Linears/convs/attention run in the
    # parameter dtype. RoPE angles are built in float64; ROPE_DTYPE is the dtype the rotation is applied in
    # (the reference uses float64; fp32 differs by ~1e-7 relative and avoids fp64 work on GPUs every step).
    # FP32_MODULES is the one declaration wanmoe.numerics reads: a dtype conversion (--convert_model_dtype, the
    # checkpoint loader, the planner) leaves these submodules' tensors as stored and int8 never quantizes them.
    FP32_MODULES = ("time_embedding", "time_projection", "head", "casual_audio_encoder")
    ROPE_DTYPE = torch.float32

    def __init__(self, cfg: DiTConfig, attn_fn: AttnFn = attention) -> None:
        super().__init__()
        cfg.validate()
        self.cfg, self.attn_fn, self.seq_parallel = cfg, attn_fn, None
        d = cfg.dim
        self.patch_embedding = Conv3d(cfg.in_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), Linear(d, d))
        self.time_embedding = nn.Sequential(Linear(cfg.freq_dim, d), nn.SiLU(), Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), Linear(d, 6 * d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        if cfg.s2v is not None:
            attach_s2v_modules(self, cfg)
            self._inject_at = {layer: i for i, layer in enumerate(cfg.s2v.audio_inject_layers)}
        if self.head.head.weight.device.type != "meta":  # a meta build is only a shape to load weights into
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Training init (reference): xavier Linears/patch conv, N(0, .02) text/time MLPs, zero head weight."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for m in (*self.text_embedding, *self.time_embedding):
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)

    # ---------------------------------------------------------------- embeddings
    def _time(self, t: Tensor) -> tuple[Tensor, Tensor]:
        # t (P,) -> e (P, D), e0 (P, 6, D), both fp32 (sinusoid in float64 first).
        emb = sinusoidal_embedding(t, self.cfg.freq_dim).float()
        te = self.time_embedding
        e = linear_fp32(te[2], torch.nn.functional.silu(linear_fp32(te[0], emb)))
        e0 = linear_fp32(self.time_projection[1], torch.nn.functional.silu(e))
        return e, e0.unflatten(1, (6, self.cfg.dim))

    def _time_per_token(self, t: Tensor, length: int) -> tuple[Tensor, Tensor]:
        # t (B,) -> e (B, 1, D), e0 (B, 1, 6, D), broadcast over tokens (no (B, L, 6, D) copy);
        # t (B, L) -> embed only the distinct values, then gather per token.
        if t.dim() == 1:
            e, e0 = self._time(t)
            return e[:, None], e0[:, None]
        if t.shape[1] != length:
            raise ValueError(f"per-token t must be (B, L={length}); got {tuple(t.shape)}")
        vals, inv = torch.unique(t, return_inverse=True)
        e, e0 = self._time(vals)
        return e[inv], e0[inv]  # (B, L, D), (B, L, 6, D)

    def _context(self, context: Tensor) -> Tensor:
        b, s, c = context.shape
        if c != self.cfg.text_dim or s > self.cfg.text_len:
            raise ValueError(f"context must be (B, S<={self.cfg.text_len}, {self.cfg.text_dim}); got {(b, s, c)}")
        wd = self.patch_embedding.weight.dtype  # the conv is never quantized; the text MLP may be int8
        # Zero-pad to text_len: cross-attention is unmasked over all text_len positions, as in the reference.
        ctx = torch.nn.functional.pad(context.to(wd), (0, 0, 0, self.cfg.text_len - s))  # (B, text_len, text_dim)
        return self.text_embedding(ctx)  # (B, text_len, D)

    def _check(self, x: Tensor, t: Tensor, y: Tensor | None, s2v: S2VInputs | None) -> None:
        cfg = self.cfg
        if x.dim() != 5:
            raise ValueError(f"x must be (B, C, F, H, W); got {tuple(x.shape)}")
        cin = x.shape[1] + (0 if y is None else y.shape[1])
        if cin != cfg.in_dim:
            raise ValueError(f"x channels ({x.shape[1]}) + y channels must equal in_dim={cfg.in_dim}")
        if cfg.model_type == "i2v" and y is None:
            raise ValueError("model_type 'i2v' needs y (mask + image latent)")
        if y is not None and (y.shape[0] != x.shape[0] or y.shape[2:] != x.shape[2:]):
            raise ValueError(f"y must match x on batch/F/H/W: {tuple(y.shape)} vs {tuple(x.shape)}")
        if any(n % p for n, p in zip(x.shape[2:], cfg.patch_size)):
            raise ValueError(f"latent (F, H, W)={tuple(x.shape[2:])} not divisible by patch {cfg.patch_size}")
        if t.dim() not in (1, 2) or t.shape[0] != x.shape[0]:
            raise ValueError(f"t must be (B,) or (B, L) with B={x.shape[0]}; got {tuple(t.shape)}")
        if (cfg.s2v is not None) != (s2v is not None):
            raise ValueError("s2v inputs are required for (and only for) an S2V model")
        if s2v is not None and t.dim() != 1:
            raise ValueError("S2V takes t of shape (B,)")

    # ---------------------------------------------------------------- forward
    def forward(
        self, x: Tensor, t: Tensor, context: Tensor, *, y: Tensor | None = None, s2v: S2VInputs | None = None
    ) -> Tensor:
        """x (B, C, F, H, W) noisy latent, t (B,) or (B, L) timesteps in [0, 1000], context (B, S, text_dim)."""
        self._check(x, t, y, s2v)
        cfg = self.cfg
        if y is not None:
            x = torch.cat([x, y.to(x.dtype)], dim=1)  # (B, in_dim, F, H, W): channel concat before patchify
        tok = self.patch_embedding(x.to(self.patch_embedding.weight.dtype))  # (B, D, f, h, w)
        grid = tuple(tok.shape[2:])
        # (B, L, D) f-major token order. Contiguous: the transposed view (strides (D*L, 1, L)) made every
        # residual add and norm of every block read memory with stride L, ~3x the cost of a contiguous add.
        tok = tok.flatten(2).transpose(1, 2).float().contiguous()
        n_video = tok.shape[1]

        seg, st = None, None
        if s2v is not None:
            st = s2v_tokens(self, cfg.s2v, x, tok, grid, s2v)
            tok, pos = st.tokens, st.positions
            if cfg.s2v.zero_timestep:
                e_all, e0_all = self._time(torch.cat([t, t.new_zeros(1)]))
                e = e_all[:-1, None]  # (B, 1, D): the head only sees noisy tokens
                e0 = torch.stack([e0_all[:-1], e0_all[-1:].expand(t.shape[0], -1, -1)], dim=1)  # (B, 2, 6, D)
                seg = (torch.arange(tok.shape[1], device=tok.device) < st.num_noisy)[None, :, None]  # (1, L, 1)
            else:
                e, e0 = self._time_per_token(t, n_video)
        else:
            pos = grid_positions(*grid, device=tok.device)
            e, e0 = self._time_per_token(t, n_video)
        rope = rope_table(pos, cfg.head_dim, dtype=self.ROPE_DTYPE)[None]  # (1, L, D/N/2, 2)
        ctx = self._context(context)

        length, k_lens = tok.shape[1], None
        sp = self.seq_parallel
        if sp is not None:
            # Shard the token stream and every per-token tensor; attention gets the global valid length so
            # the padding added by shard() is masked after Ulysses' all-to-all.
            tok, rope = sp.shard(tok, 1), sp.shard(rope, 1)
            e0_blk = sp.shard(e0, 1) if e0.shape[1] == length else e0
            seg = None if seg is None else sp.shard(seg, 1)
            k_lens = torch.full((tok.shape[0],), length, dtype=torch.long, device=tok.device)
        else:
            e0_blk = e0

        for i, block in enumerate(self.blocks):
            tok = block(tok, e0_blk, rope, ctx, attn_fn=self.attn_fn, k_lens=k_lens, seg=seg)
            if st is not None and i in self._inject_at:
                if sp is not None:
                    tok = sp.gather(tok, 1, length)  # injection regroups tokens per frame: needs the full stream
                tok = s2v_inject_audio(self, self._inject_at[i], tok, st)
                if sp is not None:
                    tok = sp.shard(tok, 1)

        if sp is not None:
            tok = sp.gather(tok, 1, length)
        out = self.head(tok[:, :n_video], e if e.shape[1] == 1 else e[:, :n_video])  # (B, L, p*q*r*C)
        p, q, r = cfg.patch_size
        f, h, w = grid
        return rearrange(out, "b (f h w) (p q r c) -> b c (f p) (h q) (w r)", f=f, h=h, w=w, p=p, q=q, r=r).float()
