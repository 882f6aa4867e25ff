"""`wanmoe eval`: held-out comparison of expert set-ups on the talking-avatar task, as a markdown table + PNG plots.

    wanmoe eval --n 8 --out docs/results                       # two experts vs the single-expert baseline
    wanmoe eval --setups two,one,two-threshold,two-blend,two-int8,two-10steps --n 4
    wanmoe eval --n 3 --setups two,one --speech 6 --out runs/eval  # the full evaluation (docs/results.md)
    wanmoe eval --n 3 --setups still --speech 6                # control: the reference held still, no model
    wanmoe eval --n 3 --speech 3 --jobs 2 --threads 1          # the short run of tests/test_eval.py
    wanmoe eval --motion 8 --long 30 --threads 1 --out runs/motion  # prompt motion and long audio (eval/motion.py)

Each set-up runs in its own subprocess, so its peak memory is its own. For every held-out sample the
reference image, audio and prompt go through the same Python API (`wanmoe.load`) as `generate.py`; the output is
compared with the ground-truth render of the same avatar and audio. With `--speech K`, K extra samples are
driven by real synthesized speech (espeak-ng: hand-written sentences no training clip speaks, held-out avatars,
several of espeak-ng's voices), whose ground truth is rendered from that audio; `sync_speech` is their mean.

Alignment: the first S2V clip drops 3 frames (official), so generated frame k shows ground-truth frame k + 3.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from wanmoe.configs import PRESETS
from wanmoe.data.espeak import HELDOUT_SENTENCES

# name -> (model folder relative to the task's model root, request settings, load options): Python API keywords.
SETUPS: dict[str, tuple[str, dict, dict]] = {
    "two": ("", {}, {}),
    "one": ("single_expert", {}, {}),
    "two-threshold": ("", {"threshold": -2.5}, {}),
    "two-blend": ("", {"blend": 1.0}, {}),
    "two-int8": ("", {}, {"int8": True}),
    "two-10steps": ("", {"steps": 10}, {}),
    "one-10steps": ("single_expert", {"steps": 10}, {}),
    "two-dpm++": ("", {"solver": "dpm++"}, {}),
    "two-audio2": ("", {"motion_scale": 2.0}, {}),
    "one-audio2": ("single_expert", {"motion_scale": 2.0}, {}),
    "two-audio1": ("", {"motion_scale": 1.0}, {}),
    "one-audio1": ("single_expert", {"motion_scale": 1.0}, {}),
    "two-audio3": ("", {"motion_scale": 3.0}, {}),
    "one-audio3": ("single_expert", {"motion_scale": 3.0}, {}),
    # Step caching per expert at threshold 0.1 (each model's shipped step_cache.json).
    "two-cache": ("", {"cache": 0.1}, {}),
    "one-cache": ("single_expert", {"cache": 0.1}, {}),
    # The official clip chaining (the previous clip's frames as motion frames); s2v-mini's default starts every
    # clip from the reference image instead (clip_context "reference"), which --long measures against this.
    "two-frames": ("", {"clip_context": "frames"}, {}),
    "one-frames": ("single_expert", {"clip_context": "frames"}, {}),
    # Control, no model: the reference image held still for as many frames as the model makes. It shows what the
    # picture metrics give for keeping the face and moving nothing (its mouth sync is 0 by construction).
    "still": (None, {}, {}),
}
# Frames the first clip loses (as the official S2V pipeline drops them): generated frame k shows ground-truth
# frame k + DROPPED.
DROPPED = PRESETS["s2v-mini"].dropped_frames(start_from_ref=False)
# Real-speech eval samples: (sentence, espeak-ng voice). Written by hand, so none is a training sentence
# (those are drawn from `wanmoe.data.espeak.WORDS`); the first is the single sample of earlier reports.
SPEECH_CASES = HELDOUT_SENTENCES  # the held-out espeak-ng sentences (text, voice) of --speech and --long


def held_out_cases(n: int, frames: int, speech: int, work: Path) -> list[dict]:
    """Write each case's reference PNG and audio WAV; keep the ground truth for scoring."""
    from wanmoe import media
    from wanmoe.data.avatar import make_sample, render_from_audio, sample_params, split_seeds
    from wanmoe.data.espeak import espeak_wav

    cases = []
    for seed in split_seeds("heldout", n):
        s = make_sample(seed, frames=frames)
        cases.append({"name": f"heldout-{seed}", "sample": s})
    if speech > len(SPEECH_CASES):
        raise ValueError(f"--speech {speech}: at most {len(SPEECH_CASES)} real-speech samples")
    avatars = split_seeds("heldout")
    for k, (text, voice) in enumerate(SPEECH_CASES[:speech]):
        wav = espeak_wav(text, work / f"speech{k}.wav", voice=voice)
        audio = media.read_audio(wav, sr=16000)[: int(16000 * frames / 16)]
        s = render_from_audio(sample_params(avatars[-1 - k]), audio, 16000, 16.0, 128)
        cases.append({"name": "espeak-ng" if k == 0 else f"espeak-ng-{k}", "sample": s})
    for c in cases:
        s = c["sample"]
        c["image"], c["audio"] = work / f"{c['name']}.png", work / f"{c['name']}.wav"
        media.save_png(c["image"], s.ref)
        _write_wav(c["audio"], s.audio, s.sr)
    return cases


