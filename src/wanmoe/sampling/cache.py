"""Step caching per expert: skip a transformer evaluation when its output is predictable from the last one.

In the style of MagCache (Ma et al. 2025) and TeaCache (Liu et al. 2025): how much a flow model's velocity changes
from one step to the next is smooth in the noise level and nearly the same for every input, so it can be calibrated
once per model from uncached runs. A step whose predicted change is small reuses the expert's last computed
velocity, rescaled by the calibrated magnitude ratio, instead of running the transformer (with CFG, all of its
passes). Errors accumulate: after a real evaluation, the predicted relative change mean|v_i - v_j| / mean|v_j| summed
over the skipped steps must stay under `threshold`, and at most `max_skips` steps in a row are skipped. An expert's
first step and the step after a switch between experts always run (the velocity of another expert is not a
prediction of this one's).

The calibration is a function of log-SNR, not of the step index, so one calibration serves any step count, shift
or solver. For each expert it holds samples of g(lam) = d log mean|v| / d lam (the magnitude ratio between two
steps is exp(g (lam_i - lam_{i-1}))) and of c(lam) = relative change per unit lam (the predicted reuse error of
a step is c |lam_i - lam_{i-1}|), interpolated linearly at the midpoint of the step.

Axis legend: v and x have the latent shape (B, C, F, H, W); only elementwise ops and a scalar norm happen here.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from wanmoe.sampling.schedules import log_snr_float

Denoise = Callable[[Tensor, Tensor], Tensor]
CALIBRATION_FILE = "step_cache.json"


@dataclass
class Calibration:
    """Per expert: (lam, g, c) samples sorted by lam, from uncached runs (see the module docstring)."""

    samples: dict[str, list[tuple[float, float, float]]] = field(default_factory=dict)

    def _at(self, expert: str, lam: float) -> tuple[float, float]:
        pts = self.samples.get(expert)
        if not pts:
            raise KeyError(expert)
        xs = [p[0] for p in pts]
        k = bisect.bisect_left(xs, lam)
        if k == 0 or k == len(pts):
            _, g, c = pts[min(k, len(pts) - 1)]
            return g, c
        (x0, g0, c0), (x1, g1, c1) = pts[k - 1], pts[k]
        w = (lam - x0) / (x1 - x0) if x1 > x0 else 1.0
        return g0 + (g1 - g0) * w, c0 + (c1 - c0) * w

    def ratio(self, expert: str, lam_prev: float, lam: float) -> float:
        """Predicted mean|v| at `lam` over mean|v| at `lam_prev` for this expert."""
        g, _ = self._at(expert, 0.5 * (lam_prev + lam))
        return math.exp(g * (lam - lam_prev))

    def change(self, expert: str, lam_prev: float, lam: float) -> float:
        """Predicted relative change of the velocity between the two noise levels."""
        _, c = self._at(expert, 0.5 * (lam_prev + lam))
        return c * abs(lam - lam_prev)

    def to_json(self) -> dict:
        return {"version": 2, "columns": ["log_snr", "dlog_magnitude_dlam", "relative_change_per_lam"],
                "experts": {n: [list(p) for p in pts] for n, pts in self.samples.items()}}

    @classmethod
    def from_json(cls, d: Mapping) -> Calibration:
        if not isinstance(d, Mapping) or d.get("version") != 2 or not isinstance(d.get("experts"), Mapping):
            raise ValueError("not a step-cache calibration (expected {'version': 2, 'experts': {...}})")
        out = {}
        for name, pts in d["experts"].items():
            rows = sorted(tuple(float(v) for v in p) for p in pts)
            if not all(len(r) == 3 and all(math.isfinite(v) for v in r) and r[2] >= 0 for r in rows):
                raise ValueError(f"bad calibration samples for expert {name!r}")
            out[str(name)] = rows
        return cls(out)

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None


class Recorder:
    """Watches every real evaluation of uncached runs; `calibration()` turns them into per-expert samples."""

    def __init__(self) -> None:
        self.steps: dict[tuple[str, float], list[tuple[float, float]]] = {}  # (expert, mid lam) -> [(g, c)]
        self._last: dict[str, tuple[float, Tensor]] = {}

    def start_run(self) -> None:
        self._last = {}

    def wrap(self, name: str, denoise: Denoise) -> Denoise:
        def f(x: Tensor, sigma: Tensor) -> Tensor:
            v = denoise(x, sigma)
            lam = log_snr_float(float(sigma))
            prev = self._last.get(name)
            if prev is not None and prev[0] != lam:
                lam0, v0 = prev
                m0, m1 = float(v0.abs().mean()), float(v.abs().mean())
                if m0 > 0 and m1 > 0:
                    d = lam - lam0
                    g = (math.log(m1) - math.log(m0)) / d
                    c = float((v - v0).abs().mean()) / m0 / abs(d)
                    self.steps.setdefault((name, round(0.5 * (lam0 + lam), 6)), []).append((g, c))
            self._last[name] = (lam, v.detach().clone())
            return v

        return f

    def calibration(self) -> Calibration:
        out: dict[str, list[tuple[float, float, float]]] = {}
        for (name, lam), vals in sorted(self.steps.items()):
            out.setdefault(name, []).append((lam, sum(g for g, _ in vals) / len(vals),
                                             max(c for _, c in vals)))  # the worst change seen: a cautious guess
        return Calibration(out)


@dataclass
class CacheStats:
    computed: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)


class StepCache:
    """Per-expert skipping for one sampling run. `step()` must return the index of the step being evaluated
    (the expert router's counter), `plan` is the router's plan (experts per step), `lams` the log-SNR per step."""

    def __init__(self, calibration: Calibration, plan: list[dict[str, float]], lams: list[float], threshold: float,
                 max_skips: int, step: Callable[[], int], stats: CacheStats | None = None) -> None:
        self.cal, self.plan, self.lams = calibration, plan, lams
        self.threshold, self.max_skips, self.step = threshold, max_skips, step
        self.stats = stats or CacheStats()
        self.state: dict[str, dict] = {}

    def wrap(self, name: str, denoise: Denoise) -> Denoise:
        st = self.state.setdefault(name, {"v": None, "last": -2, "err": 0.0, "skips": 0, "scale": 1.0})

        def f(x: Tensor, sigma: Tensor) -> Tensor:
            i = self.step()
            follows = st["v"] is not None and st["last"] == i - 1 and name in self.plan[i - 1]
            if follows and st["skips"] < self.max_skips:
                r = self.cal.ratio(name, self.lams[i - 1], self.lams[i])
                err = st["err"] + self.cal.change(name, self.lams[i - 1], self.lams[i])
                if err <= self.threshold:
                    st["err"] = err
                    st["skips"] += 1
                    st["scale"] *= r
                    st["last"] = i
                    self.stats.skipped[name] = self.stats.skipped.get(name, 0) + 1
                    return st["v"] * st["scale"]
            v = denoise(x, sigma)
            st.update(v=v, last=i, err=0.0, skips=0, scale=1.0)
            self.stats.computed[name] = self.stats.computed.get(name, 0) + 1
            return v

        return f
