"""Test-only loader for the official Wan2.2 flow solvers (wan/utils/fm_solvers*.py), used as oracles.

`import wan` fails on CPU (it touches CUDA / flash_attn at import), so the two solver files are loaded directly by
path; they depend only on diffusers, numpy and torch.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch


def _wan_utils_dir() -> Path:
    spec = importlib.util.find_spec("wan")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the official `wan22` package (import path `wan`) is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "utils"


def load(name: str):
    """Load wan/utils/<name>.py as a standalone module (cached in sys.modules under a private name)."""
    key = f"_oracle_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, _wan_utils_dir() / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


def official_schedule(solver: str, steps: int, shift: float):
    """The scheduler object and the int64 timesteps, set up exactly as wan/text2video.py does."""
    if solver == "unipc":
        cls = load("fm_solvers_unipc").FlowUniPCMultistepScheduler
        sched = cls(num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)
        sched.set_timesteps(steps, device="cpu", shift=shift)
        return sched, sched.timesteps
    if solver == "dpm++":
        mod = load("fm_solvers")
        sched = mod.FlowDPMSolverMultistepScheduler(num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)
        sampling_sigmas = mod.get_sampling_sigmas(steps, shift)
        ts, _ = mod.retrieve_timesteps(sched, device="cpu", sigmas=sampling_sigmas)
        return sched, ts
    raise ValueError(solver)


def official_sample(solver: str, steps: int, shift: float, model, x: torch.Tensor) -> torch.Tensor:
    """Run the official denoising loop: model(x, t) -> velocity, then scheduler.step."""
    sched, ts = official_schedule(solver, steps, shift)
    for t in ts:
        v = model(x, t)
        x = sched.step(v, t, x, return_dict=False)[0]
    return x
