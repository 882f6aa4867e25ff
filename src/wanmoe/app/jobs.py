"""The web app's job queue: validated jobs run one at a time on a worker thread through the Python API.

`JobQueue.submit(form, image=, audio=)` checks everything the command line checks (`make_request`, `read_inputs`)
before the job is queued, so a bad upload is refused at once with the library's message; uploads are opened only
when they lie inside the app's upload folder. The worker runs `Pipeline.run` with a progress and a preview
callback: each report updates the job (stage, steps per expert, decoded frames, ETA, a live preview), and a
cancelled job stops at its next report. Every file a job writes lives in `<out_dir>/jobs/<id>/`. Nothing here
imports gradio: the page (wanmoe.app.ui) and the tests drive this class directly.

Axis legend: C latent channels, F latent frames, H/W latent height/width, T pixel frames.
"""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from wanmoe.api import Pipeline
from wanmoe.app.preview import LatentRGB, RGBFit, frames_uint8, png_data_uri, strip
from wanmoe.configs import PipelineConfig
from wanmoe.experts import expert_weights
from wanmoe.inputs import Inputs, read_inputs
from wanmoe.pipeline import Preview, Progress
from wanmoe.request import FLOAT_WEIGHTS, QUANT_MODES, InputError, Request, make_request
from wanmoe.sampling.schedules import flow_sigmas

log = logging.getLogger(__name__)

QUALITY = {"fast": 0.2, "balanced": 0.5, "quality": 1.0}  # fraction of the task's sampling steps
# Form fields handed to make_request as they are (None = the task's value).
REQUEST_FIELDS = ("prompt", "negative_prompt", "size", "seed", "steps", "shift", "solver", "guide_scale", "boundary",
                  "threshold", "blend", "motion_scale", "num_clip", "infer_frames", "cache", "clip_context")
STATES = ("queued", "running", "done", "failed", "cancelled")


class Cancelled(Exception):
    """Raised from a progress callback to stop a running job."""


def preset_steps(task_steps: int, quality: str) -> int:
    if quality not in QUALITY:
        raise InputError("quality", f"must be one of {', '.join(QUALITY)}, got {quality!r}")
    return max(2, round(task_steps * QUALITY[quality]))


@dataclass
class Job:
    id: str
    form: dict  # the settings as submitted (seed resolved): what "use these settings again" restores
    request: Request
    inputs: Inputs | None  # dropped when the job ends
    folder: Path
    plan: list[str]  # the expert(s) of every sampling step of one clip ("high", "low", "high+low")
    created: float = field(default_factory=time.time)
    state: str = "queued"
    started: float | None = None
    finished: float | None = None
    stage: str = ""  # text | encode | sample | decode | mux
    step: int = 0  # sampling steps done, all clips
    clip: int = 0
    clips: int = 1
    frames_done: int = 0  # decoded frames streamed so far, all clips
    clips_decoded: int = 0
    clip_frames: int = 0  # frames streamed of the clip being decoded
    eta_s: float | None = None
    message: str = ""
    preview_uri: str = ""  # the latest x0 prediction, as a PNG strip
    frame_uri: str = ""  # the newest decoded frame
    first_frame_s: float | None = None  # seconds from submit to the first decoded frame of the video
    video: Path | None = None
    sidecar: Path | None = None
    timings: dict = field(default_factory=dict)
    cancel: threading.Event = field(default_factory=threading.Event)
    version: int = 0  # bumped on every change, so pages redraw only what changed

    @property
    def total_steps(self) -> int:
        return self.request.steps * self.clips

    def expert_counts(self) -> list[tuple[str, int, int]]:
        """(expert, steps done, steps in total) over all clips, in schedule order."""
        per_step = [name for w in self.plan for name in w.split("+")]
        names = list(dict.fromkeys(per_step))
        done_steps = [self.plan[i % len(self.plan)] for i in range(self.step)]
        return [(n, sum(n in w.split("+") for w in done_steps), per_step.count(n) * self.clips) for n in names]

    def status(self, position: int = 0) -> dict:
        """What the HTTP API's `status` returns (JSON)."""
        return {"id": self.id, "state": self.state, "position": position, "stage": self.stage, "step": self.step,
                "steps": self.total_steps, "clip": self.clip, "clips": self.clips, "frames": self.frames_done,
                "experts": {n: [d, t] for n, d, t in self.expert_counts()},
                "eta_s": None if self.eta_s is None else round(self.eta_s, 1), "message": self.message,
                "first_frame_s": self.first_frame_s, "seed": self.request.seed, "timings": self.timings,
                "created": self.created, "started": self.started, "finished": self.finished,
                "prompt": self.request.prompt,
                "video": self.video.name if self.video else None}


