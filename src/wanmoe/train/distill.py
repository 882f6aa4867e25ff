"""Step distillation of the embedded model: one LoRA per noise expert so that a few Euler steps land where the
20-step sampler goes.

    wanmoe train distill --out runs/distill --steps_fast 2 --steps 1500 --max_minutes 40 --threads 1

Method: trajectory distillation with per-step state matching. The teacher is the shipped model run exactly as
users run it (`pipeline.sample_clip`: 20 UniPC steps, the expert switch at the boundary, audio guidance at the
task's motion_scale); it starts from seeded noise with the conditioning of a train-split avatar (reference
image, audio, prompt: procedural speech-like audio and espeak-ng sentences), and we keep the states where
its model was evaluated at the few-step schedule's sigmas, plus its final latent. Those sigmas are on the
teacher's grid whenever the step count divides 20 (2 steps: indices 0 and 10 of the 20), so no
interpolation is needed. The student is the same expert with LoRA factors beside its attention and FFN
Linears (`lora_train.TrainableLoRA`). Its step k goes from sigma_k to sigma_{k+1} of the few-step schedule
with one Euler step, x_{k+1} = x_k + (sigma_{k+1} - sigma_k) v, so the loss asks that step to land on the
teacher's state at sigma_{k+1}:

    v* = (x_T(sigma_{k+1}) - x_k) / (sigma_{k+1} - sigma_k),      loss = mean (v_student(x_k, sigma_k) - v*)^2

(the landing error divided by the step size, a constant per step). On the last step sigma_{k+1} = 0, and the
loss is the student's x0 prediction against the teacher's final latent. Why this and not consistency or
DMD-style distillation: the teacher is a deterministic ODE sampler, and each few-step step is served by one
expert, so the target of every expert's LoRA is fixed in advance. Each expert trains alone and needs no
backpropagation through several DiT calls, no second (fake-score) network, and no GAN; the
cost is one 20-step teacher run per training trajectory, cheap on this model. The student runs one
conditional pass per step: the teacher's audio guidance (two passes per step) is folded into the LoRA (the
target is the guided trajectory), which halves the transformer batch again (guidance distillation, Meng et
al. 2023).

Inputs of step k: the teacher's own state for the first step of each expert's run and for the steps that
expert takes after its own (teacher forcing). After an earlier expert's LoRA has been trained, a later
expert's first step instead starts where the distilled earlier expert lands, the input it gets at inference
(`student_inputs`), so the low-noise LoRA also learns to correct the high-noise LoRA's residual error.

Result on s2v-mini (docs/results.md): at 2 steps and one pass per step (1/20 of the default's transformer
passes) the LoRAs reproduce the 20-step video (31 dB PSNR to it on held-out avatars, against 23 dB for the
base model at the same cost) and keep every ground-truth score of the 20-step model; the base model at 2 steps
scores higher against the ground truth (it averages, and PSNR rewards the average), so they do not ship.

Axis legend: M trajectories, B batch, K steps of the few-step schedule, C latent channels, F latent frames,
H/W latent height/width, S text tokens, Dt text width, Ka audio layers, Dm audio feature width, A audio frames,
T pixel frames, Hp/Wp pixel height/width.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from wanmoe import experts as ex
from wanmoe.configs import PipelineConfig
from wanmoe.models.s2v import S2VInputs
from wanmoe.sampling.schedules import flow_sigmas, timesteps
from wanmoe.train.lora_train import LoraRun, base_expert
from wanmoe.train.state import load_tensors, save_atomic

log = logging.getLogger(__name__)
TEACHER_STEPS = 20
FAST_SOLVER = "euler"  # the student's steps are the Euler steps it was trained for


@dataclass
class TeacherSet:
    """Teacher trajectories at the few-step schedule's sigmas, with the conditioning that made them."""

    states: Tensor  # (M, K + 1, C, F, H, W): noise, teacher states at sigma_1..sigma_{K-1}, final latent
    context: Tensor  # (M, S, Dt)
    audio: Tensor  # (M, Ka, Dm, A)
    ref: Tensor  # (M, C, 1, H, W) reference latent
    sigmas: Tensor  # (K + 1,) the student's schedule (float64)
    seeds: Tensor  # (M,) avatar seeds (train split)

    def save(self, path: Path) -> None:
        save_atomic({k: getattr(self, k) for k in self.__dataclass_fields__}, path)

    @classmethod
    def load(cls, path: Path) -> TeacherSet:
        return cls(**load_tensors(path))  # tensors only: no pickle code

    def __len__(self) -> int:
        return self.states.shape[0]


