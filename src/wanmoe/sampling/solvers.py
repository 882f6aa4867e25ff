"""Flow-matching ODE solvers as plain functions over a denoise callable.

Parameterisation: `denoise(x, sigma) -> velocity` with x_sigma = (1 - sigma) * x0 + sigma * noise and
v = noise - x0, so the data prediction is x0 = x - sigma * v. `sigma` is passed as a 0-dim tensor taken from the
schedule (no host round trip). Every solver has the signature `sample_<name>(denoise, x, sigmas, *, callback=None)`
and returns the sample at sigmas[-1] (0 for schedules from `flow_sigmas`).

Axis legend: x and every prediction have the caller's latent shape, usually (B, C, F, H, W); the solvers only use
elementwise arithmetic on it. sigmas is (steps + 1,).

No host sync in the loop: the schedule is copied to the host once, before the loop, and every per-step coefficient
is a Python float computed there. The multistep history lives in local variables; there is no scheduler object.

Arithmetic runs in float32 (or float64 if x is float64), like the official schedulers (the DPM++ one upcasts to
float32); the result is cast back to x's dtype.

If `denoise` carries a `plan` attribute (a list with one {expert name: weight} dict per step, as
`wanmoe.experts.route` provides), the callback's `StepInfo.experts` reports it; otherwise it is empty.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from wanmoe.sampling.schedules import log_snr_float

Denoise = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class StepInfo:
    """What a callback sees after the model call of step `i` (for progress bars and logs)."""

    i: int
    sigma: float
    log_snr: float
    x: Tensor  # the latent the model saw at this step
    denoised: Tensor  # x0 prediction x - sigma * v
    experts: dict[str, float] = field(default_factory=dict)  # active experts and their mixing weights


Callback = Callable[[StepInfo], None]


def _prepare(denoise: Denoise, x: Tensor, sigmas: Tensor) -> tuple[list[float], list[dict[str, float]], Tensor]:
    """Validate, copy the schedule to the host (the one sync, before the loop) and read the expert plan."""
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be 1-D with at least 2 entries, got shape {tuple(sigmas.shape)}")
    s = sigmas.detach().to("cpu", torch.float64).tolist()
    if any(b > a for a, b in zip(s, s[1:])) or s[0] > 1.0 or s[-1] < 0.0:
        raise ValueError(f"sigmas must be non-increasing within [0, 1], got {s[:3]}...{s[-2:]}")
    if any(v <= 0.0 for v in s[:-1]):
        raise ValueError("only the terminal sigma may be 0 (the model is never evaluated there)")
    steps = len(s) - 1
    plan = getattr(denoise, "plan", None)
    plan = list(plan) if plan is not None and len(plan) == steps else [{} for _ in range(steps)]
    work = x.to(torch.promote_types(x.dtype, torch.float32))
    return s, plan, work


def _lam(sigma: float) -> float:
    """Half log-SNR lambda = log(alpha / sigma) with alpha = 1 - sigma (DPM-Solver's time variable)."""
    return 0.5 * log_snr_float(sigma)


def _report(callback: Callback | None, i: int, s: list[float], x: Tensor, x0: Tensor, plan: list) -> None:
    if callback is not None:
        callback(StepInfo(i=i, sigma=s[i], log_snr=log_snr_float(s[i]), x=x, denoised=x0, experts=plan[i]))


def sample_euler(denoise: Denoise, x: Tensor, sigmas: Tensor, *, callback: Callback | None = None) -> Tensor:
    """Euler on the flow ODE dx/dsigma = v (Karras et al. 2022, Alg. 1 without churn)."""
    out_dtype = x.dtype
    s, plan, x = _prepare(denoise, x, sigmas)
    for i in range(len(s) - 1):
        v = denoise(x, sigmas[i])
        if callback is not None:  # Euler itself never needs the x0 prediction
            _report(callback, i, s, x, x - s[i] * v, plan)
        x = x + (s[i + 1] - s[i]) * v
    return x.to(out_dtype)


def sample_dpmpp_2m(denoise: Denoise, x: Tensor, sigmas: Tensor, *, callback: Callback | None = None) -> Tensor:
    """DPM-Solver++(2M), Lu et al. 2022 (arXiv 2211.01095) Alg. 2, midpoint form, alpha = 1 - sigma.

    As the official flow scheduler: first order on the first step and on the last (final sigma 0) step.
    """
    out_dtype = x.dtype
    s, plan, x = _prepare(denoise, x, sigmas)
    n = len(s) - 1
    lam = [_lam(v) for v in s]
    m_prev = None
    for i in range(n):
        v = denoise(x, sigmas[i])
        x0 = x - s[i] * v
        _report(callback, i, s, x, x0, plan)
        h = lam[i + 1] - lam[i]
        alpha_t = 1.0 - s[i + 1]
        # x_{i+1} = (sigma_t / sigma_s) x - alpha_t (e^{-h} - 1) D, with D the (extrapolated) data prediction.
        decay, gain = s[i + 1] / s[i], -alpha_t * math.expm1(-h)
        if m_prev is None or i == n - 1:
            x = decay * x + gain * x0
        else:
            # D = x0 + (x0 - m_prev) / (2 r), r = h_prev / h. When the previous step started at sigma = 1,
            # h_prev = inf and the correction vanishes, as in the official arithmetic.
            half_inv_r = 0.5 * h / (lam[i] - lam[i - 1])
            x = decay * x + gain * ((1.0 + half_inv_r) * x0 - half_inv_r * m_prev)
        m_prev = x0
    return x.to(out_dtype)


def _unipc_rhos(h: float, rk: float) -> tuple[float, float]:
    """UniC-2 (bh2) weights: solve [[1, 1], [rk, 1]] @ rho = (b1, b2) (Zhao et al. 2023, UniPC, Alg. B(h))."""
    hh = -h  # data-prediction form integrates in -lambda
    phi1 = math.expm1(hh)  # B(h) = e^{hh} - 1 for bh2
    g1 = phi1 / hh - 1.0  # phi_2-type term: (e^{hh} - 1) / hh - 1
    g2 = g1 / hh - 0.5  # phi_3-type term
    b1, b2 = g1 / phi1, 2.0 * g2 / phi1
    rho0 = (b1 - b2) / (1.0 - rk)
    return rho0, b1 - rho0


def sample_unipc(denoise: Denoise, x: Tensor, sigmas: Tensor, *, callback: Callback | None = None) -> Tensor:
    """UniPC, bh2, order 2, data prediction, Zhao et al. 2023 (arXiv 2302.04867), as the official default.

    Each step: evaluate the model at the predicted x_i, correct x_i with UniC using that evaluation (order =
    previous predictor's order), then predict x_{i+1} with UniP. Orders: 1 on the first and the last step, else 2.
    """
    out_dtype = x.dtype
    s, plan, x = _prepare(denoise, x, sigmas)
    n = len(s) - 1
    lam = [_lam(v) for v in s]
    alpha = [1.0 - v for v in s]
    x_c = m1 = m2 = None  # corrected sample and data predictions of steps i-1 and i-2
    for i in range(n):
        v = denoise(x, sigmas[i])
        m0 = x - s[i] * v
        _report(callback, i, s, x, m0, plan)
        if i > 0:
            # UniC: redo the step i-1 -> i with the new evaluation m0 folded in.
            h = lam[i] - lam[i - 1]
            phi = math.expm1(-h)
            base = (s[i] / s[i - 1]) * x_c - (alpha[i] * phi) * m1
            if i == 1:
                x = base - (alpha[i] * phi * 0.5) * (m0 - m1)
            else:
                rk = (lam[i - 2] - lam[i - 1]) / h
                rho0, rho1 = _unipc_rhos(h, rk)
                x = base - (alpha[i] * phi) * ((rho0 / rk) * (m2 - m1) + rho1 * (m0 - m1))
        x_c = x
        # UniP: predict x_{i+1} from the corrected x_i.
        h = lam[i + 1] - lam[i]
        phi = math.expm1(-h)
        x_next = (s[i + 1] / s[i]) * x - (alpha[i + 1] * phi) * m0
        if 0 < i < n - 1:
            rk = (lam[i - 1] - lam[i]) / h
            x_next = x_next - (alpha[i + 1] * phi * 0.5 / rk) * (m1 - m0)
        x, m2, m1 = x_next, m1, m0
    return x.to(out_dtype)
