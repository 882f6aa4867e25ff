"""Flow-matching noise schedules as pure functions.

Convention (docs/architecture.md): x_sigma = (1 - sigma) * x0 + sigma * noise, sigma in [0, 1]; sigma = 1 is pure
noise. A schedule is a 1-D tensor of `steps + 1` sigmas, decreasing, ending at exactly 0; the model is evaluated at
the first `steps` entries and the terminal 0 is only a target. Schedules are computed once, before sampling, and
handed to the solvers; no solver builds its own.

Axis legend: this module has no tensor axes beyond the 1-D schedule (length steps + 1).

Why float64: the official code derives the model timesteps from float64 sigmas (trunc(sigma * 1000)) and only
then rounds the sigmas to float32 for the solver arithmetic. Returning the float64 values keeps `timesteps()`
bit-identical to the official ones (a float32 round trip can move trunc() across an integer); solvers cast the
coefficients themselves.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

NUM_TRAIN_TIMESTEPS = 1000
SOLVERS = ("unipc", "dpm++", "euler")
SPACINGS = ("linear", "cosine")

# Where each solver's unshifted grid starts. The official UniPC scheduler takes its
# sigma_max from a float32 training table built as 1 - linspace(1, 1/1000, 1000)[::-1], so its start is 0.999
# rounded to float32 and widened back to a Python float; reproducing that rounding keeps the timesteps equal.
# DPM++ uses get_sampling_sigmas, which starts at exactly 1.0. Euler has no official scheduler; it follows DPM++.
_START = {
    "unipc": float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS)),
    "dpm++": 1.0,
    "euler": 1.0,
}


def time_shift(sigmas: Tensor | np.ndarray, shift: float) -> Tensor | np.ndarray:
    """sigma' = s * sigma / (1 + (s - 1) * sigma) (the official get_sampling_sigmas; SD3 eq. 23)."""
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_sigmas(steps: int, shift: float, *, solver: str = "unipc", spacing: str = "linear") -> Tensor:
    """Shifted flow-matching sigmas, (steps + 1,) float64, starting where the official `solver` starts, ending at 0.

    `linear` is the official grid: linspace(start, 0, steps + 1)[:-1], shifted, then a terminal 0.
    `cosine` (a wanmoe extension, not in the official code) warps the same grid with u -> (1 + cos(pi u)) / 2
    before the shift, which puts more steps near both ends (very noisy and nearly clean) than in the middle.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if solver not in _START:
        raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; expected one of {SPACINGS}")
    start = _START[solver]
    if spacing == "linear":
        # np.linspace, not torch.linspace: the two round differently in the last bit, and the official grid is numpy's.
        grid = np.linspace(start, 0.0, steps + 1)[:-1]
    else:
        u = np.linspace(0.0, 1.0, steps + 1)[:-1]
        grid = start * 0.5 * (1.0 + np.cos(math.pi * u))
    shifted = time_shift(grid, float(shift))
    return torch.from_numpy(np.concatenate([shifted, [0.0]]).astype(np.float64))


def timesteps(sigmas: Tensor, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Tensor:
    """Model timesteps t = trunc(sigma * 1000) as int64, the values the official pipeline feeds the DiT."""
    # Conversion to int64 truncates toward zero, as the official `.to(torch.int64)` does; sigmas are >= 0.
    return (sigmas.to(torch.float64) * num_train_timesteps).to(torch.int64)


def log_snr(sigmas: Tensor) -> Tensor:
    """log SNR with SNR = ((1 - sigma) / sigma)^2; -inf at sigma = 1, +inf at sigma = 0."""
    s = sigmas.to(torch.float64)
    return 2.0 * (torch.log1p(-s) - torch.log(s))


def sigma_from_log_snr(lam: Tensor | float) -> Tensor:
    """Inverse of `log_snr`: sigma = 1 / (1 + exp(lam / 2)) = sigmoid(-lam / 2)."""
    return torch.sigmoid(-0.5 * torch.as_tensor(lam, dtype=torch.float64))


def log_snr_float(sigma: float) -> float:
    """Host-side log SNR of one sigma, with the endpoints mapped to -inf / +inf instead of raising."""
    if sigma >= 1.0:
        return -math.inf
    if sigma <= 0.0:
        return math.inf
    return 2.0 * (math.log1p(-sigma) - math.log(sigma))
