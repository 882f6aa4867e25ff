"""CPU kernel choices for convolutions and linears, decided here and nowhere else.

Only float32 CPU tensors are affected. Every other device and dtype (CUDA, bf16, meta, ...) calls the plain
``F.conv3d`` / ``F.linear``, so GPU paths are unchanged. Models call ``conv3d`` / ``linear`` through the layers
in ``wanmoe.models.layers`` and ``wanmoe.models.vae_blocks``.

conv3d. PyTorch sends an fp32 5-D convolution to oneDNN only when batch * channels * frames * height > 20480 (or
batch > 1, or a kernel wider than 3); narrower ones run in ``slow_conv3d``, an im2col reference kernel that
reached ~21 GFLOP/s on this project's 2-core machine where oneDNN's matmul reached ~457 (issue 14). The causal VAE's
per-frame convolutions are all narrow. The rule here, from measurements on that machine (docs/performance.md):
- overlapping windows (a kernel extent larger than its stride: 3x3x3, the 3x1x1 time convs) run in oneDNN
  (``torch.mkldnn_convolution``): 2-15x faster than slow_conv3d for the narrow ones, and above the threshold
  the kernel PyTorch picks itself;
- a 1x1x1 convolution of a channels-last input is a matmul over channels and goes through ``linear``;
- any other channels-last input runs in oneDNN, which keeps the layout (PyTorch would return a standard one);
  where the weight is more than twice the input (wide convs on small frames), x goes in a standard layout and
  the output is reordered back, since PyTorch would otherwise copy the weight into channels-last on every call;
- everything else (non-overlapping windows on a standard layout: the DiT's patchify, 1x1x1 convs) stays on
  PyTorch's path, where im2col is a plain reshuffle: slow_conv3d measured 1.5-4x faster than oneDNN there.
Callers that keep their activations channels-last (``activation_format()`` says when) avoid the layout reorder
oneDNN otherwise does on every call. This is a documented rule rather than a per-process measurement: the
choice depends on the shape, and timing each new shape would cost more than the rule loses;
``tests/test_backends.py`` checks with torch.profiler which kernel runs and the benchmarks re-measure it.

linear. ``nn.Linear`` runs MKL's sgemm on CPU; oneDNN's ``mkldnn::_linear_pointwise`` computes the same product
(within float rounding). On the project's 2-core machine, products above ~1 MFLOP with two threads ran as fast in
both on a quiet machine (sgemm time / oneDNN time 0.95-1.05) and 2.5-3x faster in oneDNN while other processes
loaded the cores (sgemm slowed down far more than oneDNN); with one thread they tie, and on small products oneDNN's
fixed cost per call loses (0.6). So: small products and single-threaded runs take sgemm (a rule from those
measurements), and multi-threaded products above SMALL_FLOPS take oneDNN unless a measurement on first use (per
thread count; both kernels timed alternately, best of several rounds) finds sgemm more than 25 % faster, and
never if oneDNN's result differs from ``F.linear`` by more than 1e-5 (relative). The margin keeps the choice
from flipping with the load between two runs, which would change outputs between runs of one seed (the embedded
S2V pipeline turns any change of float rounding into ~43 dB PSNR, as a change of thread count does); set the
mode below to pin it. oneDNN's linear has no autograd kernel: anything that needs gradients takes ``F.linear``.

Debugging and pinning: ``WANMOE_CPU_BACKENDS=default`` (or ``set_mode("default")``) restores PyTorch's default
kernels everywhere; ``onednn`` takes oneDNN's linear for every product without measuring; ``auto`` (the default)
follows the rules above. Nothing is measured at import time.

Axis legend: B batch, C channels, T frames, H/W height/width, L tokens (any leading dims), K/N in/out features.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "MODES",
    "mode",
    "set_mode",
    "use_mode",
    "onednn_available",
    "conv3d",
    "activation_format",
    "linear",
    "linear_choice",
    "clear_measurements",
]

ENV_VAR = "WANMOE_CPU_BACKENDS"
MODES = ("auto", "default", "onednn")

# Linear (module docstring): up to SMALL_FLOPS multiply-adds a call and with one thread, sgemm without timing;
# above, with more threads, oneDNN unless sgemm measures _MARGIN faster at _PROBE.
SMALL_FLOPS = 1 << 20
_PROBE = (512, 512, 1024)  # (rows, K, N)
_MARGIN = 1.25
_ROUNDS = 7
_TOL = 1e-5

_mode_override: str | None = None
_env_mode: str | None = None  # $WANMOE_CPU_BACKENDS, read on first use (every layer call asks for the mode)
# thread count -> "onednn" | "default" for products above SMALL_FLOPS; filled lazily by linear_choice.
_linear_choices: dict[int, str] = {}


def _check_mode(m: str) -> str:
    if m not in MODES:
        raise ValueError(f"CPU backend mode must be one of {MODES}; got {m!r} (env {ENV_VAR} or set_mode)")
    return m


def mode() -> str:
    """The active mode: ``set_mode``'s value if set, else ``$WANMOE_CPU_BACKENDS`` (read once), else ``auto``."""
    global _env_mode
    if _mode_override is not None:
        return _mode_override
    if _env_mode is None:
        _env_mode = _check_mode(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto")
    return _env_mode


def set_mode(m: str | None) -> None:
    """Set the mode for this process (None: back to the environment variable, read again, or ``auto``)."""
    global _mode_override, _env_mode
    _mode_override, _env_mode = (None if m is None else _check_mode(m)), None


@contextmanager
def use_mode(m: str) -> Iterator[None]:
    """Run a block under one mode (e.g. ``with use_mode("default"):`` for PyTorch's own kernels)."""
    global _mode_override
    prev = _mode_override
    set_mode(m)
    try:
        yield
    finally:
        _mode_override = prev


def onednn_available() -> bool:
    """PyTorch was built with oneDNN and it is enabled (``torch.backends.mkldnn.flags`` can switch it off)."""
    # The C calls behind torch.backends.mkldnn.is_available() / .enabled: asked on every layer call, and the
    # Python wrappers cost ~2 us each time.
    return torch._C._has_mkldnn and torch._C._get_mkldnn_enabled()


def _cpu_fp32(*ts: Tensor | None) -> bool:
    return all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32 and t.layout == torch.strided)
               for t in ts)


