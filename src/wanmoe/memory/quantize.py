"""8-bit weights (int8, fp8) for Linear layers, applied from outside the network.

`quantize_(model, "int8")` swaps every `nn.Linear` (minus `skip`) for an `Int8Linear` holding an int8 weight
(O, I) and one float32 scale per output channel (O,), symmetric absmax: w ~= q * s, s = max|w_row| / 127
(the per-channel weight-only scheme of LLM.int8() / torchao `int8_weight_only`, without outlier handling).
Activations stay in floating point and the layer computes in the input's dtype, as gpt-fast's
`WeightOnlyInt8Linear`: `F.linear(x, qweight.to(x.dtype)) * scale + bias`. The scale multiplies the (..., O)
output, so the scaled float weight is never formed (the matmul reads an exact, unscaled copy of q in x's dtype; the
int8 and fp8 products below need none). There is no `.weight`: code that needs a
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

**fp8** (`quantize_(model, "fp8")`, `Fp8Linear`): the same per-channel scheme with float8 e4m3 storage (scale =
max|w_row| / 448), the same bytes as int8. Where the GPU has fp8 tensor cores (CUDA compute capability 8.9 or later)
and the input is bf16, the layer rounds its input to e4m3 per token and multiplies fp8 by fp8 with fp32
accumulation (`torch._scaled_mm`, row-wise scales); elsewhere (the CPU, older GPUs) it is weight-only, like int8's
default path: e4m3 -> bf16/fp32 is exact. A device whose `torch._scaled_mm` refuses the product gets one warning and
weight-only layers from then on. On this project's CPU PyTorch's fp8 product measured 2-3x slower than an
fp32 matmul, so it is only a memory option there.

Axis legend: O output features, I input features, L tokens (any leading axes of x).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from wanmoe.numerics import fp32_predicate

log = logging.getLogger(__name__)

__all__ = ["QuantLinear", "Int8Linear", "Fp8Linear", "fp8_tensor_cores", "quantize_", "quantized_state_dict",
           "save_quantized", "load_quantized", "quantized_names", "weight_bytes", "set_int8_activations", "QUANT_KEY"]

QUANT_KEY = "wanmoe_quant"  # safetensors metadata: {"mode": "int8", "modules": [...]}
MODES = ("int8", "fp8")
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# Narrowest layer whose int8 activations pay on this project's CPU: DiT forward 0.82x float32 at width 96, 1.42x at
# width 512 (benchmarks/int8_speed.py, one thread); narrower layers keep the weight-only path.
INT8_ACT_MIN_FEATURES = 256


def fp8_tensor_cores(device: torch.device) -> bool:
    """Whether `device` multiplies fp8 by fp8 in hardware: CUDA compute capability 8.9 or later (Ada, Hopper,
    Blackwell); asked once per device."""
    if device.type != "cuda":
        return False
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _FP8_CAPABLE:
        _FP8_CAPABLE[idx] = torch.cuda.get_device_capability(idx) >= (8, 9)
    return _FP8_CAPABLE[idx]


_FP8_CAPABLE: dict[int, bool] = {}
# Devices whose torch._scaled_mm refused an fp8 product (a PyTorch or driver without row-wise fp8 scaling): their
# Fp8Linear layers stay weight-only for the rest of the process, after one warning.
_FP8_REFUSED: dict[str, str] = {}


class QuantLinear(nn.Module):
    """y = (x q^T) * weight_scale + b with q = qweight (O, I) in the mode's 8-bit storage dtype, weight_scale
    float32 (O,): W ~= q * scale[:, None]. Subclasses: `Int8Linear`, `Fp8Linear`."""

    mode: str = ""
    storage: torch.dtype = torch.int8
    # cast_ and model.to(dtype) must not round the scales to bf16: a 0.4% per-row gain error would be
    # comparable to the whole 8-bit rounding error (wanmoe.numerics reads this attribute).
    _keep_fp32_buffers = ("weight_scale",)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # Buffers, not Parameters: 8-bit tensors cannot take gradients and must not reach an optimizer.
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=self.storage, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> QuantLinear:
        w = lin.weight.detach()
        q = cls(lin.in_features, lin.out_features, lin.bias is not None, device=w.device, dtype=w.dtype)
        if w.is_meta:
            return q  # structure only: the values come from a quantized state dict
        qw, scale = quantize_weight(w, cls.mode)
        q.qweight.copy_(qw)
        q.weight_scale.copy_(scale)
        if lin.bias is not None:
            q.bias.data.copy_(lin.bias.detach())
        return q

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The float (O, I) weight: for tests and tools only, forward never builds it."""
        return self.qweight.to(dtype) * self.weight_scale.to(dtype)[:, None]  # (O, I)

    def _weight_only(self, x: Tensor) -> Tensor:
        # int8 or fp8 (e4m3) -> x.dtype is exact for bf16, fp16 and fp32; the matmul runs in x.dtype.
        y = F.linear(x, self.qweight.to(x.dtype))  # (..., L, O)
        # Scale the output in place: the product is formed in fp32 (scales stay fp32) and rounded once into y.
        y.mul_(self.weight_scale)
        return y if self.bias is None else y.add_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self._weight_only(x)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> QuantLinear:
        kept = {"weight_scale": (self.weight_scale, torch.float32), "qweight": (self.qweight, self.storage)}
        super()._apply(fn, recurse)
        for name, (old, dtype) in kept.items():  # a dtype cast (to(bf16), half()): follow only the device
            new = getattr(self, name)
            if new.dtype != dtype:
                setattr(self, name, old.to(device=new.device, dtype=dtype))
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(QuantLinear):
    """Weight-only int8 (symmetric absmax per output channel); optionally int8 activations too."""

    mode, storage = "int8", torch.int8

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.int8_activations = False  # True: quantize x per token and multiply in int8 (module docstring)

    def forward(self, x: Tensor) -> Tensor:
        if self.int8_activations and self._int8_pays(x):
            return self._forward_int8(x)
        return self._weight_only(x)

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
        x_scale = _absmax_scale(x2, 127.0)  # (L, 1)
        xq = torch.round(x2 / x_scale).clamp_(-127, 127).to(torch.int8)  # (L, I)
        acc = torch._int_mm(xq, self.qweight.t())  # (L, O) int32, exact; qweight.t() is the column-major operand
        y = acc.float().mul_(x_scale).mul_(self.weight_scale)  # (L, O) fp32
        if self.bias is not None:
            y.add_(self.bias)
        return y.to(x.dtype).reshape(*lead, self.out_features)


