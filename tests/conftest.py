"""Shared fixtures: one CPU thread per test, and tiny random-weight checkpoints written in the official layout.

The tiny tasks (t2v-tiny, i2v-tiny, s2v-tiny) run the same code path as the official ones with small models;
`tiny_ckpt(task)` writes one with `wanmoe.loading.save_small_model` the first time a session asks for it.
"""

from __future__ import annotations

import wave
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Several test processes and a training job share 2 cores: intra-op threads oversubscribe them and make
    # the tiny end-to-end runs ~10-25x slower (measured: s2v-tiny 94 s with default threads vs 3.6 s with one).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _random_experts(cfg, seed: int) -> dict[str, torch.nn.Module]:  # noqa: ANN001 (PipelineConfig)
    from wanmoe.models.dit import DiT

    torch.manual_seed(seed)
    out = {}
    for name in cfg.experts:
        m = DiT(cfg.dit)
        with torch.no_grad():
            # Zero-initialised output heads would make every expert predict 0; small random weights everywhere
            # give a model whose output depends on every input (noise, text, image, audio).
            for p in m.parameters():
                p.copy_(torch.randn_like(p) * 0.05)
        out[name] = m
    return out


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """task -> folder with a tiny random-weight checkpoint (DiT folders + vae + byte text encoder), cached."""
    from wanmoe.configs import PRESETS
    from wanmoe.encoders.text import ByteTextEncoder
    from wanmoe.loading import save_small_model
    from wanmoe.models.vae import WanVAE

    made: dict[str, Path] = {}

    def make(task: str) -> Path:
        if task not in made:
            cfg = PRESETS[task]
            root = tmp_path_factory.mktemp(f"ckpt-{task}")
            experts = _random_experts(cfg, seed=0)
            torch.manual_seed(1)
            save_small_model(root, cfg, experts, WanVAE(cfg.vae).eval(), ByteTextEncoder(cfg.byte_text))
            made[task] = root
        return made[task]

    return make


def write_wav(path: Path, audio: np.ndarray, sr: int = 16000) -> Path:
    """Mono 16-bit PCM wav from float samples in [-1, 1]."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes((np.clip(audio, -1, 1) * 32767).astype(np.int16).tobytes())
    return path


def speech_like(seconds: float, sr: int = 16000) -> np.ndarray:
    """A tone with a syllable-rate envelope: audible, deterministic, changes over time."""
    t = np.arange(round(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Good and bad input files shared by the end-to-end tests (read-only for them)."""
    from wanmoe import media

    d = tmp_path_factory.mktemp("media")
    g = torch.Generator().manual_seed(0)
    media.save_png(d / "ref.png", torch.rand(3, 64, 64, generator=g) * 2 - 1)
    media.save_png(d / "ref_tall.png", torch.rand(3, 64, 48, generator=g) * 2 - 1)
    write_wav(d / "speech.wav", speech_like(1.0))
    write_wav(d / "short.wav", speech_like(0.7))
    write_wav(d / "silent.wav", np.zeros(16000, dtype=np.float32))
    write_wav(d / "empty.wav", np.zeros(0, dtype=np.float32))
    (d / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage that is not audio" * 4)
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    return d
