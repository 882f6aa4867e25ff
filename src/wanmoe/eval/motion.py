"""Prompt-motion and long-audio checks (issue 15 items 3 and 4): does the motion word of the prompt move the head,
and does a long clip hold its quality and colour from the first seconds to the last?

Axis legend: T pixel frames, H/W pixel height/width, 3 RGB channels.

Motion energy (``motion_energy``) is measured from the frames alone, so it scores a generated video and a
ground-truth render alike. Per frame, the background colour of each row is the median of the left and right
``BORDER`` pixel columns (the procedural background is a vertical gradient, so one colour per row fits it
exactly); a pixel's face weight ramps from 0 to 1 as its RGB distance to that colour goes from ``MASK_LO`` to
``MASK_HI``; the face centroid is the weighted mean pixel position. The energy is the RMS distance of the centroid
from its mean position over the clip, in pixels: an amplitude (not its square), so "2x" is 2x in displacement.
Why the outline and not frame differences: the mouth opens with the audio and the eyes blink in every motion
style, "still" included, and both sit inside the face, so they leave the face mask (and its centroid) unchanged
while they dominate a plain frame difference. ``frame_difference`` (the naive metric) is reported beside it.

Long audio (``long_audio_report``): the model's video of a ~30 s held-out clip against the ground-truth render of
the same avatar and audio, after the first clip's dropped frames: PSNR over the first and the last ``window_s``
seconds, and the colour drift, i.e. how far the change of mean RGB (whole frame, and the background border
ring) from the first window to the last differs between the generated video and the ground truth, in 8-bit
levels (0-255).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

BORDER = 4  # pixel columns each side that estimate the background (the face never reaches them)
MASK_LO, MASK_HI = 0.05, 0.15  # RGB distance (0-1 scale) from the background where the face weight goes 0 -> 1
# Motion frequency per style for the prompt-motion cases: the middle of `sample_params`' range for each style,
# so the only thing that differs between an avatar's four cases is the motion (and its prompt phrase).
STYLE_HZ = {"still": 0.0, "nod": 1.05, "sway": 0.55, "bob": 1.25}
DRIFT_MAX = 3.0  # colour drift tolerated as "no drift": 3 of 255 levels per channel (about 1 %)


def _frames01(video: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(3, T, H, W) in [-1, 1] -> float64 (T, H, W, 3) in [0, 1]."""
    v = torch.as_tensor(np.asarray(video) if not isinstance(video, torch.Tensor) else video).detach().cpu()
    if v.ndim != 4 or v.shape[0] != 3:
        raise ValueError(f"video must be (3, T, H, W), got {tuple(v.shape)}")
    return ((v.double() + 1) / 2).clamp(0, 1).permute(1, 2, 3, 0)  # (T, H, W, 3)


def face_centroids(video: torch.Tensor | np.ndarray) -> np.ndarray:
    """(T, 2) face centroid (x, y) in pixels per frame; see the module docstring for the face weight."""
    x = _frames01(video)  # (T, H, W, 3)
    t, h, w, _ = x.shape
    if w <= 2 * BORDER:
        raise ValueError(f"frames must be wider than {2 * BORDER} pixels, got {w}")
    sides = torch.cat([x[:, :, :BORDER], x[:, :, -BORDER:]], dim=2)  # (T, H, 2*BORDER, 3)
    bg = sides.median(dim=2).values  # (T, H, 3) background colour per row
    d = (x - bg[:, :, None]).norm(dim=-1)  # (T, H, W)
    m = ((d - MASK_LO) / (MASK_HI - MASK_LO)).clamp(0, 1)  # (T, H, W)
    mass = m.sum(dim=(1, 2)).clamp_min(1e-9)  # (T,)
    ys = torch.arange(h, dtype=torch.float64).view(1, h, 1)
    xs = torch.arange(w, dtype=torch.float64).view(1, 1, w)
    cx = (m * xs).sum(dim=(1, 2)) / mass  # (T,)
    cy = (m * ys).sum(dim=(1, 2)) / mass  # (T,)
    return torch.stack([cx, cy], dim=1).numpy()


def motion_energy(video: torch.Tensor | np.ndarray) -> float:
    """RMS distance (pixels) of the face centroid from its mean position over the clip; 0 for a still head."""
    return _rms_centred(face_centroids(video))


