"""Tests for the procedural talking-avatar dataset (wanmoe.data.avatar, wanmoe.data.speech)."""

import time

import numpy as np
import pytest
import torch

from wanmoe.data.avatar import (
    MOTIONS,
    AvatarDataset,
    AvatarParams,
    make_sample,
    mouth_opening,
    render_from_audio,
    render_reference,
    render_video,
    sample_params,
    split_seeds,
)
from wanmoe.data.speech import loudness_envelope, synthesize_speech


def test_same_seed_identical_sample_and_different_seed_differs():
    a, b = make_sample(7, seconds=1.0, size=48), make_sample(7, seconds=1.0, size=48)
    assert torch.equal(a.video, b.video) and torch.equal(a.ref, b.ref)
    assert np.array_equal(a.audio, b.audio) and a.prompt == b.prompt and a.params == b.params
    c = make_sample(8, seconds=1.0, size=48)
    assert not torch.equal(a.video, c.video)
    assert not np.array_equal(a.audio, c.audio)


def test_shapes_ranges_and_any_size():
    s = make_sample(3, seconds=1.0, size=(40, 72), fps=16)
    assert s.video.shape == (3, 16, 40, 72) and s.video.dtype == torch.float32
    assert s.ref.shape == (3, 40, 72)
    assert s.audio.dtype == np.float32 and s.audio.shape == (16000,) and s.sr == 16000
    assert s.mouth.shape == (16,) and s.envelope.shape == (16,)
    assert float(s.video.min()) >= -1 and float(s.video.max()) <= 1
    assert float(s.mouth.min()) >= 0 and float(s.mouth.max()) <= 1
    assert np.abs(s.audio).max() <= 1.0
    # frames= overrides seconds (4k+1 frames for the temporal VAE).
    assert make_sample(3, frames=17, size=32).video.shape[1] == 17


def test_prompt_describes_params():
    for seed in range(20):
        p = sample_params(seed)
        prompt = p.prompt
        assert p.face_color in prompt and p.bg_color in prompt and p.face_shape in prompt
        assert MOTIONS[p.motion] in prompt and prompt.endswith("while talking")
    assert {sample_params(s).motion for s in range(40)} == set(MOTIONS)


def test_invalid_params_raise():
    p = sample_params(0)
    with pytest.raises(ValueError, match="motion"):
        AvatarParams(**{**p.__dict__, "motion": "dance"})
    with pytest.raises(ValueError, match="size"):
        render_reference(p, 8)
    with pytest.raises(ValueError, match="split"):
        split_seeds("test")


def test_mouth_follows_loudness():
    s = make_sample(11, seconds=4.0, size=32)
    # Ground truth is a function of the envelope of the audio actually returned.
    env = loudness_envelope(s.audio, s.sr, s.fps)
    assert np.allclose(env, s.envelope.numpy())
    assert np.corrcoef(s.mouth.numpy(), env)[0, 1] > 0.9
    # And of the raw audio energy per frame (not just of our own envelope definition).
    frame = s.sr // 16
    rms = np.sqrt((s.audio[: frame * 64].reshape(64, frame).astype(np.float64) ** 2).mean(1))
    assert np.corrcoef(s.mouth.numpy(), rms)[0, 1] > 0.7
    # Speech has pauses and open syllables.
    assert s.mouth.min() < 0.05 and s.mouth.max() > 0.8


def test_mouth_pixels_grow_with_opening():
    p = AvatarParams(**{**sample_params(2).__dict__, "motion": "still", "blink_period": 100.0, "blink_phase": 50.0})
    v = render_video(p, np.linspace(0, 1, 8), 16, 64)
    dark = ((v + 1) / 2).mean(0).lt(0.2).flatten(1).sum(1)  # dark-pixel count per frame (mouth, pupils)
    assert torch.all(dark[1:] >= dark[:-1]) and dark[-1] > dark[0] + 20


def test_syllable_rate_slow_enough_for_vae_stride():
    # Average 4-frame pooling (a 4x temporal VAE stride) keeps most of the mouth signal's variance.
    kept = []
    for seed in range(3):
        m = make_sample(seed, seconds=6.0, size=16).mouth.numpy()
        kept.append(m.reshape(-1, 4).mean(1).var() / m.var())
    assert np.mean(kept) > 0.4


def test_head_motion_and_blink_change_frames_with_silence():
    silent = np.zeros(32)
    for motion in ("nod", "sway", "bob"):
        p = AvatarParams(**{**sample_params(5).__dict__, "motion": motion, "motion_hz": 1.0})
        v = render_video(p, silent, 16, 32)
        assert (v - v[:, :1]).abs().amax() > 0.5, motion  # the head moved by at least ~a pixel
    still = AvatarParams(**{**sample_params(5).__dict__, "motion": "still", "blink_period": 100.0,
                            "blink_phase": 50.0})
    v = render_video(still, silent, 16, 32)
    assert torch.allclose(v, v[:, :1].expand_as(v))  # nothing moves: no speech, no blink, still head
    assert torch.allclose(v[:, 0], render_reference(still, 32), atol=1e-5)


def test_render_speed():
    p = sample_params(1)
    env = loudness_envelope(synthesize_speech(1, 4.0), 16000, 16)
    render_video(p, env, 16, 128)  # warm-up
    # CPU time of this process, not wall time: the test machine is shared, wall time is noise.
    t0 = time.process_time()
    render_video(p, env, 16, 128)
    assert time.process_time() - t0 < 1.0 * torch.get_num_threads()


def test_render_from_any_audio():
    sr = 22050
    t = np.arange(2 * sr) / sr
    audio = (np.sin(2 * np.pi * 200 * t) * (np.sin(2 * np.pi * 1.5 * t) > 0)).astype(np.float32)
    s = render_from_audio(sample_params(4), audio, sr, 16, 32)
    assert s.video.shape == (3, 32, 32, 32) and s.sr == sr
    assert np.allclose(s.mouth.numpy(), mouth_opening(s.envelope).numpy())
    assert loudness_envelope(np.zeros(16000, np.float32), 16000, 16).max() == 0


def test_splits_disjoint_and_dataset():
    tr, ho = split_seeds("train"), split_seeds("heldout")
    assert set(split_seeds("train", 1000)).isdisjoint(ho) and tr.stop <= ho.start
    ds = AvatarDataset("heldout", 3, seconds=0.5, size=24)
    assert len(ds) == 3 and ds[1].params.seed == ho[1]
    assert torch.equal(ds[1].video, make_sample(ho[1], 0.5, 24).video)