def _write_wav(path: Path, audio: np.ndarray, sr: int) -> None:
    import wave

    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes((np.clip(audio, -1, 1) * 32767).astype(np.int16).tobytes())


def score(video: torch.Tensor, s) -> dict[str, float]:  # noqa: ANN001 (AvatarSample)
    from wanmoe.eval import metrics as m

    t = min(video.shape[1], s.video.shape[1] - DROPPED)
    gen, gt = video[:, :t], s.video[:, DROPPED : DROPPED + t]
    env = s.envelope[DROPPED : DROPPED + t]
    sync = m.mouth_sync(gen, env, s.ref)
    return {"psnr": m.psnr(gen, gt), "ssim": m.ssim(gen, gt), "flow_consistency": m.flow_consistency(gen),
            "sync": sync["sync"], "sync_best": sync["sync_best"], "identity": m.identity_similarity(gen, s.ref),
            "gt_sync": m.mouth_sync(gt, env, s.ref)["sync"]}


def other_sync(video: torch.Tensor, s, other) -> float:  # noqa: ANN001 (AvatarSample)
    """Sync of ``video`` (generated for ``s``) against the envelope of a different sample ``other``."""
    from wanmoe.eval import metrics as m

    t = min(video.shape[1], s.video.shape[1] - DROPPED, other.envelope.shape[0] - DROPPED)
    return m.mouth_sync(video[:, :t], other.envelope[DROPPED : DROPPED + t], s.ref)["sync"]


def run_setup(task: str, model_dir: Path, settings: dict, options: dict, cases: list[dict], seed: int,
              frames: int | None = None) -> dict:
    """Generate every case with one set-up (in this process, models loaded once) and average the metrics."""
    from wanmoe.api import load
    from wanmoe.eval.metrics import peak_rss_mb

    pipe = None if model_dir is None else load(model_dir, task=None, **options)
    if frames is not None:
        settings = {**settings, "infer_frames": frames}
    rows, videos, seconds, n_frames, calls = [], [], 0.0, 0, {}
    for c in cases:
        if pipe is None:  # the "still" control: the reference as the pipeline reads it, repeated
            from wanmoe.inputs import load_image

            t = (frames or PRESETS[task].infer_frames) - DROPPED
            frames_ = load_image(c["image"])[:, None].expand(-1, t, -1, -1).contiguous()  # (3, T, H, W)
        else:
            video = pipe(c["sample"].prompt, image=c["image"], audio=c["audio"], seed=seed, **settings)
            for name, k in video.expert_calls.items():  # transformer evaluations per expert (fewer with caching)
                calls[name] = calls.get(name, 0) + k
            seconds += video.timings["generate_s"]
            n_frames += video.num_frames
            frames_ = video.frames
        rows.append({"case": c["name"], **score(frames_, c["sample"])})
        videos.append(frames_)
    out = summarize(rows, videos, cases)
    out["s_per_frame"] = seconds / max(n_frames, 1)
    for name, k in calls.items():
        out[f"calls_{name}"] = k / len(cases)  # per sample
    out["peak_rss_mb"] = peak_rss_mb()
    out["cases"] = rows
    return out


