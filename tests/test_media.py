"""Tests for wanmoe.media: mp4 writing (H.264 + AAC, cut to shorter, atomic), audio/image reading."""

import os
import wave

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")

from wanmoe import media  # noqa: E402
from wanmoe.media import (  # noqa: E402
    audio_is_silent,
    probe_video,
    read_audio,
    read_image,
    read_video,
    save_png,
    write_video,
)

SR = 16000


def _tone(seconds: float, sr: int = SR, freq: float = 440.0, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _smooth_video(t: int, h: int, w: int) -> torch.Tensor:
    # Smooth gradients survive H.264 + yuv420p far better than noise, so round trips can be checked tightly.
    yy = torch.linspace(-0.8, 0.8, h)[:, None].expand(h, w)
    xx = torch.linspace(-0.8, 0.8, w)[None, :].expand(h, w)
    frames = [torch.stack([yy, xx, torch.full((h, w), -0.8 + 1.6 * i / max(t - 1, 1))]) for i in range(t)]
    return torch.stack(frames, dim=1)  # (3, T, H, W)


def _write_wav(path, audio: np.ndarray, sr: int, channels: int = 1) -> None:
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    if channels > 1:
        pcm = np.repeat(pcm[:, None], channels, axis=1)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(2)
        f.setframerate(sr)
        f.writeframes(pcm.tobytes())


def _write_mp3(path, audio: np.ndarray, sr: int) -> None:
    with av.open(str(path), "w", format="mp3") as c:
        s = c.add_stream("libmp3lame", rate=sr, layout="mono")
        n = 1152
        for i in range(0, len(audio), n):
            fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio[None, i : i + n]), format="fltp", layout="mono")
            fr.sample_rate, fr.pts = sr, i
            c.mux(s.encode(fr))
        c.mux(s.encode(None))


def test_write_video_with_audio_cut_to_video(tmp_path):
    torch.manual_seed(0)
    v = _smooth_video(10, 32, 48)
    path = tmp_path / "out.mp4"
    write_video(path, v, fps=16, audio=_tone(2.0), sr=SR)  # audio longer than the 10/16 s video
    info = probe_video(path)
    assert (info["frames"], info["width"], info["height"], info["fps"]) == (10, 48, 32, 16.0)
    assert info["video_duration"] == pytest.approx(10 / 16)
    assert info["audio_duration"] == pytest.approx(10 / 16, abs=1e-3)
    back, fps = read_video(path)
    assert back.shape == (3, 10, 32, 48) and fps == 16.0
    err = (back - v).abs().mean().item()
    assert err < 0.03, err
    # the muxed audio is the tone, not silence
    decoded = read_audio(path, sr=SR)
    assert not audio_is_silent(decoded)
    assert abs(float(np.sqrt(np.mean(decoded**2))) - 0.3 / np.sqrt(2)) < 0.02


def test_write_video_cut_to_audio_and_uint8_and_odd_size(tmp_path):
    frames = (np.random.default_rng(0).random((20, 33, 47, 3)) * 255).astype(np.uint8)
    path = tmp_path / "odd.mp4"
    write_video(path, frames, fps=16, audio=_tone(0.5), sr=SR)  # 0.5 s of audio = 8 frames at 16 fps
    info = probe_video(path)
    assert info["frames"] == 8
    assert (info["width"], info["height"]) == (48, 34)  # odd sizes are edge-padded to even for yuv420p
    assert info["audio_duration"] == pytest.approx(0.5, abs=1e-3)
    # no audio: still a valid mp4 without an audio stream
    write_video(tmp_path / "silent.mp4", frames, fps=24)
    info = probe_video(tmp_path / "silent.mp4")
    assert info["frames"] == 20 and info["fps"] == 24.0 and info["audio_duration"] == 0.0


def test_write_video_rejects_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="3, T, H, W"):
        write_video(tmp_path / "x.mp4", torch.zeros(4, 2, 8, 8), fps=16)
    with pytest.raises(ValueError, match="shorter than one video frame"):
        write_video(tmp_path / "x.mp4", torch.zeros(3, 2, 8, 8), fps=16, audio=np.zeros(10, np.float32))
    with pytest.raises(ValueError, match="fps"):
        write_video(tmp_path / "x.mp4", torch.zeros(3, 2, 8, 8), fps=0)
    assert list(tmp_path.iterdir()) == []


