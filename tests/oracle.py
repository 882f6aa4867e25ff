"""Load files of the official Wan2.2 package (`wan`) as test oracles on CPU.

Importing `wan` itself fails without CUDA/flash-attn (its __init__ pulls in every pipeline), so
`load_wan_module("modules/model.py")` imports single files under a private package alias (`_wan_oracle`) whose
package __init__ files are NOT executed, with `modules/attention.py` replaced by an exact SDPA implementation
that honours k_lens. Oracles only: the library under src/wanmoe never imports this.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

ALIAS = "_wan_oracle"


def wan_root() -> Path:
    spec = importlib.util.find_spec("wan")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the official Wan2.2 package (`pip install wan22 --no-deps`, import name `wan`) is missing")
    return Path(list(spec.submodule_search_locations)[0])


def sdpa_flash_attention(
    q,
    k,
    v,
    q_lens=None,
    k_lens=None,
    dropout_p=0.0,
    softmax_scale=None,
    q_scale=None,
    causal=False,
    window_size=(-1, -1),
    deterministic=False,
    dtype=torch.bfloat16,
    version=None,
):
    """Drop-in for wan's flash_attention: exact attention in the input dtype, keys >= k_lens masked,
    query rows >= q_lens zeroed (as varlen kernels leave them)."""
    if window_size != (-1, -1) or causal or dropout_p:
        raise NotImplementedError("oracle attention supports only global, non-causal, no-dropout attention")
    lq, lk = q.shape[1], k.shape[1]
    mask = None
    if k_lens is not None:
        mask = (torch.arange(lk)[None, :] < k_lens.cpu()[:, None]).to(q.device)[:, None, None, :]
    if q_scale is not None:
        q = q * q_scale
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=softmax_scale
    ).transpose(1, 2)
    if q_lens is not None:
        out = out * (torch.arange(lq)[None, :] < q_lens.cpu()[:, None]).to(out)[:, :, None, None]
    return out.type_as(q)


def _ensure_package(name: str, path: Path) -> None:
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(path)]  # a namespace-like package: its __init__.py is never run
        sys.modules[name] = pkg


def _install_stubs() -> None:
    root = wan_root()
    _ensure_package(ALIAS, root)
    for sub in ("modules", "modules/s2v", "distributed", "utils"):
        _ensure_package(f"{ALIAS}.{sub.replace('/', '.')}", root / sub)
    att = f"{ALIAS}.modules.attention"
    if att not in sys.modules:
        mod = types.ModuleType(att)
        mod.flash_attention = sdpa_flash_attention
        mod.attention = sdpa_flash_attention
        mod.FLASH_ATTN_2_AVAILABLE = mod.FLASH_ATTN_3_AVAILABLE = False
        sys.modules[att] = mod


def load_wan_module(relpath: str) -> types.ModuleType:
    """Import wan/<relpath> (e.g. "modules/model.py", "modules/s2v/model_s2v.py", "modules/vae2_1.py")."""
    _install_stubs()
    name = f"{ALIAS}." + relpath.removesuffix(".py").replace("/", ".")
    return importlib.import_module(name)