def summarize(rows: list[dict], videos: list[torch.Tensor], cases: list[dict]) -> dict:
    """The table row of one set-up from its per-case scores (``rows``, filled in with ``sync_other``): the held-out
    means, and over the real-speech cases the mean sync, the weakest and the best-lag mean."""
    # Control: the same generated mouth against ANOTHER case's loudness envelope. A mouth that follows its own
    # audio scores high on "sync" and about 0 here; a generic open/close pattern scores alike on both.
    for k, r in enumerate(rows):
        r["sync_other"] = other_sync(videos[k], cases[k]["sample"], cases[(k + 1) % len(cases)]["sample"])
    heldout = [r for r in rows if not r["case"].startswith("espeak-ng")]
    out = {k: float(np.mean([r[k] for r in heldout])) for k in heldout[0] if k != "case"}
    speech = [r for r in rows if r["case"].startswith("espeak-ng")]
    if speech:  # the mean over the real-speech samples, and the weakest one
        out["sync_speech"] = float(np.mean([r["sync"] for r in speech]))
        out["sync_speech_min"] = float(min(r["sync"] for r in speech))
        out["sync_speech_best"] = float(np.mean([r["sync_best"] for r in speech]))
    return out


def run_checks(a: argparse.Namespace, root: Path, names: list[str], argv: list[str] | None) -> int:
    """`--motion` / `--long`: each check for each set-up, in this process; JSON and markdown into `--out`."""
    from wanmoe.api import load
    from wanmoe.eval import motion

    if a.motion < 0 or a.long < 0:
        raise SystemExit(f"--motion and --long must be >= 0, got {a.motion} and {a.long}")
    results, md = {}, [f"command: wanmoe eval {' '.join(argv if argv is not None else sys.argv[1:])}"]
    if any(SETUPS[n][0] is None for n in names):
        raise SystemExit("--motion and --long measure models; the 'still' control has none")
    for name in names:
        sub, settings, options = SETUPS[name]
        pipe = load(root / sub, task=None, **options)
        if a.frames is not None:
            settings = {**settings, "infer_frames": a.frames}
        if a.motion:
            print(f"motion {name} ...", file=sys.stderr, flush=True)
            results[f"{name}/motion"] = r = motion.run_motion(pipe, a.motion, a.frames, a.seed, **settings)
            md += ["", f"## {name}: prompt motion", "", motion.motion_markdown(r)]
        if a.long:
            print(f"long audio {name} ...", file=sys.stderr, flush=True)
            strip = a.out / f"long_{name}.png"
            results[f"{name}/long"] = r = motion.run_long(pipe, a.long, a.long_source, a.seed, strip=strip, **settings)
            md += ["", f"## {name}: long audio", "", motion.long_markdown(r), "",
                   f"![ground truth (top) and {name} (bottom), {motion.STRIP_COLUMNS} frames from first to last]"
                   f"({strip.name})"]
    (a.out / "motion_long.json").write_text(json.dumps(results, indent=2))
    (a.out / "motion_long.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="wanmoe eval", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", default="s2v-mini", choices=[t for t, c in PRESETS.items() if c.embedded],
                   help="an embedded S2V task (its model folder holds the two-expert model and single_expert/)")
    p.add_argument("--model", type=Path, default=None, help="model root (default: the embedded assets)")
    p.add_argument("--setups", default=None,
                   help=f"comma list of {', '.join(SETUPS)} (default: two,one; with --motion/--long: two)")
    p.add_argument("--n", type=int, default=4, help="held-out samples")
    p.add_argument("--speech", type=int, nargs="?", const=1, default=0, metavar="K",
                   help=f"add K real-speech samples (espeak-ng; --speech alone: 1, at most {len(SPEECH_CASES)})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames", type=int, default=None,
                   help="pixel frames per sample, a multiple of 4 (default: one clip of the task's infer_frames)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per set-up process")
    p.add_argument("--jobs", type=int, default=1,
                   help="set-ups run side by side (e.g. --jobs 2 --threads 1 on 2 cores; s/frame then shares the CPU)")
    p.add_argument("--motion", type=int, default=0, metavar="N",
                   help="instead of the set-up table: prompt motion on N held-out avatars x 4 motion words")
    p.add_argument("--long", type=float, default=0.0, metavar="SECONDS",
                   help="instead of the set-up table: first vs last 4 s of a SECONDS-long held-out speech clip")
    p.add_argument("--long_source", default="espeak", choices=("espeak", "procedural"),
                   help="the long clip's audio: the held-out espeak-ng sentences, or procedural speech")
    p.add_argument("--out", type=Path, default=Path("eval_out"))
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if not 0 <= a.speech <= len(SPEECH_CASES):
        p.error(f"--speech must be between 0 and {len(SPEECH_CASES)}, got {a.speech}")
    if a.jobs < 1 or a.threads < 1:
        p.error(f"--jobs and --threads must be at least 1, got {a.jobs} and {a.threads}")
    torch.set_num_threads(a.threads)
    if a.worker is not None:  # subprocess mode: one set-up, JSON in and out
        job = json.loads(a.worker.read_text())
        cases = held_out_cases(job["n"], job["frames"], job["speech"], Path(job["work"]))
        model = None if job["model"] is None else Path(job["model"])
        res = run_setup(job["task"], model, job["settings"], job["options"], cases, job["seed"],
                        job.get("infer_frames"))
        Path(job["result"]).write_text(json.dumps(res))
        return 0
    from wanmoe.configs import ASSETS
    from wanmoe.eval.report import write_report

    cfg = PRESETS[a.task]
    root = a.model or ASSETS / a.task
    checks = a.motion > 0 or a.long > 0
    names = [s.strip() for s in (a.setups or ("two" if checks else "two,one")).split(",") if s.strip()]
    unknown = [s for s in names if s not in SETUPS]
    if unknown:
        raise SystemExit(f"unknown set-up(s) {unknown}; choose from {', '.join(SETUPS)}")
    a.out.mkdir(parents=True, exist_ok=True)
    if checks:
        return run_checks(a, root, names, argv)
    rows, details = {}, {}
    with tempfile.TemporaryDirectory() as work:
        jobs = {}
        for name in names:
            sub, settings, options = SETUPS[name]
            job = {"task": a.task, "model": None if sub is None else str(root / sub), "settings": settings,
                   "options": options, "n": a.n,
                   "speech": a.speech, "frames": a.frames or cfg.infer_frames, "infer_frames": a.frames,
                   "seed": a.seed, "work": f"{work}/{name}", "result": f"{work}/{name}.json"}
            Path(job["work"]).mkdir()  # each worker writes its own inputs: workers may run side by side
            Path(f"{work}/{name}.job").write_text(json.dumps(job))
            jobs[name] = job
        for k in range(0, len(names), a.jobs):  # `--jobs` set-ups side by side, each in its own process
            batch = names[k : k + a.jobs]
            print(f"eval {', '.join(batch)} ...", file=sys.stderr, flush=True)
            procs = [subprocess.Popen([sys.executable, "-m", "wanmoe.eval.cli", "--worker", f"{work}/{name}.job",
                                       "--threads", str(a.threads)]) for name in batch]
            codes = [proc.wait() for proc in procs]
            if any(codes):
                raise SystemExit(f"eval worker(s) failed: {dict(zip(batch, codes))}")
        for name in names:
            res = json.loads(Path(jobs[name]["result"]).read_text())
            details[name] = res.pop("cases")
            rows[name] = res
    (a.out / "results.json").write_text(json.dumps({"rows": rows, "cases": details}, indent=2))
    report = write_report(rows, a.out, title=f"wanmoe eval: {a.task}, {a.n} held-out samples"
                          + (f" + {a.speech} espeak-ng speech samples" if a.speech else ""),
                          notes=f"command: wanmoe eval {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(report.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
