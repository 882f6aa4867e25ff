"""Weight-only int8: accuracy against float Linear, structure, bytes, safetensors round trip, no dequantization."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wanmoe.memory.quantize import (
    Int8Linear,
    load_quantized,
    quantize_,
    quantize_weight,
    quantized_names,
    save_quantized,
    weight_bytes,
)
from wanmoe.numerics import cast_


class Block(nn.Module):
    FP32_MODULES = ("norm_proj",)

    def __init__(self, d: int = 64, h: int = 256) -> None:
        super().__init__()
        self.inp = nn.Linear(d, h)
        self.out = nn.Linear(h, d, bias=False)
        self.norm_proj = nn.Linear(d, d)  # declared fp32: must never be quantized
        self.head = nn.Linear(d, 8)
        self.scale = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.scale + self.norm_proj(x)
        return self.head(x + self.out(torch.nn.functional.gelu(self.inp(x))))


@torch.no_grad()
def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    peak = b.abs().max()
    return float(10 * torch.log10(peak**2 / (a - b).pow(2).mean()))


def test_quantize_weight_per_channel_exact_on_grid():
    torch.manual_seed(0)
    # Rows that are integer multiples of their scale, with absmax 127, round-trip exactly.
    scale = torch.tensor([0.5, 2.0, 1e-3])
    grid = torch.randint(-127, 128, (3, 16)).float()
    grid[:, 0] = 127
    w = grid * scale[:, None]
    qw, s = quantize_weight(w)
    assert qw.dtype == torch.int8
    torch.testing.assert_close(s, scale)
    torch.testing.assert_close(qw.float() * s[:, None], w)
    assert quantize_weight(torch.zeros(2, 4))[0].abs().sum() == 0  # zero rows: no NaN, q = 0


def test_int8_linear_close_to_float():
    torch.manual_seed(0)
    lin = nn.Linear(128, 96)
    x = torch.randn(4, 10, 128)
    q = Int8Linear.from_linear(lin)
    with torch.no_grad():
        ref, out = lin(x), q(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    rel = (out - ref).norm() / ref.norm()
    assert rel < 5e-3, rel  # int8 absmax: ~0.3% of the weight's dynamic range per element
    assert psnr(out, ref) > 40
    # A deliberately wrong scale must be caught by the same check.
    q.weight_scale.mul_(1.05)
    with torch.no_grad():
        assert (q(x) - ref).norm() / ref.norm() > 2e-2


def test_quantize_structure_skip_and_fp32_modules():
    model = Block()
    quantize_(model, "int8", skip=["head"])
    assert quantized_names(model) == ["inp", "out"]
    assert isinstance(model.norm_proj, nn.Linear) and isinstance(model.head, nn.Linear)
    with pytest.raises(ValueError, match="unknown quantization mode"):
        quantize_(Block(), "int4")


def test_scales_stay_fp32_under_casts():
    model = quantize_(Block())
    model.to(torch.bfloat16)
    assert model.inp.qweight.dtype == torch.int8 and model.inp.weight_scale.dtype == torch.float32
    assert model.inp.bias.dtype == torch.bfloat16
    m2 = cast_(quantize_(Block()), torch.bfloat16)
    assert m2.inp.weight_scale.dtype == torch.float32 and m2.inp.bias.dtype == torch.bfloat16
    assert m2.norm_proj.weight.dtype == torch.float32  # declared fp32 module: cast_ leaves it alone
    assert m2.scale.dtype == torch.bfloat16


def test_int8_bytes_at_most_055_of_bf16():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256), nn.LayerNorm(256))
    model.to(torch.bfloat16)
    bf16 = weight_bytes(model)
    quantize_(model)
    ratio = weight_bytes(model) / bf16
    assert ratio <= 0.55, ratio


def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    ref_model = Block().eval()
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        ref = ref_model(x)
    qmodel = quantize_(ref_model)  # in place
    path = save_quantized(qmodel, tmp_path / "q.safetensors")
    loaded = load_quantized(Block, path)
    assert quantized_names(loaded) == quantized_names(qmodel)
    with torch.no_grad():
        a, b = qmodel(x), loaded(x)
    assert torch.equal(a, b)
    assert psnr(b, ref) > 35
    # A plain float file is refused, not silently loaded as floats.
    from safetensors.torch import save_file

    save_file(Block().state_dict(), str(tmp_path / "f.safetensors"))
    with pytest.raises(ValueError, match="not a wanmoe quantized file"):
        load_quantized(Block, tmp_path / "f.safetensors")


def test_tiny_dit_int8_close_and_fp32_modules_untouched():
    from wanmoe.models.dit import DIT_PRESETS, DiT

    torch.manual_seed(0)
    cfg = DIT_PRESETS["t2v-a14b-tiny"]
    model = DiT(cfg).eval()
    nn.init.normal_(model.head.head.weight, std=0.02)  # init zeroes the head; give the output some signal
    x, t = torch.randn(1, 16, 2, 8, 8), torch.tensor([700.0])
    ctx = torch.randn(1, 4, cfg.text_dim)
    with torch.no_grad():
        ref = model(x, t, ctx)
        names = quantized_names(quantize_(model))
        out = model(x, t, ctx)
    assert names and not any(n.split(".")[0] in DiT.FP32_MODULES for n in names)
    assert any(n.startswith("blocks.0.ffn") for n in names)
    assert psnr(out, ref) > 35
    with torch.no_grad():  # bf16 compute path (--convert_model_dtype) on top of int8 weights
        out16 = cast_(model, torch.bfloat16)(x, t, ctx)
    assert out16.dtype == torch.float32 and psnr(out16, ref) > 25


def test_int8_linear_scales_the_output_without_a_float_weight(monkeypatch):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    q = Int8Linear.from_linear(lin)
    assert not hasattr(q, "weight")  # no property that dequantizes on read
    x = torch.randn(3, 7, 64)
    with torch.no_grad():
        want = torch.nn.functional.linear(x, q.dequantize(torch.float32), q.bias)
        monkeypatch.setattr(Int8Linear, "dequantize", lambda *a, **k: pytest.fail("forward dequantized"))
        got = q(x)
        got16 = q.to(torch.bfloat16)(x.bfloat16())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # same math, output scaled instead of weight
    assert got16.dtype == torch.bfloat16 and q.weight_scale.dtype == torch.float32
    assert (got16.float() - want).norm() / want.norm() < 1e-2


@pytest.mark.parametrize("preset", ["t2v-a14b-tiny", "s2v-14b-tiny"])
def test_int8_dit_forward_never_dequantizes(monkeypatch, preset):
    from wanmoe.models.dit import DIT_PRESETS, DiT, S2VInputs

    torch.manual_seed(0)
    cfg = DIT_PRESETS[preset]
    model = quantize_(DiT(cfg).eval())
    calls = []
    original = Int8Linear.dequantize
    monkeypatch.setattr(Int8Linear, "dequantize", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    x, t, ctx = torch.randn(1, 16, 2, 8, 8), torch.tensor([700.0]), torch.randn(1, 4, cfg.text_dim)
    kw = {}
    if cfg.s2v is not None:
        s = cfg.s2v
        kw["s2v"] = S2VInputs(torch.randn(1, s.num_audio_layers, s.audio_dim, 8), torch.randn(1, 16, 1, 8, 8),
                              torch.randn(1, 16, 19, 8, 8))
    with torch.no_grad():
        out = model(x, t, ctx, **kw)
        out16 = cast_(model, torch.bfloat16)(x, t, ctx, **kw)  # the --convert_model_dtype path too
    assert len(quantized_names(model)) > 10
    assert calls == [] and out.isfinite().all() and out16.isfinite().all()


def test_int8_activations_multiply_in_int8_exactly_and_stay_close():
    """int8 activations: the integer product is exact (against float64 on the same int8 values), the result is
    close to the float layer, no float weight is formed, and layers narrower than the measured threshold keep the
    weight-only path (bit for bit)."""
    from wanmoe.memory.quantize import INT8_ACT_MIN_FEATURES, set_int8_activations

    torch.manual_seed(0)
    lin = nn.Linear(512, 768)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(2, 33, 512)
    with torch.no_grad():
        ref = lin(x)
        q.int8_activations = True
        calls = []
        real_mm = torch._int_mm
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch, "_int_mm", lambda a, b: calls.append(a.dtype) or real_mm(a, b))
            mp.setattr(Int8Linear, "dequantize", lambda *a, **k: pytest.fail("forward dequantized"))
            got = q(x)
        x2 = x.reshape(-1, 512).double()
        xs = x2.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
        xq = torch.round(x2 / xs).clamp(-127, 127)
        want = (xq @ q.qweight.double().t()) * xs * q.weight_scale.double() + q.bias.double()
    assert calls == [torch.int8] and got.shape == ref.shape and got.dtype == x.dtype
    torch.testing.assert_close(got.reshape(-1, 768).double(), want, rtol=1e-5, atol=1e-5)
    assert psnr(got, ref) > 38  # per-token activation rounding on top of the weights'
    narrow = Int8Linear.from_linear(nn.Linear(INT8_ACT_MIN_FEATURES // 2, 512))
    xn = torch.randn(5, INT8_ACT_MIN_FEATURES // 2)
    with torch.no_grad():
        plain = narrow(xn)
        assert set_int8_activations(nn.Sequential(narrow, nn.ReLU())) == 1 and narrow.int8_activations
        assert torch.equal(narrow(xn), plain)


def test_int8_activations_load_option():
    import wanmoe
    from wanmoe.cli import main
    from wanmoe.request import InputError

    with pytest.raises(InputError, match="int8_activations.*int8"):
        wanmoe.load("s2v-mini", int8_activations=True)
    assert main(["generate", "--int8_activations"]) == 2
    pipe = wanmoe.load("s2v-mini", int8=True, int8_activations=True)
    layers = [m for m in pipe.components.experts.get("high").modules() if isinstance(m, Int8Linear)]
    assert layers and all(m.int8_activations for m in layers) and pipe.options.int8_activations


def test_fp8_weights_per_channel_close_and_exact_on_grid():
    """fp8 (e4m3) weights: values on the e4m3 grid round-trip exactly, a float layer is matched at the precision of a
    3-bit mantissa, and the layer never forms the scaled float weight."""
    from wanmoe.memory.quantize import FP8_MAX, Fp8Linear

    torch.manual_seed(0)
    scale = torch.tensor([0.5, 2.0, 1e-3])
    grid = torch.randn(3, 16).clamp(-3, 3).mul(100).to(torch.float8_e4m3fn).float()  # exact e4m3 values
    grid[:, 0] = FP8_MAX
    qw, s = quantize_weight(grid * scale[:, None], "fp8")
    assert qw.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    torch.testing.assert_close(qw.float() * s[:, None], grid * scale[:, None])
    assert quantize_weight(torch.zeros(2, 4), "fp8")[0].float().abs().sum() == 0

    lin = nn.Linear(128, 96)
    q = Fp8Linear.from_linear(lin)
    x = torch.randn(4, 10, 128)
    with torch.no_grad():
        ref = lin(x)
        want = torch.nn.functional.linear(x, q.dequantize(torch.float32), q.bias)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(Fp8Linear, "dequantize", lambda *a, **k: pytest.fail("forward dequantized"))
            got = q(x)  # on the CPU: weight-only
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert 28 < psnr(got, ref) < 45  # e4m3: ~2^-4 relative per weight; int8 absmax is finer at this size
    q.weight_scale.mul_(1.05)  # the same check catches a wrong scale
    with torch.no_grad():
        assert (q(x) - ref).norm() / ref.norm() > 2e-2


def test_fp8_matmul_path_matches_its_emulation():
    """The fp8 x fp8 product (what runs on fp8 tensor cores; forced here through PyTorch's CPU kernel): the same
    numbers as rounding x per token to e4m3 and multiplying in float64, and still close to the float layer."""
    from wanmoe.memory.quantize import FP8_MAX, Fp8Linear

    torch.manual_seed(0)
    lin = nn.Linear(256, 192)
    q = Fp8Linear.from_linear(lin)
    x = torch.randn(2, 40, 256)
    assert not q._fp8_pays(x) and not q._fp8_pays(x.bfloat16())  # auto: no fp8 tensor cores on the CPU
    q.fp8_matmul = True
    with torch.no_grad():
        ref = lin(x)
        got = q(x)
    x2 = x.reshape(-1, 256).double()
    xs = x2.abs().amax(1, keepdim=True) / FP8_MAX
    xq = (x2 / xs).float().to(torch.float8_e4m3fn).double()
    want = (xq @ q.qweight.double().t()) * xs * q.weight_scale.double() + q.bias.double()
    assert got.shape == ref.shape and got.dtype == x.dtype
    torch.testing.assert_close(got.reshape(-1, 192).double(), want, rtol=1e-4, atol=1e-4)
    assert psnr(got, ref) > 25


def test_fp8_storage_survives_casts_and_saves(tmp_path):
    from wanmoe.memory.quantize import Fp8Linear

    torch.manual_seed(0)
    model = quantize_(Block().eval(), "fp8")
    assert quantized_names(model) == ["inp", "out", "head"] and isinstance(model.inp, Fp8Linear)
    qw = model.inp.qweight.clone()
    model.to(torch.bfloat16)
    assert model.inp.qweight.dtype == torch.float8_e4m3fn and torch.equal(model.inp.qweight.float(), qw.float())
    assert model.inp.weight_scale.dtype == torch.float32 and model.inp.bias.dtype == torch.bfloat16
    m2 = cast_(quantize_(Block(), "fp8"), torch.bfloat16)
    assert m2.inp.qweight.dtype == torch.float8_e4m3fn and m2.scale.dtype == torch.bfloat16
    model.float()
    x = torch.randn(2, 5, 64)
    path = save_quantized(model, tmp_path / "q8.safetensors")
    loaded = load_quantized(Block, path)
    assert isinstance(loaded.inp, Fp8Linear)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert weight_bytes(loaded) == weight_bytes(load_quantized(Block, save_quantized(
        quantize_(Block(), "int8"), tmp_path / "q.safetensors")))  # fp8 and int8 cost the same bytes


def test_quant_option_per_expert():
    """quant: one mode for every expert or one per expert, normalized once, checked before loading, and each expert
    loaded with its own layers."""
    import wanmoe
    from wanmoe.cli import main
    from wanmoe.memory.quantize import Fp8Linear
    from wanmoe.request import InputError, check_quant

    names = ("high", "low")
    assert check_quant(None, names) is None and check_quant(None, names, int8=True) == "int8"
    assert check_quant("fp8", names) == "fp8" and check_quant({"high": "int8", "low": "int8"}, names) == "int8"
    assert check_quant("high=fp8", names) == "high=fp8,low=none"
    assert check_quant({"low": "fp8", "high": None}, names) == "high=none,low=fp8"
    assert check_quant("high=none,low=none", names) is None and check_quant("none", names) is None
    assert check_quant("float", names, int8=True) == "int8" and check_quant("high=float,low=fp8", names) == \
        "high=none,low=fp8"
    for bad, match in (("int4", "one of int8, fp8"), ("mid=fp8", "unknown experts"), ("high", "one of"),
                       ("=fp8", "looks like")):
        with pytest.raises(InputError, match=f"quant.*{match}"):
            check_quant(bad, names)
    with pytest.raises(InputError, match="quant.*int8 asks"):
        wanmoe.load("s2v-mini", int8=True, quant="fp8")
    with pytest.raises(InputError, match="int8_activations"):
        wanmoe.load("s2v-mini", quant="fp8", int8_activations=True)
    assert main(["generate", "--quant", "int4"]) == 2
    pipe = wanmoe.load("s2v-mini", quant="high=fp8,low=int8", int8_activations=True)
    high, low = (pipe.components.experts.get(n) for n in names)
    assert pipe.options.quant == "high=fp8,low=int8" and not pipe.options.int8
    assert pipe.options.all_quantized and pipe.options.expert_quant("low") == "int8"
    assert [type(m) for m in high.modules() if isinstance(m, (Fp8Linear, Int8Linear))] == \
        [Fp8Linear] * len(quantized_names(high))
    assert quantized_names(low) and all(isinstance(low.get_submodule(n), Int8Linear) for n in quantized_names(low))
    assert all(low.get_submodule(n).int8_activations for n in quantized_names(low))
    half = wanmoe.load("s2v-mini", quant={"low": "fp8"})
    assert not quantized_names(half.components.experts.get("high")) and not half.options.all_quantized


def test_fp8_product_refused_falls_back_to_weight_only(monkeypatch, caplog):
    """On a device that claims fp8 tensor cores but whose torch._scaled_mm refuses the operands, an fp8 layer
    warns once and runs weight-only from then on (an untested GPU must not end a run); forced, the error stands."""
    from wanmoe.memory import quantize as qz

    torch.manual_seed(0)
    q = qz.Fp8Linear.from_linear(nn.Linear(64, 32)).to(torch.bfloat16)
    x = torch.randn(3, 20, 64, dtype=torch.bfloat16)
    calls = []

    def refuse(*a, **k):  # noqa: ANN002, ANN003
        calls.append(1)
        raise RuntimeError("row-wise scaling is not supported here")

    monkeypatch.setattr(qz, "fp8_tensor_cores", lambda device: True)
    monkeypatch.setattr(torch, "_scaled_mm", refuse)
    monkeypatch.setattr(qz, "_FP8_REFUSED", {})
    with torch.no_grad(), caplog.at_level("WARNING", logger="wanmoe.memory.quantize"):
        want = q._weight_only(x)
        assert torch.equal(q(x), want) and torch.equal(q(x), want)
    assert calls == [1] and sum("fp8 product refused" in r.message for r in caplog.records) == 1
    q.fp8_matmul = True
    with torch.no_grad(), pytest.raises(RuntimeError, match="row-wise"):
        q(x)