# ---- convolution --------------------------------------------------------------------------------------------


def _triple(v: int | tuple[int, ...]) -> list[int]:
    return [v] * 3 if isinstance(v, int) else list(v)


def _channels_last(x: Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d)


def conv3d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int, int] = 1,
    padding: int | tuple[int, int, int] = 0,
) -> Tensor:
    """``F.conv3d(x, weight, bias, stride, padding)`` (dilation 1, groups 1); x (B, C, T, H, W).

    fp32 on CPU (see the module docstring): overlapping windows (some kernel extent > its stride, e.g. 3x3x3
    stride 1) run in oneDNN; a 1x1x1 convolution of a channels-last x is a matmul over channels (``linear``);
    any other channels-last x runs in oneDNN and stays channels-last; the rest (non-overlapping windows such as
    the DiT's patchify, on a standard layout) stays on PyTorch's path, where slow_conv3d's im2col is a plain
    reshuffle and measured faster than oneDNN.
    """
    if (mode() == "default" or x.dim() != 5 or not _cpu_fp32(x, weight, bias) or not onednn_available()
            or torch.compiler.is_compiling()):  # under torch.compile the compiler chooses the kernels
        return F.conv3d(x, weight, bias, stride, padding)
    k, st, pad = weight.shape[2:], _triple(stride), _triple(padding)
    cl = _channels_last(x)
    if cl and tuple(k) == (1, 1, 1) and st == [1, 1, 1] and pad == [0, 0, 0]:
        # (B, T, H, W, C) memory times (O, C)^T -> (B, T, H, W, O): the channels-last (B, O, T, H, W) result.
        return linear(x.permute(0, 2, 3, 4, 1), weight.flatten(1), bias).permute(0, 4, 1, 2, 3)
    if cl and weight.numel() > 2 * x.numel():
        # With a channels-last x, PyTorch first copies the weight into that layout, every call; when the weight
        # is the larger tensor (wide convs on small frames), reordering x and the output instead moves less.
        y = torch.mkldnn_convolution(x.contiguous(), weight, bias, pad, st, [1, 1, 1], 1)
        return y.contiguous(memory_format=torch.channels_last_3d)
    if cl or any(ki > si for ki, si in zip(k, st)):
        return torch.mkldnn_convolution(x, weight, bias, pad, st, [1, 1, 1], 1)
    return F.conv3d(x, weight, bias, stride, padding)


