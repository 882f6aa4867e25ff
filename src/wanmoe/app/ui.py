"""The page of `wanmoe serve` (gradio Blocks): inputs and settings, the job queue, live progress and previews,
and the history of finished jobs.

Everything the page does goes through `wanmoe.app.jobs.JobQueue`; a timer polls it four times a second and
redraws only what changed (the status panel by job version, the queue and history lists by their counters).
Previews travel inline as PNG data URIs, so they are never written to disk. Elements carry `wm-*` ids and
`data-*` attributes that the browser test (tests/test_app_browser.py) reads.
"""

from __future__ import annotations

import html
import time
from pathlib import Path

import gradio as gr

from wanmoe.app.jobs import QUALITY, Job, JobQueue, preset_steps, quant_of
from wanmoe.configs import PipelineConfig
from wanmoe.request import InputError
from wanmoe.sampling.schedules import SOLVERS
from wanmoe.tts import VOICES

POLL_S = 0.25
HISTORY_SHOWN = 12
DRIVE = ("audio file or microphone", "text to speech")

CSS = """
#wm-status .wm-card { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 10px 12px; }
#wm-status .wm-head { font-weight: 600; margin-bottom: 6px; }
#wm-status .wm-stages { display: flex; flex-wrap: wrap; gap: 6px; margin: 6px 0; font-size: 0.9em; }
#wm-status .wm-stage { padding: 2px 8px; border-radius: 10px; background: var(--background-fill-secondary); }
#wm-status .wm-stage.done { background: #d8f3dc; color: #1b4332; }
#wm-status .wm-stage.now { background: #ffe8a3; color: #5c4400; font-weight: 600; }
#wm-status progress { width: 100%; height: 10px; }
#wm-status .wm-previews { display: flex; gap: 12px; flex-wrap: wrap; margin-top: 8px; }
#wm-status figure { margin: 0; }
#wm-status figcaption { font-size: 0.8em; opacity: 0.8; }
#wm-status img { image-rendering: pixelated; border-radius: 4px; }
#wm-message .wm-error { color: #b00020; font-weight: 600; }
#wm-message .wm-ok { color: #1b4332; }
#wm-history { flex-wrap: wrap; }
#wm-history .wm-history-item { flex: 1 1 320px; max-width: 440px; border: 1px solid var(--border-color-primary);
  border-radius: 8px; padding: 8px; }
"""


def _esc(x: object) -> str:
    return html.escape(str(x), quote=True)


def _stages(job: Job) -> list[tuple[str, str]]:
    """(label, css class) per stage: text, encode, each expert's steps, decode, mux."""
    order = ["text", "encode", "sample", "decode", "mux"]
    at = order.index(job.stage) if job.stage in order else 0
    ended = job.state == "done"

    def cls(i: int) -> str:
        return "done" if ended or i < at else ("now" if i == at and job.state == "running" else "")

    out = [("text", cls(0)), ("encode", cls(1))]
    for name, done, total in job.expert_counts():
        c = "done" if ended or (done >= total and at >= 2) else ("now" if at == 2 and job.state == "running" and
                                                                  done < total else "")
        out.append((f"{name} expert {done}/{total} steps", c))
    per = job.clips if job.clips > 1 else ""
    frames = f"{job.frames_done} frame{'' if job.frames_done == 1 else 's'}"
    out.append((f"decode {frames}" + (f" ({job.clips_decoded}/{per} clips)" if per else ""), cls(3)))
    out.append(("mux", cls(4)))
    return out


def status_html(q: JobQueue) -> tuple[str, tuple]:
    """The status panel (running job, or the last finished one, or idle) and a key that changes when it does."""
    active = q.active()
    job = active[0] if active else (q.history()[0] if q.history() else None)
    if job is None:
        msg = "warming up the model (one short job)..." if q.warming else "idle: no job yet"
        return (f'<div id="wm-status-card" class="wm-card" data-state="{"warming" if q.warming else "idle"}">'
                f'<div class="wm-head">{msg}</div></div>'), ("idle", q.warming)
    if job.state == "queued":
        head = f"job {job.id}: waiting" + (" for the warm-up" if q.warming else "")
    elif job.state == "running":
        left = "time left: measuring" if job.eta_s is None else f"about {job.eta_s:.1f} s left"
        head = f"job {job.id}: {job.stage} &middot; {time.time() - job.started:.1f} s &middot; {left}"
    else:
        head = f"job {job.id}: {job.state} &middot; {_esc(job.message)}"
    elapsed = (job.finished or time.time()) - (job.started or time.time())
    frac = 1.0 if job.state == "done" else (elapsed / (elapsed + job.eta_s) if job.eta_s else
                                             job.step / max(1, job.total_steps) * 0.5)
    stages = "".join(f'<span class="wm-stage {c}">{_esc(label)}</span>' for label, c in _stages(job))
    figs = []
    if job.preview_uri:
        figs.append(f'<figure><img id="wm-preview" src="{job.preview_uri}" alt="live preview"><figcaption>'
                    f"live preview: x0 after step {job.step} of {job.total_steps}</figcaption></figure>")
    if job.frame_uri:
        first = "" if job.first_frame_s is None else f" (the first {job.first_frame_s:.2f} s after submitting)"
        figs.append(f'<figure><img id="wm-frame" src="{job.frame_uri}" alt="newest decoded frame"><figcaption>'
                    f"decoded frame {job.frames_done}{first}</figcaption></figure>")
    attrs = (f'data-job="{_esc(job.id)}" data-state="{job.state}" data-stage="{job.stage}" data-step="{job.step}" '
             f'data-frames="{job.frames_done}" data-first-frame="{job.first_frame_s or ""}"')
    body = (f'<div id="wm-status-card" class="wm-card" {attrs}><div class="wm-head">{head}</div>'
            f'<progress value="{frac:.3f}" max="1"></progress><div class="wm-stages">{stages}</div>'
            f'<div class="wm-previews">{"".join(figs)}</div></div>')
    return body, (job.id, job.version, round(elapsed) if job.state == "running" else 0, q.warming)


