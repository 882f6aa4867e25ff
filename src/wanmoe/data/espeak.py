"""Real synthesized speech for training clips: espeak-ng sentences, a deterministic function of the seed.

Axis legend: N audio samples (mono).

The procedural `speech.synthesize_speech` audio is speech-like but not speech; a model trained on it alone
follows real speech only weakly (docs/results.md). These clips put real phonetics under the avatar: a sentence of
common words (drawn from the seed), spoken by one of espeak-ng's voice variants at a drawn speed and pitch.
espeak-ng is an external program (Debian package `espeak-ng`); it is only needed to make such training clips.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["espeak_wav", "espeak_sentence", "espeak_speech", "WORDS", "HELDOUT_SENTENCES"]

WORDS = (
    "the a we you they it this that when where how why what good time day night sun rain music river "
    "morning window garden people little always never often together tomorrow yesterday open close slowly "
    "quickly happy quiet bright cold warm city road table paper story number color simple question answer "
    "listen speak travel dream build follow remember around between under over because maybe really very"
).split()
_VARIANTS = ("m1", "m2", "m3", "m4", "m7", "f1", "f2", "f3", "f4")


def espeak_wav(text: str, path: Path, *, voice: str | None = None, speed: int = 140, pitch: int | None = None
               ) -> Path:
    """Speak ``text`` with espeak-ng into the WAV file ``path``; raises with a clear message when it is missing."""
    exe = shutil.which("espeak-ng") or shutil.which("espeak")
    if exe is None:
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng); it makes the real-speech eval "
                           "sample and the speech training clips")
    args = [exe, *(["-v", voice] if voice else []), "-s", str(speed)]
    args += ["-p", str(pitch)] if pitch is not None else []
    subprocess.run([*args, "-w", str(path), text], check=True, capture_output=True)
    return path


def espeak_sentence(seed: int) -> str:
    """A few short phrases of common words, e.g. 'quiet garden always. we follow the river.'"""
    rng = np.random.default_rng([int(seed), 0x5EEC])
    phrases = []
    for _ in range(int(rng.integers(2, 5))):
        phrases.append(" ".join(rng.choice(WORDS, size=int(rng.integers(2, 6)))))
    return ". ".join(phrases) + "."


def espeak_speech(seed: int, seconds: float, sr: int = 16000) -> np.ndarray:
    """(round(seconds * sr),) float32 mono: the seed's sentence spoken by espeak-ng, zero-padded or cut."""
    from wanmoe import media

    rng = np.random.default_rng([int(seed), 0x5EED])
    voice = f"en+{_VARIANTS[int(rng.integers(len(_VARIANTS)))]}"
    speed, pitch, lead = int(rng.integers(120, 176)), int(rng.integers(30, 71)), float(rng.uniform(0.0, 0.4))
    with tempfile.TemporaryDirectory() as tmp:
        wav = espeak_wav(espeak_sentence(seed), Path(tmp) / "s.wav", voice=voice, speed=speed, pitch=pitch)
        audio = media.read_audio(wav, sr=sr)
    n = int(round(seconds * sr))
    audio = np.concatenate([np.zeros(int(lead * sr), np.float32), audio.astype(np.float32)])[:n]
    return np.pad(audio, (0, n - audio.shape[0]))


# Held-out real-speech sentences (text, espeak-ng voice; None = its default) of `wanmoe eval --speech` and
# `--long`: no training clip speaks them.
HELDOUT_SENTENCES: tuple[tuple[str, str | None], ...] = (
    ("Hello there. This is a talking avatar, made by two noise experts.", None),
    ("Good evening. The weather report says light snow is falling over the northern hills.", "en+f3"),
    ("Please remember to bring your passport, a pencil, and something warm to wear.", "en+m3"),
    ("Seven hundred lanterns floated down the canal while the band played softly.", "en+f2"),
    ("I would like a cup of coffee, with milk, and maybe a piece of apple cake.", "en+m7"),
    ("Welcome back, everyone. Today we will learn how rivers carve deep valleys.", "en+f4"),
)
