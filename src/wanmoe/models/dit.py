"""Wan2.2 diffusion transformer (the "noise expert" network), as a pure tensor function.

Axis legend: B batch, C channels, F latent frames, H/W latent height/width, L tokens, N heads,
D model width (``dim``), S text tokens.

Structure (spec section 6; Wan2.2 ``wan/modules/model.py``): patchify (Conv3d) -> text / timestep embeddings ->
``num_layers`` x [AdaLN-modulated self-attention with 3-D RoPE, cross-attention to text, modulated FFN]
-> modulated head -> unpatchify. State-dict keys and shapes equal the official checkpoints (1095 keys for
A14B; 1260 with the S2V extension of ``models/s2v.py``).

Sequence-parallel seam: ``DiT.seq_parallel`` (None by default) may hold an object with ``world``,
``shard(x, dim)`` and ``gather(x, dim, length)``; see docs/architecture.md. Under it, per-token timestep rows are
sharded as a (B|1, L) row index (S2V's t / t=0 boundary becomes one), not as (B, L, 6, D) tensors.

Memory knob: ``DiT.token_chunk`` (None by default: every token at once) runs the token-local parts of each block
(norms, modulation, q/k/v and output projections, cross-attention queries, FFN, gated adds), the head and the S2V
audio injection over at most that many tokens at a time. Self-attention still attends to the whole sequence through
the attention seam: full-length keys and values, queries one chunk at a time (full length too under sequence
parallelism, whose all-to-all needs q and k of one length). Equal to the unchunked output up to float rounding;
``wanmoe.models.frugal.frugal_`` sets it (docs/performance.md).
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
    apply_rope,
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


# Which row of a small timestep table each token uses, with no per-token copy of the table (spec: the reference
# builds (B, L, 6, D) fp32 per forward): None = row 0 for every token; an int n = row 0 before token n and row 1
# from n on (S2V: ref/motion tokens at t = 0); a (B|1, L) long tensor = a row per token (per-token t).
def _pieces(rows: int | Tensor | None, a: int, b: int) -> list[tuple[int, int, slice | Tensor]]:
    """Tokens [a, b) as (lo, hi, sel) runs that share one row selector: a row slice, or a (B|1, hi-lo) index."""
    if rows is None:
        return [(a, b, slice(0, 1))]
    if isinstance(rows, int):
        runs = ((a, min(b, rows), slice(0, 1)), (max(a, rows), b, slice(1, 2)))
        return [r for r in runs if r[0] < r[1]]
    return [(a, b, rows[:, a:b])]


def _param(table: Tensor, sel: slice | Tensor, k: int) -> Tensor:
    # table (Bt, R, K, D) fp32 -> parameter k of the selected rows: (Bt, 1, D) for a slice, (B, n, D) gathered.
    if isinstance(sel, slice):
        return table[:, sel, k]
    rows = torch.arange(table.shape[0], device=sel.device)[:, None]  # (Bt, 1): broadcasts against sel (B|1, n)
    return table[:, :, k][rows, sel]


def _modulate(n: Tensor, table: Tensor, pieces: list, a: int, shift: int, scale: int) -> Tensor:
    """n * (1 + scale) + shift over the runs of tokens [a, ...) that n (B, c, D) holds; fp32."""
    parts = [
        n[:, lo - a : hi - a] * (1 + _param(table, sel, scale)) + _param(table, sel, shift) for lo, hi, sel in pieces
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _gated_add(x: Tensor, y: Tensor, table: Tensor, pieces: list, a: int, gate: int) -> Tensor:
    """x + y * gate in fp32 (the gated residual add) over the runs of tokens x (B, c, D) holds."""
    parts = [x[:, lo - a : hi - a] + y[:, lo - a : hi - a].float() * _param(table, sel, gate) for lo, hi, sel in pieces]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _spans(length: int, chunk: int | None) -> list[tuple[int, int]]:
    c = length if chunk is None else max(1, chunk)
    return [(a, min(a + c, length)) for a in range(0, max(length, 1), c)]


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
        rows: int | Tensor | None = None,
        chunk: int | None = None,
        split_queries: bool = True,
    ) -> Tensor:
        # x (B, L, D) fp32 residual stream; e0 (B|1, R, 6, D) fp32 timestep rows, picked per token by `rows`;
        # rope (1, L, D/N/2, 2); context (B, S, D) in compute dtype. chunk: tokens per pass of the token-local
        # parts (None = all at once). Self-attention always attends to the whole (local) sequence: keys and values
        # are full length; with split_queries the queries (and the attention output) come one chunk at a time,
        # else (Ulysses: its all-to-all needs q and k of one shard length) q is full length too.
        # The blocks' float weight dtype, read from a tensor int8 never replaces (an Int8Linear has no .weight).
        wd = self.modulation.dtype
        table = self.modulation.float() + e0  # (B|1, R, 6, D): modulation table stays fp32
        length = x.shape[1]
        spans = _spans(length, chunk)
        ck, cv = self.cross_attn.project_kv(context)  # (B, S, N, D): text keys once per block, not per chunk
        if len(spans) == 1:
            pieces = _pieces(rows, 0, length)
            h = self._h(x, table, pieces, 0, wd)
            q, (k, v) = self._q(h, rope), self._kv(h, rope)
            del h
            att = attn_fn(q, k, v, k_lens=k_lens)  # (B, L, N, D)
            del q, k, v
            return self._token_local(x, att, table, pieces, ck, cv, 0, wd)
        # Full-length k, v (and q unless split) filled chunk by chunk: norms, modulation, projections and RoPE see
        # one chunk at a time.
        shape = (*x.shape[:2], self.self_attn.num_heads, self.self_attn.head_dim)  # (B, L, N, D)
        k, v = (x.new_empty(shape, dtype=wd) for _ in range(2))
        q = None if split_queries else x.new_empty(shape, dtype=wd)
        for a, b in spans:
            h = self._h(x[:, a:b], table, _pieces(rows, a, b), a, wd)
            k[:, a:b], v[:, a:b] = self._kv(h, rope[:, a:b])
            if q is not None:
                q[:, a:b] = self._q(h, rope[:, a:b])
            del h
        att = None if q is None else attn_fn(q, k, v, k_lens=k_lens)  # (B, L, N, D)
        del q
        # Without autograd the results go straight back into the residual stream (chunk j's queries are read
        # before chunk j is written); with it into a new tensor (the norms saved x's chunks for backward).
        out = x if not torch.is_grad_enabled() else torch.empty_like(x)
        for a, b in spans:
            xs, pieces = x[:, a:b], _pieces(rows, a, b)
            if att is None:  # this chunk's queries against every key: (B, c, N, D)
                att_s = attn_fn(self._q(self._h(xs, table, pieces, a, wd), rope[:, a:b]), k, v, k_lens=k_lens)
            else:
                att_s = att[:, a:b]
            out[:, a:b] = self._token_local(xs, att_s, table, pieces, ck, cv, a, wd)
        return out

    def _h(self, x: Tensor, table: Tensor, pieces: list, a: int, wd: torch.dtype) -> Tensor:
        # x (B, c, D) fp32 tokens [a, a + c) -> the AdaLN-modulated self-attention input, in the weight dtype.
        return _modulate(self.norm1(x), table, pieces, a, 0, 1).to(wd)

    def _q(self, h: Tensor, rope: Tensor) -> Tensor:
        return apply_rope(self.self_attn.project_q(h), rope)  # (B, c, N, D)

    def _kv(self, h: Tensor, rope: Tensor) -> tuple[Tensor, Tensor]:
        k, v = self.self_attn.project_kv(h)  # (B, c, N, D) each
        return apply_rope(k, rope), v

    def _token_local(
        self, x: Tensor, att: Tensor, table: Tensor, pieces: list, ck: Tensor, cv: Tensor, a: int, wd: torch.dtype
    ) -> Tensor:
        # x (B, c, D) fp32 tokens [a, a + c); att (B, c, N, D) their self-attention output.
        x = _gated_add(x, self.self_attn.o(att.flatten(2)), table, pieces, a, 2)  # gated residual adds in fp32
        # Cross-attention is local to each token (no all-to-all under Ulysses), so it uses the plain backend.
        x = x + self.cross_attn.attend(self.norm3(x).to(wd), ck, cv).float()
        y = self.ffn(_modulate(self.norm2(x), table, pieces, a, 3, 4).to(wd))
        return _gated_add(x, y, table, pieces, a, 5)


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.norm = LayerNorm32(cfg.dim, cfg.eps)
        self.head = Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(_randn_over_sqrt((1, 2, cfg.dim), cfg.dim))

    def forward(self, x: Tensor, e: Tensor, rows: int | Tensor | None = None, chunk: int | None = None) -> Tensor:
        # x (B, L, D); e (B|1, R, D) time-embedding rows (not e0), picked per token by `rows`;
        # (shift, scale) = modulation + e; all fp32. Output (B, L, p*q*r*C), chunk tokens at a time.
        table = self.modulation.float()[:, None] + e[:, :, None]  # (B|1, R, 2, D)
        spans = _spans(x.shape[1], chunk)
        out = None
        for a, b in spans:
            h = _modulate(self.norm(x[:, a:b].float()), table, _pieces(rows, a, b), a, 0, 1)
            y = linear_fp32(self.head, h)  # (B, c, p*q*r*C)
            if len(spans) == 1:
                return y
            out = x.new_empty((*x.shape[:2], y.shape[-1]), dtype=y.dtype) if out is None else out
            out[:, a:b] = y
        return out


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
        self.token_chunk: int | None = None  # see the module docstring; frugal_() sets it
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

    def _time_rows(self, t: Tensor, length: int) -> tuple[Tensor, Tensor, Tensor | None]:
        # t (B,) -> e (B, 1, D), e0 (B, 1, 6, D), one row for every token (no (B, L, 6, D) copy);
        # t (B, L) -> e (1, P, D), e0 (1, P, 6, D) for the P distinct values, and each token's row (B, L).
        if t.dim() == 1:
            e, e0 = self._time(t)
            return e[:, None], e0[:, None], None
        if t.shape[1] != length:
            raise ValueError(f"per-token t must be (B, L={length}); got {tuple(t.shape)}")
        vals, inv = torch.unique(t, return_inverse=True)
        e, e0 = self._time(vals)
        return e[None], e0[None], inv

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
        # One fp32 copy straight from the conv's output (no intermediate fp32 transposed copy).
        tok = tok.new_empty((tok.shape[0], math.prod(grid), tok.shape[1]), dtype=torch.float32).copy_(
            tok.flatten(2).transpose(1, 2)
        )
        n_video = tok.shape[1]

        st = None
        if s2v is not None:
            st = s2v_tokens(self, cfg.s2v, x, tok, grid, s2v)
            tok, pos = st.tokens, st.positions
            if cfg.s2v.zero_timestep:
                e_all, e0_all = self._time(torch.cat([t, t.new_zeros(1)]))
                e, e_rows = e_all[:-1, None], None  # (B, 1, D): the head only sees noisy tokens
                e0 = torch.stack([e0_all[:-1], e0_all[-1:].expand(t.shape[0], -1, -1)], dim=1)  # (B, 2, 6, D)
                rows = st.num_noisy  # row 0 (t) for the noisy tokens, row 1 (t = 0) for ref/motion
            else:
                e, e0, rows = self._time_rows(t, n_video)
                e_rows = rows
        else:
            pos = grid_positions(*grid, device=tok.device)
            e, e0, rows = self._time_rows(t, n_video)
            e_rows = rows
        rope = rope_table(pos, cfg.head_dim, dtype=self.ROPE_DTYPE)[None]  # (1, L, D/N/2, 2)
        ctx = self._context(context)

        length, k_lens, chunk = tok.shape[1], None, self.token_chunk
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"token_chunk must be None or a positive int; got {chunk!r}")
        sp = self.seq_parallel
        if sp is not None:
            # Shard the token stream and every per-token tensor; attention gets the global valid length so
            # the padding added by shard() is masked after Ulysses' all-to-all. A shard's offset is not known
            # here, so S2V's row boundary becomes a per-token row index; padded tokens' rows are clamped.
            tok, rope = sp.shard(tok, 1), sp.shard(rope, 1)
            if isinstance(rows, int):
                rows = (torch.arange(length, device=tok.device) >= rows).long()[None]  # (1, L)
            if rows is not None:
                rows = sp.shard(rows, 1).clamp(0, e0.shape[1] - 1)  # (B|1, L / world)
            k_lens = torch.full((tok.shape[0],), length, dtype=torch.long, device=tok.device)

        for i, block in enumerate(self.blocks):
            tok = block(tok, e0, rope, ctx, attn_fn=self.attn_fn, k_lens=k_lens, rows=rows, chunk=chunk,
                        split_queries=sp is None)
            if st is not None and i in self._inject_at:
                if sp is not None:
                    tok = sp.gather(tok, 1, length)  # injection regroups tokens per frame: needs the full stream
                tok = s2v_inject_audio(self, self._inject_at[i], tok, st, chunk)
                if sp is not None:
                    tok = sp.shard(tok, 1)

        if sp is not None:
            tok = sp.gather(tok, 1, length)
        out = self.head(tok[:, :n_video], e, e_rows, chunk)  # (B, L, p*q*r*C)
        p, q, r = cfg.patch_size
        f, h, w = grid
        return rearrange(out, "b (f h w) (p q r c) -> b c (f p) (h q) (w r)", f=f, h=h, w=w, p=p, q=q, r=r).float()
