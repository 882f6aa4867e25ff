"""Text encoders: the umT5-XXL encoder of Wan2.2 and a small byte-level encoder for tiny models.

Axis legend: B batch, S text tokens (padded to text_len), N heads, D head dim, C model width.

Both return the DiT context layout: (B, text_len, text_dim), each prompt's states trimmed to its true
token count and zero padded after it (the official pipeline trims, then WanModel zero-pads to 512).
"""

from __future__ import annotations

import html
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "TextEncoder",
    "T5Config",
    "T5_PRESETS",
    "UMT5Encoder",
    "T5TextEncoder",
    "ByteTextConfig",
    "ByteTextEncoder",
    "clean_prompt",
    "pad_trimmed",
    "tiny_byte_config",
]

T5_CHECKPOINT = "models_t5_umt5-xxl-enc-bf16.pth"
T5_TOKENIZER = "google/umt5-xxl"


class TextEncoder(Protocol):
    text_dim: int
    text_len: int

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """prompts -> (B, text_len, text_dim), zero after each prompt's last token."""
        ...


def pad_trimmed(states: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """Zero every position at or after lens[b]: (B, S, C), (B,) -> (B, S, C)."""
    keep = torch.arange(states.shape[1], device=states.device)[None, :] < lens[:, None]  # (B, S)
    return states * keep[..., None].to(states.dtype)


def _check_prompts(prompts: list[str]) -> list[str]:
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, got a single str")
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings")
    return list(prompts)


# ------------------------------------------------------------------------------------------- umT5
@dataclass(frozen=True)
class T5Config:
    vocab: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_dist: int = 128
    eps: float = 1e-6
    text_len: int = 512

    def validate(self) -> None:
        if self.dim_attn % self.num_heads:
            raise ValueError(f"dim_attn ({self.dim_attn}) must be divisible by num_heads ({self.num_heads})")
        if self.num_buckets < 4 or self.num_buckets % 2:
            raise ValueError(f"num_buckets must be an even number >= 4, got {self.num_buckets}")


T5_PRESETS: dict[str, T5Config] = {
    "umt5-xxl": T5Config(),
    "tiny": T5Config(vocab=256, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2, text_len=16),
}


class T5RMSNorm(nn.Module):
    """T5 layer norm: RMS only, no mean/bias; statistics in fp32, then cast to the weight dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.type_as(self.weight)
        return self.weight * x


class T5RelativeBias(nn.Module):
    """Bidirectional bucketed relative position bias, Raffel et al. 2020 (T5), sec. 2.1."""

    def __init__(self, num_buckets: int, num_heads: int, max_dist: int):
        super().__init__()
        self.num_buckets, self.max_dist = num_buckets, max_dist
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def buckets(self, rel: torch.Tensor) -> torch.Tensor:
        half = self.num_buckets // 2  # one half per direction; keys after the query use the upper half
        out = (rel > 0).long() * half
        dist = rel.abs()
        exact = half // 2  # distances below this get their own bucket, the rest are log-spaced to max_dist
        far = (
            exact
            + (torch.log(dist.clamp_min(1).float() / exact) / math.log(self.max_dist / exact) * (half - exact)).long()
        )  # .long() truncates, as the reference does
        far = far.clamp_max(half - 1)
        return out + torch.where(dist < exact, dist, far)

    def forward(self, s: int) -> torch.Tensor:
        pos = torch.arange(s, device=self.embedding.weight.device)
        rel = pos[None, :] - pos[:, None]  # (Sq, Sk) key minus query
        return self.embedding(self.buckets(rel)).permute(2, 0, 1)[None]  # (1, N, Sq, Sk)


class T5Attention(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q = nn.Linear(cfg.dim, cfg.dim_attn, bias=False)
        self.k = nn.Linear(cfg.dim, cfg.dim_attn, bias=False)
        self.v = nn.Linear(cfg.dim, cfg.dim_attn, bias=False)
        self.o = nn.Linear(cfg.dim_attn, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        q = self.q(x).unflatten(-1, (self.num_heads, -1))  # (B, S, N, D)
        k = self.k(x).unflatten(-1, (self.num_heads, -1))  # (B, S, N, D)
        v = self.v(x).unflatten(-1, (self.num_heads, -1))  # (B, S, N, D)
        # T5 folds the 1/sqrt(D) scale into its initialisation, so logits are unscaled; softmax in fp32.
        logits = torch.einsum("binc,bjnc->bnij", q, k) + bias  # (B, N, S, S)
        attn = F.softmax(logits.float(), dim=-1).type_as(logits)
        out = torch.einsum("bnij,bjnc->binc", attn, v)  # (B, S, N, D)
        return self.o(out.flatten(2))  # (B, S, C)


class T5FeedForward(nn.Module):
    """Gated-GELU FFN (T5 v1.1): fc2(fc1(x) * gelu_tanh(gate(x)))."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        # gate is a Sequential so the key is `gate.0.weight`, as in the official checkpoint
        self.gate = nn.Sequential(nn.Linear(cfg.dim, cfg.dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(cfg.dim, cfg.dim_ffn, bias=False)
        self.fc2 = nn.Linear(cfg.dim_ffn, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.norm1 = T5RMSNorm(cfg.dim, cfg.eps)
        self.attn = T5Attention(cfg)
        self.norm2 = T5RMSNorm(cfg.dim, cfg.eps)
        self.ffn = T5FeedForward(cfg)
        # umT5 does not share the position bias: every block owns one (shared_pos=False)
        self.pos_embedding = T5RelativeBias(cfg.num_buckets, cfg.num_heads, cfg.max_dist)

    def forward(self, x: torch.Tensor, pad_bias: torch.Tensor) -> torch.Tensor:
        bias = self.pos_embedding(x.shape[1]).to(x.dtype) + pad_bias  # (B, N, S, S)
        x = x + self.attn(self.norm1(x), bias)
        return x + self.ffn(self.norm2(x))


class UMT5Encoder(nn.Module):
    """umT5 encoder stack with the official Wan checkpoint keys: ids (B, S), mask (B, S) -> (B, S, C)."""

    _keep_in_fp32_modules = ()  # the reference runs everything in the checkpoint dtype (norm stats in fp32)

    def __init__(self, cfg: T5Config):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList(T5Block(cfg) for _ in range(cfg.num_layers))
        self.norm = T5RMSNorm(cfg.dim, cfg.eps)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids)  # (B, S, C)
        # padded keys get the most negative finite logit (not -inf), as the reference does
        pad_bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device)
        pad_bias = pad_bias.masked_fill(mask == 0, torch.finfo(x.dtype).min)[:, None, None, :]  # (B, 1, 1, S)
        for block in self.blocks:
            x = block(x, pad_bias)
        return self.norm(x)


_WS = re.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """The official 'whitespace' cleaning: ftfy.fix_text, html-unescape twice, strip, collapse whitespace."""
    import ftfy  # [hf] extra; required so the tokens match the official ones exactly

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WS.sub(" ", text).strip()


class T5TextEncoder:
    """umT5-XXL from `<ckpt_dir>` (official .pth + google/umt5-xxl tokenizer): prompts -> (B, 512, 4096)."""

    def __init__(self, model: UMT5Encoder, tokenizer, device: str | torch.device = "cpu"):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.text_len = model.cfg.text_len
        self.text_dim = model.cfg.dim

    @classmethod
    def from_checkpoint(
        cls,
        ckpt_dir: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        cfg: T5Config | None = None,
    ) -> T5TextEncoder:
        from transformers import AutoTokenizer

        ckpt_dir = Path(ckpt_dir)
        path, tok_dir = ckpt_dir / T5_CHECKPOINT, ckpt_dir / T5_TOKENIZER
        for p in (path, tok_dir):
            if not p.exists():
                raise ValueError(f"missing umT5 file {str(p)!r} (expected the Wan2.2 checkpoint layout)")
        cfg = cfg or T5_PRESETS["umt5-xxl"]
        with torch.device("meta"):
            model = UMT5Encoder(cfg)
        # weights_only: no pickle code execution; mmap: the 11 GB file is paged in, not copied
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        model.load_state_dict(state, strict=True, assign=True)
        model = model.to(device=device, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        return cls(model, tokenizer, device)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ids (B, text_len) int64, mask (B, text_len): padding to text_len, truncation, special tokens."""
        prompts = [clean_prompt(p) for p in _check_prompts(prompts)]
        out = self.tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=self.text_len,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return out.input_ids, out.attention_mask

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> context (B, text_len, C) zero after each prompt's tokens, lens (B,) true token counts."""
        ids, mask = self.tokenize(prompts)
        ids, mask = ids.to(self.device), mask.to(self.device)
        lens = mask.gt(0).sum(1).long()  # (B,)
        return pad_trimmed(self.model(ids, mask), lens), lens

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        return self.encode(prompts)[0]


# ----------------------------------------------------------------------------------------- bytes
@dataclass(frozen=True)
class ByteTextConfig:
    text_dim: int = 64
    text_len: int = 64  # bytes incl. the end token; longer prompts are truncated
    num_layers: int = 2
    num_heads: int = 4
    ffn_mult: int = 4
    eps: float = 1e-6

    PAD = 0  # token ids: 0 pad, 1..256 the UTF-8 bytes, 257 end of text
    EOS = 257
    VOCAB = 258

    def validate(self) -> None:
        if self.text_dim % self.num_heads:
            raise ValueError(f"text_dim ({self.text_dim}) must be divisible by num_heads ({self.num_heads})")
        if self.text_len < 2:
            raise ValueError(f"text_len must be >= 2, got {self.text_len}")
        if self.num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {self.num_layers}")


class _ByteBlock(nn.Module):
    def __init__(self, cfg: ByteTextConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.norm1 = nn.LayerNorm(cfg.text_dim, eps=cfg.eps)
        self.qkv = nn.Linear(cfg.text_dim, 3 * cfg.text_dim)
        self.o = nn.Linear(cfg.text_dim, cfg.text_dim)
        self.norm2 = nn.LayerNorm(cfg.text_dim, eps=cfg.eps)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.text_dim, cfg.ffn_mult * cfg.text_dim),
            nn.GELU(approximate="tanh"),
            nn.Linear(cfg.ffn_mult * cfg.text_dim, cfg.text_dim),
        )

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).unflatten(-1, (3, self.num_heads, -1)).unbind(2)  # 3 x (B, S, N, D)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, N, S, D)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])  # (B, N, S, D)
        x = x + self.o(a.transpose(1, 2).flatten(2))  # (B, S, C)
        return x + self.ffn(self.norm2(x))


class ByteTextEncoder(nn.Module):
    """Byte-level tokens -> embedding + learned positions -> a few pre-norm transformer layers -> LayerNorm.

    Needs no files; trained jointly with the tiny DiT. Output (B, text_len, text_dim), zero after each
    prompt's end token, the same contract as the umT5 encoder.
    """

    def __init__(self, cfg: ByteTextConfig | None = None):
        super().__init__()
        cfg = cfg or ByteTextConfig()
        cfg.validate()
        self.cfg = cfg
        self.text_dim, self.text_len = cfg.text_dim, cfg.text_len
        # A meta build (to load weights into) draws nothing: a random init on meta runs PyTorch's Python reference
        # kernels, whose first use imports the compiler stack (about a second of start-up).
        meta = torch.empty(0).device.type == "meta"
        table = torch.empty(cfg.VOCAB, cfg.text_dim) if meta else None
        self.token_embedding = nn.Embedding(cfg.VOCAB, cfg.text_dim, _weight=table)
        self.pos_embedding = nn.Parameter(torch.zeros(cfg.text_len, cfg.text_dim))
        self.blocks = nn.ModuleList(_ByteBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.text_dim, eps=cfg.eps)
        if not meta:  # GPT-2 style small normal init for the embeddings (nanoGPT); Linears keep the torch default
            nn.init.normal_(self.token_embedding.weight, std=0.02)
            nn.init.normal_(self.pos_embedding, std=0.02)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ids (B, text_len) int64, lens (B,) int64 (bytes + end token)."""
        prompts = _check_prompts(prompts)
        s = self.cfg.text_len
        ids = torch.full((len(prompts), s), self.cfg.PAD, dtype=torch.long)
        lens = torch.empty(len(prompts), dtype=torch.long)
        for b, p in enumerate(prompts):
            raw = list(_WS.sub(" ", p).strip().encode("utf-8"))[: s - 1]
            toks = [c + 1 for c in raw] + [self.cfg.EOS]
            ids[b, : len(toks)] = torch.tensor(toks)
            lens[b] = len(toks)
        return ids, lens

    def encode_ids(self, ids: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """ids (B, S), lens (B,) -> (B, S, text_dim), zero at positions >= lens."""
        s = ids.shape[1]
        if s > self.cfg.text_len:
            raise ValueError(f"sequence length {s} exceeds text_len {self.cfg.text_len}")
        key_mask = torch.arange(s, device=ids.device)[None, :] < lens[:, None]  # (B, S) True = attend
        x = self.token_embedding(ids) + self.pos_embedding[:s]  # (B, S, C)
        for block in self.blocks:
            x = block(x, key_mask)
        return pad_trimmed(self.norm(x), lens)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.token_embedding.weight.device
        ids, lens = self.tokenize(prompts)
        return self.encode_ids(ids.to(device), lens.to(device)), lens.to(device)

    def forward(self, prompts: list[str]) -> torch.Tensor:
        return self.encode(prompts)[0]


def tiny_byte_config(**overrides) -> ByteTextConfig:
    """A 2-layer, 32-wide byte encoder for tests; overrides via dataclasses.replace."""
    return replace(ByteTextConfig(text_dim=32, text_len=32, num_layers=2, num_heads=2), **overrides)
