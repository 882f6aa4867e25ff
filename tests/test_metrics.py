"""Tests for wanmoe.eval.metrics and wanmoe.eval.report."""

import math
import shutil
import subprocess
import time
import wave

import numpy as np
import pytest
import torch

from wanmoe.data.avatar import MOUTH_INTERIOR, make_sample, render_from_audio, render_video, sample_params
from wanmoe.eval import metrics as M
from wanmoe.eval.report import markdown_table, write_report


def _noisy(v: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (v + std * torch.randn(v.shape, generator=g)).clamp(-1, 1)


@pytest.fixture(scope="module")
def sample():
    return make_sample(5, seconds=3.0, size=64)


def test_psnr_identical_capped_analytic_and_monotone(sample):
    v = sample.video
    assert M.psnr(v, v) == 100.0
    # Constant offset 0.1 in [-1, 1] = 0.05 on [0, 1]: PSNR = 10 log10(1 / 0.0025).
    a = torch.zeros(3, 2, 8, 8)
    assert M.psnr(a, a + 0.1) == pytest.approx(10 * math.log10(1 / 0.0025), rel=1e-6)
    vals = [M.psnr(v, _noisy(v, s)) for s in (0.02, 0.1, 0.4)]
    assert vals[0] > vals[1] > vals[2]
    with pytest.raises(ValueError, match="shape"):
        M.psnr(v, v[:, :2])


def test_ssim_range_identity_and_analytic():
    torch.manual_seed(0)
    v = make_sample(2, seconds=0.5, size=48).video
    for mode in ("luma", "rgb"):
        assert M.ssim(v, v, mode=mode) == pytest.approx(1.0, abs=1e-9)
        vals = [M.ssim(v, _noisy(v, s), mode=mode) for s in (0.02, 0.1, 0.5)]
        assert all(0.0 <= x <= 1.0 for x in vals) and vals[0] > vals[1] > vals[2]
    # Two constant images: SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1) (variances are zero).
    a, b = torch.full((3, 1, 16, 16), -0.2), torch.full((3, 1, 16, 16), 0.4)  # 0.4 and 0.7 on [0, 1]
    c1 = 0.01**2
    assert M.ssim(a, b) == pytest.approx((2 * 0.4 * 0.7 + c1) / (0.4**2 + 0.7**2 + c1), rel=1e-6)  # float32 inputs
    with pytest.raises(ValueError, match="mode"):
        M.ssim(v, v, mode="lab")


def test_flow_consistency_smooth_beats_shuffled(sample):
    # A blurred random texture translating one pixel per frame: flow explains it almost exactly.
    g = torch.Generator().manual_seed(0)
    tex = torch.nn.functional.avg_pool2d(torch.rand(3, 1, 80, 80, generator=g), 5, 1, 2)[:, 0]  # (3, H, W)
    smooth = torch.stack([torch.roll(tex, shifts=(k, k), dims=(1, 2)) for k in range(8)], 1) * 2 - 1
    shuffled = smooth[:, torch.randperm(8, generator=g)]
    s_smooth, s_shuf = M.flow_consistency(smooth), M.flow_consistency(shuffled)
    assert 0 <= s_shuf < s_smooth <= 1 and s_smooth > 0.97
    assert s_smooth - s_shuf > 0.01
    # Also on the avatar itself (flat colours, so the gap is smaller but must exist).
    v = sample.video[:, :16]
    perm = torch.randperm(16, generator=g)
    assert M.flow_consistency(v) > M.flow_consistency(v[:, perm])
    # Flicker (independent noise per frame) is not explained by motion.
    assert M.flow_consistency(_noisy(v, 0.1)) < M.flow_consistency(v) - 0.02


def test_mouth_sync_ground_truth_high(sample):
    r = M.mouth_sync(sample.video, sample.envelope, sample.ref)
    assert r["sync"] >= 0.8 and r["sync_best"] >= r["sync"] and r["sync_lag"] == 0
    region = M.locate_mouth(sample.ref)
    assert region.y1 - region.y0 < 32 and region.y0 > 32  # below the middle of a 64 px frame
    # A video delayed by 2 frames is found at lag +2.
    late = torch.cat([sample.video[:, :1].expand(-1, 2, -1, -1), sample.video[:, :-2]], 1)
    r_late = M.mouth_sync(late, sample.envelope, sample.ref)
    assert r_late["sync_lag"] == 2 and r_late["sync_best"] > r_late["sync"]


def test_mouth_sync_near_zero_when_mouth_ignores_audio():
    rs = []
    rs, shut_rs = [], []
    for seed in range(3):
        s = make_sample(seed, seconds=8.0, size=32)
        other = make_sample(seed + 500, seconds=8.0, size=32)  # someone else's speech drives the mouth
        rs.append(M.mouth_sync(render_video(s.params, other.envelope, 16, 32), s.envelope, s.ref)["sync"])
        # Mouth shut throughout (head motion and blinks still happen).
        shut = render_video(s.params, np.zeros(len(s.envelope)), 16, 32)
        shut_rs.append(M.mouth_sync(shut, s.envelope, s.ref)["sync"])
    assert abs(float(np.mean(rs))) < 0.3, rs
    assert max(abs(r) for r in shut_rs) < 0.3, shut_rs


def _espeak_wav(path) -> tuple[np.ndarray, int]:
    exe = shutil.which("espeak-ng")
    if exe is None:
        pytest.fail("espeak-ng is not on PATH: install it (apt-get install espeak-ng); CI installs it")
    text = "The quick brown fox jumps over the lazy dog, and then it rests for a while."
    subprocess.run([exe, "-w", str(path), text], check=True, capture_output=True)
    with wave.open(str(path)) as f:
        assert f.getsampwidth() == 2 and f.getnchannels() == 1
        sr = f.getframerate()
        audio = np.frombuffer(f.readframes(f.getnframes()), dtype=np.int16).astype(np.float32) / 32768
    return audio, sr


def test_real_speech_sync(tmp_path):
    audio, sr = _espeak_wav(tmp_path / "speech.wav")
    assert audio.size > sr  # more than a second of speech
    s = render_from_audio(sample_params(9), audio, sr, 16, 48)
    assert M.mouth_sync(s.video, s.envelope, s.ref)["sync"] >= 0.5


def test_identity_similarity(sample):
    same = M.identity_similarity(sample.video, sample.ref)
    other = M.identity_similarity(make_sample(6, seconds=0.5, size=64).video, sample.ref)
    assert 0.95 < same <= 1.0 + 1e-9 and other < same - 0.2
    assert M.identity_similarity(sample.ref, sample.ref) == pytest.approx(1.0)


def test_mouth_colour_matches_dataset():
    assert tuple(M._MOUTH_RGB) == MOUTH_INTERIOR


def test_pearson():
    x = np.arange(10.0)
    assert M.pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert M.pearson(x, -x) == pytest.approx(-1.0)
    assert M.pearson(x, np.ones(10)) == 0.0


def test_timing_and_memory_helpers():
    with M.timed() as t:
        time.sleep(0.02)
    assert 0.015 < t.seconds < 2.0
    assert M.peak_rss_mb() > 10
    if not torch.cuda.is_available():
        assert M.cuda_peak_mb() is None


def test_report_table_and_plot(tmp_path):
    rows = {"one-expert": {"psnr": 21.5, "sync": 0.61}, "two-expert": {"psnr": 23.25, "sync": 0.8, "sec": 1.5}}
    table = markdown_table(rows)
    lines = table.strip().splitlines()
    assert lines[0] == "| setup | psnr | sync | sec |" and len(lines) == 4
    assert "| one-expert | 21.5 | 0.61 |  |" in table and "| two-expert | 23.25 | 0.8 | 1.5 |" in table
    md = write_report(rows, tmp_path / "rep", title="cmp")
    png = tmp_path / "rep" / "metrics.png"
    assert md.read_text().startswith("# cmp") and "metrics.png" in md.read_text()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
    with pytest.raises(ValueError):
        markdown_table({})