def _message(text: str, ok: bool) -> str:
    return f'<div class="{"wm-ok" if ok else "wm-error"}">{_esc(text)}</div>'


def _form(cfg: PipelineConfig, can_cache: bool) -> dict[str, gr.components.Component]:
    """The inputs and settings, in the current column; keyed as the job form (guidance per expert: guide_<name>)."""
    s2v, experts = cfg.modality == "s2v", list(cfg.experts)
    example = cfg.example_files() if cfg.embedded else {}
    prompt0 = cfg.example_prompt if cfg.embedded else ""
    if example.get("prompt") is not None and Path(example["prompt"]).is_file():
        prompt0 = Path(example["prompt"]).read_text().strip()
    f: dict[str, gr.components.Component] = {}
    f["image"] = gr.Image(label="Reference image" if s2v else "Input image", type="filepath", image_mode=None,
                          sources=["upload", "clipboard"], value=example.get("image"), elem_id="wm-image",
                          visible=cfg.modality in ("s2v", "i2v"), height=220)
    f["drive"] = gr.Radio(list(DRIVE), value=DRIVE[0], label="Drive the face with", visible=s2v, elem_id="wm-drive")
    f["audio"] = gr.Audio(label="Voice (upload or record)", type="filepath", sources=["upload", "microphone"],
                          value=example.get("audio"), elem_id="wm-audio", visible=s2v)
    f["tts_text"] = gr.Textbox(label="Words to speak (espeak-ng)", lines=2, visible=False, elem_id="wm-tts")
    f["tts_voice"] = gr.Dropdown(list(VOICES), value=VOICES[0], label="Voice", visible=False, allow_custom_value=True)
    f["prompt"] = gr.Textbox(label="Prompt", value=prompt0, lines=2, elem_id="wm-prompt")
    f["quality"] = gr.Radio(list(QUALITY), value="balanced", label="Preset", elem_id="wm-quality")
    f["go"] = gr.Button("Generate", variant="primary", elem_id="wm-generate")
    f["message"] = gr.HTML(elem_id="wm-message")
    with gr.Accordion("Advanced", open=False, elem_id="wm-advanced"):
        f["steps"] = gr.Slider(1, max(100, cfg.sample_steps), step=1, label="Sampling steps",
                               value=preset_steps(cfg.sample_steps, "balanced"), elem_id="wm-steps")
        with gr.Row():
            f["solver"] = gr.Dropdown(list(SOLVERS), value=cfg.sample_solver, label="Solver")
            f["shift"] = gr.Number(value=cfg.sample_shift, label="Shift", minimum=0.01)
            # Text, not a number: seeds go up to 2**63, beyond what a browser's numbers hold exactly.
            f["seed"] = gr.Textbox(value="-1", label="Seed (-1: random)", elem_id="wm-seed")
        with gr.Row():
            for n in experts:
                f[f"guide_{n}"] = gr.Number(value=cfg.guide_scale[n], label=f"Guidance, {n} expert")
        with gr.Row(visible=len(experts) > 1):
            f["boundary"] = gr.Number(value=cfg.boundary, label="Expert cut (timestep fraction)")
            f["blend"] = gr.Slider(0.0, 3.0, step=0.1, value=0.0, label="Blend (log-SNR half-width)")
        with gr.Row(visible=s2v):
            f["motion_scale"] = gr.Number(value=cfg.motion_scale, label="Motion scale (audio guidance)")
            f["num_clip"] = gr.Number(value=0, precision=0, label="Clips (0: as many as the audio fills)")
            f["clip_context"] = gr.Dropdown(["frames", "reference"], value=cfg.clip_context,
                                            label="Later clips start from (the clip before, or the image)")
        with gr.Row():
            f["size"] = gr.Dropdown(list(cfg.sizes) or [cfg.default_size], value=cfg.default_size,
                                    allow_custom_value=True, label="Size (W*H)")
            f["quant"] = gr.Dropdown(["float", "int8", "fp8"], value="float", label="Expert weights (8-bit: less "
                                     "memory; fp8 runs in fp8 on GPUs with fp8 tensor cores)")
            f["cache"] = gr.Slider(0.0, 0.5, step=0.05, value=0.0, visible=can_cache,
                                   label="Step caching threshold (0: off)")
    return f