def _rms_centred(c: np.ndarray) -> float:
    return float(np.sqrt(((c - c.mean(0)) ** 2).sum(1).mean()))


def frame_difference(video: torch.Tensor | np.ndarray) -> float:
    """Mean absolute frame-to-frame difference on the 0-255 scale (the naive metric, for comparison)."""
    x = _frames01(video)
    if x.shape[0] < 2:
        return 0.0
    return float((x[1:] - x[:-1]).abs().mean() * 255)


# ------------------------------------------------------------------------------------------------ prompt motion
def motion_cases(n: int, frames: int) -> list[dict]:
    """For each of the first ``n`` held-out avatars, one ground-truth sample per motion style: the same reference
    image and audio, the prompt differing only in the motion phrase."""
    from wanmoe.data.avatar import MOTIONS, render_from_audio, sample_params, split_seeds
    from wanmoe.data.speech import SPEECH_SR, synthesize_speech

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    cases = []
    for seed in split_seeds("heldout", n):
        base = sample_params(seed)
        audio = synthesize_speech(seed, frames / 16.0, SPEECH_SR)
        for style in ("still", *(m for m in MOTIONS if m != "still")):  # "still" first: the others compare to it
            p = replace(base, motion=style, motion_hz=STYLE_HZ[style])
            cases.append({"seed": seed, "style": style, "sample": render_from_audio(p, audio, SPEECH_SR, 16.0, 128)})
    return cases


