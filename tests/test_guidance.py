"""Classifier-free guidance wrappers and per-expert scales."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from wanmoe.configs import get_preset
from wanmoe.experts import route
from wanmoe.sampling.guidance import cfg, cfg_per_expert, per_expert_scale
from wanmoe.sampling.schedules import flow_sigmas


def test_cfg_formula() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    guided = cfg(lambda x, s: a * x, lambda x, s: b * x, 4.0)
    x, s = torch.randn(2, 3), torch.tensor(0.5)
    torch.testing.assert_close(guided(x, s), b * x + 4.0 * (a * x - b * x))
    # scale 0 is the unconditional prediction.
    torch.testing.assert_close(cfg(lambda x, s: a, lambda x, s: b, 0.0)(x, s), b)


def test_scale_one_skips_uncond() -> None:
    def cond(x, s):
        return x + 1

    def uncond(x, s):
        raise AssertionError("uncond must not run at scale 1")

    assert cfg(cond, uncond, 1.0) is cond
    with pytest.raises(ValueError):
        cfg(cond, uncond, float("nan"))


def test_per_expert_scale() -> None:
    assert per_expert_scale(3.5, ("high", "low")) == {"high": 3.5, "low": 3.5}
    assert per_expert_scale({"low": 3.0, "high": 4.0}, ("high", "low")) == {"high": 4.0, "low": 3.0}
    with pytest.raises(ValueError, match="missing"):
        per_expert_scale({"high": 4.0}, ("high", "low"))
    with pytest.raises(ValueError, match="unknown"):
        per_expert_scale({"high": 4.0, "low": 3.0, "mid": 1.0}, ("high", "low"))
    with pytest.raises(TypeError):
        per_expert_scale(True, ("high",))


def test_each_expert_uses_its_own_scale_through_the_router() -> None:
    cfg = get_preset("t2v-A14B")
    d = SimpleNamespace(experts=cfg.expert_spec(), steps=cfg.sample_steps, shift=cfg.sample_shift)
    sigmas = flow_sigmas(d.steps, d.shift)
    # cond predicts 1 and uncond 0, so the guided output equals the scale in use.
    cond = {n: (lambda x, s: torch.ones_like(x)) for n in d.experts.names}
    uncond = {n: (lambda x, s: torch.zeros_like(x)) for n in d.experts.names}
    router = route(cfg_per_expert(cond, uncond, {"high": 4.0, "low": 3.0}), d.experts, sigmas)
    x = torch.zeros(1, 1, 1, 1, 1)
    used = [router(x, sigmas[i]).item() for i in range(d.steps)]
    assert used == [4.0] * 26 + [3.0] * 14
    with pytest.raises(ValueError):
        cfg_per_expert(cond, {"high": uncond["high"]}, 3.0)