def _queue_panel(q: JobQueue, version: gr.State, message: gr.HTML) -> None:
    """The waiting and running jobs, each with its position and a Cancel button; redrawn when `version` changes."""

    @gr.render(inputs=[version])
    def show_queue(_: int) -> None:
        jobs = q.active()
        if not jobs:
            gr.Markdown("*empty*", elem_classes=["wm-queue-empty"])
        for job in jobs:
            where = "running" if job.state == "running" else f"waiting, position {q.position(job)}"
            with gr.Row(elem_classes=["wm-queue-item"], equal_height=True):
                gr.Markdown(f"**{job.id}** &middot; {where} &middot; {_esc(job.request.prompt[:60])}")
                stop = gr.Button("Cancel", size="sm", scale=0, elem_classes=["wm-cancel"])
                stop.click(lambda j=job.id: _cancel(q, j), outputs=[message], api_visibility="private")


def _history_panel(q: JobQueue, version: gr.State, form: dict) -> None:
    """Finished jobs as cards: video with sound, downloads, settings, "use these settings again"."""
    keys = [k for k in form if k not in ("go", "message")]

    @gr.render(inputs=[version])
    def show_history(_: int) -> None:
        jobs = q.history()[:HISTORY_SHOWN]
        if not jobs:
            gr.Markdown("*nothing yet*")
        with gr.Row(elem_id="wm-history"):
            for job in jobs:
                with gr.Column(min_width=320, elem_classes=["wm-history-item", f"wm-{job.state}"]):
                    took = job.timings.get("total_s")
                    gr.Markdown(f"**{job.id}** &middot; {job.state} &middot; {_esc(job.message)}"
                                + (f" &middot; generation {took:.1f} s" if took else "")
                                + f"<br>{_esc(job.request.prompt[:120])}")
                    if job.video is not None:
                        gr.Video(value=str(job.video), label=job.video.name, elem_classes=["wm-video"], height=240)
                        with gr.Row():
                            gr.DownloadButton("mp4", value=str(job.video), size="sm", elem_classes=["wm-dl-mp4"])
                            gr.DownloadButton("JSON sidecar", value=str(job.sidecar), size="sm",
                                              elem_classes=["wm-dl-json"])
                    again = gr.Button("Use these settings again", size="sm", elem_classes=["wm-again"])
                    with gr.Accordion("Settings", open=False):
                        gr.JSON(value=job.request.to_json())
                    again.click(lambda j=job.id: [_restore(q, j)[k] for k in keys], outputs=[form[k] for k in keys],
                                api_visibility="private")


def build(q: JobQueue) -> gr.Blocks:
    cfg = q.cfg
    s2v = cfg.modality == "s2v"
    with gr.Blocks(title=f"wanmoe: {cfg.task}", analytics_enabled=False) as demo:
        gr.Markdown(f"## wanmoe &middot; {cfg.task}\nA face, a voice (or typed words) and a prompt become a talking "
                    "video. Jobs run one at a time, in order; finished ones stay in the history below."
                    if s2v else f"## wanmoe &middot; {cfg.task}")
        with gr.Row():
            with gr.Column(scale=5):
                form = _form(cfg, getattr(q.pipe.components, "cache_calibration", None) is not None)
            with gr.Column(scale=6):
                status = gr.HTML(status_html(q)[0], elem_id="wm-status")
                gr.Markdown("### Queue")
                queue_ver = gr.State(-1)
                _queue_panel(q, queue_ver, form["message"])
        gr.Markdown("### History")
        hist_ver = gr.State(-1)
        _history_panel(q, hist_ver, form)
        keys = [k for k in form if k not in ("go", "message")]
        # preprocess=False: gradio hands over the uploads' file records untouched (its own image preprocessing would
        # open them with PIL first); JobQueue opens a file only inside the upload folder, with the CLI's checks.
        form["go"].click(lambda *v: _submit(q, dict(zip(keys, v, strict=True))), inputs=[form[k] for k in keys],
                         outputs=[form["message"]], api_visibility="private", concurrency_limit=None, preprocess=False)
        form["quality"].change(lambda v: preset_steps(cfg.sample_steps, v), inputs=[form["quality"]],
                               outputs=[form["steps"]], api_visibility="private")
        form["drive"].change(lambda d: (gr.update(visible=d == DRIVE[0]), gr.update(visible=d == DRIVE[1]),
                                        gr.update(visible=d == DRIVE[1])), inputs=[form["drive"]],
                             outputs=[form["audio"], form["tts_text"], form["tts_voice"]], api_visibility="private")
        seen = gr.State({})

        def tick(seen_: dict) -> tuple:
            body, key = status_html(q)
            out = [gr.skip(), gr.skip(), gr.skip()]
            new = dict(seen_)
            if key != seen_.get("status"):
                out[0], new["status"] = body, key
            if q.changed != seen_.get("queue"):
                out[1] = new["queue"] = q.changed
            if q.finished != seen_.get("history"):
                out[2] = new["history"] = q.finished
            return (*out, new)

        # Each tick on its own ("multiple"): a tick whose answer is lost cannot hold back the next ones. (Outside
        # gradio's queue, a tick's new counters would not re-render the queue and history lists.)
        gr.Timer(POLL_S).tick(tick, inputs=[seen], outputs=[status, queue_ver, hist_ver, seen], show_progress="hidden",
                              api_visibility="private", concurrency_limit=None, trigger_mode="multiple")
        demo.load(tick, inputs=[seen], outputs=[status, queue_ver, hist_ver, seen], show_progress="hidden",
                  api_visibility="private")
    return demo


