"""The public Python API as users drive it: `wanmoe.load(...)`, `pipe(...)`, `video.save(...)`, for every task.

Tiny random-weight checkpoints (tests/conftest.py) for T2V, I2V and S2V; the shipped s2v-mini for the README
script, whose frames must equal the command line's for the same seed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import wanmoe
from wanmoe import media

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("task", "kwargs", "shape"), [
    ("t2v-tiny", {"frame_num": 5, "size": "64*48"}, (3, 5, 48, 64)),
    ("i2v-tiny", {"frame_num": 9, "image": "ref_tall.png"}, (3, 9, 64, 48)),
    ("s2v-tiny", {"infer_frames": 8, "image": "ref.png", "audio": "short.wav"}, (3, 13, 64, 64)),
])
def test_every_task_through_the_public_api(task, kwargs, shape, tiny_ckpt, media_dir, tmp_path):
    pipe = wanmoe.load(tiny_ckpt(task))  # the task is detected from the folder
    assert pipe.task == task
    kw = {k: media_dir / v if k in ("image", "audio") else v for k, v in kwargs.items()}
    events = []
    video = pipe("a cat on a surfboard", seed=3, steps=2, progress=events.append, **kw)
    assert isinstance(video, wanmoe.Video) and tuple(video.frames.shape) == shape
    assert torch.isfinite(video.frames).all() and video.frames.abs().max() <= 1.0
    assert video.fps == 16 and video.request.seed == 3 and video.request.prompt == "a cat on a surfboard"
    assert set(video.timings) >= {"text_s", "encode_s", "sample_s", "decode_s", "total_s"}
    stages = [e.stage for e in events]
    assert stages[0] == "text" and "sample" in stages and stages[-1] == "decode"
    samples = [e for e in events if e.stage == "sample"]
    assert [e.done for e in samples] == list(range(1, samples[-1].total + 1))  # every step reported, in order
    out = video.save(tmp_path / "v.mp4")
    side = json.loads((tmp_path / "v.json").read_text())
    info = media.probe_video(out)
    assert side["frames"] == info["frames"] and side["task"] == task and side["seed"] == 3
    assert (info["audio_duration"] > 0) == (task == "s2v-tiny")  # the sound is muxed when there is audio
    again = pipe("a cat on a surfboard", seed=3, steps=2, **kw)
    assert torch.equal(again.frames, video.frames)  # the loaded pipeline is reusable and deterministic


def test_inputs_as_paths_pil_arrays_and_tensors_agree(tiny_ckpt, media_dir):
    from PIL import Image

    pipe = wanmoe.load("s2v-tiny", ckpt_dir=tiny_ckpt("s2v-tiny"))
    path = media_dir / "ref.png"
    pil = Image.open(path)
    arr = np.asarray(pil.convert("RGB"))
    ten = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1
    audio = media.read_audio(media_dir / "speech.wav")
    a44 = media.read_audio(media_dir / "speech.wav", sr=44100)
    ref = pipe(image=path, audio=media_dir / "speech.wav", seed=1, infer_frames=8, num_clip=1).frames
    for image, sound in ((pil, audio), (arr, (audio, 16000)), (ten, torch.from_numpy(audio))):
        got = pipe(image=image, audio=sound, seed=1, infer_frames=8, num_clip=1).frames
        assert torch.equal(got, ref)
    # Audio at another rate is resampled to 16 kHz (close, not bit-equal: two resamplings).
    got = pipe(image=path, audio=(a44, 44100), seed=1, infer_frames=8, num_clip=1).frames
    assert (got - ref).abs().mean() < 0.02


def test_sixteen_bit_and_transparent_images_keep_their_colours(tmp_path):
    from PIL import Image

    from wanmoe.inputs import load_image

    grey = np.full((40, 40), 32768, dtype=np.uint16)  # mid-grey in 16 bits; a naive convert saturates to white
    Image.fromarray(grey).save(tmp_path / "g16.png")
    x = load_image(tmp_path / "g16.png")
    assert x.shape == (3, 40, 40) and abs(float(x.mean())) < 0.01
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)  # fully transparent black: shown as white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    assert float(load_image(tmp_path / "t.png").min()) == 1.0


def _readme_script() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"```python\n(import wanmoe\n.*?)```", text, re.S)
    assert m, "README has no Python API example starting with `import wanmoe`"
    return m.group(1)


def test_readme_script_equals_the_command_line(tmp_path, monkeypatch):
    """README's ten-line script makes the default video with sound; `generate.py` gives the same frames."""
    script = _readme_script()
    assert len(script.strip().splitlines()) <= 10
    frames: dict[str, list] = {}
    add = media.VideoWriter.add

    def capture(self, video):  # noqa: ANN001, ANN202 (what the muxer receives, the API's save and the CLI's stream)
        frames.setdefault(self.dest.name, []).append(video.clone())
        return add(self, video)

    monkeypatch.setattr(media.VideoWriter, "add", capture)
    monkeypatch.chdir(tmp_path)
    exec(compile(script, "README.md", "exec"), {})  # noqa: S102 (the README's own code)
    (api_name,) = frames
    assert (tmp_path / api_name).is_file() and (tmp_path / api_name).with_suffix(".json").is_file()
    assert media.probe_video(tmp_path / api_name)["audio_duration"] > 1.0
    seed = json.loads((tmp_path / api_name).with_suffix(".json").read_text())["seed"]
    from wanmoe.cli import generate_main

    assert generate_main(["--base_seed", str(seed), "--quiet", "--save_file", str(tmp_path / "cli.mp4")]) == 0
    assert torch.equal(torch.cat(frames["cli.mp4"], dim=1), torch.cat(frames[api_name], dim=1))


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_exits_cleanly_and_leaves_no_file(sig, code, tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    # 1000 steps at 256x256 take minutes: the signal always arrives mid-sampling.
    p = subprocess.Popen([sys.executable, str(ROOT / "generate.py"), "--task", "t2v-tiny", "--ckpt_dir",
                          str(tiny_ckpt("t2v-tiny")), "--sample_steps", "1000", "--size", "256*256", "--frame_num",
                          "9", "--save_file", str(out / "v.mp4")], env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    buf = b""
    while b"sampling" not in buf and time.time() < deadline:  # wait until it is really working
        chunk = os.read(p.stderr.fileno(), 4096)
        if not chunk:
            break
        buf += chunk
    p.send_signal(sig)
    err = (buf + p.communicate(timeout=60)[1]).decode(errors="replace")
    assert p.returncode == code, err[-2000:]
    assert "Traceback" not in err
    assert list(out.iterdir()) == []
