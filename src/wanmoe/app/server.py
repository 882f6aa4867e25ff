"""`wanmoe serve`: load a model once, then serve the page and a small HTTP API on 127.0.0.1.

The HTTP API (for scripts; README has a curl session):
  POST   /api/jobs               multipart: image, audio (files, optional for the embedded task), and any form field
                                 (prompt, tts_text, tts_voice, quality, steps, seed, solver, shift, guide_scale, ...)
                                 -> 201 and the job's status; 422 {"field", "error"} for a bad input
  GET    /api/jobs               every job's status (running and waiting first, then the history)
  GET    /api/jobs/{id}          state, queue position, stage, steps per expert, frames, ETA, timings
  GET    /api/jobs/{id}/video    the mp4 (409 until the job is done); /sidecar: its JSON
  DELETE /api/jobs/{id}          cancel
The page's own gradio events are private to it: these routes are the API.

Everything the app writes goes under `--out_dir`: uploads, gradio's file cache, temporary files, and one folder
per job. This is a command-line entry point: it alone sets process-wide state (environment, temp folder).
"""


import argparse
import importlib.util
import logging
import os
import re
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

from wanmoe.configs import DEFAULT_TASK
from wanmoe.request import InputError

log = logging.getLogger("wanmoe.app")

# HTTP form fields -> how to read them (strings in a multipart form); the rest are strings.
NUMBERS = {"steps": int, "seed": int, "num_clip": int, "infer_frames": int, "shift": float, "boundary": float,
           "threshold": float, "blend": float, "motion_scale": float, "cache": float}
TEXTS = ("prompt", "negative_prompt", "tts_text", "tts_voice", "quality", "solver", "size", "guide_scale", "int8",
         "quant", "clip_context")
MAX_UPLOAD_MB = 64


def default_out_dir() -> Path:
    return Path(os.environ.get("WANMOE_OUTPUT_DIR") or Path.home() / "wanmoe-outputs") / "app"


def form_from_http(fields: dict[str, str]) -> dict:
    """Multipart text fields -> the job form (numbers parsed; guide_scale `4.0` or `high=4.0,low=3.0`)."""
    unknown = sorted(set(fields) - set(NUMBERS) - set(TEXTS))
    if unknown:
        raise InputError(unknown[0], f"is not a field of this API; fields: {', '.join(sorted([*NUMBERS, *TEXTS]))}")
    form: dict = {}
    for k, v in fields.items():
        v = v.strip()
        if v == "":
            continue
        if k in NUMBERS:
            try:
                form[k] = NUMBERS[k](v)
            except ValueError:
                raise InputError(k, f"must be {'an integer' if NUMBERS[k] is int else 'a number'}, got {v!r}") from None
        elif k == "guide_scale":
            try:
                form[k] = {a.split("=")[0].strip(): float(a.split("=")[1]) for a in v.split(",")} if "=" in v \
                    else float(v)
            except (ValueError, IndexError):
                raise InputError(k, f"must be a number or high=4.0,low=3.0, got {v!r}") from None
        elif k == "int8":
            form[k] = v.lower() in ("1", "true", "yes", "on")
        else:
            form[k] = v
    return form


