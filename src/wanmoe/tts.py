"""Text to speech without any download: the words a user types, spoken by espeak-ng, as driving audio for S2V.

The official Wan2.2 S2V speaks `--tts_text` with CosyVoice, a model fetched from the cloud that clones the voice
of `--tts_prompt_audio`; nothing here downloads anything, so wanmoe speaks with espeak-ng (an external program,
Debian package `espeak-ng`) through the same `espeak_wav` that makes the speech training clips. The result is
16 kHz mono float32, ready for `wanmoe.inputs.load_audio`.

Axis legend: N audio samples (mono).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from wanmoe.request import InputError

MAX_CHARS = 2000  # about two minutes of speech at espeak-ng's default rate
VOICES = ("en", "en+f3", "en+m3", "en+f2", "en-us", "en-us+f4")  # offered by the web app; any espeak-ng voice works
_VOICE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_+")


def espeak_available() -> bool:
    return (shutil.which("espeak-ng") or shutil.which("espeak")) is not None


def check_text(text: object, voice: object = None) -> str:
    """The text to speak, stripped; InputError for an empty, over-long or non-string text or a malformed voice."""
    if not isinstance(text, str) or not text.strip():
        raise InputError("tts_text", f"must be a non-empty string of words to speak, got {text!r}")
    text = text.strip()
    if len(text) > MAX_CHARS:
        raise InputError("tts_text", f"has {len(text)} characters: at most {MAX_CHARS} are accepted")
    if any(ord(ch) < 32 and ch not in "\n\t" for ch in text):
        raise InputError("tts_text", "contains control characters")
    if voice is not None and (not isinstance(voice, str) or not voice or not set(voice) <= _VOICE_CHARS
                              or len(voice) > 40):
        # The voice goes on espeak-ng's command line: letters, digits, - _ + only (no option injection).
        raise InputError("tts_voice", f"must be an espeak-ng voice name such as {', '.join(VOICES[:3])}, got {voice!r}")
    if not espeak_available():
        raise InputError("tts_text", "needs espeak-ng, which is not installed: install the Debian/Ubuntu package "
                                     "`espeak-ng` (apt-get install espeak-ng), or give audio instead")
    return text


def speak(text: str, *, voice: str | None = None, sr: int = 16000) -> np.ndarray:
    """(N,) float32 mono at `sr`: `text` spoken by espeak-ng (voice: an espeak-ng voice name, default its own)."""
    from wanmoe import media
    from wanmoe.data.espeak import espeak_wav

    text = check_text(text, voice)
    with tempfile.TemporaryDirectory(prefix="wanmoe-tts-") as tmp:
        wav = Path(tmp) / "speech.wav"
        try:
            # A leading space: a text that starts with "-" is spoken, not parsed as an espeak-ng option.
            espeak_wav(" " + text if text.startswith("-") else text, wav, voice=voice)
        except subprocess.CalledProcessError as e:
            said = ((e.stderr or b"") + (e.stdout or b"")).decode(errors="replace").strip().splitlines()
            raise InputError("tts_voice" if voice else "tts_text",
                             f"espeak-ng failed: {said[0] if said else e}") from None
        return media.read_audio(wav, sr=sr).astype(np.float32)


__all__ = ["speak", "check_text", "espeak_available", "VOICES", "MAX_CHARS"]