def activation_format(x: Tensor) -> torch.memory_format:
    """The memory format a caller should keep 5-D activations in before a chain of ``conv3d`` calls.

    channels_last_3d where conv3d goes to oneDNN (it then needs no reorder per call, and norms over channels read
    contiguous memory); ``torch.contiguous_format`` everywhere else, so GPU and default paths are unchanged.
    """
    if mode() != "default" and x.dim() == 5 and _cpu_fp32(x) and onednn_available():
        return torch.channels_last_3d
    return torch.contiguous_format


# ---- linear -------------------------------------------------------------------------------------------------


def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    # x (..., K), weight (N, K) dense: no prepacking, so the weight may change between calls (training, offload).
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _elapsed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _measure_linear() -> str:
    """Time sgemm (F.linear) against oneDNN at the probe shape: "onednn" if exact and not clearly slower."""
    m, k, n = _PROBE
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g)
    try:
        ref = F.linear(x, w, b)
        got = _onednn_linear(x, w, b)
    except (RuntimeError, NotImplementedError):  # op missing in this build: sgemm it is
        return "default"
    if ((got - ref).norm() / ref.norm()).item() > _TOL:
        return "default"  # never run a numerically different kernel
    cands = {"default": lambda: F.linear(x, w, b), "onednn": lambda: _onednn_linear(x, w, b)}
    best = {name: float("inf") for name in cands}
    for fn in cands.values():  # warm-up (first-call allocation and oneDNN primitive creation)
        fn()
    for _ in range(_ROUNDS):  # alternate so a load change on the shared machine hits both; best of the rounds
        for name, fn in cands.items():
            best[name] = min(best[name], _elapsed(fn))
    return "default" if best["default"] * _MARGIN < best["onednn"] else "onednn"


def linear_choice(flops: int = 1 << 30) -> str:
    """Which kernel a fp32 CPU linear of ``flops`` multiply-adds uses now: "onednn" or "default".

    Small products and single-threaded runs take sgemm (the rule above); others are measured on first use per
    thread count and cached for the process. ``mode()`` overrides both.
    """
    md = mode()
    if md == "default" or not onednn_available():
        return "default"
    if md == "onednn":
        return "onednn"
    if flops <= SMALL_FLOPS:
        return "default"
    threads = torch.get_num_threads()
    choice = _linear_choices.get(threads)
    if choice is None:
        with torch.no_grad():
            choice = _linear_choices[threads] = "default" if threads < 2 else _measure_linear()
    return choice


def clear_measurements() -> None:
    """Forget the cached choices (the next call measures again)."""
    _linear_choices.clear()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``: x (..., K), weight (N, K) -> (..., N), through the measured CPU kernel."""
    # Cheap tests only: this runs for every Linear call, and tiny models are bound by per-call overhead. F.linear
    # and oneDNN both require weight and bias on x's device and dtype, so x's are the ones to test.
    if not (x.is_cpu and x.dtype is torch.float32 and weight.dtype is torch.float32 and x.dim() > 0):
        return F.linear(x, weight, bias)
    if torch.compiler.is_compiling():  # the compiler chooses the kernels (oneDNN ops do not trace)
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return F.linear(x, weight, bias)  # oneDNN's linear has no autograd kernel
    md = _mode_override or _env_mode or mode()
    if md == "default" or x.layout != torch.strided or weight.dim() != 2:
        return F.linear(x, weight, bias)
    flops = x.numel() * weight.shape[0]  # rows * K * N
    if md == "onednn" or (
        # The cached choice first (a dict read); linear_choice measures on a miss.
        flops > SMALL_FLOPS and (_linear_choices.get(torch.get_num_threads()) or linear_choice(flops)) == "onednn"
    ):
        if onednn_available():
            return _onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)