class Rates:
    """Running estimates (exponential averages) of what a job's stages cost here, for ETAs; per pixel of a clip
    (frames x W x H), so a short warm-up clip predicts a full one."""

    def __init__(self) -> None:
        self.step: float | None = None  # seconds of one sampling step, per clip pixel
        self.decode: float | None = None  # seconds of one clip's decode, per clip pixel
        self.mux_s: float | None = None  # closing one video file

    @staticmethod
    def _avg(old: float | None, new: float, a: float = 0.5) -> float:
        return new if old is None else (1 - a) * old + a * new

    def learn(self, timings: dict, steps: int, clips: int, clip_pixels: int, mux_s: float | None) -> None:
        self.step = self._avg(self.step, timings["sample_s"] / max(1, steps) / clip_pixels)
        self.decode = self._avg(self.decode, timings["decode_s"] / max(1, clips) / clip_pixels)
        if mux_s is not None:  # the warm-up writes no file
            self.mux_s = self._avg(self.mux_s, mux_s)


def clip_pixels(cfg: PipelineConfig, req: Request) -> int:
    """Frames x W x H of one clip: what a step's and a decode's cost scale with."""
    return (req.infer_frames if cfg.modality == "s2v" else req.frame_num) * req.size[0] * req.size[1]


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:n] or "video"


def quant_of(form: dict) -> str | None:
    """The experts' weights a form asks for: `quant` ("float", "int8", "fp8"; empty: float) or the older `int8`
    flag -> None, "int8" or "fp8"; InputError('quant') for anything else."""
    q = str(form.get("quant") or "").strip().lower()
    if q in FLOAT_WEIGHTS:
        return "int8" if form.get("int8") else None
    if q not in QUANT_MODES:
        raise InputError("quant", f"must be one of float, {', '.join(QUANT_MODES)}; got {form.get('quant')!r}")
    if form.get("int8") and q != "int8":
        raise InputError("quant", f"{q} conflicts with int8 (give one of them)")
    return q


