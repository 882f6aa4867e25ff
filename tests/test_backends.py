"""wanmoe.backends: the CPU kernels it picks give F.conv3d / F.linear's results, run where they should (checked
with torch.profiler), decide once per process, and switch off."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from wanmoe import backends
from wanmoe.models.vae import VAE_TINY, WanVAE

TOL = 1e-5

needs_onednn = pytest.mark.skipif(not backends.onednn_available(), reason="PyTorch built without oneDNN")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).norm() / b.norm()).item()


def _ops(fn) -> dict[str, int]:
    """{op name: calls} of one call of fn."""
    with profile() as prof:
        fn()
    return {e.key: e.count for e in prof.key_averages()}


@pytest.fixture(autouse=True)
def _auto_mode():
    """Every test starts in the default "auto" mode and leaves no override behind."""
    backends.set_mode("auto")
    yield
    backends.set_mode(None)


# (x shape, weight shape, stride, padding, channels-last input)
CONVS = [
    ((1, 16, 3, 18, 18), (16, 16, 3, 3, 3), 1, 0, False),  # narrow: B*C*T*H = 864 <= 20480 (slow_conv3d side)
    ((1, 40, 4, 130, 8), (8, 40, 3, 3, 3), 1, (0, 1, 1), False),  # 40*4*130 = 20800 > 20480 (oneDNN side already)
    ((2, 8, 3, 10, 10), (8, 8, 3, 3, 3), 1, 1, False),  # batch > 1: PyTorch's own oneDNN case
    ((1, 16, 5, 12, 12), (16, 16, 3, 1, 1), (2, 1, 1), 0, False),  # the VAE's strided time conv
    ((1, 16, 3, 18, 18), (24, 16, 3, 3, 3), 1, (0, 1, 1), True),  # channels-last activations (the VAE's layout)
    ((1, 64, 3, 6, 6), (64, 64, 3, 3, 3), 1, (0, 1, 1), True),  # channels-last, weight > 2x input: x reordered
    ((1, 16, 2, 10, 10), (32, 16, 1, 1, 1), 1, 0, True),  # 1x1x1 on channels-last: a matmul over channels
    ((1, 16, 2, 10, 10), (32, 16, 1, 1, 1), 1, 0, False),  # 1x1x1 on a standard layout: PyTorch's path
    ((1, 16, 3, 16, 16), (64, 16, 1, 2, 2), (1, 2, 2), 0, False),  # the DiT's patchify (non-overlapping)
]


@needs_onednn
@pytest.mark.parametrize("xs, ws, stride, padding, cl", CONVS)
def test_conv3d_matches_default(xs, ws, stride, padding, cl):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(xs, generator=g), torch.randn(ws, generator=g), torch.randn(ws[0], generator=g)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    want = F.conv3d(x, w, b, stride, padding)
    got = backends.conv3d(x, w, b, stride, padding)
    assert _rel(got, want) <= TOL
    if cl:  # the layout is kept, so a chain of convs never reorders
        assert got.is_contiguous(memory_format=torch.channels_last_3d)
    assert _rel(backends.conv3d(x, w, None, stride, padding), F.conv3d(x, w, None, stride, padding)) <= TOL


@needs_onednn
def test_narrow_conv_leaves_slow_conv3d():
    x, w = torch.randn(1, 16, 3, 18, 18), torch.randn(16, 16, 3, 3, 3)
    assert "aten::slow_conv3d_forward" in _ops(lambda: F.conv3d(x, w))  # the premise: PyTorch's pick
    ops = _ops(lambda: backends.conv3d(x, w))
    assert "aten::slow_conv3d_forward" not in ops and "aten::mkldnn_convolution" in ops
    with backends.use_mode("default"):
        assert "aten::slow_conv3d_forward" in _ops(lambda: backends.conv3d(x, w))


@needs_onednn
def test_conv3d_gradients_match():
    g = torch.Generator().manual_seed(1)
    x0, w0 = torch.randn(1, 4, 3, 6, 6, generator=g), torch.randn(5, 4, 3, 3, 3, generator=g)
    grads = []
    for fn in (F.conv3d, backends.conv3d):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        fn(x, w, None, 1, (0, 1, 1)).square().sum().backward()
        grads.append((x.grad, w.grad))
    assert _rel(grads[1][0], grads[0][0]) <= TOL and _rel(grads[1][1], grads[0][1]) <= TOL


@pytest.mark.parametrize("mode", ["auto", "onednn"])
@pytest.mark.parametrize("shape", [(3, 64), (2, 48, 64), (1, 600, 512)])
def test_linear_matches_f_linear(mode, shape):
    g = torch.Generator().manual_seed(2)
    k = shape[-1]
    x, w, b = torch.randn(shape, generator=g), torch.randn(96, k, generator=g) / k**0.5, torch.randn(96, generator=g)
    with backends.use_mode(mode), torch.inference_mode():
        assert _rel(backends.linear(x, w, b), F.linear(x, w, b)) <= TOL
        assert _rel(backends.linear(x, w), F.linear(x, w)) <= TOL
        xt = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, non-contiguous
        assert _rel(backends.linear(xt, w, b), F.linear(x, w, b)) <= TOL


def test_linear_with_gradients_takes_f_linear():
    x, w = torch.randn(4, 8, requires_grad=True), torch.randn(3, 8, requires_grad=True)
    with backends.use_mode("onednn"):
        ops = _ops(lambda: backends.linear(x, w).sum().backward())
    assert not any("linear_pointwise" in op for op in ops)
    assert x.grad is not None and w.grad is not None


def test_choice_is_measured_once_and_kept():
    backends.clear_measurements()
    threads = torch.get_num_threads()
    try:
        assert backends.linear_choice(backends.SMALL_FLOPS) == "default"  # small products: sgemm, by rule
        torch.set_num_threads(1)
        assert backends.linear_choice(1 << 30) == "default" and backends._linear_choices == {1: "default"}
        torch.set_num_threads(2)  # multi-threaded large products: timed once, then read from the cache
        first = backends.linear_choice(1 << 30)
        assert first in ("default", "onednn") and backends._linear_choices[2] == first
        cached = dict(backends._linear_choices)
        assert [backends.linear_choice(1 << 30) for _ in range(3)] == [first] * 3
        assert backends._linear_choices == cached
    finally:
        torch.set_num_threads(threads)


def test_disable_switch(monkeypatch):
    x, w = torch.randn(1, 16, 3, 18, 18), torch.randn(16, 16, 3, 3, 3)
    monkeypatch.setenv(backends.ENV_VAR, "default")
    backends.set_mode(None)  # back to the environment variable (read again)
    assert backends.mode() == "default" and backends.linear_choice() == "default"
    assert "aten::slow_conv3d_forward" in _ops(lambda: backends.conv3d(x, w))
    assert backends.activation_format(x) == torch.contiguous_format
    monkeypatch.setenv(backends.ENV_VAR, "fastest")
    backends.set_mode(None)
    with pytest.raises(ValueError, match="auto"):
        backends.mode()
    with pytest.raises(ValueError, match="auto"):
        backends.set_mode("on")


def test_other_dtypes_and_devices_keep_pytorchs_path():
    x, w = torch.randn(2, 8, dtype=torch.bfloat16), torch.randn(4, 8, dtype=torch.bfloat16)
    with backends.use_mode("onednn"):
        ops = _ops(lambda: backends.linear(x, w))
        assert not any("linear_pointwise" in op for op in ops)
        xm, wm = torch.empty(1, 4, 3, 8, 8, device="meta"), torch.empty(4, 4, 3, 3, 3, device="meta")
        assert backends.conv3d(xm, wm).shape == (1, 4, 1, 6, 6)
        assert backends.activation_format(xm) == torch.contiguous_format


def test_import_measures_nothing():
    code = ("import wanmoe.backends as b, wanmoe.models.dit, wanmoe.models.vae; "
            "assert not b._linear_choices and b._env_mode is None")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@needs_onednn
def test_vae_decode_runs_onednn_and_matches_default():
    torch.manual_seed(0)
    vae = WanVAE(VAE_TINY).eval()
    z = torch.randn(1, 16, 2, 4, 4)
    with torch.inference_mode():
        with backends.use_mode("default"):
            want = vae.decode(z)
        ops = _ops(lambda: vae.decode(z))
        got = vae.decode(z)
    # One slow_conv3d call is left: the 1x1x1 conv on the (standard-layout) latent, where PyTorch's path is a plain
    # matmul and measured fastest. Every overlapping (3x3x3, 3x1x1) conv runs in oneDNN.
    assert ops.get("aten::slow_conv3d_forward", 0) == 1 and ops["aten::mkldnn_convolution"] > 10
    assert got.is_contiguous() and _rel(got, want) <= TOL


def test_dit_residual_stream_is_contiguous():
    from wanmoe.models.dit import DIT_PRESETS, DiT

    model = DiT(DIT_PRESETS["t2v-a14b-tiny"]).eval()
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    with torch.inference_mode():
        model(torch.randn(1, 16, 2, 8, 8), torch.tensor([500.0]), torch.randn(1, 5, 32))
    assert seen == [True]
