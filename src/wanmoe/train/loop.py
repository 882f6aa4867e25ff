"""Train one noise expert (or the single-expert baseline) of the small S2V model: a flat loop.

Axis legend: B batch, C latent channels, F latent frames, H/W latent height/width, S text tokens,
K audio layers, Dm audio feature width, A audio frames (video fps).

Setup -> loop (sample sigma in the expert's noise range -> noise -> velocity loss -> backward -> clip -> step
-> EMA -> log -> checkpoint). The expert's range comes from `wanmoe.experts.expert_sigma_range`, the same
module that routes at inference. Training clips use the S2V first-clip layout: the VAE encodes
[reference | frames], latent 0 is the reference latent and the rest are the targets, exactly what
`pipeline.S2VClips` decodes with `drop_motion_frames=True`.

Expert-specific augmentation: the high-noise expert (layout and motion) sees colour-jittered latents of
whole clips (a per-channel affine on the latent stream, shared by target and reference); the low-noise
expert (detail) sees the clean latents only. The single-expert baseline sees clean latents over the
whole range. All three cost the same per step (same network, same batch).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from wanmoe import experts as ex
from wanmoe.configs import PipelineConfig
from wanmoe.models.dit import DiT
from wanmoe.models.s2v import S2VInputs
from wanmoe.sampling.schedules import time_shift
from wanmoe.train.state import load_tensors, save_atomic

log = logging.getLogger(__name__)


@dataclass
class LatentSet:
    """Pre-encoded training clips (the slow VAE/text/audio work done once)."""

    latents: Tensor  # (N, C, 1 + F, H, W): [ref | targets]
    audio: Tensor  # (N, K, Dm, A) with A = 4 F
    context: Tensor  # (N, S, text_dim) frozen text-encoder output
    context_null: Tensor  # (S, text_dim) the empty prompt
    mouth: Tensor | None = None  # (N, 1, 1, H, W) 1 on latent cells covering the mouth box, else 0
    # Continuation clips (a clip after the first, `pipeline.S2VClips` with r > 0): the latents of the motion frames
    # that precede the targets, and which rows are such clips; None in a first-clip-only set.
    motion: Tensor | None = None  # (N, C, Fm, H, W), zeros on first-clip rows
    cont: Tensor | None = None  # (N,) bool

    def save(self, path: Path) -> None:
        save_atomic(dataclasses.asdict(self), path)

    @classmethod
    def load(cls, path: Path) -> LatentSet:
        return cls(**load_tensors(path))

    @classmethod
    def cat(cls, sets: list[LatentSet]) -> LatentSet:
        """One set from several (same shapes; the first set's empty-prompt context)."""
        if len(sets) == 1:
            return sets[0]
        mouth = None if any(s.mouth is None for s in sets) else torch.cat([s.mouth for s in sets])
        motion = cont = None
        with_motion = [s for s in sets if s.motion is not None]
        if with_motion:
            fm = with_motion[0].motion.shape[2]
            motion = torch.cat([s.motion if s.motion is not None else
                                s.latents.new_zeros(s.latents.shape[0], s.latents.shape[1], fm, *s.latents.shape[3:])
                                for s in sets])
            cont = torch.cat([s.cont if s.cont is not None else torch.zeros(len(s.latents), dtype=torch.bool)
                              for s in sets])
        return cls(torch.cat([s.latents for s in sets]), torch.cat([s.audio for s in sets]),
                   torch.cat([s.context for s in sets]), sets[0].context_null, mouth, motion, cont)


def mouth_cells(box: tuple[int, int, int, int], hw: tuple[int, int], stride: int) -> Tensor:
    """(1, 1, H, W) mask of the latent cells that overlap the pixel box (y0, y1, x0, x1)."""
    y0, y1, x0, x1 = box
    m = torch.zeros(1, 1, *hw)
    m[..., y0 // stride : -(-y1 // stride), x0 // stride : -(-x1 // stride)] = 1
    return m


def velocity_loss(pred: Tensor, target: Tensor, mouth: Tensor | None, mouth_weight: float) -> Tensor:
    """MSE on the velocity, plus ``mouth_weight`` x the MSE on the mouth cells (a lip-region loss)."""
    loss = F.mse_loss(pred, target)
    if mouth is not None and mouth_weight > 0:
        m = mouth.expand_as(pred)
        loss = loss + mouth_weight * ((pred - target).pow(2) * m).sum() / m.sum().clamp_min(1)
    return loss


def u_range(sigma_lo: float, sigma_hi: float, shift: float) -> tuple[float, float]:
    """Inverse of the shift: the uniform-u interval whose shifted sigmas fall in [sigma_lo, sigma_hi]."""

    def inv(s: float) -> float:  # sigma' = k s / (1 + (k - 1) s)  <=>  s = sigma' / (k - (k - 1) sigma')
        return s / (shift - (shift - 1) * s)

    return inv(sigma_lo), inv(sigma_hi)


def sample_sigmas(n: int, lo: float, hi: float, shift: float, g: torch.Generator) -> Tensor:
    """Sigmas distributed like the sampler's steps (uniform u, then the shift), restricted to [lo, hi]."""
    u0, u1 = u_range(lo, hi, shift)
    u = u0 + (u1 - u0) * torch.rand(n, generator=g, dtype=torch.float64)
    return time_shift(u, shift).float()


def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1.0 - decay)


MOTION_MODULES = ("frame_packer.",)  # DiT parameters that only continuation clips (motion tokens) train


def _clip_pools(data: LatentSet, cont_frac: float) -> tuple[Tensor | None, Tensor | None]:
    """Row indices to draw batches from: (first clips, continuation clips); None where there are none to use."""
    rows = torch.arange(len(data.latents))
    if data.cont is None:
        return rows, None
    first, cont = rows[~data.cont], rows[data.cont]
    return (first if len(first) else None), (cont if len(cont) and cont_frac > 0 else None)


def latent_config(cfg: PipelineConfig, z: int) -> PipelineConfig:
    """`cfg` with a z-channel latent (`PipelineConfig.with_vae`; only the widths matter for training, the latent
    statistics are the VAE file's business)."""
    return cfg.with_vae(dataclasses.replace(cfg.vae, z_dim=z, mean=(0.0,) * z, std=(1.0,) * z))


# DiT parameters whose input channels are latent channels (video, reference and motion latents; S2V pose latents).
LATENT_INPUTS = ("patch_embedding.weight", "cond_encoder.weight", "frame_packer.proj.weight",
                 "frame_packer.proj_2x.weight", "frame_packer.proj_4x.weight")


@torch.no_grad()
def widen_dit_latent(state: dict[str, Tensor], z_old: int, z_new: int) -> dict[str, Tensor]:
    """A DiT state dict for a wider latent (z_old -> z_new channels), computing exactly what the old one computed
    on the old channels: the new input channels get zero weights, the head's new output channels (each patch
    position's channels, channels fastest: "(p q r c)") zero weights and bias. A warm start for experts retrained
    on a wider VAE, as `train.vae_train.widen_latent` is for the VAE itself."""
    if z_new < z_old:
        raise ValueError(f"the latent can only grow in a warm start, got {z_old} -> {z_new}")
    out = dict(state)
    for k in LATENT_INPUTS:
        w = state.get(k)
        if w is not None and w.shape[1] == z_old:
            out[k] = torch.cat([w, w.new_zeros(w.shape[0], z_new - z_old, *w.shape[2:])], dim=1)
    for k in ("head.head.weight", "head.head.bias"):
        w = state[k]
        p = w.shape[0] // z_old  # patch positions
        grid = w.reshape(p, z_old, *w.shape[1:])
        out[k] = torch.cat([grid, grid.new_zeros(p, z_new - z_old, *w.shape[1:])], dim=1).reshape(p * z_new,
                                                                                                   *w.shape[1:])
    return out


def _init_state(cfg: PipelineConfig, init: Path) -> dict[str, Tensor]:
    """Starting weights: a training checkpoint's EMA weights, or a shipped expert folder's weights in fp32; from a
    narrower latent (a model trained on an earlier VAE) widened to this one (`widen_dit_latent`)."""
    if init.is_dir():
        from wanmoe import checkpoint as ck

        z_old = ck.read_dit_config(init).in_dim
        state = ck.load_dit(init, dtype=torch.float32, cfg=latent_config(cfg, z_old).dit).state_dict()
    else:
        state = load_tensors(init)["ema"]
    z_old = state["patch_embedding.weight"].shape[1]
    if z_old != cfg.dit.in_dim:
        log.info("widening %s from a %d-channel latent to %d", init, z_old, cfg.dit.in_dim)
        state = widen_dit_latent(state, z_old, cfg.dit.in_dim)
    return state


def jitter_draw(b: int, c: int, g: torch.Generator, strength: float = 0.15) -> tuple[Tensor, Tensor]:
    """Per-sample, per-channel affine jitter of the latent stream (colour/contrast-like augmentation): the
    (scale, bias) pair, each (B, C, 1, 1, 1), that `z * scale + bias` applies to every latent of a clip."""
    scale = 1 + strength * (2 * torch.rand(b, c, 1, 1, 1, generator=g) - 1)
    bias = strength * (2 * torch.rand(b, c, 1, 1, 1, generator=g) - 1)
    return scale, bias


def train_expert(cfg: PipelineConfig, data: LatentSet, out: Path, *, expert: str, steps: int, batch: int = 2,
                 lr: float = 3e-4, shift: float | None = None, drop_text: float = 0.1, drop_audio: float = 0.1,
                 ema_decay: float = 0.995, seed: int = 0, ckpt_every: int = 100, progress: bool = True,
                 max_seconds: float | None = None, mouth_weight: float = 0.0, init: Path | None = None,
                 cont_frac: float = 0.5, motion_noise: float = 0.1, motion_lr_mult: float = 1.0) -> Path:
    """Train `expert` ("high", "low" or "dense" = the whole range) and write out/<expert>.pt; resumable.

    ``init``: a checkpoint of an earlier run (its EMA weights start both the model and the EMA; the optimiser
    and the step count start fresh), or a shipped expert's folder (its weights, in fp32), used when a run
    continues from the shipped model.
    ``mouth_weight``: extra weight on the latent cells over the mouth (needs ``data.mouth``).
    ``cont_frac``: where ``data`` has continuation clips, the fraction of batches drawn from them (the model then
    sees their motion latents, with Gaussian noise of a random strength up to ``motion_noise`` added, since at
    inference they come from its own decoded frames); the other batches are first clips, without motion tokens.
    ``motion_lr_mult``: learning-rate multiplier for the modules that only continuation clips train (the motion
    frame packer), which a model trained on first clips alone has never updated."""
    spec = ex.ExpertSpec(names=cfg.experts, boundary=cfg.boundary) if len(cfg.experts) > 1 else ex.DENSE
    lo, hi = (0.0, 1.0) if expert == "dense" else ex.expert_sigma_range(spec, expert)
    shift = cfg.sample_shift if shift is None else shift
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / f"{expert}.pt"
    torch.manual_seed(seed)
    model = DiT(cfg.dit)
    model.init_weights()
    ema = copy.deepcopy(model).requires_grad_(False)
    # One parameter group unless the motion modules get their own rate (so earlier checkpoints still resume).
    groups = [{"params": list(model.parameters())}]
    named = list(model.named_parameters())
    motion = [p for n, p in named if n.startswith(MOTION_MODULES)]
    if motion_lr_mult != 1.0 and motion:
        groups = [{"params": [p for n, p in named if not n.startswith(MOTION_MODULES)]},
                  {"params": motion, "lr_mult": motion_lr_mult}]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    step = 0
    if init is not None and not ckpt_path.exists():
        state = _init_state(cfg, Path(init))
        model.load_state_dict(state)
        ema.load_state_dict(state)
        log.info("initialised %s from %s", expert, init)
    if mouth_weight > 0 and data.mouth is None:
        raise ValueError("mouth_weight > 0 needs latents built with mouth masks (re-run `wanmoe train latents`)")
    if ckpt_path.exists():
        ck = load_tensors(ckpt_path)
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        step = int(ck["step"])
    g = torch.Generator().manual_seed(seed * 1000 + step)
    fm = cfg.dit.s2v.lat_motion_frames
    logf = (out / f"{expert}_loss.jsonl").open("a")
    bar = tqdm(total=steps, initial=step, desc=f"train {expert} [{lo:.3f}, {hi:.3f}]", disable=not progress)
    t0, ema_loss = time.perf_counter(), None
    first, cont = _clip_pools(data, cont_frac)
    if first is None and cont is None:
        raise ValueError("no clips to train on (continuation clips only, and cont_frac = 0)")
    while step < steps:
        # One kind of clip per batch (first clips or continuations): the motion tokens are on or off per batch.
        use_cont = cont is not None and (first is None or float(torch.rand((), generator=g)) < cont_frac)
        pool = cont if use_cont else first
        idx = pool[torch.randint(len(pool), (batch,), generator=g)]
        z = data.latents[idx]  # (B, C, 1 + F, H, W)
        # The high-noise expert's colour jitter: one draw per clip, applied to its reference, targets and motion
        # frames alike (they are one video: at inference the motion frames come from the same colours).
        jit = jitter_draw(*z.shape[:2], g) if expert == "high" else None
        if jit is not None:
            z = z * jit[0] + jit[1]
        ref, x0 = z[:, :, :1], z[:, :, 1:]
        audio, ctx = data.audio[idx].clone(), data.context[idx].clone()
        # Condition dropout so classifier-free (text) and audio guidance have an unconditional model to use.
        no_text = torch.rand(batch, generator=g) < drop_text
        ctx[no_text] = data.context_null
        audio[torch.rand(batch, generator=g) < drop_audio] = 0
        sigma = sample_sigmas(batch, lo, hi, shift, g)  # (B,)
        noise = torch.randn(x0.shape, generator=g)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise  # flow matching: x_sigma = (1 - sigma) x0 + sigma eps
        if use_cont:
            motion = data.motion[idx]  # (B, C, Fm, H, W)
            if jit is not None:
                motion = motion * jit[0] + jit[1]
            amp = motion_noise * torch.rand(batch, 1, 1, 1, 1, generator=g)
            motion = motion + amp * torch.randn(motion.shape, generator=g)
        else:
            motion = x0.new_zeros(batch, x0.shape[1], fm, *x0.shape[3:])
        inp = S2VInputs(audio=audio, ref_latents=ref, motion_latents=motion, drop_motion_frames=not use_cont)
        pred = model(xt, sigma * 1000, ctx, s2v=inp)  # (B, C, F, H, W) velocity
        loss = velocity_loss(pred, noise - x0, None if data.mouth is None else data.mouth[idx], mouth_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        warm = min(1.0, (step + 1) / 100)  # linear warm-up, then cosine to 10%
        for group in opt.param_groups:
            # A group without "lr_mult" (every group of a checkpoint from before the option) runs at the base rate.
            mult = group.get("lr_mult", 1.0)
            group["lr"] = mult * lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        opt.step()
        update_ema(ema, model, ema_decay if step > 200 else 0.0)
        step += 1
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{ema_loss:.4f}")
        if step % 20 == 0:
            logf.write(json.dumps({"step": step, "loss": loss.item(), "loss_ema": ema_loss,
                                   "t": time.perf_counter() - t0}) + "\n")
            logf.flush()
        stop = max_seconds is not None and time.perf_counter() - t0 > max_seconds
        if step % ckpt_every == 0 or step == steps or stop:
            save_atomic({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
                         "config": json.dumps({"expert": expert, "range": [lo, hi], "task": cfg.task})}, ckpt_path)
        if stop:
            log.info("time budget reached at step %d", step)
            break
    bar.close()
    return ckpt_path
