"""Noise experts: official splits, log-SNR thresholds, blend bands, routing, training ranges, CLI table."""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from solvers_oracle import official_schedule

from wanmoe.cli import main as cli_main
from wanmoe.configs import PRESETS, get_preset
from wanmoe.experts import (
    DENSE,
    ExpertSpec,
    band_weight,
    boundary_to_log_snr,
    expert_sigma_range,
    expert_timestep_range,
    expert_weights,
    route,
    weights_at,
)
from wanmoe.sampling.schedules import flow_sigmas, log_snr_float, sigma_from_log_snr
from wanmoe.sampling.solvers import sample_dpmpp_2m, sample_unipc


def task_defaults(task: str) -> SimpleNamespace:
    """A task's sampling defaults, read from the task registry (the one place they are written)."""
    cfg = get_preset(task)
    return SimpleNamespace(experts=cfg.expert_spec(), shift=cfg.sample_shift, steps=cfg.sample_steps,
                           guide_scales=dict(cfg.guide_scale))


MOE = ("high", "low")


def _split(weights: list[dict[str, float]]) -> list[str]:
    assert all(len(w) == 1 for w in weights)
    return [next(iter(w)) for w in weights]


@pytest.mark.parametrize(
    "task,solver,n_high,n_low",
    [("t2v-A14B", "unipc", 26, 14), ("t2v-A14B", "dpm++", 26, 14), ("i2v-A14B", "unipc", 15, 25)],
)
def test_official_default_split(task: str, solver: str, n_high: int, n_low: int) -> None:
    d = task_defaults(task)
    sigmas = flow_sigmas(d.steps, d.shift, solver=solver)
    split = _split(expert_weights(sigmas, d.experts))
    assert split == ["high"] * n_high + ["low"] * n_low
    # Replay the official rule on the official scheduler's own timesteps: t >= boundary * 1000 -> high.
    _, ts = official_schedule(solver, d.steps, d.shift)
    boundary = d.experts.boundary[0] * 1000
    assert split == ["high" if t >= boundary else "low" for t in ts.tolist()]


def test_log_snr_threshold_reproduces_the_boundary_split() -> None:
    for task in ("t2v-A14B", "i2v-A14B"):
        d = task_defaults(task)
        sigmas = flow_sigmas(d.steps, d.shift)
        by_threshold = ExpertSpec(MOE, thresholds=(boundary_to_log_snr(d.experts.boundary[0]),))
        assert expert_weights(sigmas, by_threshold) == expert_weights(sigmas, d.experts)
    assert boundary_to_log_snr(0.875) == pytest.approx(2 * math.log(1 / 7))
    assert boundary_to_log_snr(0.9) == pytest.approx(2 * math.log(1 / 9))


def test_threshold_outside_every_step_gives_one_expert() -> None:
    sigmas = flow_sigmas(20, 5.0)
    lams = [log_snr_float(s) for s in sigmas[:-1].tolist()]
    above = ExpertSpec(MOE, thresholds=(max(lams) + 1.0,), blend=0.5)
    below = ExpertSpec(MOE, thresholds=(min(lams) - 1.0,), blend=0.5)
    assert expert_weights(sigmas, above) == [{"high": 1.0}] * 20
    assert expert_weights(sigmas, below) == [{"low": 1.0}] * 20
    assert expert_weights(sigmas, DENSE) == [{"low": 1.0}] * 20


def test_band_weight_edges_exact_and_continuous() -> None:
    cut, w = -3.9, 0.75
    assert band_weight(cut - w, cut, w) == 0.0 and band_weight(cut + w, cut, w) == 1.0
    assert band_weight(cut, cut, w) == 0.5
    assert band_weight(cut - w - 1e-9, cut, w) == 0.0 and band_weight(cut + w + 1e-9, cut, w) == 1.0
    lams = torch.linspace(cut - 2, cut + 2, 4001, dtype=torch.float64).tolist()
    vals = [band_weight(v, cut, w) for v in lams]
    step = lams[1] - lams[0]
    # Continuous and piecewise linear: no jump larger than slope * grid step.
    assert max(abs(b - a) for a, b in zip(vals, vals[1:])) <= step / (2 * w) + 1e-12
    assert all(b >= a for a, b in zip(vals, vals[1:]))


