"""Noise experts: which denoiser serves which noise level, for sampling and for training.

An expert set is an ORDERED list of names, highest noise first, that partitions the log-SNR axis into consecutive
intervals; nothing here assumes two (a dense model is a list of one, `DENSE`; the roadmap has four). With
SNR = ((1 - sigma) / sigma)^2 and lam = log SNR, the cut points c_1 < ... < c_{n-1} split the axis; expert k serves
c_k <= lam < c_{k+1} (c_0 = -inf, c_n = +inf), i.e. the high-noise expert serves the steps whose SNR is below its cut.

The cuts come either as log-SNR `thresholds` or as the official `boundary` (a fraction of the 1000 training
timesteps; lam = 2 log((1 - b) / b)). With a boundary and no blend band the official comparison is used verbatim,
trunc(sigma * 1000) >= boundary * 1000 -> the higher-noise expert (official T2V pipeline), so every step matches the
official code even at ties. An optional band of half-width `blend` (log-SNR units) around each cut runs both
neighbours and mixes their velocities with a weight linear in lam:
    w_low = clip((lam - c + blend) / (2 blend), 0, 1),   w_high = 1 - w_low
(exactly 0 and 1 at the band edges; docs/experts.md).

Contracts other modules code against:
- `expert_weights(sigmas, spec)` -> one {name: weight} dict per model evaluation (len(sigmas) - 1 of them), only
  experts with non-zero weight, computed on the host BEFORE the loop so no step syncs.
- `route(denoisers, spec, sigmas)` -> an `ExpertRouter`, itself a denoise callable. It must be called once per
  step in schedule order (each solver here does) and exposes `plan`, `step` and `upcoming()` so a residency
  manager can prefetch; an optional `hook(step, names)` runs before each step's experts.
- `expert_sigma_range(spec, name)` -> (sigma_min, sigma_max) the expert owns, for per-expert training.
- The tasks' cuts, shifts, steps and guide scales live in the task registry (`wanmoe.configs.PRESETS`).

Axis legend: x and the predictions have the latent shape (B, C, F, H, W); only elementwise ops happen here.
Run `wanmoe experts --task t2v-A14B --sample_steps 40` for the step-by-step table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from wanmoe.sampling.guidance import per_expert_scale
from wanmoe.sampling.schedules import NUM_TRAIN_TIMESTEPS, log_snr_float

Denoise = Callable[[Tensor, Tensor], Tensor]


def boundary_to_log_snr(boundary: float) -> float:
    """The log-SNR at sigma = boundary: 2 log((1 - b) / b) (0.875 -> -3.892, 0.900 -> -4.394)."""
    return log_snr_float(boundary)


@dataclass(frozen=True)
class ExpertSpec:
    """Ordered experts (high noise first) and the cuts between neighbours. Give `thresholds` or `boundary`."""

    names: tuple[str, ...] = ("high", "low")
    thresholds: tuple[float, ...] = ()  # log-SNR cut points, increasing, len(names) - 1
    boundary: tuple[float, ...] | float = ()  # official timestep fractions, decreasing, len(names) - 1
    blend: float = 0.0  # half-width of the mixing band around each cut, log-SNR units; 0 = hard switch

    def __post_init__(self) -> None:
        # Normalise a scalar boundary to a 1-tuple (frozen dataclass, so through object.__setattr__).
        if isinstance(self.boundary, (int, float)):
            object.__setattr__(self, "boundary", (float(self.boundary),))
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "thresholds", tuple(float(c) for c in self.thresholds))
        object.__setattr__(self, "boundary", tuple(float(b) for b in self.boundary))
        self.validate()

    def validate(self) -> None:
        n = len(self.names)
        if n == 0 or len(set(self.names)) != n or not all(isinstance(s, str) and s for s in self.names):
            raise ValueError(f"expert names must be distinct non-empty strings, got {self.names}")
        if self.thresholds and self.boundary:
            raise ValueError("give either log-SNR `thresholds` or an official `boundary`, not both")
        given = self.thresholds or self.boundary
        if len(given) != n - 1:
            raise ValueError(f"{n} experts need {n - 1} cut(s) (thresholds or boundary), got {len(given)}")
        if any(not 0.0 < b < 1.0 for b in self.boundary):
            raise ValueError(f"boundary values must lie in (0, 1), got {self.boundary}")
        if any(not math.isfinite(c) for c in self.thresholds):
            raise ValueError(f"thresholds must be finite, got {self.thresholds}")
        if not (self.blend >= 0.0 and math.isfinite(self.blend)):
            raise ValueError(f"blend must be a finite half-width >= 0, got {self.blend}")
        cuts = self.cuts
        if any(b - a <= 0 for a, b in zip(cuts, cuts[1:])):
            raise ValueError(f"cuts must be ordered high noise first (log-SNR increasing), got {cuts}")
        if any(b - a < 2 * self.blend for a, b in zip(cuts, cuts[1:])):
            raise ValueError(f"blend bands of half-width {self.blend} overlap between cuts {cuts}")

    @property
    def cuts(self) -> tuple[float, ...]:
        """Cut points in log-SNR, increasing (high-noise expert first)."""
        return self.thresholds or tuple(boundary_to_log_snr(b) for b in self.boundary)


# A single model serving every noise level. Named "low" to match configs.py (PipelineConfig.experts for s2v-14B).
DENSE = ExpertSpec(names=("low",))


def _progress(sigma: float, j: int, spec: ExpertSpec) -> float:
    """How far past cut j (toward the lower-noise expert) a step at `sigma` is: 0, 1, or linear inside the band."""
    if spec.blend == 0.0:
        if spec.boundary:
            # The official rule, on the official int64 timestep.
            return 0.0 if math.trunc(sigma * NUM_TRAIN_TIMESTEPS) >= spec.boundary[j] * NUM_TRAIN_TIMESTEPS else 1.0
    return band_weight(log_snr_float(sigma), spec.cuts[j], spec.blend)


def band_weight(lam: float, cut: float, blend: float) -> float:
    """Weight of the lower-noise expert at log-SNR `lam`: clip((lam - cut + blend) / (2 blend), 0, 1).

    Exactly 0 at lam = cut - blend and exactly 1 at lam = cut + blend; with blend = 0, a step (lam >= cut -> 1).
    """
    if blend == 0.0:
        return 1.0 if lam >= cut else 0.0
    return min(1.0, max(0.0, (lam - cut + blend) / (2.0 * blend)))


def weights_at(sigma: float, spec: ExpertSpec) -> dict[str, float]:
    """{name: weight} of the experts active at one sigma (weights > 0, summing to 1), high noise first."""
    # Expert k gets p_{k-1} - p_k, with p_{-1} = 1 and p_{n-1} = 0. Bands do not overlap (validated), so at most one
    # p is fractional and every weight is exactly 0, 1, p or 1 - p.
    p = [1.0] + [_progress(sigma, j, spec) for j in range(len(spec.names) - 1)] + [0.0]
    weights = {name: p[k] - p[k + 1] for k, name in enumerate(spec.names)}
    return {name: w for name, w in weights.items() if w > 0.0}


def expert_weights(sigmas: Tensor | Sequence[float], spec: ExpertSpec) -> list[dict[str, float]]:
    """One {name: weight} dict per model evaluation of the schedule (its first len(sigmas) - 1 entries)."""
    s = sigmas.detach().to("cpu", torch.float64).tolist() if isinstance(sigmas, Tensor) else list(sigmas)
    if len(s) < 2:
        raise ValueError("a schedule needs at least 2 sigmas (steps + terminal)")
    return [weights_at(float(v), spec) for v in s[:-1]]


class ExpertRouter:
    """A denoise callable that sends each step to its experts and mixes them by the precomputed plan.

    Stateful only in its step counter: build one per sampling run (or call `reset()`), and call it exactly once per
    step in schedule order, as every solver in wanmoe.sampling.solvers does.
    """

    def __init__(
        self,
        denoisers: Mapping[str, Denoise],
        plan: list[dict[str, float]],
        hook: Callable[[int, tuple[str, ...]], None] | None = None,
    ) -> None:
        self.denoisers = dict(denoisers)
        self.plan = plan
        self.hook = hook
        self.step = 0  # index of the next call

    def reset(self) -> None:
        self.step = 0

    def needs(self, i: int) -> tuple[str, ...]:
        """Experts step `i` will call (empty past the end), for residency managers."""
        return tuple(self.plan[i]) if 0 <= i < len(self.plan) else ()

    def upcoming(self) -> tuple[str, ...]:
        """Experts the next call will run."""
        return self.needs(self.step)

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        if self.step >= len(self.plan):
            raise RuntimeError(f"router called {self.step + 1} times for a {len(self.plan)}-step plan; reset() it")
        i, weights = self.step, self.plan[self.step]
        self.step += 1
        if self.hook is not None:
            self.hook(i, tuple(weights))
        if len(weights) == 1:
            # A single expert is returned untouched (no multiply by 1.0), so hard switching is bit-exact.
            (name,) = weights
            return self.denoisers[name](x, sigma)
        out = None
        for name, w in weights.items():
            v = w * self.denoisers[name](x, sigma)
            out = v if out is None else out + v
        return out


def route(
    denoisers: Mapping[str, Denoise],
    spec: ExpertSpec,
    sigmas: Tensor,
    *,
    hook: Callable[[int, tuple[str, ...]], None] | None = None,
) -> ExpertRouter:
    """Compose per-expert denoisers into one denoise callable for this schedule (plan computed here, once)."""
    if set(denoisers) != set(spec.names):
        raise ValueError(f"denoisers must be given for exactly {spec.names}, got {sorted(denoisers)}")
    return ExpertRouter(denoisers, expert_weights(sigmas, spec), hook)


def expert_sigma_range(spec: ExpertSpec, name: str, *, include_band: bool = True) -> tuple[float, float]:
    """(sigma_min, sigma_max) of the noise levels `name` serves; with the band by default (it runs there too)."""
    if name not in spec.names:
        raise ValueError(f"unknown expert {name!r}; expected one of {spec.names}")
    k = spec.names.index(name)
    w = spec.blend if include_band else 0.0
    cuts = spec.cuts

    def sigma_at(j: int, side: float) -> float:
        if spec.boundary and w == 0.0:
            return spec.boundary[j]  # exact, no log round trip
        return 1.0 / (1.0 + math.exp(0.5 * (cuts[j] + side * w)))  # sigma = sigmoid(-lam / 2)

    sigma_max = 1.0 if k == 0 else sigma_at(k - 1, -1.0)
    sigma_min = 0.0 if k == len(spec.names) - 1 else sigma_at(k, +1.0)
    return sigma_min, sigma_max


def expert_timestep_range(spec: ExpertSpec, name: str, *, include_band: bool = True) -> tuple[float, float]:
    """`expert_sigma_range` in training timesteps (sigma * 1000)."""
    lo, hi = expert_sigma_range(spec, name, include_band=include_band)
    return lo * NUM_TRAIN_TIMESTEPS, hi * NUM_TRAIN_TIMESTEPS


def schedule_table(spec: ExpertSpec, sigmas: Tensor, guide_scale: Mapping[str, float] | float) -> list[dict]:
    """Rows (step, t, sigma, log_snr, experts, guide) of one schedule: which expert serves each step."""
    scales = per_expert_scale(guide_scale, spec.names)
    s = sigmas.tolist()
    rows = []
    for i, weights in enumerate(expert_weights(sigmas, spec)):
        rows.append(dict(step=i, t=math.trunc(s[i] * NUM_TRAIN_TIMESTEPS), sigma=s[i], log_snr=log_snr_float(s[i]),
                         experts=weights, guide={n: scales[n] for n in weights}))
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'step':>4} {'t':>4} {'sigma':>8} {'log-SNR':>8}  experts (weight)        guide"]
    for r in rows:
        who = ", ".join(f"{n}:{w:.3f}" for n, w in r["experts"].items())
        guide = ", ".join(f"{g:g}" for g in r["guide"].values())
        lines.append(f"{r['step']:>4} {r['t']:>4} {r['sigma']:>8.5f} {r['log_snr']:>8.3f}  {who:<24} {guide}")
    counts: dict[str, int] = {}
    for r in rows:
        for n in r["experts"]:
            counts[n] = counts.get(n, 0) + 1
    lines.append("steps per expert: " + ", ".join(f"{n} {c}" for n, c in counts.items()))
    return "\n".join(lines)
