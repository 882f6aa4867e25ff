"""Step distillation of the embedded model (wanmoe.train.distill, `wanmoe train distill`)."""

from __future__ import annotations

import json

import pytest
import torch

from wanmoe import lora as lo
from wanmoe.configs import PRESETS

MINI = PRESETS["s2v-mini"]


def test_schedule_matches_the_teacher_grid_and_switches_experts():
    from wanmoe.sampling.schedules import flow_sigmas
    from wanmoe.train.distill import fast_sigmas, step_experts, teacher_indices

    s = fast_sigmas(MINI, 2)
    teacher = flow_sigmas(20, MINI.sample_shift)  # the 20-step UniPC grid
    assert teacher_indices(2) == [0, 10, 20]
    assert abs(float(s[1] - teacher[10])) < 1e-3 and s[-1] == 0  # the student lands where the teacher passes
    assert step_experts(MINI, s) == ["high", "low"]  # one step per expert: the switch is inside the schedule
    with pytest.raises(ValueError, match="divide"):
        teacher_indices(3)


def test_smoke_training_writes_loras_that_load_and_resume(tmp_path):
    """`wanmoe train distill --smoke`: teacher trajectories for 2 avatars, 2 steps per expert, one file each."""
    from safetensors import safe_open

    import wanmoe
    from wanmoe.train.cli import main

    assert main(["distill", "--smoke", "--quiet", "--out", str(tmp_path)]) == 0
    for e in MINI.experts:
        f = tmp_path / f"fast_{e}.safetensors"
        with safe_open(str(f), "pt") as h:
            assert h.metadata()["expert"] == e and h.metadata()["steps"] == "2"
        assert lo.check_lora_file(f, MINI.dit) == []
    assert main(["distill", "--smoke", "--quiet", "--out", str(tmp_path), "--steps", "3"]) == 0  # resumes
    assert json.loads((tmp_path / "fast_low_loss.jsonl").read_text().splitlines()[-1])["step"] == 3
    from wanmoe.pipeline import draw_noise
    from wanmoe.train.distill import TeacherSet

    t = TeacherSet.load(tmp_path / "teacher2_0.pt")  # 2 avatars: noise, state at sigma_1, final latent
    assert t.states.shape[:2] == (2, 3) and t.seeds.tolist() == [0, 1] and torch.isfinite(t.states).all()
    assert torch.equal(t.states[0, 0], draw_noise((1, *t.states.shape[2:]), 10_000, torch.device("cpu"))[0])
    ck = torch.load(tmp_path / "fast_high.pt", weights_only=True)
    assert int(ck["step"]) == 3
    pipe = wanmoe.load("s2v-mini")
    pipe.load_lora(tmp_path / "fast_high.safetensors", experts="high")
    pipe.load_lora(tmp_path / "fast_low.safetensors", experts="low")
    assert [d["scale"] for d in pipe.loras] == [{"high": 1.0}, {"low": 1.0}]



def test_shipped_distilled_option_reproduces_the_20_step_video():
    """`load(..., distilled=True)` / `--distilled`: both experts carry their LoRA, 2 Euler steps become the default,
    and the 2-step video is closer to the 20-step video than the base model's 2 steps (what the LoRAs were
    trained for), on the shipped example."""
    import wanmoe
    from wanmoe.eval.metrics import psnr
    from wanmoe.request import InputError

    kw = dict(seed=0)  # whole default clip: the LoRAs were trained on 68-frame clips (28 frames: +1.8 dB only)
    pipe = wanmoe.load("s2v-mini")
    ref = pipe(**kw).frames  # the 20-step default
    base = pipe(steps=2, solver="euler", motion_scale=1.0, **kw).frames
    pipe.use_distilled()
    assert pipe.request().steps == 2 and pipe.request().solver == "euler" and pipe.request(steps=3).steps == 3
    assert sorted(e for d in pipe.loras for e in d["scale"]) == ["high", "low"]
    fast = pipe(**kw).frames
    gain = psnr(fast, ref) - psnr(base, ref)
    assert gain > 3.0, gain  # 25.4 -> 31.7 dB here (round 8; 26.4 -> 33.2 on round 5, docs/results.md)
    with pytest.raises(InputError, match="distilled"):
        wanmoe.load("t2v-tiny", distilled=True)


def test_cli_distilled_flag(tmp_path):
    from wanmoe.cli import main

    assert main(["generate", "--task", "t2v-tiny", "--distilled", "--save_file", str(tmp_path / "x.mp4")]) == 2
    assert not list(tmp_path.iterdir())
