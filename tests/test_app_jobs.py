"""The web app's job queue without a browser: validation before queueing, order and positions, cancel, progress
with ETA, previews, files only in the app's folder, history across restarts (tiny random-weight S2V model)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

import wanmoe
from wanmoe import media
from wanmoe.app.jobs import JobQueue, preset_steps
from wanmoe.request import InputError


def _wait(cond, timeout: float = 120.0) -> None:
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise TimeoutError("condition not met in time")
        time.sleep(0.01)


@pytest.fixture
def app(tiny_ckpt, media_dir, tmp_path):
    uploads = tmp_path / "app" / "uploads"
    uploads.mkdir(parents=True)
    for name in ("ref.png", "short.wav", "speech.wav", "corrupt.png", "silent.wav"):
        shutil.copy(media_dir / name, uploads / name)
    ckpt = tiny_ckpt("s2v-tiny")
    q = JobQueue(lambda quant: wanmoe.load(ckpt, quant=quant), tmp_path / "app", upload_dir=uploads, warmup=False)
    yield q, uploads
    q.close()


FORM = {"prompt": "a cat", "quality": "fast", "infer_frames": 8, "seed": 3}


def test_jobs_run_in_order_with_positions_progress_and_files(app, tmp_path):
    q, up = app
    a = q.submit(dict(FORM, steps=40), image=up / "ref.png", audio=up / "short.wav")
    b = q.submit(FORM, image=up / "ref.png", audio=up / "speech.wav")
    _wait(lambda: a.state == "running" and a.step > 0)
    assert b.state == "queued" and q.position(b) == 1 and q.position(a) == 0
    assert [j.id for j in q.active()] == [a.id, b.id]
    st = q.get(b.id).status(q.position(b))
    assert st["state"] == "queued" and st["position"] == 1
    _wait(lambda: b.state in ("done", "failed"))
    assert a.state == "done" and b.state == "done", (a.message, b.message)
    assert a.finished <= b.started  # one at a time, in order
    # The first job taught the preview map; the second showed a live preview and streamed frames.
    assert q.rgb is not None and b.preview_uri.startswith("data:image/png;base64,")
    assert b.frame_uri.startswith("data:image/png") and b.first_frame_s is not None
    assert b.frames_done == media.probe_video(b.video)["frames"]
    info = media.probe_video(a.video)
    assert info["frames"] > 0 and info["audio_duration"] > 0  # the video has its sound
    side = json.loads(a.sidecar.read_text())
    assert side["seed"] == 3 and side["settings"]["steps"] == 40
    assert b.request.steps == preset_steps(q.cfg.sample_steps, "fast")
    st = b.status()
    assert st["experts"] and sum(d for d, t in st["experts"].values()) >= b.total_steps
    # Every file lives under the app's folder, each job in its own.
    for job in (a, b):
        assert job.video.parent == job.folder and job.folder.parent == tmp_path / "app" / "jobs"
        assert (job.folder / "job.json").is_file() and (job.folder / "input_image.png").is_file()
    assert [j.id for j in q.history()] == [b.id, a.id]
    # A job after a finished one knows its ETA from the first report on.
    c = q.submit(dict(FORM, steps=30), image=up / "ref.png", audio=up / "short.wav")
    _wait(lambda: c.step >= 2 or c.state != "queued" and c.state != "running")
    assert c.eta_s is not None and c.eta_s > 0
    _wait(lambda: c.state == "done")


def test_history_survives_a_restart(app, tiny_ckpt, tmp_path):
    q, up = app
    a = q.submit(FORM, image=up / "ref.png", audio=up / "short.wav")
    _wait(lambda: a.state == "done")
    q2 = JobQueue(lambda quant: q.pipe, tmp_path / "app", upload_dir=up, warmup=False)
    try:
        old = q2.history()
        assert [j.id for j in old] == [a.id] and old[0].video == a.video and old[0].form["seed"] == 3
        assert q2.submit(FORM, image=up / "ref.png", audio=up / "short.wav").id != a.id
    finally:
        q2.close()


def test_cancel_queued_and_running(app):
    q, up = app
    a = q.submit(dict(FORM, steps=1000), image=up / "ref.png", audio=up / "short.wav")
    b = q.submit(FORM, image=up / "ref.png", audio=up / "short.wav")
    assert q.cancel(b.id).state == "cancelled"  # never runs
    _wait(lambda: a.step >= 2)
    q.cancel(a.id)
    _wait(lambda: a.state != "running")
    assert a.state == "cancelled" and a.video is None and a.step < 1000
    assert not list(a.folder.glob("*.mp4"))
    assert b.started is None


@pytest.mark.parametrize(("files", "form", "field", "words"), [
    ({"image": "ref.png", "audio": "silent.wav"}, {}, "audio", "is silent"),
    ({"image": "corrupt.png", "audio": "short.wav"}, {}, "image", "cannot read"),
    ({"image": "/etc/hostname", "audio": "short.wav"}, {}, "image", "must be a file uploaded to this app"),
    ({"image": "../../../ref.png", "audio": "short.wav"}, {}, "image", "must be a file uploaded to this app"),
    ({"image": "ref.png", "audio": "short.wav"}, {"steps": 0}, "steps", "must be an integer in [1, 1000]"),
    ({"image": "ref.png", "audio": "short.wav"}, {"quality": "ultra"}, "quality", "must be one of fast"),
    ({"image": "ref.png"}, {}, "audio", "is needed"),
    ({"image": "ref.png", "audio": "short.wav"}, {"cache": 0.1}, "cache", "not available"),
])
def test_bad_submissions_are_refused_before_queueing(app, files, form, field, words):
    q, up = app
    kw = {k: (v if v.startswith("/") else up / v) for k, v in files.items()}
    with pytest.raises(InputError) as e:
        q.submit(dict(FORM, **form), **kw)
    assert e.value.field == field and words in str(e.value)
    assert not q.active() and not list(q.jobs_dir.iterdir())  # nothing queued, nothing written


def test_too_many_clips_and_full_queue(app, tmp_path):
    q, up = app
    q.max_clips = 1
    with pytest.raises(InputError, match="at most 1 per job"):
        q.submit(FORM, image=up / "ref.png", audio=up / "speech.wav")  # 1 s at 16 fps = 2 clips of 8 frames
    q.max_clips, q.max_queued = 20, 1
    a = q.submit(dict(FORM, steps=1000), image=up / "ref.png", audio=up / "short.wav")
    _wait(lambda: a.state == "running")
    q.submit(FORM, image=up / "ref.png", audio=up / "short.wav")
    with pytest.raises(InputError, match="queue is full"):
        q.submit(FORM, image=up / "ref.png", audio=up / "short.wav")
    q.cancel(a.id)


def test_upload_outside_folder_is_never_opened(app, monkeypatch):
    q, up = app
    opened = []
    real = Path.is_file
    monkeypatch.setattr(Path, "is_file", lambda self: opened.append(str(self)) or real(self))
    with pytest.raises(InputError):
        q.submit(FORM, image="/etc/passwd", audio=up / "short.wav")
    assert "/etc/passwd" not in opened


def test_tts_job_with_int8_experts(app):
    """Typed words (espeak-ng) drive the face; int8 experts load on first use beside the float ones (the older
    `int8` field and `quant` name the same pipeline); a bad `quant` is refused before queueing."""
    from wanmoe import tts
    from wanmoe.app.jobs import quant_of

    if not tts.espeak_available():
        pytest.skip("espeak-ng is not installed (scripts/setup.sh dev installs it)")
    q, up = app
    job = q.submit(dict(FORM, tts_text="hello there", tts_voice="en+f3", int8=True), image=up / "ref.png")
    _wait(lambda: job.state in ("done", "failed"))
    assert job.state == "done", job.message
    assert set(q._pipes) == {None, "int8"} and q._pipes["int8"].options.int8
    assert quant_of({"int8": True}) == quant_of({"quant": "int8"}) == "int8" and quant_of({"quant": "float"}) is None
    for bad in ({"quant": "int4"}, {"quant": "fp8", "int8": True}):
        with pytest.raises(InputError, match="quant"):
            q.submit(dict(FORM, **bad), image=up / "ref.png")
    side = json.loads(job.sidecar.read_text())
    assert "hello there" in side["inputs"]["audio"] and media.probe_video(job.video)["audio_duration"] > 0
    with pytest.raises(InputError, match="cannot be combined with audio"):
        q.submit(dict(FORM, tts_text="hi"), image=up / "ref.png", audio=up / "short.wav")


def test_text_to_video_job(tiny_ckpt, tmp_path):
    q = JobQueue(lambda quant: wanmoe.load(tiny_ckpt("t2v-tiny")), tmp_path / "app", upload_dir=tmp_path / "up",
                 warmup=False)
    try:
        (tmp_path / "up").mkdir()
        media.save_png(tmp_path / "up" / "x.png", np.zeros((64, 64, 3), np.uint8))
        with pytest.raises(InputError, match="image does not apply"):
            q.submit({"prompt": "a boat", "size": "64*48"}, image=tmp_path / "up" / "x.png")
        job = q.submit({"prompt": "a boat", "size": "64*48", "steps": 2, "seed": 1})
        _wait(lambda: job.state in ("done", "failed"))
        assert job.state == "done", job.message
        assert job.frames_done == media.probe_video(job.video)["frames"] == q.cfg.frame_num
    finally:
        q.close()


def test_serve_is_a_subcommand(capsys, monkeypatch):
    import importlib.util

    from wanmoe.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0 and "--host" in capsys.readouterr().out
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    assert main(["serve"]) == 2 and "pip install 'wanmoe[app]'" in capsys.readouterr().err