def _uint8_image(ref: torch.Tensor) -> torch.Tensor:
    """The reference as a PNG would carry it (uint8), like `wanmoe eval` and `generate.py` read it."""
    return ((ref.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _summary(energy: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    still = float(np.mean(energy["still"]))
    out = {}
    for style, vals in energy.items():
        # A still ground truth measures ~0 px: its own ratio is 1, and a moving style's against it is huge.
        per = [1.0 if style == "still" else v / max(s, 1e-9) for v, s in zip(vals, energy["still"])]
        out[style] = {"energy": float(np.mean(vals)), "ratio": float(np.mean(vals)) / max(still, 1e-9),
                      "ratio_min": float(min(per))}  # the weakest avatar's own ratio
    return out


def run_motion(pipe, n: int = 4, frames: int | None = None, seed: int = 0, **settings: object) -> dict:  # noqa: ANN001
    """Generate every (avatar, style) case with ``pipe`` and measure motion energy on it and on its ground truth.

    Returns per-case rows and, for "gt" and "model", per style: mean energy (px), ratio to "still" (of the means)
    and the smallest per-avatar ratio. ``moving_min_ratio`` is the weakest moving style's ratio (item 3: >= 2)."""
    frames = frames or pipe.cfg.infer_frames
    drop = pipe.cfg.dropped_frames(start_from_ref=False)
    rows, gt_e, gen_e, tracks = [], {}, {}, {}
    for c in motion_cases(n, frames):
        s = c["sample"]
        video = pipe(s.prompt, image=_uint8_image(s.ref), audio=(s.audio, s.sr), seed=seed, **settings)
        t = min(video.frames.shape[1], s.video.shape[1] - drop)
        gen, gt = video.frames[:, :t], s.video[:, drop : drop + t]  # generated frame k shows gt frame k + drop
        tr = tracks[c["seed"], c["style"]] = {"gt": face_centroids(gt), "model": face_centroids(gen)}
        row = {"seed": c["seed"], "style": c["style"], "prompt": s.prompt,
               "gt_energy": _rms_centred(tr["gt"]), "model_energy": _rms_centred(tr["model"]),
               "gt_frame_diff": frame_difference(gt), "model_frame_diff": frame_difference(gen)}
        # What the motion word alone changed: the centroid track against the same avatar's "still" track (same
        # image, audio and seed), so motion both videos share (artefacts, drift) cancels.
        for k in ("gt", "model"):
            row[f"{k}_vs_still"] = _rms_centred(tr[k] - tracks[c["seed"], "still"][k])
        rows.append(row)
        gt_e.setdefault(c["style"], []).append(row["gt_energy"])
        gen_e.setdefault(c["style"], []).append(row["model_energy"])
    out = {"n": n, "frames": frames, "seed": seed, "settings": dict(settings), "cases": rows,
           "gt": _summary(gt_e), "model": _summary(gen_e)}
    for k in ("gt", "model"):
        out[f"{k}_moving_min_ratio"] = min(v["ratio"] for s, v in out[k].items() if s != "still")
    return out


# ------------------------------------------------------------------------------------------------ long audio
def long_clip_audio(seconds: float, source: str = "espeak", work: str | None = None) -> tuple[np.ndarray, int, str]:
    """A held-out speech clip of exactly ``seconds`` at 16 kHz: (samples, sr, description).

    'espeak': the hand-written held-out sentences of `wanmoe eval --speech` (their voices), spoken one after the
    other with 0.4 s pauses, repeated if needed and cut; 'procedural': `synthesize_speech` of a held-out seed."""
    sr = 16000
    n = int(round(seconds * sr))
    if n < sr:
        raise ValueError(f"seconds must be >= 1, got {seconds}")
    if source == "procedural":
        from wanmoe.data.avatar import split_seeds
        from wanmoe.data.speech import synthesize_speech

        seed = split_seeds("heldout")[-1]  # no other eval sample uses this voice
        return synthesize_speech(seed, seconds, sr), sr, f"procedural speech, held-out seed {seed}"
    if source != "espeak":
        raise ValueError(f"source={source!r}; expected 'espeak' or 'procedural'")
    import tempfile
    from pathlib import Path

    from wanmoe import media
    from wanmoe.data.espeak import HELDOUT_SENTENCES as SPEECH_CASES
    from wanmoe.data.espeak import espeak_wav

    parts, total, k = [], 0, 0
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        while total < n:
            text, voice = SPEECH_CASES[k % len(SPEECH_CASES)]
            a = media.read_audio(espeak_wav(text, Path(tmp) / f"s{k}.wav", voice=voice), sr=sr).astype(np.float32)
            parts += [a, np.zeros(int(0.4 * sr), np.float32)]
            total, k = total + a.shape[0] + int(0.4 * sr), k + 1
    return np.concatenate(parts)[:n], sr, f"{k} held-out espeak-ng sentences (wanmoe.data.espeak.HELDOUT_SENTENCES)"


def _mean_rgb(frames01: torch.Tensor, ring: bool) -> np.ndarray:
    """Mean (R, G, B) on the 0-255 scale over (T, H, W, 3) frames: all pixels, or the BORDER-pixel frame ring."""
    if ring:
        m = torch.zeros(frames01.shape[1:3], dtype=torch.bool)
        m[:BORDER], m[-BORDER:], m[:, :BORDER], m[:, -BORDER:] = True, True, True, True
        frames01 = frames01[:, m]  # (T, P, 3)
    return (frames01.reshape(-1, 3).mean(0) * 255).numpy()


STRIP_COLUMNS = 6


def save_strip(path: Path, rows: list[torch.Tensor], columns: int = STRIP_COLUMNS) -> list[int]:
    """One PNG: a row per (3, T, H, W) video in [-1, 1] (equal T), `columns` frames spread evenly from the first
    to the last, 2-pixel white gaps. Returns the frame indices shown."""
    t = rows[0].shape[1]
    idx = [round(k * (t - 1) / max(columns - 1, 1)) for k in range(columns)]
    h, w = rows[0].shape[2:]
    g = 2
    canvas = torch.ones(3, len(rows) * (h + g) - g, columns * (w + g) - g)
    for r, v in enumerate(rows):
        for c, k in enumerate(idx):
            canvas[:, r * (h + g) : r * (h + g) + h, c * (w + g) : c * (w + g) + w] = v[:, k].clamp(-1, 1)
    from wanmoe import media

    media.save_png(path, canvas)
    return idx


def long_audio_report(gen: torch.Tensor, gt: torch.Tensor, fps: float, window_s: float = 4.0,
                      seams: list[int] | None = None) -> dict:
    """PSNR and colour of the first vs the last ``window_s`` seconds of aligned (3, T, H, W) videos in [-1, 1].

    ``seams``: the frame indices where a new clip starts; then also the mean absolute change (0-255 levels) from
    the frame before a seam to the seam frame against the same between the other consecutive frames, for both
    videos (a clip that does not join up with the one before shows as a larger change at the seams)."""
    from wanmoe.eval.metrics import psnr

    if gen.shape != gt.shape:
        raise ValueError(f"videos differ in shape: {tuple(gen.shape)} vs {tuple(gt.shape)}")
    t, w = gen.shape[1], int(round(window_s * fps))
    if not 1 <= w <= t:
        raise ValueError(f"a {window_s} s window is {w} frames; the videos have {t}")
    first, last = slice(0, w), slice(t - w, t)
    out: dict = {"frames": t, "window_frames": w, "psnr_first": psnr(gen[:, first], gt[:, first]),
                 "psnr_last": psnr(gen[:, last], gt[:, last])}
    out["psnr_drop"] = out["psnr_first"] - out["psnr_last"]
    g, r = _frames01(gen), _frames01(gt)
    for name, ring in (("frame", False), ("background", True)):
        gf, gl, rf, rl = (_mean_rgb(v[s], ring) for v in (g, r) for s in (first, last))
        drift = (gl - gf) - (rl - rf)  # the generated video's colour change beyond the ground truth's own
        out[f"rgb_{name}"] = {"model_first": gf.tolist(), "model_last": gl.tolist(), "gt_first": rf.tolist(),
                              "gt_last": rl.tolist(), "drift": drift.tolist()}
        out[f"drift_{name}"] = float(np.abs(drift).max())
    # PSNR per second, to see where a decline starts (the S2V clip boundaries fall every infer_frames frames).
    sec = int(round(fps))
    out["psnr_per_second"] = [psnr(gen[:, k : k + sec], gt[:, k : k + sec]) for k in range(0, t - sec + 1, sec)]
    out["holds"] = bool(out["psnr_drop"] <= 1.0 and max(out["drift_frame"], out["drift_background"]) <= DRIFT_MAX)
    seams = [k for k in (seams or []) if 0 < k < t]
    if seams:
        for name, v in (("model", gen), ("gt", gt)):
            step = (v[:, 1:] - v[:, :-1]).abs().mean(dim=(0, 2, 3)) * 127.5  # (T - 1,) change into frame k + 1
            at = torch.zeros(t - 1, dtype=torch.bool)
            at[[k - 1 for k in seams]] = True
            out[f"seam_{name}"] = {"at_seams": float(step[at].mean()), "within_clips": float(step[~at].mean())}
        out["seams"] = seams
    return out


def run_long(pipe, seconds: float = 30.0, source: str = "espeak", seed: int = 0, avatar: int | None = None,  # noqa: ANN001
             window_s: float = 4.0, strip: Path | None = None, **settings: object) -> dict:
    """The model's video of a ``seconds`` held-out clip vs the ground-truth render of the same avatar and audio.

    ``strip``: also save a PNG there, ground truth above the model, at STRIP_COLUMNS evenly spaced frames."""
    from wanmoe.data.avatar import render_from_audio, sample_params, split_seeds

    audio, sr, what = long_clip_audio(seconds, source)
    avatar = split_seeds("heldout")[0] if avatar is None else avatar
    s = render_from_audio(sample_params(avatar), audio, sr, float(pipe.cfg.sample_fps), 128)
    video = pipe(s.prompt, image=_uint8_image(s.ref), audio=(audio, sr), seed=seed, **settings)
    drop = pipe.cfg.dropped_frames(start_from_ref=False)
    t = min(video.frames.shape[1], s.video.shape[1] - drop)  # the last clip runs past the audio: not scored
    nf = int(video.request.infer_frames)
    seams = list(range(nf - drop, t, nf))  # clip 0 keeps infer_frames - drop frames, the others infer_frames
    rep = long_audio_report(video.frames[:, :t], s.video[:, drop : drop + t], pipe.cfg.sample_fps, window_s, seams)
    if strip is not None:
        save_strip(strip, [s.video[:, drop : drop + t], video.frames[:, :t]])
    return {"seconds": seconds, "audio": what, "avatar": avatar, "prompt": s.prompt, "seed": seed,
            "settings": dict(settings), "clips": int(video.timings.get("clips", 0)),
            "generate_s": float(video.timings.get("generate_s", math.nan)), **rep}


# ------------------------------------------------------------------------------------------------ markdown
def motion_markdown(res: dict) -> str:
    lines = [f"Prompt motion: {res['n']} held-out avatars x 4 styles, {res['frames']} frames, seed {res['seed']}. "
             "Energy: RMS face-centroid displacement (px); ratio: style mean / 'still' mean (the weakest avatar's "
             "own ratio in brackets); vs still: RMS difference (px) between the style's centroid track and the same "
             "avatar's 'still' track; frame diff: mean |frame k+1 - frame k| (0-255).", "",
             "| style | gt energy | gt ratio | model energy | model ratio | model vs still | frame diff gt "
             "| frame diff model |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for style in res["gt"]:
        g, m = res["gt"][style], res["model"][style]
        mean = {k: np.mean([r[k] for r in res["cases"] if r["style"] == style])
                for k in ("model_vs_still", "gt_frame_diff", "model_frame_diff")}
        lines.append(f"| {style} | {g['energy']:.3f} | {_ratio(g)} | {m['energy']:.3f} | {_ratio(m)} "
                     f"| {mean['model_vs_still']:.3f} | {mean['gt_frame_diff']:.2f} | {mean['model_frame_diff']:.2f} |")
    ok = res["model_moving_min_ratio"] >= 2.0
    lines += ["", f"Item 3 (every moving style >= 2x 'still' on the model): **{'holds' if ok else 'does not hold'}** "
              f"(weakest moving style: {res['model_moving_min_ratio']:.2f}x; ground truth "
              f"{_fmt_ratio(res['gt_moving_min_ratio'])})."]
    return "\n".join(lines)


def _fmt_ratio(r: float) -> str:
    return f"{r:.1f}x" if r < 1000 else ">1000x"


def _ratio(s: dict) -> str:
    return f"{_fmt_ratio(s['ratio'])} ({_fmt_ratio(s['ratio_min'])})"


def long_markdown(res: dict) -> str:
    def rgb(v: list[float]) -> str:
        return "(" + ", ".join(f"{x:.1f}" for x in v) + ")"

    f, b = res["rgb_frame"], res["rgb_background"]
    lines = [f"Long audio: {res['seconds']:g} s of {res['audio']}, held-out avatar {res['avatar']}, seed "
             f"{res['seed']}, {res['clips']} clips, {res['frames']} scored frames, windows of "
             f"{res['window_frames']} frames.", "",
             "| figure | first window | last window | change |", "|---|---:|---:|---:|",
             f"| PSNR vs ground truth (dB) | {res['psnr_first']:.2f} | {res['psnr_last']:.2f} | "
             f"{-res['psnr_drop']:+.2f} |",
             f"| mean RGB, model, whole frame | {rgb(f['model_first'])} | {rgb(f['model_last'])} | "
             f"drift beyond gt {rgb(f['drift'])} |",
             f"| mean RGB, ground truth, whole frame | {rgb(f['gt_first'])} | {rgb(f['gt_last'])} | |",
             f"| mean RGB, model, background ring | {rgb(b['model_first'])} | {rgb(b['model_last'])} | "
             f"drift beyond gt {rgb(b['drift'])} |",
             f"| mean RGB, ground truth, background ring | {rgb(b['gt_first'])} | {rgb(b['gt_last'])} | |", "",
             "PSNR per second: " + ", ".join(f"{p:.1f}" for p in res["psnr_per_second"]), "",
             *([f"Clip seams ({len(res['seams'])}): mean |frame change| into a clip's first frame "
                f"{res['seam_model']['at_seams']:.2f} levels against {res['seam_model']['within_clips']:.2f} between "
                f"the other frames (ground truth {res['seam_gt']['at_seams']:.2f} and "
                f"{res['seam_gt']['within_clips']:.2f}).", ""] if res.get("seams") else []),
             f"Item 4 (last window within 1 dB of the first, colour drift <= {DRIFT_MAX:g}/255 per channel): "
             f"**{'holds' if res['holds'] else 'does not hold'}** (PSNR drop {res['psnr_drop']:.2f} dB, colour "
             f"drift {res['drift_frame']:.1f} (frame) and {res['drift_background']:.1f} (background) levels)."]
    return "\n".join(lines)