def _path(v: object) -> object:
    """An upload's path from its raw gradio file record ({"path": ..., "orig_name": ...}); anything else as is."""
    return v.get("path") if isinstance(v, dict) else v


def _submit(q: JobQueue, vals: dict) -> str:
    """Queue a job from the form; a bad input comes back as the library's message, shown in the page."""
    cfg = q.cfg
    s2v, experts = cfg.modality == "s2v", list(cfg.experts)
    text_mode = s2v and vals.pop("drive") == DRIVE[1]
    image, audio = _path(vals.pop("image", None)), _path(vals.pop("audio", None))
    form = {k: v for k, v in vals.items() if not k.startswith("guide_")}
    form["guide_scale"] = {n: vals[f"guide_{n}"] for n in experts}
    if not text_mode:
        form["tts_text"] = ""
    if len(experts) < 2:
        form.pop("boundary", None)
        form.pop("blend", None)
    if not s2v:
        for k in ("motion_scale", "num_clip", "clip_context"):
            form.pop(k, None)
    form["num_clip"] = int(form["num_clip"]) if form.get("num_clip") else None
    seed = str(form.get("seed") or "-1").strip()
    if not seed.lstrip("-").isdigit():
        return _message(f"Not queued: seed must be an integer (-1: random), got {seed!r}", ok=False)
    form["seed"] = int(seed)
    form["steps"] = int(form["steps"]) if form.get("steps") else None
    try:
        job = q.submit(form, image=image, audio=None if text_mode else audio)
    except InputError as e:
        return _message(f"Not queued: {e}", ok=False)
    pos = q.position(job)  # 0: it already runs
    return _message(f"Queued job {job.id} ({f'position {pos} in the queue' if pos else 'running'}).", ok=True)


def _cancel(q: JobQueue, job_id: str) -> str:
    try:
        job = q.cancel(job_id)
    except InputError as e:
        return _message(str(e), ok=False)
    return _message(f"Job {job.id}: {job.message or job.state}.", ok=True)


def _restore(q: JobQueue, job_id: str) -> dict:
    """The form as this job had it (its own copies of the inputs, the seed it ran with), keyed as `_form`."""
    job, experts = q.get(job_id), list(q.cfg.experts)
    f, r = job.form, job.request
    img = job.folder / f["image"] if f.get("image") else None
    aud = job.folder / f["audio"] if f.get("audio") else None
    text = f.get("tts_text") or ""
    out = {"image": str(img) if img and img.is_file() else None, "drive": DRIVE[1] if text else DRIVE[0],
           "audio": str(aud) if aud and aud.is_file() else None, "tts_text": text,
           "tts_voice": f.get("tts_voice") or VOICES[0], "prompt": f.get("prompt", ""),
           "quality": f.get("quality") or "balanced", "steps": r.steps, "solver": r.solver, "shift": r.shift,
           "seed": str(r.seed), "boundary": f.get("boundary", q.cfg.boundary), "blend": f.get("blend") or 0.0,
           "motion_scale": r.motion_scale, "num_clip": r.num_clip or 0, "clip_context": r.clip_context,
           "size": r.size_str,
           "quant": quant_of(f) or "float", "cache": f.get("cache") or 0.0}
    return out | {f"guide_{n}": r.guide_scale.get(n) for n in experts}


__all__ = ["build", "status_html", "POLL_S"]