def test_write_video_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"previous result")
    calls = {"n": 0}
    real = av.VideoFrame.from_ndarray

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash mid-encode")
        return real(*args, **kwargs)

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_video(path, _smooth_video(6, 16, 16), fps=16, audio=_tone(1.0))
    assert calls["n"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]  # no temp file left
    assert path.read_bytes() == b"previous result"  # the old file is untouched
    monkeypatch.undo()
    fresh = tmp_path / "new.mp4"
    monkeypatch.setattr(av.VideoFrame, "from_ndarray", failing)
    calls["n"] = 0
    with pytest.raises(RuntimeError):
        write_video(fresh, _smooth_video(6, 16, 16), fps=16)
    assert not fresh.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


def test_read_audio_wav_resamples_and_downmixes(tmp_path):
    src = _tone(1.0, sr=44100, freq=300.0, amp=0.5)
    _write_wav(tmp_path / "a.wav", src, 44100, channels=2)
    out = read_audio(tmp_path / "a.wav", sr=SR)
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(len(out) - SR) <= 32
    ref = _tone(len(out) / SR, sr=SR, freq=300.0, amp=0.5)
    # compare away from the resampler's edge transients
    err = np.abs(out[200:-200] - ref[200 : len(out) - 200]).max()
    assert err < 0.02, err


def test_read_audio_mp3(tmp_path):
    _write_mp3(tmp_path / "a.mp3", _tone(1.0, sr=22050, amp=0.4), 22050)
    out = read_audio(tmp_path / "a.mp3", sr=SR)
    assert out.dtype == np.float32 and out.ndim == 1
    assert 0.95 * SR <= len(out) <= 1.1 * SR  # mp3 adds encoder delay/padding
    rms = float(np.sqrt(np.mean(out[2000:-2000] ** 2)))
    assert abs(rms - 0.4 / np.sqrt(2)) < 0.02, rms


def test_read_audio_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        read_audio(tmp_path / "missing.wav")
    (tmp_path / "corrupt.wav").write_bytes(os.urandom(2048))
    with pytest.raises(ValueError):
        read_audio(tmp_path / "corrupt.wav")
    _write_wav(tmp_path / "empty.wav", np.zeros(0, np.float32), SR)
    with pytest.raises(ValueError, match="no samples|cannot decode"):
        read_audio(tmp_path / "empty.wav")
    write_video(tmp_path / "v.mp4", _smooth_video(2, 16, 16), fps=16)
    with pytest.raises(ValueError, match="no audio stream"):
        read_audio(tmp_path / "v.mp4")


def test_audio_is_silent():
    assert audio_is_silent(np.zeros(1000, np.float32))
    assert audio_is_silent(np.full(1000, 1e-5, np.float32))
    assert audio_is_silent(np.zeros(0, np.float32))
    assert not audio_is_silent(_tone(0.1, amp=0.01))


def test_read_image_and_save_png(tmp_path):
    torch.manual_seed(0)
    img = torch.rand(3, 9, 13) * 2 - 1
    save_png(tmp_path / "a.png", img)
    back = read_image(tmp_path / "a.png")
    assert back.shape == (3, 9, 13) and back.dtype == torch.float32
    assert back.min() >= -1 and back.max() <= 1
    assert (back - img).abs().max().item() <= 1 / 127.5 + 1e-6  # png is lossless up to uint8 rounding
    save_png(tmp_path / "b.png", np.zeros((4, 5, 3), np.uint8))
    assert torch.all(read_image(tmp_path / "b.png") == -1)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        read_image(tmp_path / "bad.png")
    with pytest.raises(ValueError, match="not found"):
        read_image(tmp_path / "nope.png")


def test_media_imports_lazily():
    # the module must not import PyAV / Pillow at import time (optional [media] extra)
    src = open(media.__file__).read().split('"""', 2)[2]
    head = src.split("def ", 1)[0]
    assert "import av" not in head and "PIL" not in head
