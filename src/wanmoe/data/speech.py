"""Synthetic speech-like audio and the per-frame loudness envelope that drives the avatar's mouth.

Axis legend: N audio samples (mono), T pixel frames (video fps), K harmonics.

The audio is not language: it is a train of voiced "syllables" (a glottal-like harmonic source shaped by two
vowel formants) with a pitch contour (phrase declination plus a rise or fall per syllable), an attack/decay
loudness contour per syllable, and pauses between phrases. Syllable rate is kept at 2-4 Hz so that, at 16 fps
with a 4-frame temporal VAE stride (4 latent frames per second), one latent frame still resolves an open/close.
Everything is a deterministic function of the seed (numpy ``default_rng``), vectorised over samples.
"""

from __future__ import annotations

import numpy as np

__all__ = ["synthesize_speech", "loudness_envelope", "SPEECH_SR"]

SPEECH_SR = 16000

# (F1, F2) in Hz for a few vowels (textbook adult averages, Peterson & Barney 1952, rounded).
_VOWELS = np.array([[730, 1090], [270, 2290], [300, 870], [530, 1840], [570, 840], [660, 1720]], dtype=np.float64)


def _syllable_plan(rng: np.random.Generator, seconds: float) -> list[tuple[float, float, float, int, float]]:
    """(start s, duration s, peak amplitude, vowel index, pitch slope) for each syllable, pauses in between."""
    plan = []
    t = float(rng.uniform(0.1, 0.4))  # short lead-in silence
    while t < seconds - 0.15:
        n_syl = int(rng.integers(2, 7))  # syllables in this phrase
        for _ in range(n_syl):
            dur = float(rng.uniform(0.22, 0.42))  # 2.4-4.5 syllables/s incl. gaps: slow enough for a 4-frame stride
            if t + dur > seconds:
                break
            plan.append((t, dur, float(rng.uniform(0.45, 1.0)), int(rng.integers(len(_VOWELS))),
                         float(rng.uniform(-0.25, 0.25))))
            t += dur + float(rng.uniform(0.03, 0.12))  # brief dip between syllables
        t += float(rng.uniform(0.25, 0.7))  # phrase pause
    return plan


def synthesize_speech(seed: int, seconds: float, sr: int = SPEECH_SR) -> np.ndarray:
    """Speech-like mono audio (N,) float32 in [-1, 1], N = round(seconds * sr); deterministic in ``seed``."""
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    if sr < 4000:
        raise ValueError(f"sr must be >= 4000 Hz, got {sr}")
    rng = np.random.default_rng([int(seed), 0x5BEEC])
    n = int(round(seconds * sr))
    t = np.arange(n, dtype=np.float64) / sr  # (N,)
    plan = _syllable_plan(rng, seconds)

    base_f0 = float(rng.uniform(95, 230))  # speaker pitch
    # Per-sample syllable parameters: amplitude envelope, f0 multiplier and formants (piecewise per syllable).
    amp = np.zeros(n)  # (N,)
    f0_mul = np.ones(n)  # (N,)
    formants = np.tile(_VOWELS[0], (n, 1))  # (N, 2)
    for start, dur, peak, vowel, slope in plan:
        i0, i1 = int(start * sr), min(n, int((start + dur) * sr))
        u = np.clip((t[i0:i1] - start) / dur, 0.0, 1.0)  # 0..1 inside the syllable
        # Fast attack, slower decay (a consonant-vowel shape): u^a (1-u)^b normalised to peak 1.
        shape = u**0.6 * (1 - u) ** 1.2
        amp[i0:i1] = peak * shape / shape.max()
        f0_mul[i0:i1] = 1.0 + slope * (u - 0.5)
        formants[i0:i1] = _VOWELS[vowel]
    # Phrase-level declination of pitch (speech falls over an utterance) and a slow wobble.
    f0 = base_f0 * f0_mul * (1.0 - 0.12 * (t / seconds)) * (1.0 + 0.03 * np.sin(2 * np.pi * 5.5 * t))  # (N,)
    phase = 2 * np.pi * np.cumsum(f0) / sr  # (N,)

    k = np.arange(1, 25, dtype=np.float64)[:, None]  # (K, 1) harmonic numbers
    hf = k * f0[None, :]  # (K, N) harmonic frequencies
    # Spectral envelope: -6 dB/oct source tilt times two Gaussian formant resonances; zero above Nyquist.
    gain = (1.0 / k) * (
        np.exp(-(((hf - formants[None, :, 0]) / 120.0) ** 2))
        + 0.6 * np.exp(-(((hf - formants[None, :, 1]) / 180.0) ** 2))
        + 0.05
    )
    gain = gain * (hf < 0.45 * sr)
    voiced = (gain * np.sin(k * phase[None, :])).sum(0)  # (N,)
    voiced /= np.abs(voiced).max() + 1e-9
    # A little breath noise during syllables (fricative-ish onsets) and a very low noise floor everywhere.
    noise = rng.standard_normal(n)
    audio = amp * (0.9 * voiced + 0.08 * noise) + 1e-4 * noise
    audio = 0.8 * audio / (np.abs(audio).max() + 1e-9)
    return audio.astype(np.float32)


def loudness_envelope(audio: np.ndarray, sr: int, fps: float, *, range_db: float = 30.0) -> np.ndarray:
    """Per-video-frame loudness (T,) float32 in [0, 1], T = round(len(audio) / sr * fps).

    Definition: for frame k (centre time (k + 0.5) / fps) take the RMS of the audio under a Hann window of
    length 2 / fps centred there; convert to dB relative to the clip's loudest frame; map
    [-range_db, 0] dB linearly to [0, 1] and clip. Relative dB makes it work for any recording level
    (synthetic or real speech); silence maps to 0.
    """
    audio = np.asarray(audio, dtype=np.float64).reshape(-1)
    if audio.size == 0:
        raise ValueError("audio is empty")
    if sr <= 0 or fps <= 0:
        raise ValueError(f"sr and fps must be > 0, got sr={sr}, fps={fps}")
    n_frames = int(round(audio.size / sr * fps))
    if n_frames < 1:
        raise ValueError(f"audio of {audio.size} samples is shorter than one frame at {fps} fps")
    win = max(2, int(round(2 * sr / fps)))
    w = np.hanning(win + 2)[1:-1]  # (win,) strictly positive taps
    pad = win // 2 + 1
    x2 = np.pad(audio**2, (pad, pad + win))
    centers = ((np.arange(n_frames) + 0.5) * sr / fps).astype(np.int64) + pad  # (T,)
    idx = centers[:, None] - win // 2 + np.arange(win)[None, :]  # (T, win)
    rms = np.sqrt((x2[idx] * w).sum(1) / w.sum())  # (T,)
    if rms.max() < 1e-6:  # digital silence: nothing to open the mouth for
        return np.zeros(n_frames, dtype=np.float32)
    db = 20 * np.log10(rms + 1e-8)
    env = np.clip((db - db.max()) / range_db + 1.0, 0.0, 1.0)
    return env.astype(np.float32)