def test_blend_mixes_near_the_cut_only() -> None:
    spec = replace(task_defaults("t2v-A14B").experts, blend=0.5)
    sigmas = flow_sigmas(40, 12.0)
    weights = expert_weights(sigmas, spec)
    cut = spec.cuts[0]
    for s, w in zip(sigmas[:-1].tolist(), weights):
        lam = log_snr_float(s)
        assert sum(w.values()) == pytest.approx(1.0, abs=1e-15)
        if abs(lam - cut) < 0.5:
            assert set(w) == {"high", "low"}
            assert w["low"] == pytest.approx((lam - cut + 0.5) / 1.0)
        else:
            assert len(w) == 1 and next(iter(w.values())) == 1.0
    assert sum(len(w) == 2 for w in weights) == 5


def test_four_experts() -> None:
    spec = ExpertSpec(("e0", "e1", "e2", "e3"), thresholds=(-6.0, -3.0, 0.0), blend=0.4)
    sigmas = flow_sigmas(40, 5.0)
    first_active, seen = [], set()
    for w in expert_weights(sigmas, spec):
        assert 1 <= len(w) <= 2 and sum(w.values()) == pytest.approx(1.0)
        idx = [spec.names.index(n) for n in w]
        assert idx == list(range(idx[0], idx[0] + len(idx)))  # neighbours only, high noise first
        first_active.append(idx[0])
        seen.update(w)
    assert seen == set(spec.names)
    assert first_active == sorted(first_active)  # the schedule walks the experts in order
    # Mid-band between e1 and e2 both run with weight 1/2.
    assert weights_at(float(sigma_from_log_snr(-3.0)), spec) == pytest.approx({"e1": 0.5, "e2": 0.5})


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(names=MOE),  # no cut
        dict(names=MOE, thresholds=(-1.0,), boundary=0.9),
        dict(names=("a", "b", "c"), thresholds=(0.0, -1.0)),  # not increasing
        dict(names=("a", "b", "c"), thresholds=(0.0, 1.0), blend=0.6),  # bands overlap
        dict(names=("a", "a"), thresholds=(0.0,)),
        dict(names=MOE, boundary=1.5),
        dict(names=MOE, thresholds=(0.0,), blend=-1.0),
    ],
)
def test_spec_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ExpertSpec(**kwargs)


def test_route_calls_only_active_experts_and_mixes() -> None:
    spec = ExpertSpec(MOE, thresholds=(-3.9,), blend=0.5)
    sigmas = flow_sigmas(40, 12.0)
    calls: list[tuple[int, str]] = []
    hooked: list[tuple[int, tuple[str, ...]]] = []
    step = [0]

    def expert(name: str, value: float):
        def denoise(x, s):
            calls.append((step[0], name))
            return torch.full_like(x, value)

        return denoise

    router = route(
        {"high": expert("high", 2.0), "low": expert("low", -1.0)},
        spec,
        sigmas,
        hook=lambda i, names: hooked.append((i, names)),
    )
    assert router.upcoming() == ("high",)
    x = torch.zeros(1, 2, 1, 2, 2)
    for i in range(40):
        step[0] = i
        expected = router.plan[i]
        assert router.upcoming() == tuple(expected) == router.needs(i)
        out = router(x, sigmas[i])
        torch.testing.assert_close(out, torch.full_like(x, 2.0 * expected.get("high", 0) - expected.get("low", 0)))
        assert sorted(n for j, n in calls if j == i) == sorted(expected)
    assert hooked == [(i, tuple(p)) for i, p in enumerate(router.plan)]
    assert router.upcoming() == ()
    with pytest.raises(RuntimeError):
        router(x, sigmas[0])
    router.reset()
    assert router.step == 0


