"""The numerics policy, written once: which tensors stay fp32, what `convert_model_dtype` means,
and the dtype the pipeline computes in on each device. The loader, `cast_`, int8 and the planner all ask here.

1. **Which submodules stay fp32.** Exactly those a model class lists in its `FP32_MODULES` class attribute
   (DiT: the timestep MLP, its projection to the modulation tables, the output head and the S2V audio
   encoder). The model computes them in fp32 with explicit `.float()` casts whatever their storage dtype;
   a dtype conversion (`cast_`, a casting checkpoint load) leaves their tensors as they are, and int8 never
   quantizes them. Separately, a module may pin some of its own floating tensors by naming them in a
   `_keep_fp32_buffers` class attribute (the int8 per-channel scales: rounding them to bf16 would be a 0.4 %
   per-row gain error, as large as the int8 rounding itself).
2. **What `convert_model_dtype` means.** Every other floating tensor of the DiT becomes `PARAM_DTYPE` (bf16),
   as the official `model.to(param_dtype)`. The official code also rounds the fp32 modules to bf16 and then
   computes them in fp32 under autocast; keeping their stored fp32 values skips that rounding for 0.37 GB
   per A14B expert (1.3 % of its bf16 bytes; S2V-14B 0.56 GB). Without it, the stored dtype is kept on an
   accelerator (official A14B shards are fp32) and the rest is upcast to fp32 on the CPU (the small models
   ship bf16; their fp32 modules stay bf16-stored, which changes no value: they compute in fp32 anyway).
3. **Compute dtype.** The dtype the pipeline hands the DiT its inputs in (latents, text context,
   conditioning): fp32 on the CPU always (bf16 GEMMs are fast only on CPUs with AMX/AVX512-BF16, and even
   there a tiny-DiT forward measured 1.25x slower in bf16), bf16 on an accelerator when converting, else
   fp32. Inside, the DiT casts activations to its weight dtype at each layer and keeps the fp32 modules,
   norms, modulation and the residual stream in fp32.

No tensor axes are manipulated here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ["PARAM_DTYPE", "FP32_ATTR", "PINNED_ATTR", "fp32_module_names", "fp32_predicate", "keeps_fp32",
           "weight_dtype", "compute_dtype", "cast_"]

PARAM_DTYPE = torch.bfloat16  # official `param_dtype` of every Wan2.2 config
FP32_ATTR = "FP32_MODULES"  # class attribute: names of child modules that stay fp32 (relative to the class)
PINNED_ATTR = "_keep_fp32_buffers"  # class attribute: names of a module's own tensors that stay fp32


def fp32_module_names(model: nn.Module) -> tuple[str, ...]:
    """Qualified names of the submodules that stay fp32: each declaring class's FP32_MODULES, under its path.

    For a DiT this is `DiT.FP32_MODULES` itself; a wrapper that holds a DiT at `dit` gets `dit.head`, etc.
    """
    out: list[str] = []
    for prefix, mod in model.named_modules():
        out += [f"{prefix}.{n}" if prefix else n for n in getattr(type(mod), FP32_ATTR, ())]
    return tuple(out)


def _under(name: str, roots: Iterable[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def fp32_predicate(model: nn.Module) -> Callable[[str], bool]:
    """`keeps_fp32` for many names at once (the module tree is walked once, here)."""
    roots = fp32_module_names(model)
    pinned = {f"{p}.{b}" if p else b for p, m in model.named_modules() for b in getattr(type(m), PINNED_ATTR, ())}
    return lambda name: name in pinned or _under(name, roots)


def keeps_fp32(param_name: str, model: nn.Module) -> bool:
    """Whether a dtype conversion leaves the parameter/buffer/state-dict key `param_name` of model as it is."""
    return fp32_predicate(model)(param_name)


def _device(device: torch.device | str) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def weight_dtype(device: torch.device | str, convert_model_dtype: bool) -> torch.dtype | None:
    """The dtype the DiT's weights are loaded in (fp32 modules excepted); None keeps the stored dtype."""
    if convert_model_dtype:
        return PARAM_DTYPE
    return torch.float32 if _device(device).type == "cpu" else None


def compute_dtype(device: torch.device | str, convert_model_dtype: bool) -> torch.dtype:
    """The dtype the pipeline feeds the DiT in: fp32 on the CPU always, bf16 elsewhere only when converting."""
    if convert_model_dtype and _device(device).type != "cpu":
        return PARAM_DTYPE
    return torch.float32


def _castable(t: torch.Tensor) -> bool:
    # Floating tensors, except 8-bit floats: those are quantized storage (fp8 weights), like int8.
    return t.is_floating_point() and t.element_size() > 1


@torch.no_grad()
def cast_(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast floating parameters and buffers to dtype in place, except what `keeps_fp32` names; returns model.

    This is `convert_model_dtype` (official: `model.to(param_dtype)`) under the policy above. Integer tensors
    (int8 weights) and 8-bit floats (fp8 weights) are untouched; works on meta models. Parameters keep their
    identity (`.data` is swapped, as `Module.to` does), so tied weights and optimizer references survive.
    """
    if not dtype.is_floating_point:
        raise TypeError(f"cast_ needs a floating dtype; got {dtype}")
    keep = fp32_predicate(model)
    for prefix, mod in model.named_modules():
        for name, p in mod.named_parameters(recurse=False):
            full = f"{prefix}.{name}" if prefix else name
            if _castable(p) and p.dtype != dtype and not keep(full):
                p.data = p.data.to(dtype)
        for name, b in list(mod._buffers.items()):
            full = f"{prefix}.{name}" if prefix else name
            if b is not None and _castable(b) and b.dtype != dtype and not keep(full):
                mod._buffers[name] = b.to(dtype)
    return model
