"""`frugal_`: switch on the activation-memory knobs of the DiT (token chunks) and the VAE (spatial tiles).

Both knobs are off by default (None) and the models then compute exactly what they computed before (torch.equal).
Applied from outside, like `quantize_` and `apply_ulysses`: the loader and the memory planner call the same function,
so what is planned is what runs. Measurements behind the defaults: docs/performance.md ("Frugal activations") and
docs/vae.md ("Tiled encode and decode").

- DiT.token_chunk (tokens): the token-local parts of every block (norms, modulation, q/k/v projections, the output
  projection, cross-attention, the FFN, the gated residual adds), the self-attention queries, the S2V audio
  injection and the head run over at most this many tokens at a time; keys and values stay full length, so
  attention still spans the whole sequence. Equal to the unchunked output up to float rounding (different matmul
  shapes). 4096: the A14B peak at 1280*720 is 3.6 GB against 4.0 GB at 8192 and 3.4 GB at 2048 (the full-length
  fp32 residual stream and bf16 k, v, 3.1 GB, are the floor); 4096-row matmuls and attention calls still fill a
  GPU, and a chunk's FFN hidden (4096 x 13824 bf16, 0.11 GB) is small next to k, v (2 x 0.77 GB).
- WanVAE.tiling (Tiling(tile, overlap) in latent cells): encode/decode over tiles of at most 32 cells (256 px)
  that overlap by at least 8 cells (64 px). At 1280*720 x 81 frames: 4 x 7 tiles of 29 x 30 cells, decode peak
  18.1 -> 2.0 GB, encode 14.6 -> 1.8 GB, for 1.7x the convolution work; tiled vs untiled 45-49 dB on the trained
  small VAE.
"""

from __future__ import annotations

from torch import nn

from .dit import DiT
from .vae import WanVAE
from .vae_tiling import DEFAULT_TILING, Tiling

__all__ = ["frugal_", "DEFAULT_TOKEN_CHUNK", "DEFAULT_TILING"]

DEFAULT_TOKEN_CHUNK = 4096


def frugal_(
    *modules: nn.Module | None, token_chunk: int | None = DEFAULT_TOKEN_CHUNK, tiling: Tiling | None = DEFAULT_TILING
) -> int:
    """Set `token_chunk` on every DiT and `tiling` on every WanVAE found in the given module trees (None entries
    are skipped; None values switch a knob off). Returns how many models were changed."""
    bad = isinstance(token_chunk, bool) or not isinstance(token_chunk, int) or token_chunk < 1
    if token_chunk is not None and bad:
        raise ValueError(f"token_chunk must be None or a positive int; got {token_chunk!r}")
    if tiling is not None:
        if not isinstance(tiling, Tiling):
            raise TypeError(f"tiling must be a Tiling or None; got {type(tiling).__name__}")
        tiling.validate()
    n = 0
    for root in modules:
        if root is None:
            continue
        for m in root.modules():
            if isinstance(m, DiT):
                m.token_chunk, n = token_chunk, n + 1
            elif isinstance(m, WanVAE):
                m.tiling, n = tiling, n + 1
    return n