def test_routed_sampling_matches_single_model_and_reports_experts() -> None:
    torch.manual_seed(0)
    w = torch.randn(2, 2)

    def model(x, s):
        return torch.tanh(torch.einsum("bcfhw,cd->bdfhw", x, w)) + s.to(x.dtype) * x  # (B, C, F, H, W)

    d = task_defaults("t2v-A14B")
    sigmas = flow_sigmas(d.steps, d.shift)
    x = torch.randn(1, 2, 1, 3, 3)
    infos = []
    routed = sample_unipc(route({"high": model, "low": model}, d.experts, sigmas), x, sigmas, callback=infos.append)
    assert torch.equal(routed, sample_unipc(model, x, sigmas))  # hard switch is bit-exact
    assert [next(iter(i.experts)) for i in infos] == ["high"] * 26 + ["low"] * 14
    # A different low expert changes only the tail of the trajectory.
    other = sample_dpmpp_2m(route({"high": model, "low": lambda x, s: 0 * x}, d.experts, sigmas), x, sigmas)
    assert not torch.allclose(other, sample_dpmpp_2m(model, x, sigmas))


def test_route_rejects_wrong_names() -> None:
    with pytest.raises(ValueError):
        route({"high": lambda x, s: x}, task_defaults("t2v-A14B").experts, flow_sigmas(4, 3.0))


def test_training_ranges() -> None:
    t2v = task_defaults("t2v-A14B").experts
    assert expert_sigma_range(t2v, "high") == (0.875, 1.0)
    assert expert_sigma_range(t2v, "low") == (0.0, 0.875)
    assert expert_timestep_range(t2v, "high") == (875.0, 1000.0)
    blended = replace(t2v, blend=0.5)
    lo_h, hi_h = expert_sigma_range(blended, "high")
    lo_l, hi_l = expert_sigma_range(blended, "low")
    assert hi_h == 1.0 and lo_l == 0.0 and lo_h < 0.875 < hi_l  # the band belongs to both
    assert log_snr_float(lo_h) == pytest.approx(t2v.cuts[0] + 0.5)
    assert expert_sigma_range(blended, "high", include_band=False)[0] == pytest.approx(0.875)
    four = ExpertSpec(("a", "b", "c", "d"), thresholds=(-4.0, 0.0, 4.0))
    ranges = [expert_sigma_range(four, n) for n in four.names]
    assert ranges[0][1] == 1.0 and ranges[-1][0] == 0.0
    assert all(ranges[k][0] == ranges[k + 1][1] for k in range(3))  # contiguous, high noise first
    assert expert_sigma_range(DENSE, "low") == (0.0, 1.0)
    with pytest.raises(ValueError):
        expert_sigma_range(four, "high")


def test_task_defaults_come_from_the_registry() -> None:
    t2v = task_defaults("T2V-a14b")
    assert (t2v.experts.boundary, t2v.shift, t2v.steps, t2v.guide_scales) == (
        (0.875,),
        12.0,
        40,
        {"high": 4.0, "low": 3.0},
    )
    i2v = task_defaults("i2v-A14B")
    assert (i2v.experts.boundary, i2v.shift, i2v.guide_scales) == ((0.9,), 5.0, {"high": 3.5, "low": 3.5})
    assert task_defaults("s2v-14B").experts.names == ("low",) and task_defaults("s2v-14B").shift == 3.0
    assert task_defaults("s2v-mini").experts.boundary == (0.9,)
    with pytest.raises(ValueError, match="available"):
        task_defaults("t2v-1.3B")


def test_cli_table(capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["experts", "--task", "t2v-A14B", "--sample_steps", "40"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 42 and out[-1] == "steps per expert: high 26, low 14"
    assert out[1].split()[:2] == ["0", "999"] and "high" in out[26] and "low" in out[27]


def test_cli_module_entry_point() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "wanmoe", "experts", "--task", "i2v-A14B", "--sample_steps", "40"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert r.stdout.strip().splitlines()[-1] == "steps per expert: high 15, low 25"


@pytest.mark.parametrize("task", sorted(PRESETS))
def test_cli_table_accepts_every_task(capsys: pytest.CaptureFixture, task: str) -> None:
    assert cli_main(["experts", "--task", task]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    cfg = get_preset(task)
    assert last.startswith("steps per expert: ")
    served = [part.split()[0] for part in last.removeprefix("steps per expert: ").split(", ")]
    assert served and set(served) <= set(cfg.experts)