def fast_sigmas(cfg: PipelineConfig, steps: int) -> Tensor:
    """The student's schedule: `steps` Euler steps on the task's shifted grid, (steps + 1,) ending at 0."""
    return flow_sigmas(steps, cfg.sample_shift, solver=FAST_SOLVER)


def teacher_indices(steps: int, teacher_steps: int = TEACHER_STEPS) -> list[int]:
    """Indices into the teacher's (teacher_steps + 1)-sigma grid matching the few-step grid's sigmas."""
    if steps < 1 or teacher_steps % steps:
        raise ValueError(f"the few-step count must divide {teacher_steps} (1, 2, 4, 5, 10), got {steps}")
    return [k * teacher_steps // steps for k in range(steps + 1)]


def step_experts(cfg: PipelineConfig, sigmas: Tensor) -> list[str]:
    """Which expert serves each step of a schedule (the pipeline's router, hard switch)."""
    spec = ex.ExpertSpec(names=cfg.experts, boundary=cfg.boundary)
    return [next(iter(w)) for w in ex.expert_weights(sigmas, spec)]


def conditioning_sources(seeds: Sequence[int], frames: int, fps: float = 16.0) -> list[dict]:
    """Train-split avatars with their inputs: even seeds speak procedural speech-like audio, odd ones an espeak-ng
    sentence (real speech, `data.espeak`). Only the inputs are rendered, never a target video."""
    from wanmoe.data.avatar import describe, make_sample, render_reference, sample_params
    from wanmoe.data.espeak import espeak_speech

    out = []
    for seed in seeds:
        if seed % 2 == 0:
            s = make_sample(int(seed), frames=frames)
            out.append({"seed": int(seed), "image": s.ref, "audio": (s.audio, s.sr), "prompt": s.prompt})
        else:
            p = sample_params(int(seed))
            out.append({"seed": int(seed), "image": render_reference(p, 128), "prompt": describe(p),
                        "audio": (espeak_speech(int(seed), frames / fps, 16000), 16000)})
    return out


def build_teacher(pipe, seeds: Sequence[int], steps: int, *, noise_seed: int = 10_000,  # noqa: ANN001
                  infer_frames: int | None = None, progress: bool = True) -> TeacherSet:
    """Run the teacher (the pipeline's own 20-step sampler, task defaults) once per avatar seed, keeping the
    states at which its model was evaluated at the few-step sigmas and its final latent."""
    from wanmoe.inputs import read_inputs
    from wanmoe.pipeline import S2VClips, sample_clip
    from wanmoe.request import make_request

    c, cfg = pipe.components, pipe.cfg
    keep = teacher_indices(steps)
    rows: dict[str, list[Tensor]] = {"states": [], "context": [], "audio": [], "ref": []}
    frames = infer_frames or cfg.infer_frames
    for k, src in enumerate(tqdm(conditioning_sources(seeds, frames + 1), desc="teacher", disable=not progress)):
        req = make_request(cfg, prompt=src["prompt"], steps=TEACHER_STEPS, num_clip=1, infer_frames=infer_frames,
                           seed=noise_seed + k)
        inputs = read_inputs(cfg, image=src["image"], audio=src["audio"])
        with torch.no_grad():
            ctx = c.text_encoder([req.prompt]).to(c.device, c.dtype)  # (1, S, Dt)
            ctx_null = c.text_encoder([req.negative_prompt]).to(c.device, c.dtype)
            cond = S2VClips(c, req, inputs, ctx, ctx_null).conditioning(0)
            seen: dict[int, Tensor] = {}

            def record(info, _seen=seen) -> None:  # noqa: ANN001 (StepInfo): the state the model saw at step i
                if info.i in keep:
                    _seen[info.i] = info.x.detach().float().cpu()

            final, _ = sample_clip(c, req, cond, req.seed, record)
        seen[TEACHER_STEPS] = final.float().cpu()
        rows["states"].append(torch.cat([seen[i] for i in keep]))  # (K + 1, C, F, H, W)
        s2v = cond.cond["s2v"]
        rows["context"].append(cond.cond["context"][0].float().cpu())
        rows["audio"].append(s2v.audio[0].float().cpu())
        rows["ref"].append(s2v.ref_latents[0].float().cpu())
    return TeacherSet(**{k: torch.stack(v) for k, v in rows.items()}, sigmas=fast_sigmas(cfg, steps),
                      seeds=torch.tensor([int(s) for s in seeds]))


def _forward(model: nn.Module, cfg: PipelineConfig, data: TeacherSet, idx: Tensor, x: Tensor,
             sigma: float) -> Tensor:
    """The expert's conditional velocity at (x, sigma) for trajectories idx, as the pipeline calls it."""
    b = x.shape[0]
    ref = data.ref[idx]
    motion = ref.new_zeros(b, ref.shape[1], cfg.dit.s2v.lat_motion_frames, *ref.shape[3:])  # never read: dropped
    inp = S2VInputs(audio=data.audio[idx], ref_latents=ref, motion_latents=motion, drop_motion_frames=True)
    t = timesteps(torch.tensor([sigma], dtype=torch.float64)).float().expand(b)  # (B,) trunc(1000 sigma)
    return model(x, t, data.context[idx], s2v=inp)  # (B, C, F, H, W)


@torch.no_grad()
def student_inputs(cfg: PipelineConfig, data: TeacherSet, root: Path, loras: dict[str, Path],
                   batch: int = 4) -> Tensor:
    """(M, K + 1, C, F, H, W) like data.states, where each step served by an expert in `loras` is replaced by
    that distilled expert's Euler step from the state before (what the student sees at inference)."""
    from wanmoe.lora import apply_lora, read_lora

    s = data.sigmas.tolist()
    who = step_experts(cfg, data.sigmas)
    out = data.states.clone()
    for name, file in loras.items():
        model = base_expert(cfg, root, name)
        apply_lora(model, read_lora(file, model), 1.0)
        for k, e in enumerate(who):
            if e != name or k + 1 >= len(s) - 1:
                continue  # the final latent stays the teacher's (it is the target, never an input)
            for i in range(0, len(data), batch):
                idx = torch.arange(i, min(i + batch, len(data)))
                x = out[idx, k]
                out[idx, k + 1] = x + (s[k + 1] - s[k]) * _forward(model, cfg, data, idx, x, s[k])
    return out


def train_distill(cfg: PipelineConfig, data: TeacherSet, root: Path, out: Path, *, expert: str,
                  inputs: Tensor | None = None, rank: int = 16, alpha: float = 16.0, steps: int = 1000,
                  batch: int = 2, lr: float = 1e-3, seed: int = 0, ckpt_every: int = 50,
                  max_seconds: float | None = None, progress: bool = True) -> Path:
    """Train the step-distillation LoRA of `expert` (resumable from out/fast_<expert>.pt); returns
    out/fast_<expert>.safetensors, written at every checkpoint and at the end. `inputs`: per-step inputs
    (`student_inputs`), default the teacher's states."""
    s = data.sigmas.tolist()
    mine = [k for k, e in enumerate(step_experts(cfg, data.sigmas)) if e == expert]
    if not mine:
        raise ValueError(f"expert {expert!r} serves no step of the {len(s) - 1}-step schedule {s}")
    xin = data.states if inputs is None else inputs
    meta = {"task": cfg.task, "expert": expert, "kind": "step distillation", "rank": str(rank),
            "fast_steps": str(len(s) - 1), "sigmas": json.dumps([round(v, 6) for v in s]),
            "teacher": f"{TEACHER_STEPS} UniPC steps, motion_scale {cfg.motion_scale}"}
    run = LoraRun(cfg, root, out, f"fast_{expert}", expert=expert, rank=rank, alpha=alpha, lr=lr, steps=steps,
                  meta=meta, desc=f"distill {expert} steps {mine}", ckpt_every=ckpt_every, max_seconds=max_seconds,
                  progress=progress)
    g = torch.Generator().manual_seed(seed * 1000 + run.step)
    while run.step < steps:
        idx = torch.randint(len(data), (batch,), generator=g)
        k = mine[int(torch.randint(len(mine), (1,), generator=g))]
        # Teacher forcing within the expert's own run; its first step sees what the earlier experts hand over.
        x = (xin if k == mine[0] else data.states)[idx, k]  # (B, C, F, H, W)
        target = (data.states[idx, k + 1] - x) / (s[k + 1] - s[k])  # the velocity that lands on the teacher
        if run.update(F.mse_loss(_forward(run.model, cfg, data, idx, x, s[k]), target), k=k):
            break
    return run.close()


# ------------------------------------------------------------------------------------------- measurement


def hf_energy(video: Tensor) -> float:
    """Sharpness: mean squared difference between the luma and its 3x3 box blur, (3, T, Hp, Wp) in [-1, 1]."""
    y = ((video.float() + 1) / 2 * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1, 1)).sum(0)  # (T, Hp, Wp)
    blur = F.avg_pool2d(y[:, None], 3, 1, 1, count_include_pad=False)[:, 0]
    return float((y - blur).pow(2).mean())


