"""Prompt-motion and long-audio measurements (wanmoe.eval.motion): the metric on ground-truth renders, and the
long-audio report on a short real run of the shipped model."""

import math

import numpy as np
import pytest
import torch

from wanmoe.eval import motion


@pytest.fixture(scope="module")
def gt_cases() -> list[dict]:
    return motion.motion_cases(2, 36)  # 2 held-out avatars x 4 styles, ground-truth renders only


def test_motion_energy_ranks_ground_truth(gt_cases: list[dict]) -> None:
    energy: dict[str, list[float]] = {}
    for c in gt_cases:
        energy.setdefault(c["style"], []).append(motion.motion_energy(c["sample"].video))
    assert set(energy) == {"still", "nod", "sway", "bob"}
    for style in ("nod", "sway", "bob"):
        for still, moving in zip(energy["still"], energy[style]):
            # The mouth opens and the eyes blink in "still" too; the centroid must not see them.
            assert still < 0.05 * moving, (style, still, moving)
            assert moving > 0.5  # pixels: every moving style displaces the outline by at least ~1 px
    # The same avatar's four cases share the reference image and audio; only the prompt's motion phrase differs.
    a = [c for c in gt_cases if c["seed"] == gt_cases[0]["seed"]]
    assert all(torch.equal(c["sample"].ref, a[0]["sample"].ref) for c in a)
    assert all(np.array_equal(c["sample"].audio, a[0]["sample"].audio) for c in a)
    assert len({c["sample"].prompt for c in a}) == 4


def test_motion_energy_units_and_constant_video(gt_cases: list[dict]) -> None:
    ref = gt_cases[0]["sample"].ref  # (3, H, W) rest pose
    constant = ref[:, None].repeat(1, 12, 1, 1)  # (3, T, H, W)
    assert motion.motion_energy(constant) == pytest.approx(0.0, abs=1e-9)
    assert motion.frame_difference(constant) == 0.0
    # Horizontal shifts of 0, +2, 0, -2 px (the background is uniform along a row, so rolling keeps it):
    # centroid offsets 0, 2, 0, 2 px from the mean -> RMS sqrt(2).
    shifted = torch.stack([torch.roll(ref, s, dims=2) for s in (0, 2, 0, -2) * 3], dim=1)  # (3, 12, H, W)
    assert motion.motion_energy(shifted) == pytest.approx(math.sqrt(2), rel=0.02)


def test_long_audio_report_detects_drift(gt_cases: list[dict], tmp_path) -> None:
    gt = gt_cases[1]["sample"].video  # (3, 36, H, W)
    same = motion.long_audio_report(gt.clone(), gt, fps=16.0, window_s=1.0)
    assert same["psnr_drop"] == 0.0 and same["drift_frame"] == 0.0 and same["holds"]
    washed = gt.clone()
    washed[:, -16:] = (washed[:, -16:] + 0.1).clamp(-1, 1)  # the last second brightened by ~13 levels
    rep = motion.long_audio_report(washed, gt, fps=16.0, window_s=1.0)
    assert rep["psnr_drop"] > 1.0 and rep["drift_frame"] > 5.0 and not rep["holds"]
    # A seam: frames 20-35 of the ground truth shifted down by 6 px, as if a new clip started there re-centred.
    seam = gt.clone()
    seam[:, 20:] = torch.roll(seam[:, 20:], 6, dims=2)
    rep = motion.long_audio_report(seam, gt, fps=16.0, window_s=1.0, seams=[20])
    assert rep["seam_gt"]["at_seams"] < 2 * rep["seam_gt"]["within_clips"] + 0.5  # the render has no seam
    assert rep["seam_model"]["at_seams"] > 5 * rep["seam_model"]["within_clips"]
    assert "seam_model" not in same
    # The strip shows the frames it says, where it says.
    from PIL import Image

    idx = motion.save_strip(tmp_path / "strip.png", [gt, washed], columns=3)
    img = torch.from_numpy(np.array(Image.open(tmp_path / "strip.png"))).permute(2, 0, 1).float() / 127.5 - 1
    h, w = gt.shape[2:]
    assert idx == [0, 18, 35]  # round(17.5) = 18
    assert (img[:, h + 2 :, 2 * (w + 2) :] - washed[:, 35]).abs().max() <= 1 / 127.5
    assert (img[:, :h, w + 2 : 2 * w + 2] - gt[:, 18]).abs().max() <= 1 / 127.5


def test_long_audio_tiny_run_is_finite(tmp_path) -> None:
    from PIL import Image

    import wanmoe

    torch.set_num_threads(1)
    pipe = wanmoe.load("s2v-mini")
    res = motion.run_long(pipe, seconds=3.0, source="procedural", window_s=1.0, strip=tmp_path / "s.png", steps=2)
    strip = Image.open(tmp_path / "s.png")  # ground truth above the model, STRIP_COLUMNS frames of 128x128
    assert strip.size == (motion.STRIP_COLUMNS * 130 - 2, 2 * 130 - 2)
    assert res["clips"] == 1 and res["window_frames"] == 16
    assert res["frames"] == 48 - pipe.cfg.dropped_frames(start_from_ref=False)
    nums = [res[k] for k in ("psnr_first", "psnr_last", "psnr_drop", "drift_frame", "drift_background")]
    nums += res["psnr_per_second"] + res["rgb_frame"]["drift"] + res["rgb_background"]["model_last"]
    assert all(math.isfinite(x) for x in nums)
    assert "Item 4" in motion.long_markdown(res)
