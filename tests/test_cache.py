"""Step caching per expert: calibration from runs, the skip rule, and the pipeline wiring."""

from __future__ import annotations

import math

import pytest
import torch

from wanmoe import experts as ex
from wanmoe.sampling.cache import Calibration, Recorder, StepCache
from wanmoe.sampling.schedules import flow_sigmas, log_snr_float
from wanmoe.sampling.solvers import sample_unipc

G = {"high": -0.3, "low": 0.2}  # d log|v| / d lam of the synthetic experts


def _expert(name: str, calls: list):
    """A velocity with a fixed direction and magnitude exp(G * lam): exactly what the calibration models."""
    direction = torch.linspace(-1, 1, 2 * 3 * 4).reshape(1, 2, 1, 3, 4)

    def f(x, sigma):
        calls.append((name, float(sigma)))
        return direction * math.exp(G[name] * log_snr_float(float(sigma)))

    return f


def _run(spec, sigmas, cache: StepCache | None = None):
    calls: list = []
    router = ex.route({n: _expert(n, calls) for n in spec.names}, spec, sigmas)
    if cache is not None:
        cache.step = lambda: router.step - 1
        cache.plan = router.plan
        router.denoisers = {n: cache.wrap(n, d) for n, d in router.denoisers.items()}
    x = sample_unipc(router, torch.zeros(1, 2, 1, 3, 4), sigmas)
    return x, calls


def test_recorder_recovers_the_magnitude_slope_per_expert():
    spec = ex.ExpertSpec(("high", "low"), boundary=0.875)
    sigmas = flow_sigmas(20, 5.0)
    rec = Recorder()
    rec.start_run()
    router = ex.route({n: rec.wrap(n, _expert(n, [])) for n in spec.names}, spec, sigmas)
    sample_unipc(router, torch.zeros(1, 2, 1, 3, 4), sigmas)
    cal = rec.calibration()
    for n, g in G.items():
        assert all(abs(s - g) < 1e-5 for _, s, _ in cal.samples[n]), (n, cal.samples[n])
        # |v_i - v_j| / |v_j| = |r - 1| for a fixed direction: about |g| per unit lam for small steps.
        # (the first interval of the schedule starts at sigma = 1, a step of many units of lam: not small)
        assert all(0.5 * abs(g) < c < 2 * abs(g) for _, _, c in cal.samples[n][1:]), (n, cal.samples[n])
    assert cal.ratio("low", 1.0, 2.0) == pytest.approx(math.exp(0.2))
    assert Calibration.from_json(cal.to_json()).samples == cal.samples


def test_skipping_follows_the_calibration_and_protects_switches():
    spec = ex.ExpertSpec(("high", "low"), boundary=0.875)
    sigmas = flow_sigmas(20, 5.0)
    lams = [log_snr_float(s) for s in sigmas.tolist()]
    cal = Calibration({n: [(-10.0, g, abs(g)), (10.0, g, abs(g))] for n, g in G.items()})
    ref, ref_calls = _run(spec, sigmas)
    cache = StepCache(cal, [], lams, threshold=0.5, max_skips=2, step=lambda: 0)
    got, calls = _run(spec, sigmas, cache)
    plan = ex.expert_weights(sigmas, spec)
    assert len(ref_calls) == 20 and len(calls) < 20 * 0.7  # most of the steps were skipped
    # With an exact calibration the skipped outputs are exact, so the trajectory is unchanged.
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    computed = {round(s, 12) for _, s in calls}
    first_low = next(i for i, w in enumerate(plan) if "low" in w)
    for i in (0, first_low):  # each expert's first step always runs
        assert round(sigmas[i].item(), 12) in computed
    # Never more than max_skips in a row for an expert.
    run = 0
    for i in range(20):
        run = 0 if round(sigmas[i].item(), 12) in computed else run + 1
        assert run <= 2


def test_a_tight_threshold_is_the_uncached_path():
    spec = ex.ExpertSpec(("high", "low"), boundary=0.875)
    sigmas = flow_sigmas(12, 5.0)
    lams = [log_snr_float(s) for s in sigmas.tolist()]
    cal = Calibration({n: [(0.0, 1.0, 5.0)] for n in G})  # predicts large changes: nothing is predictable enough
    ref, _ = _run(spec, sigmas)
    got, calls = _run(spec, sigmas, StepCache(cal, [], lams, threshold=1e-3, max_skips=2, step=lambda: 0))
    assert len(calls) == 12 and torch.equal(got, ref)


def test_pipeline_cache_needs_calibration_then_skips(tiny_ckpt):
    import wanmoe

    pipe = wanmoe.load(tiny_ckpt("t2v-tiny"))
    with pytest.raises(wanmoe.InputError, match="cache"):
        pipe(seed=1, steps=8, cache=0.3)
    cal = pipe.calibrate_cache([{"seed": 1, "steps": 8}, {"seed": 2, "steps": 8}])
    assert set(cal["experts"]) <= {"high", "low"} and cal["experts"]
    ref = pipe(seed=1, steps=8)
    fast = pipe(seed=1, steps=8, cache=0.3)
    assert sum(ref.expert_calls.values()) == 8 and sum(fast.expert_calls.values()) < 8
    assert fast.expert_steps == ref.expert_steps  # the plan is the same; only evaluations are saved
    assert fast.request.to_json()["cache"] == 0.3
    assert (fast.frames - ref.frames).abs().mean() < 0.2
