"""Weight-only int8 quantization of Linear layers, applied from outside the network.

`quantize_(model, "int8")` swaps every `nn.Linear` (minus `skip`) for an `Int8Linear` holding an int8 weight
(O, I) and one float32 scale per output channel (O,), symmetric absmax: w ~= q * s, s = max|w_row| / 127
(the per-channel weight-only scheme of LLM.int8() / torchao `int8_weight_only`, without outlier handling).
Activations stay in floating point and the layer computes in the input's dtype, as gpt-fast's
`WeightOnlyInt8Linear`: `F.linear(x, qweight.to(x.dtype)) * scale + bias`. The scale multiplies the (..., O)
output, so no dequantized (O, I) weight is built and multiplied out. There is no `.weight`: code that needs a
model's float dtype reads a tensor int8 never replaces (see models/dit.py); `dequantize(dtype)` is the explicit
way to get the float weight (tests count its calls). Which modules are never quantized is the numerics
policy's answer (`wanmoe.numerics`: the model's `FP32_MODULES`). Quantized models save and load with safetensors:
keys `<name>.qweight` (int8) and `<name>.weight_scale` (float32) next to the unchanged float tensors, with the
quantized module names in the file metadata so a meta-built model can be re-quantized structurally and
loaded strictly with `assign=True`.

**int8 activations** (`set_int8_activations(model, True)`; off by default): the layer also quantizes its input,
per token (symmetric absmax over I, fp32 scales), and multiplies int8 by int8 with int32 accumulation
(`torch._int_mm`): y = (xq qweight^T) * x_scale[:, None] * weight_scale + b. No float copy of the weight is made,
and the integer product is exact; the only new error is the activations' rounding. The dynamic W8A8 scheme of
torchao's `int8_dynamic_activation_int8_weight`, without its smoothing. Measured in docs/performance.md.

Axis legend: O output features, I input features, L tokens (any leading axes of x).
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from wanmoe.numerics import fp32_predicate

__all__ = ["Int8Linear", "quantize_", "quantized_state_dict", "save_quantized", "load_quantized",
           "quantized_names", "weight_bytes", "set_int8_activations", "QUANT_KEY"]

QUANT_KEY = "wanmoe_quant"  # safetensors metadata: {"mode": "int8", "modules": [...]}
MODES = ("int8",)
# Narrowest layer whose int8 activations pay on this project's CPU: DiT forward 0.82x float32 at width 96, 1.42x at
# width 512 (benchmarks/int8_speed.py, one thread); narrower layers keep the weight-only path.
INT8_ACT_MIN_FEATURES = 256


class Int8Linear(nn.Module):
    """y = (x q^T) * weight_scale + b, q = qweight int8 (O, I), weight_scale float32 (O,); W ~= q * scale[:, None]."""

    # cast_ and model.to(dtype) must not round the scales to bf16: a 0.4% per-row gain error would be
    # comparable to the whole int8 rounding error (wanmoe.numerics reads this attribute).
    _keep_fp32_buffers = ("weight_scale",)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # Buffers, not Parameters: int8 tensors cannot take gradients and must not reach an optimizer.
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None
        self.int8_activations = False  # True: quantize x per token and multiply in int8 (module docstring)

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> Int8Linear:
        w = lin.weight.detach()
        q = cls(lin.in_features, lin.out_features, lin.bias is not None, device=w.device, dtype=w.dtype)
        if w.is_meta:
            return q  # structure only: the values come from a quantized state dict
        qw, scale = quantize_weight(w)
        q.qweight.copy_(qw)
        q.weight_scale.copy_(scale)
        if lin.bias is not None:
            q.bias.data.copy_(lin.bias.detach())
        return q

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The float (O, I) weight: for tests and tools only, forward never builds it."""
        return self.qweight.to(dtype) * self.weight_scale.to(dtype)[:, None]  # (O, I)

    def forward(self, x: Tensor) -> Tensor:
        if self.int8_activations and self._int8_pays(x):
            return self._forward_int8(x)
        # int8 -> x.dtype is exact (|q| <= 127 fits bf16's 8-bit significand); the matmul runs in x.dtype.
        y = F.linear(x, self.qweight.to(x.dtype))  # (..., L, O)
        # Scale the output in place: the product is formed in fp32 (scales stay fp32) and rounded once into y.
        y.mul_(self.weight_scale)
        return y if self.bias is None else y.add_(self.bias)

    def _int8_pays(self, x: Tensor) -> bool:
        """Whether the int8 product runs: layers at least INT8_ACT_MIN_FEATURES wide (measured on CPU: the
        activation quantization costs more than it saves on narrower ones, benchmarks/int8_speed.py), and on CUDA
        the shapes `torch._int_mm` takes (more than 16 rows, both widths multiples of 8)."""
        if min(self.in_features, self.out_features) < INT8_ACT_MIN_FEATURES:
            return False
        if x.device.type == "cuda":
            return x.numel() // self.in_features > 16 and self.in_features % 8 == 0 and self.out_features % 8 == 0
        return True

    def _forward_int8(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float()  # (L, I)
        x_scale = x2.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0  # (L, 1)
        xq = torch.round(x2 / x_scale).clamp_(-127, 127).to(torch.int8)  # (L, I)
        acc = torch._int_mm(xq, self.qweight.t())  # (L, O) int32, exact; qweight.t() is the column-major operand
        y = acc.float().mul_(x_scale).mul_(self.weight_scale)  # (L, O) fp32
        if self.bias is not None:
            y.add_(self.bias)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Int8Linear:
        scale = self.weight_scale
        super()._apply(fn, recurse)
        if self.weight_scale.dtype != torch.float32:  # a dtype cast (to(bf16), half()): follow only the device
            self.weight_scale = scale.to(device=self.weight_scale.device, dtype=torch.float32)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


@torch.no_grad()
def quantize_weight(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel absmax int8: (O, I) float -> (q int8 (O, I), scale float32 (O,))."""
    w = w.float()
    # A zero row gets scale 1 (any value works, q is 0) instead of a division by zero.
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0  # (O,)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)  # (O, I)
    return q, scale


def _skipped(name: str, skip: Iterable[str] | Callable[[str, nn.Module], bool] | None, mod: nn.Module) -> bool:
    if skip is None:
        return False
    if callable(skip):
        return bool(skip(name, mod))
    return any(fnmatch.fnmatchcase(name, pat) or name.startswith(pat + ".") or name == pat for pat in skip)


def quantize_(model: nn.Module, mode: str = "int8", *,
              skip: Iterable[str] | Callable[[str, nn.Module], bool] | None = None,
              only: Iterable[str] | None = None) -> nn.Module:
    """Replace nn.Linear submodules by Int8Linear in place; returns model.

    skip: glob patterns / name prefixes (e.g. ["head.*", "time_embedding.*"]) or a predicate(name, module).
    only: if given, exactly these module names are quantized (used when loading a quantized file).
    Works on meta-device models (structure only). Modules the numerics policy keeps fp32 (the model's
    `FP32_MODULES`) are never quantized: the model declared them numerically sensitive.
    """
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; supported: {MODES}")
    keep = fp32_predicate(model)
    only_set = set(only) if only is not None else None
    targets = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if only_set is not None:
            if name in only_set:
                targets.append(name)
            continue
        if keep(name):
            continue
        if not _skipped(name, skip, mod):
            targets.append(name)
    if only_set is not None and set(targets) != only_set:
        missing = sorted(only_set - set(targets))
        raise ValueError(f"cannot quantize {missing[:5]}: not nn.Linear modules of {type(model).__name__}")
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear.from_linear(getattr(parent, child)))
    return model


def set_int8_activations(model: nn.Module, on: bool = True) -> int:
    """Switch every Int8Linear of `model` to int8 activations (or back); returns how many layers were set."""
    n = 0
    for m in model.modules():
        if isinstance(m, Int8Linear):
            m.int8_activations = bool(on)
            n += 1
    return n


def quantized_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, Int8Linear)]


def quantized_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state dict of a quantized model: int8 weights, float32 scales, everything else as it is."""
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def weight_bytes(model_or_sd: nn.Module | dict[str, Tensor]) -> int:
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, nn.Module) else model_or_sd
    return sum(t.numel() * t.element_size() for t in sd.values())


def save_quantized(model: nn.Module, path: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> Path:
    """Write a quantized model to one safetensors file (atomically), with the quantized module list."""
    names = quantized_names(model)
    if not names:
        raise ValueError(f"{type(model).__name__} has no Int8Linear modules; call quantize_(model) first")
    meta = dict(metadata or {})
    meta[QUANT_KEY] = json.dumps({"mode": "int8", "modules": names})
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.cpu() for k, v in quantized_state_dict(model).items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def load_quantized(build: Callable[[], nn.Module], path: str | os.PathLike, *,
                   device: str | torch.device = "cpu") -> nn.Module:
    """Build the float model on meta, re-quantize its structure from the file's metadata, load strictly.

    Tensors come memory-mapped through safe_open, so an expert costs its int8 bytes, not a float copy.
    """
    path = Path(path)
    with safe_open(str(path), framework="pt", device=str(torch.device(device))) as f:
        meta = f.metadata() or {}
        if QUANT_KEY not in meta:
            raise ValueError(f"{path} is not a wanmoe quantized file (no {QUANT_KEY!r} metadata); "
                             "write it with save_quantized()")
        info = json.loads(meta[QUANT_KEY])
        sd = {k: f.get_tensor(k) for k in f.keys()}
    with torch.device("meta"):
        model = build()
    quantize_(model, info["mode"], only=info["modules"])
    missing = model.state_dict().keys() - sd.keys()
    unexpected = sd.keys() - model.state_dict().keys()
    if missing or unexpected:
        raise ValueError(f"{path} does not match {type(model).__name__}: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)