def measure(setups: dict[str, dict], *, n: int = 4, speech: int = 6, seed: int = 0, progress: bool = True,
            work: Path | None = None) -> dict[str, dict]:
    """Each set-up ({"settings": pipe keywords, "loras": {expert: file}}) on the held-out avatars and the
    espeak-ng sentences of `wanmoe eval` (`eval.cli.held_out_cases`, case k at seed + k), scored with
    `eval.cli.score`; plus transformer passes and sampling time per sample, sharpness against the render and,
    for every set-up after the first, PSNR against the first set-up's video of the same case (the 20-step
    default: how close a few-step video comes to what the default sampler makes from the same noise)."""
    import tempfile

    import numpy as np

    import wanmoe
    from wanmoe.configs import PRESETS
    from wanmoe.eval.cli import DROPPED, held_out_cases, score
    from wanmoe.eval.metrics import psnr

    cfg = PRESETS["s2v-mini"]
    pipe = wanmoe.load(cfg.task)
    with tempfile.TemporaryDirectory() as tmp:
        cases = held_out_cases(n, cfg.infer_frames, speech, Path(work or tmp))
        res, first = {}, None
        for name, setup in setups.items():
            for expert, file in setup.get("loras", {}).items():
                pipe.load_lora(file, experts=expert)
            rows, refs = [], []
            for k, c in enumerate(tqdm(cases, desc=name, disable=not progress)):
                v = pipe(c["sample"].prompt, image=c["image"], audio=c["audio"], seed=seed + k,
                         **setup.get("settings", {}))
                sc = score(v.frames, c["sample"])
                t = min(v.frames.shape[1], c["sample"].video.shape[1] - DROPPED)
                sc["sharpness"] = hf_energy(v.frames[:, :t]) / hf_energy(c["sample"].video[:, DROPPED : DROPPED + t])
                if first is None:
                    refs.append(v.frames)
                else:
                    sc["psnr_vs_first"] = psnr(v.frames, first[k])
                # Transformer passes: audio guidance runs a second (audio-free) pass per step.
                passes = 1 + (v.request.motion_scale != 1.0)
                rows.append({"case": c["name"], "sample_s": v.timings["sample_s"],
                             "dit_calls": passes * sum(v.expert_calls.values()), **sc})
            pipe.unload_lora()
            held = [r for r in rows if not r["case"].startswith("espeak")]
            sp = [r for r in rows if r["case"].startswith("espeak")]
            first = refs if first is None else first
            keys = ("psnr", "ssim", "sync", "sharpness") + (("psnr_vs_first",) if "psnr_vs_first" in rows[0] else ())
            m = {key: float(np.mean([r[key] for r in held])) for key in keys}
            if sp and "psnr_vs_first" in rows[0]:
                m["psnr_vs_first_speech"] = float(np.mean([r["psnr_vs_first"] for r in sp]))
            if sp:
                m.update(psnr_speech=float(np.mean([r["psnr"] for r in sp])),
                         sync_speech=float(np.mean([r["sync"] for r in sp])),
                         sharpness_speech=float(np.mean([r["sharpness"] for r in sp])))
            m.update(sample_s=float(np.mean([r["sample_s"] for r in rows])),
                     dit_calls=float(np.mean([r["dit_calls"] for r in rows])), rows=rows)
            res[name] = m
            log.info("%s: %s", name, {k: round(v, 4) for k, v in m.items() if k != "rows"})
    return res