class JobQueue:
    """Jobs in order; one worker thread runs them through `load(quant)`'s pipeline (quant: None for float experts,
    "int8" or "fp8"; one pipeline per mode, loaded on first use)."""

    def __init__(self, load: Callable[[str | None], Pipeline], out_dir: Path, *, upload_dir: Path | None = None,
                 max_queued: int = 16, max_clips: int = 20, warmup: bool = True) -> None:
        self._load, self._pipes = load, {}
        self.pipe = self._pipe(None)
        self.cfg = self.pipe.cfg
        self.out_dir = Path(out_dir).resolve()
        self.jobs_dir = self.out_dir / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.upload_dir = None if upload_dir is None else Path(upload_dir).resolve()
        self.max_queued, self.max_clips = max_queued, max_clips
        self.rates = Rates()
        self.rgb: LatentRGB | None = None  # latent -> colour map, learned from this model's own decodes
        self._fit = RGBFit()
        self._jobs: dict[str, Job] = {}
        self._order: list[str] = []
        self._lock = threading.Condition()
        self._closed = False
        self.changed = 0  # bumped when a job is added, starts or ends (the page redraws its queue)
        self.finished = 0  # bumped when a job ends (the page redraws its history)
        self.warming = warmup
        self._load_history()
        self._thread = threading.Thread(target=self._work, name="wanmoe-jobs", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------- submitting

    def _pipe(self, quant: str | None) -> Pipeline:
        if quant not in self._pipes:
            self._pipes[quant] = self._load(quant)
        return self._pipes[quant]

    def _upload(self, name: str, path: object) -> str | None:
        """An uploaded file's path, only if it lies inside the upload folder (no user-supplied path is opened)."""
        if path is None or path == "":
            return None
        if not isinstance(path, (str, Path)):
            raise InputError(name, f"must be an uploaded file, got {type(path).__name__}")
        p = Path(path).resolve()
        if self.upload_dir is None or not p.is_relative_to(self.upload_dir):
            raise InputError(name, "must be a file uploaded to this app")
        return str(p)

    def settings(self, form: dict) -> dict:
        """make_request keywords from a form: quality sets the steps unless they are given; empty means default."""
        kw = {k: form.get(k) for k in REQUEST_FIELDS if form.get(k) not in (None, "")}
        if kw.get("cache") in (0, 0.0):
            kw.pop("cache")  # 0 = off
        if "steps" not in kw:
            kw["steps"] = preset_steps(self.cfg.sample_steps, form.get("quality") or "balanced")
        return kw

    def submit(self, form: dict, *, image: object = None, audio: object = None) -> Job:
        """Validate and queue a job; raises InputError (with the library's message) for any bad input."""
        form = dict(form)
        tts_text = (form.get("tts_text") or "").strip() or None
        image_path, audio_path = self._upload("image", image), self._upload("audio", audio)
        kw = self.settings(form)
        quant_of(form)  # checked now, not when the job runs
        if kw.get("cache") is not None and getattr(self.pipe.components, "cache_calibration", None) is None:
            raise InputError("cache", "is not available for this model (it has no step-cache calibration)")
        req = make_request(self.cfg, **kw)
        try:
            inputs = read_inputs(self.cfg, image=image_path, audio=audio_path, tts_text=tts_text,
                                 tts_voice=form.get("tts_voice") or None if tts_text else None)
        except InputError as e:  # name the file as the user knows it, not by where the upload landed here
            detail = e.detail
            for p in (image_path, audio_path):
                detail = detail if p is None else detail.replace(p, Path(p).name)
            raise InputError(e.field, detail) from None
        clips = 1
        if inputs.audio is not None:
            frames = inputs.audio.size / inputs.sr * self.cfg.sample_fps
            clips = max(1, math.ceil(frames / req.infer_frames))
            clips = min(clips, req.num_clip or clips)
            if clips > self.max_clips:
                raise InputError("audio", f"lasts {inputs.audio.size / inputs.sr:.1f} s, {clips} clips: this app makes "
                                          f"at most {self.max_clips} per job (set the number of clips)")
        with self._lock:
            if sum(self._jobs[i].state == "queued" for i in self._order) >= self.max_queued:
                raise InputError("queue", f"is full ({self.max_queued} jobs waiting): wait for one to finish")
            job_id = f"{len(self._order) + 1:04d}-{secrets.token_hex(3)}"
        folder = self.jobs_dir / job_id
        folder.mkdir(parents=True)
        # The job keeps its own copies of its inputs (the upload cache may be cleaned; history restores them).
        for key, src in (("image", image_path), ("audio", audio_path)):
            if src is not None:
                dst = folder / f"input_{key}{Path(src).suffix.lower()[:8]}"
                shutil.copyfile(src, dst)
                form[key] = dst.name
        form.update(seed=req.seed, tts_text=tts_text or "")
        sigmas = flow_sigmas(req.steps, req.shift, solver=req.solver, spacing=req.noise_schedule)
        plan = ["+".join(w) for w in expert_weights(sigmas, req.experts)]
        job = Job(id=job_id, form=form, request=req, inputs=inputs, folder=folder, plan=plan, clips=clips)
        with self._lock:
            self._jobs[job.id] = job
            self._order.append(job.id)
            self.changed += 1
            self._lock.notify_all()
        return job

    # ------------------------------------------------------------------------------------------- queries

    def get(self, job_id: str) -> Job:
        job = self._jobs.get(str(job_id))
        if job is None:
            raise InputError("job", f"{job_id!r} is not a job of this app")
        return job

    def position(self, job: Job) -> int:
        """1 for the next job to run, 2 after it...; 0 when not waiting."""
        if job.state != "queued":
            return 0
        waiting = [i for i in self._order if self._jobs[i].state == "queued"]
        return waiting.index(job.id) + 1

    def active(self) -> list[Job]:
        """The running job then the waiting ones, in the order they will run."""
        jobs = [self._jobs[i] for i in self._order]
        return [j for j in jobs if j.state == "running"] + [j for j in jobs if j.state == "queued"]

    def history(self) -> list[Job]:
        """Finished, failed and cancelled jobs, newest first."""
        return [self._jobs[i] for i in reversed(self._order) if self._jobs[i].state in ("done", "failed", "cancelled")]

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        with self._lock:
            if job.state == "queued":
                self._end(job, "cancelled", "cancelled before it started")
            elif job.state == "running":
                job.cancel.set()
                job.message = "cancelling..."
                job.version += 1
        return job

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for job in self.active():
                job.cancel.set()
            self._lock.notify_all()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------------------------------- the worker

    def _end(self, job: Job, state: str, message: str = "") -> None:
        finished = time.time()
        # The record is on disk (whole: written aside, then renamed) before the job shows as ended, so whatever sees
        # the new state (the page, a restarted app reading the history) also finds the record.
        dest = job.folder / "job.json"
        try:
            tmp = dest.with_suffix(".json.tmp")
            tmp.write_text(json.dumps({**self._record(job), "state": state, "message": message, "finished": finished},
                                      indent=1))
            tmp.replace(dest)
        except OSError as e:
            log.warning("cannot write %s: %s", dest, e)
        job.state, job.message, job.finished, job.eta_s = state, message, finished, None
        job.inputs = None
        job.version += 1
        self.changed += 1
        self.finished += 1

    def _work(self) -> None:
        if self.warming:
            self._warm_up()
        while True:
            with self._lock:
                while not self._closed and not any(self._jobs[i].state == "queued" for i in self._order):
                    self._lock.wait()
                if self._closed:
                    return
                job = next(self._jobs[i] for i in self._order if self._jobs[i].state == "queued")
                job.state, job.started, job.stage = "running", time.time(), "text"
                job.version += 1
                self.changed += 1
            self._run(job)

    def _warm_up(self) -> None:
        """One short job on the task's example (or its own first settings): primes the kernels, measures the stage
        costs for ETAs and fits the preview's colour map, before the first user job."""
        t0 = time.perf_counter()
        try:
            # A short clip: it primes the same kernels as a full one (a cold first job waited 15 s for its first
            # frame here, a warm one 2 s) in a third of the time.
            short = {"num_clip": 1, "infer_frames": min(self.cfg.infer_frames, 16)} if self.cfg.modality == "s2v" \
                else {}
            req = make_request(self.cfg, steps=preset_steps(self.cfg.sample_steps, "fast"), seed=0, **short)
            inputs = read_inputs(self.cfg) if self.cfg.embedded else None
            for _ in range(2 if inputs is not None else 0):  # the first run is cold: the second one's pace counts
                job = Job(id="warmup", form={}, request=req, inputs=inputs, folder=self.out_dir, plan=[])
                video = self._generate(self.pipe, job)
            if inputs is not None:
                self.rates.learn(video.timings, req.steps, 1, clip_pixels(self.cfg, req), None)
        except Exception as e:  # noqa: BLE001 (a failed warm-up only costs the first job its ETA and preview)
            log.warning("warm-up skipped: %s", e)
        log.info("warm-up took %.1f s", time.perf_counter() - t0)
        self.warming = False
        self.changed += 1

    def _generate(self, pipe: Pipeline, job: Job, save: Path | None = None):  # noqa: ANN202 (a wanmoe.Video)
        """pipe.run with the job's progress and preview callbacks; raises Cancelled when the job is cancelled."""
        t_sub = job.created
        clip_latent: dict[int, torch.Tensor] = {}
        groups: dict[int, list[torch.Tensor]] = {}
        stage_t0 = [time.perf_counter(), 0]  # when sampling started, steps done then

        def check() -> None:
            if job.cancel.is_set():
                raise Cancelled()

        def progress(p: Progress) -> None:
            check()
            job.stage, job.clip, job.clips = p.stage, p.clip, p.clips
            if p.stage == "sample":
                if job.step == 0 or p.done == 1:
                    stage_t0[:] = [time.perf_counter(), p.done]
                job.step = p.done
            if p.stage == "decode":  # a clip is decoded: its frames teach the preview's colour map
                job.clips_decoded, job.clip_frames = p.done, 0
                lat, got = clip_latent.pop(p.clip, None), groups.pop(p.clip, [])
                if lat is not None and self._fit.add(lat, got, self.cfg.vae_stride[1]):
                    self.rgb = self._fit.map()
                if p.done == p.total:
                    job.stage = "mux"  # the last clip is in the file: the muxer finishes it and the sidecar
            job.eta_s = self._eta(job, stage_t0)
            job.version += 1

        def preview(v: Preview) -> None:
            check()
            if v.latent is not None:
                clip_latent[v.clip] = v.latent.detach().float().cpu()
                if self.rgb is not None:
                    job.preview_uri = png_data_uri(strip(self.rgb(v.latent), count=4, height=96))
            if v.frames is not None:
                job.stage = "decode"
                groups.setdefault(v.clip, []).append(v.frames)
                if job.first_frame_s is None:
                    job.first_frame_s = round(time.time() - t_sub, 2)
                job.frames_done += v.frames.shape[1]
                job.clip_frames += v.frames.shape[1]
                last = frames_uint8(v.frames[:, -1:])  # (1, Hp, Wp, 3)
                job.frame_uri = png_data_uri(strip(last, count=1, height=max(192, last.shape[1])))
                job.eta_s = self._eta(job, stage_t0)
            job.version += 1

        return pipe.run(job.request, job.inputs, progress=progress, preview=preview, save=save, keep_frames=False)

    def _run(self, job: Job) -> None:
        try:
            w, h = job.request.size
            path = job.folder / f"{self.cfg.task}_{w}x{h}_{_slug(job.request.prompt)}_{job.id}.mp4"
            # Each clip is muxed as soon as it is decoded; the mp4 and its sidecar appear together at the end.
            video = self._generate(self._pipe(quant_of(job.form)), job, save=path)
            job.video, job.sidecar = path, path.with_suffix(".json")
            job.timings = {k: round(float(v), 3) for k, v in video.timings.items()}
            mux_s = max(0.0, video.timings["total_s"] - video.timings.get("generate_s", video.timings["total_s"]))
            self.rates.learn(video.timings, job.total_steps, job.clips, clip_pixels(self.cfg, job.request), mux_s)
            self._end(job, "done", f"{job.frames_done} frames in {time.time() - job.started:.1f} s")
        except Cancelled:
            self._end(job, "cancelled", "cancelled while running")
        except InputError as e:
            self._end(job, "failed", str(e))
        except Exception as e:  # noqa: BLE001 (the worker must survive any job; the message goes to the page)
            log.exception("job %s failed", job.id)
            self._end(job, "failed", f"{type(e).__name__}: {e}")

    def _eta(self, job: Job, stage_t0: list) -> float | None:
        """Seconds left: steps left x seconds per step (this job's own pace once it has one), clips left to decode
        x seconds per decode (from earlier jobs or the warm-up), and writing the file."""
        r = self.rates
        t_start, done_then = stage_t0
        seen = job.step - done_then
        px = clip_pixels(self.cfg, job.request)
        step_s = (time.perf_counter() - t_start) / seen if seen > 0 else None if r.step is None else r.step * px
        if step_s is None or r.decode is None:
            return None
        per_clip = job.request.infer_frames if self.cfg.modality == "s2v" else job.request.frame_num
        part = min(0.95, job.clip_frames / max(1, per_clip)) if job.stage == "decode" else 0.0
        decodes_left = max(0.0, job.clips - job.clips_decoded - part)
        return (job.total_steps - job.step) * step_s + decodes_left * r.decode * px + (r.mux_s or 0.0)

    # ------------------------------------------------------------------------------------------- history on disk

    def _record(self, job: Job) -> dict:
        return {"id": job.id, "state": job.state, "message": job.message, "form": job.form, "created": job.created,
                "finished": job.finished, "first_frame_s": job.first_frame_s, "timings": job.timings,
                "video": job.video.name if job.video else None, "request": job.request.to_json()}

    def _load_history(self) -> None:
        """Finished jobs of earlier runs of the app, from their job.json files (newest kept last in order)."""
        records = []
        for f in sorted(self.jobs_dir.glob("*/job.json")):
            try:
                rec = json.loads(f.read_text())
                req = make_request(self.cfg, **{k: v for k, v in self.settings(rec["form"]).items() if k != "cache"})
                if rec["id"] != f.parent.name:
                    continue
            except (OSError, ValueError, KeyError, TypeError):
                continue  # another model's job, or a damaged record: not shown
            folder = f.parent
            video = folder / rec["video"] if rec.get("video") else None
            job = Job(id=rec["id"], form=rec["form"], request=req, inputs=None, folder=folder, plan=[],
                      created=rec.get("created", 0.0), state=rec.get("state", "done"), message=rec.get("message", ""),
                      finished=rec.get("finished"), first_frame_s=rec.get("first_frame_s"),
                      timings=rec.get("timings", {}))
            if video is not None and video.is_file():
                job.video, job.sidecar = video, video.with_suffix(".json")
            records.append(job)
        for job in sorted(records, key=lambda j: j.created):
            self._jobs[job.id] = job
            self._order.append(job.id)


__all__ = ["JobQueue", "Job", "Cancelled", "QUALITY", "preset_steps", "REQUEST_FIELDS"]
