"""The single attention seam of the DiT: ``attention(q, k, v, *, k_lens=None)``.

Axis legend: B batch, Lq query tokens, Lk key tokens, N heads, D head dim.

Backends:
- PyTorch SDPA (default, any device/dtype) with an exact boolean key mask built from ``k_lens``.
- flash-attn varlen, used only when the package is importable AND q/k/v are fp16/bf16 CUDA tensors. It gives
  the same result up to kernel rounding; masking is done by packing only the valid keys (never dropped).

Ulysses sequence parallelism wraps this function (all-to-all -> attention -> all-to-all); see
``wanmoe.distributed``. The DiT calls it for self-attention only; cross-attention is local on every rank.
"""

from __future__ import annotations

import importlib.util
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["AttnFn", "attention", "sdpa_attention", "flash_available"]


class AttnFn(Protocol):
    """Signature every attention backend (and the Ulysses wrapper) implements."""

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, k_lens: Tensor | None = None) -> Tensor: ...


_FLASH: bool | None = None


def flash_available() -> bool:
    """True when flash-attn 2 is importable (checked once, lazily: no import-time side effects)."""
    global _FLASH
    if _FLASH is None:
        _FLASH = importlib.util.find_spec("flash_attn") is not None
    return _FLASH


def _check(q: Tensor, k: Tensor, v: Tensor, k_lens: Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q/k/v must be (B, L, N, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"incompatible q/k/v shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k_lens is not None and (k_lens.dim() != 1 or k_lens.shape[0] != q.shape[0]):
        raise ValueError(f"k_lens must be (B,) = ({q.shape[0]},); got {tuple(k_lens.shape)}")


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, *, k_lens: Tensor | None = None) -> Tensor:
    """Exact scaled-dot-product attention with keys at index >= k_lens[b] given zero weight."""
    _check(q, k, v, k_lens)
    mask = None
    if k_lens is not None:
        # (B, 1, 1, Lk): broadcast over heads and queries; True = attend.
        mask = torch.arange(k.shape[1], device=k.device)[None, :] < k_lens.to(k.device)[:, None]
        mask = mask[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,  # (B, N, L, D)
    )
    return out.transpose(1, 2)  # (B, Lq, N, D)


def _flash_varlen(q: Tensor, k: Tensor, v: Tensor, k_lens: Tensor | None) -> Tensor:
    from flash_attn import flash_attn_varlen_func  # optional [flash] extra

    b, lq, n, d = q.shape
    lk = k.shape[1]
    q_lens = torch.full((b,), lq, dtype=torch.int32, device=q.device)
    if k_lens is None:
        k_lens = torch.full((b,), lk, dtype=torch.int32, device=q.device)
        k_pack, v_pack = k.flatten(0, 1), v.flatten(0, 1)  # (B*Lk, N, D)
    else:
        k_lens = k_lens.to(device=q.device, dtype=torch.int32)
        # Pack only the valid keys: this is how varlen kernels express the mask (host sync, as in the reference).
        valid = torch.arange(lk, device=q.device)[None, :] < k_lens[:, None]  # (B, Lk)
        k_pack, v_pack = k[valid], v[valid]  # (sum k_lens, N, D)
    cu_q = F.pad(q_lens.cumsum(0, dtype=torch.int32), (1, 0))
    cu_k = F.pad(k_lens.cumsum(0, dtype=torch.int32), (1, 0))
    out = flash_attn_varlen_func(
        q.flatten(0, 1), k_pack, v_pack, cu_q, cu_k, lq, int(k_lens.max()), softmax_scale=d**-0.5
    )  # (B*Lq, N, D)
    return out.unflatten(0, (b, lq))  # (B, Lq, N, D)


def attention(q: Tensor, k: Tensor, v: Tensor, *, k_lens: Tensor | None = None) -> Tensor:
    """q (B, Lq, N, D), k/v (B, Lk, N, D), k_lens (B,) valid-key counts -> (B, Lq, N, D) in q's dtype."""
    _check(q, k, v, k_lens)
    if k_lens is not None and not torch.compiler.is_compiling() and k_lens.device.type == "cpu":
        # An all-masked row would make softmax NaN; reject it at the boundary (cheap only when on CPU).
        if bool((k_lens < 1).any()):
            raise ValueError("k_lens must be >= 1 for every batch element")
    half = q.dtype in (torch.float16, torch.bfloat16)
    if half and q.is_cuda and q.dtype == k.dtype == v.dtype and q.shape[-1] <= 256 and flash_available():
        return _flash_varlen(q, k, v, k_lens)
    return sdpa_attention(q, k, v, k_lens=k_lens)