def markdown(res: dict[str, dict]) -> str:
    cols = [("dit_calls", "DiT passes", "{:.0f}"), ("sample_s", "sampling s", "{:.2f}"), ("psnr", "PSNR", "{:.2f}"),
            ("psnr_vs_first", "PSNR vs 20 steps", "{:.2f}"), ("ssim", "SSIM", "{:.3f}"), ("sync", "sync", "{:.3f}"),
            ("sharpness", "sharpness", "{:.3f}"), ("psnr_speech", "PSNR (speech)", "{:.2f}"),
            ("psnr_vs_first_speech", "PSNR vs 20 steps (speech)", "{:.2f}"), ("sync_speech", "sync (speech)", "{:.3f}"),
            ("sharpness_speech", "sharpness (speech)", "{:.3f}")]
    cols = [c for c in cols if any(c[0] in r for r in res.values())]
    lines = ["| | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, r in res.items():
        lines.append(f"| {name} | " + " | ".join(f.format(r[k]) if k in r else "" for k, _, f in cols) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- the stage


def distill_stage(cfg: PipelineConfig, out: Path, *, steps_fast: int, n: int, start: int, steps: int, rank: int,
                  lr: float, batch: int, eval_n: int, max_minutes: float | None, smoke: bool,
                  progress: bool) -> dict | None:
    """`wanmoe train distill`: teacher trajectories (in chunks of 16 avatars, each kept once written) -> one LoRA
    per expert in schedule order (each resumable; `max_minutes` per expert) -> the held-out measurement."""
    import wanmoe
    from wanmoe.configs import ASSETS
    from wanmoe.data.avatar import split_seeds

    if steps_fast < 1 or TEACHER_STEPS % steps_fast:
        raise SystemExit(f"--steps_fast {steps_fast}: must divide {TEACHER_STEPS} (1, 2, 4, 5, 10)")
    root = ASSETS / cfg.task
    out.mkdir(parents=True, exist_ok=True)
    pipe = wanmoe.load(cfg.task)
    seeds = list(split_seeds("train")[start : start + n])
    chunks = []
    for i in range(0, len(seeds), 16):
        f = out / f"teacher{steps_fast}_{start + i}.pt"
        if not f.exists():
            build_teacher(pipe, seeds[i : i + 16], steps_fast, noise_seed=10_000 + start + i,
                          infer_frames=8 if smoke else None, progress=progress).save(f)
        chunks.append(TeacherSet.load(f))
    data = TeacherSet(*(torch.cat([getattr(c, k) for c in chunks]) for k in ("states", "context", "audio", "ref")),
                      sigmas=chunks[0].sigmas, seeds=torch.cat([c.seeds for c in chunks]))
    done: dict[str, Path] = {}
    for expert in dict.fromkeys(step_experts(cfg, data.sigmas)):  # schedule order, high noise first
        xin = student_inputs(cfg, data, root, done) if done else None
        done[expert] = train_distill(cfg, data, root, out, expert=expert, inputs=xin, rank=rank, alpha=float(rank),
                                     steps=steps, batch=batch, lr=lr, progress=progress,
                                     max_seconds=None if max_minutes is None else max_minutes * 60)
        log.info("wrote %s", done[expert])
    if eval_n <= 0:
        return None
    fast = {"steps": steps_fast, "solver": FAST_SOLVER, "motion_scale": 1.0}
    setups: dict[str, dict] = {"20 steps (default)": {}}
    for k in sorted({1, 2, 4, steps_fast}):  # the base model at few steps, as users would run it
        setups[f"base, {k} step{'s' * (k > 1)}"] = {"settings": {"steps": k}}
    setups[f"base, {steps_fast} Euler steps, no audio guidance"] = {"settings": fast}
    setups[f"LoRA, {steps_fast} Euler steps, no audio guidance"] = {"settings": fast, "loras": done}
    res = measure(setups, n=eval_n, speech=6, progress=progress)
    (out / f"fast{steps_fast}_eval.json").write_text(json.dumps(res, indent=1))
    print(markdown(res))
    return res
