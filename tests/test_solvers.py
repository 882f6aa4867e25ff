"""Solvers: parity with the official UniPC / DPM++ schedulers, exactness on analytic Gaussian problems, callbacks."""

from __future__ import annotations

import pytest
import torch
from solvers_oracle import official_sample

from wanmoe.sampling.schedules import flow_sigmas, log_snr_float, timesteps
from wanmoe.sampling.solvers import StepInfo, sample_dpmpp_2m, sample_euler, sample_unipc

SOLVERS = {"unipc": sample_unipc, "dpm++": sample_dpmpp_2m, "euler": sample_euler}
GRID = [(solver, steps, shift) for solver in ("unipc", "dpm++") for steps in (10, 20, 40) for shift in (3, 5, 12)]


def _random_model(seed: int):
    """A nonlinear, time-dependent stand-in for the DiT that sees the integer timestep, like the real one."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 4, generator=g) / 2

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tf = t.to(torch.float32) / 1000
        return torch.tanh(torch.einsum("bcfhw,cd->bdfhw", x, w)) * (1 + tf) + 0.3 * x - tf  # (B, C, F, H, W)

    return model


@pytest.mark.parametrize("solver,steps,shift", GRID)
def test_final_latents_match_official(solver: str, steps: int, shift: float) -> None:
    torch.manual_seed(steps * 100 + shift)
    model = _random_model(steps + shift)
    x = torch.randn(1, 4, 2, 4, 4)  # (B, C, F, H, W)
    ref = official_sample(solver, steps, shift, model, x.clone())
    ours = SOLVERS[solver](lambda x, s: model(x, timesteps(s)), x.clone(), flow_sigmas(steps, shift, solver=solver))
    assert ref.abs().max() > 0.5  # the test problem is not trivially near zero
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def _gaussian_problem(sd_scale: float):
    """x0 ~ N(mu, sd^2) elementwise, noise ~ N(0, 1). The exact flow velocity is E[noise - x0 | x_sigma], and the
    probability-flow ODE is the affine map x(sigma) = (1 - sigma) mu + sqrt(V(sigma)) z, V = (1-sigma)^2 sd^2 + sigma^2,
    so starting from z at any sigma the clean sample is mu + sd z in closed form."""
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    sd = (torch.rand(2, 3, 4, generator=g, dtype=torch.float64) * 0.8 + 0.2) * sd_scale
    z = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)

    def var(s):
        return (1 - s) ** 2 * sd**2 + s**2

    def denoise(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return (x - (1 - s) * mu) / var(s) * (s - (1 - s) * sd**2) - mu

    def start(sigmas: torch.Tensor) -> torch.Tensor:
        s0 = sigmas[0]
        return (1 - s0) * mu + var(s0).sqrt() * z

    return denoise, start, mu + sd * z


@pytest.mark.parametrize("solver", ["euler", "unipc", "dpm++"])
@pytest.mark.parametrize("shift", [1.0, 5.0])
def test_exact_on_point_mass_gaussian(solver: str, shift: float) -> None:
    # sd -> 0: every trajectory is a straight line with a constant x0 prediction, which all three solvers
    # integrate exactly (Euler: constant velocity; DPM++/UniPC: exact exponential integrator, zero differences).
    denoise, start, target = _gaussian_problem(0.0)
    for steps in (1, 2, 7):
        sigmas = flow_sigmas(steps, shift, solver=solver)
        out = SOLVERS[solver](denoise, start(sigmas), sigmas)
        torch.testing.assert_close(out, target, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "solver,steps,tol,min_ratio",
    [("euler", 400, 6e-3, 1.8), ("unipc", 160, 3e-4, 3.5), ("dpm++", 160, 1e-3, 2.5)],
)
def test_converges_on_gaussian(solver: str, steps: int, tol: float, min_ratio: float) -> None:
    denoise, start, target = _gaussian_problem(1.0)
    errs = []
    for n in (steps // 2, steps):
        sigmas = flow_sigmas(n, 1.0, solver=solver)
        errs.append((SOLVERS[solver](denoise, start(sigmas), sigmas) - target).abs().max().item())
    assert errs[1] < tol
    # Halving the step size cuts the error by about 2 (first order) or about 4 (second order).
    assert errs[0] / errs[1] > min_ratio


@pytest.mark.parametrize("solver", ["euler", "unipc", "dpm++"])
def test_callback_and_sigma_argument(solver: str, monkeypatch: pytest.MonkeyPatch) -> None:
    sigmas = flow_sigmas(6, 3.0, solver=solver)
    seen_sigmas, infos = [], []

    def denoise(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        assert s.ndim == 0 and s.dtype == torch.float64
        seen_sigmas.append(s)
        return 0.5 * x

    def no_sync(*_a, **_k):
        raise AssertionError("host sync (.item()) inside the sampling loop")

    monkeypatch.setattr(torch.Tensor, "item", no_sync)
    SOLVERS[solver](denoise, torch.randn(1, 2, 1, 2, 2), sigmas, callback=infos.append)
    monkeypatch.undo()
    assert [s.item() for s in seen_sigmas] == sigmas[:-1].tolist()
    assert [i.i for i in infos] == list(range(6))
    assert all(isinstance(i, StepInfo) and i.experts == {} for i in infos)
    assert [i.sigma for i in infos] == sigmas[:-1].tolist()
    assert [i.log_snr for i in infos] == [log_snr_float(s) for s in sigmas[:-1].tolist()]
    torch.testing.assert_close(infos[2].denoised, infos[2].x - infos[2].sigma * 0.5 * infos[2].x)


def test_callback_reports_plan_and_dtype_roundtrip() -> None:
    sigmas = flow_sigmas(3, 3.0, solver="unipc")

    class Planned:
        plan = [{"high": 1.0}, {"high": 0.25, "low": 0.75}, {"low": 1.0}]

        def __call__(self, x, s):
            return x.float() * 0.1

    infos: list[StepInfo] = []
    x = torch.randn(1, 2, 1, 2, 2).to(torch.bfloat16)
    out = sample_unipc(Planned(), x, sigmas, callback=infos.append)
    assert out.dtype == torch.bfloat16
    assert [i.experts for i in infos] == Planned.plan
    assert infos[0].x.dtype == torch.float32  # arithmetic runs in float32 for low-precision latents


@pytest.mark.parametrize(
    "sigmas",
    [torch.tensor([0.5, 0.7, 0.0]), torch.tensor([1.5, 0.0]), torch.tensor([0.5]), torch.tensor([0.5, 0.0, 0.0])],
)
def test_rejects_bad_schedules(sigmas: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        sample_euler(lambda x, s: x, torch.zeros(2), sigmas)
