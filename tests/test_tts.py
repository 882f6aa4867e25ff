"""Text to speech without a download: `--tts_text` / `pipe(tts_text=...)` spoken by espeak-ng, and the clear errors
when espeak-ng is missing, the text is bad, or the official cloud-only TTS flags are given."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from wanmoe import media, tts
from wanmoe.cli import main
from wanmoe.configs import PRESETS
from wanmoe.inputs import read_inputs
from wanmoe.request import InputError

needs_espeak = pytest.mark.skipif(not tts.espeak_available(),
                                  reason="espeak-ng is not installed (scripts/setup.sh dev installs it)")
S2V = PRESETS["s2v-tiny"]


@needs_espeak
def test_speak_makes_speech_of_the_text_length():
    short = tts.speak("hello")
    long = tts.speak("hello there, this sentence is quite a lot longer than one word")
    assert short.dtype == np.float32 and short.ndim == 1
    assert 0.2 < short.size / 16000 < 2.0 and long.size > 2.5 * short.size
    assert 0.05 < np.abs(long).max() <= 1.0  # audible, in range
    assert tts.speak("-v is not an option").size > 8000  # a leading dash is spoken, not parsed as a flag


@needs_espeak
def test_read_inputs_speaks_tts_text_in_place_of_audio():
    inp = read_inputs(S2V, image=np.zeros((64, 64, 3), np.uint8), tts_text="good morning", tts_voice="en+f3")
    assert inp.audio is not None and inp.sr == 16000 and inp.audio.size > 4000
    assert "good morning" in inp.sources["audio"] and "espeak-ng" in inp.sources["audio"]


@pytest.mark.parametrize(("kwargs", "field", "words"), [
    ({"tts_text": "hi", "audio": np.ones(16000, np.float32) * 0.1}, "tts_text", "cannot be combined with audio"),
    ({"tts_text": "   "}, "tts_text", "non-empty"),
    ({"tts_text": "x" * (tts.MAX_CHARS + 1)}, "tts_text", "at most"),
    ({"tts_text": "hi", "tts_voice": "en; rm -rf"}, "tts_voice", "espeak-ng voice name"),
    ({"tts_voice": "en"}, "tts_voice", "only applies with tts_text"),
])
def test_bad_tts_inputs_are_refused(kwargs, field, words):
    with pytest.raises(InputError) as e:
        read_inputs(S2V, image=np.zeros((64, 64, 3), np.uint8), **kwargs)
    assert e.value.field == field and words in str(e.value)


def test_tts_text_does_not_apply_to_t2v():
    with pytest.raises(InputError, match="tts_text only applies to s2v"):
        read_inputs(PRESETS["t2v-tiny"], tts_text="hello")


@needs_espeak
def test_unknown_voice_names_espeak_error():
    with pytest.raises(InputError, match="tts_voice espeak-ng failed: .*voice does not exist"):
        tts.speak("hello", voice="nosuchvoice")


def test_missing_espeak_names_the_package(monkeypatch, capsys, tiny_ckpt, media_dir, tmp_path):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(InputError) as e:
        read_inputs(S2V, image=np.zeros((64, 64, 3), np.uint8), tts_text="hello")
    assert e.value.field == "tts_text" and "`espeak-ng`" in e.value.detail
    assert "apt-get install espeak-ng" in e.value.detail
    # The command line says the same with the flag name, exits 2, and writes nothing.
    out = tmp_path / "o.mp4"
    code = main(["generate", "--task", "s2v-tiny", "--ckpt_dir", str(tiny_ckpt("s2v-tiny")), "--image",
                 str(media_dir / "ref.png"), "--tts_text", "hello", "--save_file", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --tts_text needs espeak-ng") and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(("flags", "words"), [
    (["--tts_text", "hi", "--tts_prompt_audio", "voice.wav"], "--tts_prompt_audio needs the official CosyVoice"),
    (["--tts_text", "hi", "--tts_prompt_text", "some words"], "--tts_prompt_text needs the official CosyVoice"),
    (["--enable_tts"], "--enable_tts needs --tts_text"),
    (["--tts_text", "hi", "--audio", "{media}/speech.wav"], "--tts_text cannot be combined with audio"),
])
def test_cli_refuses_cloud_tts_flags(flags, words, capsys, tiny_ckpt, media_dir, tmp_path):
    out = tmp_path / "o.mp4"
    flags = [f.format(media=media_dir) for f in flags]
    code = main(["generate", "--task", "s2v-tiny", "--ckpt_dir", str(tiny_ckpt("s2v-tiny")), "--image",
                 str(media_dir / "ref.png"), "--save_file", str(out), *flags])
    err = capsys.readouterr().err
    assert code == 2 and words in err and "Traceback" not in err and not out.exists()


@needs_espeak
def test_cli_tts_text_end_to_end(tiny_ckpt, media_dir, tmp_path):
    """`--enable_tts --tts_text` (the official spelling) makes a video whose sound is the spoken text."""
    out = tmp_path / "spoken.mp4"
    code = main(["generate", "--task", "s2v-tiny", "--ckpt_dir", str(tiny_ckpt("s2v-tiny")), "--image",
                 str(media_dir / "ref.png"), "--enable_tts", "--tts_text", "hello world", "--infer_frames", "8",
                 "--sample_steps", "1", "--base_seed", "0", "--save_file", str(out), "--quiet"])
    assert code == 0
    info = media.probe_video(out)
    side = json.loads(out.with_suffix(".json").read_text())
    assert info["audio_duration"] > 0.3 and "hello world" in side["inputs"]["audio"]