def make_app(q, upload_root: Path, allowed: list[str]):  # noqa: ANN001, ANN201 (JobQueue -> fastapi.FastAPI)
    """The FastAPI app: the REST routes above, and the gradio page mounted at /."""
    import gradio as gr
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse

    from wanmoe.app import ui

    api = FastAPI(title="wanmoe", docs_url=None, redoc_url=None, openapi_url=None)

    def status(job) -> dict:  # noqa: ANN001
        return job.status(q.position(job))

    def find(job_id: str):  # noqa: ANN202
        try:
            return q.get(job_id)
        except InputError:
            return None

    @api.post("/api/jobs")
    async def submit(request: Request) -> JSONResponse:
        folder = upload_root / "api" / secrets.token_hex(8)
        try:
            async with request.form(max_files=2, max_fields=40, max_part_size=MAX_UPLOAD_MB << 20) as data:
                files, fields = {}, {}
                for key, value in data.multi_items():
                    if hasattr(value, "read"):  # an uploaded file: its bytes go into our upload folder only
                        if key not in ("image", "audio"):
                            raise InputError(key, "is not a file field of this API (image, audio)")
                        name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(value.filename or key).name)[-80:] or key
                        (folder / key).mkdir(parents=True, exist_ok=True)
                        dst = folder / key / (name.lstrip(".") or key)  # the user's name, so messages use it
                        with dst.open("wb") as out:
                            shutil.copyfileobj(value.file, out)
                        files[key] = dst
                    else:
                        fields[key] = str(value)
            job = q.submit(form_from_http(fields), image=files.get("image"), audio=files.get("audio"))
            return JSONResponse(status(job), status_code=201)
        except InputError as e:
            return JSONResponse({"field": e.field, "error": str(e)}, status_code=422)
        except Exception as e:  # noqa: BLE001 (a malformed multipart body: a client error, not a crash)
            return JSONResponse({"field": "request", "error": f"cannot read the form: {e}"}, status_code=400)
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # the job keeps its own copies

    @api.get("/api/jobs")
    def jobs() -> JSONResponse:
        return JSONResponse([status(j) for j in q.active() + q.history()])

    @api.get("/api/jobs/{job_id}")
    def get(job_id: str) -> JSONResponse:
        job = find(job_id)
        return JSONResponse(status(job)) if job else JSONResponse({"error": "no such job"}, status_code=404)

    @api.delete("/api/jobs/{job_id}")
    def cancel(job_id: str) -> JSONResponse:
        job = find(job_id)
        return JSONResponse(status(q.cancel(job.id))) if job else JSONResponse({"error": "no such job"}, 404)

    def file(job_id: str, which: str):  # noqa: ANN202
        job = find(job_id)
        if job is None:
            return JSONResponse({"error": "no such job"}, status_code=404)
        path = job.video if which == "video" else job.sidecar
        if job.state != "done" or path is None or not path.is_file():
            return JSONResponse({"error": f"job {job.id} is {job.state}", **status(job)}, status_code=409)
        return FileResponse(path, media_type="video/mp4" if which == "video" else "application/json",
                            filename=path.name)

    api.get("/api/jobs/{job_id}/video")(lambda job_id: file(job_id, "video"))
    api.get("/api/jobs/{job_id}/sidecar")(lambda job_id: file(job_id, "sidecar"))

    demo = ui.build(q)
    demo.queue(default_concurrency_limit=None)
    return gr.mount_gradio_app(api, demo, path="", allowed_paths=allowed, show_error=True, ssr_mode=False,
                               max_file_size=f"{MAX_UPLOAD_MB}mb", footer_links=[], css=ui.CSS, pwa=False,
                               enable_monitoring=False, mcp_server=False)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wanmoe serve", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="A local web app and HTTP API for video generation (docs/app.md).")
    p.add_argument("--model", default=DEFAULT_TASK, help="task name or checkpoint folder (as wanmoe.load takes)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the app to your network)")
    p.add_argument("--port", type=int, default=7860, help="port")
    p.add_argument("--out_dir", default=None, help="the app's folder (default: $WANMOE_OUTPUT_DIR/app or "
                                                   "~/wanmoe-outputs/app)")
    p.add_argument("--device", default=None, help="compute device (default: cuda if available, else cpu)")
    p.add_argument("--offload_model", default=None, choices=["true", "false"], help="keep idle experts off the GPU")
    p.add_argument("--convert_model_dtype", action="store_true", help="DiT weights in bf16")
    p.add_argument("--max_queued", type=int, default=16, help="jobs that may wait at once")
    p.add_argument("--max_clips", type=int, default=20, help="clips one job may make")
    p.add_argument("--no_warmup", action="store_true", help="skip the short warm-up job at start")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if importlib.util.find_spec("gradio") is None:
        print("error: wanmoe serve needs the app extra: pip install 'wanmoe[app]' (gradio)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out_dir or default_out_dir()).expanduser().resolve()
    uploads = out / "uploads"
    for d in (out, uploads / "gradio", out / "tmp"):
        d.mkdir(parents=True, exist_ok=True)
    # Before gradio is imported: it reads these once. Uploads, its cache and every temporary file stay in `out`.
    os.environ["GRADIO_TEMP_DIR"] = str(uploads / "gradio")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["TMPDIR"] = str(out / "tmp")
    tempfile.tempdir = str(out / "tmp")
    # Library caches and settings too (matplotlib's font cache under gradio, espeak-ng's audio-server settings).
    for var, sub in (("XDG_CACHE_HOME", "cache"), ("XDG_CONFIG_HOME", "config"), ("MPLCONFIGDIR", "cache/matplotlib")):
        os.environ[var] = str(out / sub)
    import uvicorn  # a dependency of gradio

    import wanmoe
    from wanmoe.app.jobs import JobQueue

    offload = None if args.offload_model is None else args.offload_model == "true"
    opts = dict(device=args.device, offload_model=offload, convert_model_dtype=args.convert_model_dtype)
    try:
        first = wanmoe.load(args.model, **opts)
    except (InputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    q = JobQueue(lambda quant: first if quant is None else wanmoe.load(args.model, quant=quant, **opts), out,
                 upload_dir=uploads, max_queued=args.max_queued, max_clips=args.max_clips, warmup=not args.no_warmup)
    allowed = [str(out)] + ([str(Path(first.cfg.example_files()["image"]).parent)] if first.cfg.embedded else [])
    app = make_app(q, uploads, allowed)
    print(f"wanmoe serve: {first.cfg.task} on http://{args.host}:{args.port} (files in {out})", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        q.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
