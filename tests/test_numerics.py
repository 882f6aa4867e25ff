"""The numerics policy: one fp32 list (on DiT), what cast_ casts, dtypes per device, and loader = cast_ = planner."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from wanmoe import checkpoint as ck
from wanmoe import numerics
from wanmoe.memory.offload import OffloadFlags, apply_precision
from wanmoe.memory.plan import plan_memory
from wanmoe.memory.quantize import quantize_
from wanmoe.models.dit import DIT_PRESETS, DiT
from wanmoe.models.vae import VAE_TINY

BF16, FP32 = torch.bfloat16, torch.float32


def tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def under_fp32_module(name: str) -> bool:
    return name.split(".")[0] in DiT.FP32_MODULES


def test_the_fp32_list_is_the_one_declared_on_dit():
    for preset in ("t2v-a14b-tiny", "s2v-14b-tiny"):
        with torch.device("meta"):
            model = DiT(DIT_PRESETS[preset])
        assert numerics.fp32_module_names(model) == DiT.FP32_MODULES
    assert not hasattr(DiT, "_keep_in_fp32_modules")  # no second list

    class Wrapper(nn.Module):  # a declaration is read wherever the declaring module sits
        def __init__(self) -> None:
            super().__init__()
            self.dit = model

    assert numerics.fp32_module_names(Wrapper()) == tuple(f"dit.{n}" for n in DiT.FP32_MODULES)
    assert numerics.keeps_fp32("head.head.weight", model)
    assert numerics.keeps_fp32("casual_audio_encoder.weights", model)
    assert not numerics.keeps_fp32("blocks.0.ffn.0.weight", model)
    assert not numerics.keeps_fp32("header.weight", model)  # a prefix of a name is not the module


@pytest.mark.parametrize("preset", ["t2v-a14b-tiny", "s2v-14b-tiny"])
def test_cast_keeps_exactly_the_fp32_modules(preset):
    model = DiT(DIT_PRESETS[preset])
    before = {n: id(t) for n, t in model.named_parameters()}
    numerics.cast_(model, BF16)
    got = {n: t.dtype for n, t in tensors(model).items() if t.is_floating_point()}
    assert any(under_fp32_module(n) for n in got) and any(not under_fp32_module(n) for n in got)
    assert got == {n: FP32 if under_fp32_module(n) else BF16 for n in got}
    assert {n: id(t) for n, t in model.named_parameters()} == before  # parameters cast in place (ties survive)
    with pytest.raises(TypeError, match="floating"):
        numerics.cast_(model, torch.int8)


def test_cast_leaves_int8_alone_and_pins_the_scales():
    model = quantize_(DiT(DIT_PRESETS["t2v-a14b-tiny"]))
    numerics.cast_(model, BF16)
    lin = model.blocks[0].ffn[0]
    assert lin.qweight.dtype == torch.int8 and lin.weight_scale.dtype == FP32 and lin.bias.dtype == BF16
    assert numerics.keeps_fp32("blocks.0.ffn.0.weight_scale", model)
    assert not numerics.keeps_fp32("blocks.0.ffn.0.bias", model)


def test_dtypes_per_device():
    assert numerics.PARAM_DTYPE == BF16  # official param_dtype
    assert numerics.weight_dtype("cuda", True) == BF16 and numerics.weight_dtype("cpu", True) == BF16
    assert numerics.weight_dtype(torch.device("cuda", 1), False) is None  # keep the stored dtype, as official
    assert numerics.weight_dtype("cpu", False) == FP32  # small models ship bf16; the CPU runs fp32
    assert numerics.compute_dtype("cpu", True) == FP32 and numerics.compute_dtype("cpu", False) == FP32
    assert numerics.compute_dtype("cuda", True) == BF16 and numerics.compute_dtype("cuda:0", False) == FP32


def test_apply_precision_casts_by_the_policy():
    loaders = {"high": lambda: DiT(DIT_PRESETS["t2v-a14b-tiny"]), "low": lambda: DiT(DIT_PRESETS["t2v-a14b-tiny"])}
    typed = apply_precision(loaders, {"high": BF16})
    high, low = typed["high"](), typed["low"]()
    assert high.head.head.weight.dtype == FP32 and high.blocks[0].ffn[0].weight.dtype == BF16
    assert low.blocks[0].ffn[0].weight.dtype == FP32


@pytest.mark.parametrize("convert", [True, False])
def test_loader_cast_and_planner_agree(tmp_path, convert):
    cfg = SimpleNamespace(task="t2v-tiny", modality="t2v", dit=DIT_PRESETS["t2v-a14b-tiny"], vae=VAE_TINY,
                          experts=("high", "low"), text_encoder="byte", audio_encoder=None, vae_stride=(4, 8, 8),
                          frame_num=5, infer_frames=8)
    torch.manual_seed(0)
    stored = DiT(cfg.dit)  # fp32, as the official A14B shards
    ck.save_dit(stored, tmp_path, max_shard_size=None)
    loaded = ck.load_dit(tmp_path, dtype=numerics.weight_dtype("cuda", convert), cfg=cfg.dit)
    cast = numerics.cast_(DiT(cfg.dit), BF16) if convert else DiT(cfg.dit)
    assert {k: v.dtype for k, v in loaded.state_dict().items()} == {k: v.dtype for k, v in cast.state_dict().items()}
    plan = plan_memory(cfg, "64*64", OffloadFlags(offload_model=True, convert_model_dtype=convert))
    nbytes = sum(t.numel() * t.element_size() for t in loaded.state_dict().values())
    assert plan.weights["expert:high"] == plan.weights["expert:low"] == nbytes
    if convert:  # the values the loader keeps are the stored fp32 ones, untouched
        assert torch.equal(loaded.time_projection[1].weight, stored.time_projection[1].weight)
