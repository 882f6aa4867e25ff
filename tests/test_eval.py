"""Evaluates the shipped embedded model on held-out samples (issue 5's acceptance checks)."""

from __future__ import annotations

import json
import shutil

import pytest

from wanmoe.configs import ASSETS
from wanmoe.eval import cli as eval_cli

# The short evaluation: the shipped model at its shipped settings (one 68-frame clip per sample, 20 steps, audio
# guidance 2), on 3 held-out samples and the first 3 of the 6 real-speech sentences, "two" and "one" side by side
# (a process and one thread each: both cores work, and another process on the machine does not stall a
# two-thread team). The full evaluation (`wanmoe eval --n 3 --speech 6`,
# docs/results.md) runs all six sentences. Measured on the shipped model (round 8, docs/results.md), why this and no
# less:
# - 3 held-out samples: two experts lead on PSNR on each (18.6 / 17.0 / 19.1 dB against 14.7 / 14.7 / 17.9) and
#   keep the reference's colours (identity 0.76 against 0.40); SSIM is level (0.833 vs 0.839, one model ahead on
#   the first sample by 0.026, within 0.004 on the others).
# - 68 frames, the length the model was trained at; 20 steps, the default: the shipped claim is about the
#   shipped settings (on round 5, shorter clips flipped the SSIM comparison).
# - 3 sentences: their mean sync is 0.58 (0.51, 0.64, 0.59; the other three: 0.35, 0.45, 0.59; all six 0.52);
#   one or two sentences would test less speech.
# - sync 0.71 and the control -0.06 are over the held-out samples, the same in the full run.
SHORT_EVAL = ["--n", "3", "--setups", "two,one", "--speech", "3", "--jobs", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    assert shutil.which("espeak-ng") or shutil.which("espeak"), "espeak-ng is required (CI installs it)"
    assert eval_cli.main([*SHORT_EVAL, "--out", str(out)]) == 0
    assert (out / "report.md").is_file() and (out / "metrics.png").is_file()
    return json.loads((out / "results.json").read_text())["rows"]


def test_shipped_model_is_present():
    root = ASSETS / "s2v-mini"
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert size < 50 * 2**20, f"embedded model is {size / 2**20:.1f} MiB, over the 50 MiB budget"
    for rel in ("high_noise_model/config.json", "low_noise_model/config.json", "single_expert/config.json",
                "vae.safetensors", "byte_text_encoder.safetensors", "example/ref.png", "example/audio.wav"):
        assert (root / rel).is_file(), rel


def test_two_experts_beat_one_on_psnr_and_identity_and_match_it_on_ssim(results):
    """What docs/results.md claims for the shipped weights: two experts ahead of one on PSNR by a wide margin
    (2.5 dB in the full run) and on keeping the reference's colours, level on SSIM (neither ahead by more than
    the per-sample spread)."""
    two, one = results["two"], results["one"]
    assert two["psnr"] > one["psnr"] + 1.0, (two["psnr"], one["psnr"])
    assert two["identity"] > one["identity"] + 0.1, (two["identity"], one["identity"])
    assert abs(two["ssim"] - one["ssim"]) < 0.02, (two["ssim"], one["ssim"])


def test_mouth_follows_the_audio_on_heldout_audio(results):
    # Issue 5's target: audio-mouth sync >= 0.5 at lag 0, on held-out audio and on real synthesized speech (the
    # mean over espeak-ng sentences no training clip speaks, here the first three of the full run's six; the
    # weakest is lower, docs/results.md).
    two = results["two"]
    assert two["gt_sync"] > 0.9  # the metric sees the ground truth's mouth follow the audio
    assert two["sync"] >= 0.5, two["sync"]
    assert two["sync_speech"] >= 0.5, (two["sync_speech"], two["sync_speech_min"])
    # It is this audio that drives the mouth: against another case's envelope the same frames score near 0.
    assert abs(two["sync_other"]) < 0.3 and two["sync"] - two["sync_other"] > 0.4, (two["sync"], two["sync_other"])


def test_speech_samples_are_held_out_and_bounded(tmp_path):
    from wanmoe.data.espeak import WORDS

    # The real-speech eval sentences are written by hand: not strings of training words only.
    for text, _ in eval_cli.SPEECH_CASES:
        words = [w.strip(".,").lower() for w in text.split()]
        assert any(w not in WORDS for w in words), text
    assert len({t for t, _ in eval_cli.SPEECH_CASES}) == len(eval_cli.SPEECH_CASES)
    with pytest.raises(SystemExit):
        eval_cli.main(["--speech", str(len(eval_cli.SPEECH_CASES) + 1), "--out", str(tmp_path)])


def test_still_control_is_the_reference_held_still(tmp_path):
    """The 'still' set-up runs no model: the reference (as the pipeline reads the PNG) repeated for the frames the
    model makes; its picture metrics are those of that still video, and its mouth sync is 0."""
    import torch

    from wanmoe.eval import metrics as m

    cases = eval_cli.held_out_cases(1, 68, 0, tmp_path)
    res = eval_cli.run_setup("s2v-mini", None, {}, {}, cases, seed=0)
    s = cases[0]["sample"]
    gt = s.video[:, eval_cli.DROPPED : 68]
    ref = ((s.ref.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1  # the PNG's uint8 values
    still = ref[:, None].expand(-1, gt.shape[1], -1, -1)
    assert res["psnr"] == pytest.approx(m.psnr(still, gt), abs=1e-4)
    assert res["sync"] == 0 and res["identity"] == pytest.approx(1.0, abs=1e-6)
    assert not res["cases"][0]["sync_other"] and torch.isfinite(torch.tensor(res["ssim"]))
