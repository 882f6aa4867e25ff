"""Memory planner: the live-bytes tracker, meta vs real allocations, and the phase model."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from wanmoe.memory.offload import OffloadFlags
from wanmoe.memory.plan import LiveBytes, activation_peak, official_peak_gb, plan_memory
from wanmoe.models.dit import DIT_PRESETS, DiT
from wanmoe.models.vae import VAE_TINY


def tiny_cfg():
    return SimpleNamespace(task="t2v-tiny", modality="t2v", dit=DIT_PRESETS["t2v-a14b-tiny"], vae=VAE_TINY,
                           experts=("high", "low"), text_encoder="byte", audio_encoder=None, vae_stride=(4, 8, 8),
                           frame_num=5, infer_frames=8)


def test_live_bytes_exact_on_known_sequence():
    with torch.device("meta"):
        lin = torch.nn.Linear(64, 256)
    with torch.no_grad(), LiveBytes() as tr:
        x = torch.empty(100, 64, device="meta")  # 25.6 kB
        y = lin(x)  # 102.4 kB
        z = torch.nn.functional.gelu(y)  # 102.4 kB, peak = x + y + z
        del y
        v = z.view(-1)  # a view costs nothing and keeps z's storage alive
        del z
        live_with_view = tr.live
        del v
        after = tr.live
    assert tr.peak == 100 * 64 * 4 + 2 * 100 * 256 * 4
    assert live_with_view == 100 * 64 * 4 + 100 * 256 * 4
    assert after == 100 * 64 * 4


def test_meta_prediction_equals_real_cpu_run():
    torch.manual_seed(0)
    cfg = DIT_PRESETS["t2v-a14b-tiny"]
    with torch.device("meta"):
        meta_model = DiT(cfg)
    real_model = DiT(cfg).eval()

    def run(model, device):
        def fn():
            x = torch.zeros(1, 16, 2, 8, 8, device=device)
            t = torch.full((1,), 500.0, device=device)
            ctx = torch.zeros(1, 4, cfg.text_dim, device=device)
            return model(x, t, ctx)

        return fn

    meta, real = activation_peak(run(meta_model, "meta")), activation_peak(run(real_model, "cpu"))
    assert meta == real and meta > 0


def test_plan_phases_follow_flags():
    cfg = tiny_cfg()
    off = plan_memory(cfg, "64*64", OffloadFlags(offload_model=True))
    res = plan_memory(cfg, "64*64", OffloadFlags(offload_model=False))
    bf16 = plan_memory(cfg, "64*64", OffloadFlags(offload_model=True, convert_model_dtype=True))
    t5cpu = plan_memory(cfg, "64*64", OffloadFlags(offload_model=True, t5_cpu=True))
    with torch.device("meta"):
        n = sum(p.numel() for p in DiT(cfg.dit).parameters())
    one_fp32 = off.weights["expert:high"]
    assert one_fp32 == n * 4  # fp32 as stored
    assert 0.5 * one_fp32 < bf16.weights["expert:high"] < 0.65 * one_fp32  # fp32 modules stay fp32
    one = off.weights["expert:high"]
    # Without offload the idle expert and the text encoder stay on the device.
    assert res.phases["denoise"] - off.phases["denoise"] == one + off.weights["text_encoder"]
    assert t5cpu.phases["encode"] < off.phases["encode"]
    assert off.tokens == 2 * 4 * 4  # F=2 latent frames, 8x8 latent, 2x2 patches
    assert off.peak == max(off.phases.values())


def test_official_lookup():
    flags = OffloadFlags(offload_model=True, convert_model_dtype=True)
    assert official_peak_gb("t2v-A14B", "1280*720", flags) == 59.8
    assert official_peak_gb("t2v-A14B", "720*1280", flags) == 59.8
    assert official_peak_gb("t2v-A14B", "1280*720", OffloadFlags()) is None


def test_plan_covers_every_task_of_the_registry():
    """Every task `wanmoe plan` lists can be planned, S2V-14B included (its forward must trace on meta)."""
    from wanmoe.configs import PRESETS

    for name, cfg in PRESETS.items():
        size = "832*480" if cfg.layout != "small" else cfg.default_size
        p = plan_memory(cfg, size, OffloadFlags(offload_model=True, convert_model_dtype=True))
        assert p.peak > 0 and p.tokens > 0, name
    s2v = plan_memory(PRESETS["s2v-14B"], "832*480", OffloadFlags(offload_model=True, convert_model_dtype=True))
    assert s2v.tokens == 20 * 30 * 52  # 20 latent frames after the motion context, 60x104 latent, 2x2 patches
