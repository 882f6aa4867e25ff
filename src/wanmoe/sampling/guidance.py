"""Classifier-free guidance as wrappers that compose denoise callables.

A denoise callable is `denoise(x, sigma) -> velocity` (see wanmoe.sampling.solvers). Guidance mixes two of them,
one conditioned and one with the "unconditional" conditioning (negative prompt, zeroed audio, ...). Scales are per
expert and named ({"high": 4.0, "low": 3.0}); a single number applies to every expert.

Axis legend: x and the predictions have the caller's latent shape, usually (B, C, F, H, W); only elementwise ops.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from torch import Tensor

Denoise = Callable[[Tensor, Tensor], Tensor]


def cfg(cond: Denoise, uncond: Denoise, scale: float) -> Denoise:
    """v = v_uncond + scale * (v_cond - v_uncond) (Ho & Salimans 2022, eq. 6; noise_pred of the official pipelines).

    scale == 1 returns `cond` itself: the formula reduces to v_cond, so the unconditional pass is skipped (the result
    differs from the official two-pass arithmetic only by float rounding).
    """
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"guidance scale must be finite, got {scale}")
    if scale == 1.0:
        return cond

    def guided(x: Tensor, sigma: Tensor) -> Tensor:
        v_uncond = uncond(x, sigma)
        return v_uncond + scale * (cond(x, sigma) - v_uncond)

    return guided


def per_expert_scale(scale: float | Mapping[str, float], names: Sequence[str]) -> dict[str, float]:
    """Expand a guidance scale to {expert name: scale}. A number applies to all; a dict must name every expert."""
    names = tuple(names)
    if isinstance(scale, Mapping):
        missing = [n for n in names if n not in scale]
        extra = [k for k in scale if k not in names]
        if missing or extra:
            raise ValueError(
                f"guidance scales must name exactly the experts {names}; missing {missing}, unknown {extra}"
            )
        return {n: float(scale[n]) for n in names}
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"guidance scale must be a number or a dict name -> number, got {type(scale).__name__}")
    return {n: float(scale) for n in names}


def cfg_per_expert(
    cond: Mapping[str, Denoise], uncond: Mapping[str, Denoise], scale: float | Mapping[str, float]
) -> dict[str, Denoise]:
    """Wrap each expert's (cond, uncond) pair with its own scale; the result feeds `wanmoe.experts.route`."""
    if set(cond) != set(uncond):
        raise ValueError(f"cond and uncond must name the same experts, got {sorted(cond)} and {sorted(uncond)}")
    scales = per_expert_scale(scale, tuple(cond))
    return {name: cfg(cond[name], uncond[name], scales[name]) for name in cond}
