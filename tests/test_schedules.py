"""Schedules: endpoints, monotonicity, shift formula, and timestep/sigma parity with the official schedulers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from solvers_oracle import official_schedule

from wanmoe.sampling.schedules import flow_sigmas, log_snr, log_snr_float, sigma_from_log_snr, time_shift, timesteps

GRID = [(solver, steps, shift) for solver in ("unipc", "dpm++") for steps in (10, 20, 40) for shift in (3, 5, 12)]


@pytest.mark.parametrize("solver,steps,shift", GRID)
def test_timesteps_and_sigmas_match_official(solver: str, steps: int, shift: float) -> None:
    sched, official_t = official_schedule(solver, steps, shift)
    sigmas = flow_sigmas(steps, shift, solver=solver)
    # Model timesteps must be identical integers, not merely close.
    assert torch.equal(timesteps(sigmas)[:-1], official_t)
    # The official solver sigmas are the same values rounded to float32 (terminal 0 included).
    assert sigmas.shape == sched.sigmas.shape == (steps + 1,)
    assert torch.equal(sigmas.to(torch.float32), sched.sigmas)


@pytest.mark.parametrize("solver", ["unipc", "dpm++", "euler"])
@pytest.mark.parametrize("spacing", ["linear", "cosine"])
def test_endpoints_and_monotone(solver: str, spacing: str) -> None:
    sigmas = flow_sigmas(13, 5.0, solver=solver, spacing=spacing)
    assert sigmas.dtype == torch.float64 and sigmas.shape == (14,)
    assert sigmas[-1].item() == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    start = float(np.float32(0.999)) if solver == "unipc" else 1.0
    assert sigmas[0].item() == pytest.approx(5.0 * start / (1 + 4.0 * start), abs=0, rel=1e-15)
    if solver != "unipc":
        assert sigmas[0].item() == 1.0


def test_unipc_first_timestep_is_999_and_dpm_is_1000() -> None:
    assert timesteps(flow_sigmas(40, 12.0, solver="unipc"))[0].item() == 999
    assert timesteps(flow_sigmas(40, 12.0, solver="dpm++"))[0].item() == 1000


def test_shift_formula_and_identity() -> None:
    s = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.equal(time_shift(s, 1.0), s)
    for shift in (0.5, 3.0, 12.0):
        expected = torch.tensor([shift * v / (1 + (shift - 1) * v) for v in s.tolist()], dtype=torch.float64)
        torch.testing.assert_close(time_shift(s, shift), expected, rtol=1e-15, atol=1e-15)
    # A shift > 1 moves every interior sigma up (more time at high noise).
    assert bool((time_shift(s, 5.0)[1:-1] > s[1:-1]).all())


def test_cosine_spacing_is_denser_at_the_ends() -> None:
    lin = flow_sigmas(20, 1.0, solver="euler", spacing="linear")
    cos = flow_sigmas(20, 1.0, solver="euler", spacing="cosine")
    d_lin, d_cos = -(lin[1:] - lin[:-1]), -(cos[1:] - cos[:-1])
    assert d_cos[0] < d_lin[0] and d_cos[10] > d_lin[10]
    # The unshifted cosine grid is (1 + cos(pi u)) / 2.
    u = torch.arange(20, dtype=torch.float64) / 20
    torch.testing.assert_close(cos[:-1], 0.5 * (1 + torch.cos(math.pi * u)), rtol=1e-14, atol=1e-14)


def test_log_snr_roundtrip_and_endpoints() -> None:
    s = torch.tensor([0.01, 0.3, 0.5, 0.875, 0.99], dtype=torch.float64)
    lam = log_snr(s)
    torch.testing.assert_close(lam, torch.log(((1 - s) / s) ** 2))
    torch.testing.assert_close(sigma_from_log_snr(lam), s, rtol=1e-14, atol=1e-14)
    assert lam[2].item() == 0.0
    assert log_snr_float(1.0) == -math.inf and log_snr_float(0.0) == math.inf
    assert log_snr_float(0.875) == pytest.approx(2 * math.log(1 / 7), rel=1e-14)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(steps=0, shift=1.0),
        dict(steps=4, shift=0.0),
        dict(steps=4, shift=1.0, solver="ddim"),
        dict(steps=4, shift=1.0, spacing="karras"),
    ],
)
def test_validation(kwargs: dict) -> None:
    steps, shift = kwargs.pop("steps"), kwargs.pop("shift")
    with pytest.raises(ValueError):
        flow_sigmas(steps, shift, **kwargs)