class Fp8Linear(QuantLinear):
    """Weight-only fp8 (e4m3, absmax per output channel scaled to 448); on GPUs with fp8 tensor cores the product
    runs in fp8 (module docstring)."""

    mode, storage = "fp8", torch.float8_e4m3fn

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        # None: the fp8 x fp8 product where the device has fp8 tensor cores and x is bf16; True: always (on the CPU
        # too, through PyTorch's reference kernel: for tests); False: never (weight-only).
        self.fp8_matmul: bool | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self._fp8_pays(x):
            try:
                return self._forward_fp8(x)
            except RuntimeError as e:
                if self.fp8_matmul:  # asked for explicitly: say so
                    raise
                _FP8_REFUSED[str(x.device)] = str(e).splitlines()[0] if str(e) else type(e).__name__
                log.warning("fp8 product refused on %s (%s): fp8 layers run weight-only there", x.device,
                            _FP8_REFUSED[str(x.device)])
        return self._weight_only(x)

    def _fp8_pays(self, x: Tensor) -> bool:
        if self.fp8_matmul is not None:
            return self.fp8_matmul
        if str(x.device) in _FP8_REFUSED:
            return False
        # torch._scaled_mm's constraints on CUDA: both widths multiples of 16, row-wise scales with a bf16 output.
        return (x.dtype == torch.bfloat16 and fp8_tensor_cores(x.device) and x.numel() // self.in_features > 16
                and self.in_features % 16 == 0 and self.out_features % 16 == 0)

    def _forward_fp8(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float()  # (L, I)
        x_scale = _absmax_scale(x2, FP8_MAX)  # (L, 1)
        xq = (x2 / x_scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)  # (L, I)
        out = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
        # qweight.t() is the column-major operand; scales (L, 1) and (1, O) in fp32; accumulation in fp32.
        y = torch._scaled_mm(xq, self.qweight.t(), scale_a=x_scale, scale_b=self.weight_scale[None], out_dtype=out)
        if self.bias is not None:
            y = y + self.bias.to(out)
        return y.to(x.dtype).reshape(*lead, self.out_features)


LAYERS: dict[str, type[QuantLinear]] = {"int8": Int8Linear, "fp8": Fp8Linear}


def _absmax_scale(t: Tensor, top: float) -> Tensor:
    """Symmetric absmax scale of each row of a 2-D tensor, (rows, 1): max |row| / top. A zero row gets a tiny scale
    instead of a division by zero (any value works, its quantized values are 0). Weights per output channel,
    activations per token."""
    return t.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / top


@torch.no_grad()
def quantize_weight(w: Tensor, mode: str = "int8") -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel absmax: (O, I) float -> (q (O, I) int8 or fp8 e4m3, scale float32 (O,))."""
    w = w.float()
    top = 127.0 if mode == "int8" else FP8_MAX
    scale = _absmax_scale(w, top)  # (O, 1)
    q = (w / scale).clamp_(-top, top)
    if mode == "int8":
        return torch.round(q).to(torch.int8), scale[:, 0]
    return q.to(torch.float8_e4m3fn), scale[:, 0]  # rounds to the nearest e4m3 value


def _skipped(name: str, skip: Iterable[str] | Callable[[str, nn.Module], bool] | None, mod: nn.Module) -> bool:
    if skip is None:
        return False
    if callable(skip):
        return bool(skip(name, mod))
    return any(fnmatch.fnmatchcase(name, pat) or name.startswith(pat + ".") or name == pat for pat in skip)


def quantize_(model: nn.Module, mode: str = "int8", *,
              skip: Iterable[str] | Callable[[str, nn.Module], bool] | None = None,
              only: Iterable[str] | None = None) -> nn.Module:
    """Replace nn.Linear submodules by the mode's layer (`Int8Linear`, `Fp8Linear`) in place; returns model.

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
        setattr(parent, child, LAYERS[mode].from_linear(getattr(parent, child)))
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
    return [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]


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
        raise ValueError(f"{type(model).__name__} has no quantized Linear modules; call quantize_(model) first")
    modes = {m.mode for m in model.modules() if isinstance(m, QuantLinear)}
    if len(modes) != 1:
        raise ValueError(f"{type(model).__name__} mixes quantization modes {sorted(modes)}; one file holds one")
    meta = dict(metadata or {})
    meta[QUANT_KEY] = json.dumps({"mode": modes.pop(), "modules": names})
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
