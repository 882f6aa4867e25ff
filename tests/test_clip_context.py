"""S2V `clip_context`: clips after the first start from the previous clip's frames (official) or from the
reference image, as the first clip does."""

from __future__ import annotations

import json

import pytest
import torch

import wanmoe
from wanmoe import media
from wanmoe.cli import main
from wanmoe.request import InputError


def _encodes(pipe, monkeypatch) -> list[tuple[int, ...]]:  # noqa: ANN001
    """Record the input shape of every VAE encode the pipeline makes."""
    vae = pipe.components.vae
    calls, orig = [], vae.encode

    def encode(x, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(tuple(x.shape))
        return orig(x, *a, **k)

    monkeypatch.setattr(vae, "encode", encode)
    return calls


def test_reference_context_starts_every_clip_from_the_reference(tiny_ckpt, media_dir, monkeypatch):
    pipe = wanmoe.load("s2v-tiny", ckpt_dir=tiny_ckpt("s2v-tiny"))
    calls = _encodes(pipe, monkeypatch)
    kw = dict(image=media_dir / "ref.png", audio=media_dir / "speech.wav", seed=5, infer_frames=8, steps=2)
    official = pipe(**kw).frames  # 1 s of audio, clips of 8 frames: two clips
    n_official = len(calls)
    calls.clear()
    fresh = pipe(clip_context="reference", **kw).frames
    assert official.shape == fresh.shape and official.shape[1] == 2 * 8 - 3
    first = 8 - 3  # clip 0 is the same in both (it always starts from the reference)
    assert torch.equal(fresh[:, :first], official[:, :first])
    assert (fresh[:, first:] - official[:, first:]).abs().mean() > 1e-3  # clip 1 did change
    # Only the reference image was encoded: the decoded frames were never fed back (the official run encodes the
    # motion frames once for clip 1).
    assert calls == [calls[0]] and calls[0][2] == 1 and n_official == 2
    # Nothing of clip 0 reaches clip 1: silencing the first quarter second (inside clip 0) changes clip 0 in both
    # modes but clip 1 only in the official one.
    audio = media.read_audio(media_dir / "speech.wav")
    audio[: 16000 // 4] = 0
    kw["audio"] = (audio, 16000)
    quiet_official, quiet_fresh = pipe(**kw).frames, pipe(clip_context="reference", **kw).frames
    assert not torch.equal(quiet_fresh[:, :first], fresh[:, :first])
    assert torch.equal(quiet_fresh[:, first:], fresh[:, first:])
    assert not torch.equal(quiet_official[:, first:], official[:, first:])
    # Every clip from the first clip's noise (seed), where the official chaining draws seed + clip.
    from wanmoe import pipeline

    seeds, draw = [], pipeline.draw_noise
    monkeypatch.setattr(pipeline, "draw_noise", lambda shape, seed, dev: seeds.append(seed) or draw(shape, seed, dev))
    pipe(clip_context="reference", **kw)
    pipe(**kw)  # s2v-tiny's default: the official chaining
    assert seeds == [5, 5, 5, 6]
    assert pipe.request(clip_context="reference").clip_context == "reference"
    assert pipe.request().clip_context == "frames"  # the official default
    assert wanmoe.load("s2v-mini").request().clip_context == "reference"  # the embedded model's (measured) default


def test_clip_context_is_validated(tiny_ckpt):
    pipe = wanmoe.load("s2v-tiny", ckpt_dir=tiny_ckpt("s2v-tiny"))
    with pytest.raises(InputError, match="clip_context"):
        pipe.request(clip_context="previous")
    t2v = wanmoe.load("t2v-tiny", ckpt_dir=tiny_ckpt("t2v-tiny"))
    with pytest.raises(InputError, match="clip_context.*only applies to s2v"):
        t2v.request(clip_context="reference")


def test_cli_flag_reaches_the_sidecar(tiny_ckpt, media_dir, tmp_path):
    out = tmp_path / "s.mp4"
    assert main(["generate", "--task", "s2v-tiny", "--ckpt_dir", str(tiny_ckpt("s2v-tiny")), "--image",
                 str(media_dir / "ref.png"), "--audio", str(media_dir / "speech.wav"), "--infer_frames", "8",
                 "--sample_steps", "2", "--clip_context", "reference", "--save_file", str(out), "--quiet"]) == 0
    side = json.loads(out.with_suffix(".json").read_text())
    assert json.dumps(side).count('"clip_context": "reference"') == 1
