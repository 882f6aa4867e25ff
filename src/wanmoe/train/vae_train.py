"""Train the small Wan-2.1-architecture VAE of the embedded model on cached avatar clips (CPU friendly).

Axis legend: B batch, T pixel frames, Hp/Wp pixel height/width, z latent channels, F latent frames.

The VAE is fully convolutional, so it trains on small random crops of few frames (T = 1 + 4k) and runs on
full frames afterwards. Loss: L1 + MSE reconstruction + a tiny KL to keep the posterior well behaved. After
training, the per-channel latent mean/std are measured on full clips and written into the config, as the
official VAE carries its 16 constants.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from wanmoe.models.vae import VAEConfig, WanVAE
from wanmoe.train.clips import ClipSet

log = logging.getLogger(__name__)


def mouth_boxes(clips: ClipSet) -> list[tuple[int, int, int, int]]:
    """Per clip, the (y0, y1, x0, x1) pixel box of the mouth found on its reference image (eval's own finder)."""
    from wanmoe.eval.metrics import locate_mouth

    boxes = []
    for i in range(len(clips)):
        r = locate_mouth(clips.ref_float(i))
        boxes.append((r.y0, r.y1, r.x0, r.x1))
    return boxes


def random_crops(clips: ClipSet, g: torch.Generator, batch: int, frames: int, crop: int, *,
                 boxes: list[tuple[int, int, int, int]] | None = None, mouth_p: float = 0.0,
                 ref_p: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, frames, crop, crop) in [-1, 1] and a (B, 1, 1, crop, crop) mouth mask (1 inside the mouth box).

    Random clip, start frame and position; frame 0 is the reference image with probability ``ref_p`` (the S2V
    layout encodes [ref | video]). With probability ``mouth_p`` the crop is centred near the mouth (needs
    ``boxes``): the mouth is a small part of the frame but it is what audio drives, so it is over-sampled.
    """
    n, _, t, h, w = clips.video.shape
    out, masks = [], []
    for _ in range(batch):
        i = int(torch.randint(n, (1,), generator=g))
        s = int(torch.randint(t - frames + 1, (1,), generator=g))
        if boxes is not None and torch.rand((), generator=g) < mouth_p:
            y0, y1, x0, x1 = boxes[i]
            jy, jx = (int(v) for v in torch.randint(-crop // 6, crop // 6 + 1, (2,), generator=g))
            y = min(max((y0 + y1) // 2 - crop // 2 + jy, 0), h - crop)
            x = min(max((x0 + x1) // 2 - crop // 2 + jx, 0), w - crop)
        else:
            y = int(torch.randint(h - crop + 1, (1,), generator=g))
            x = int(torch.randint(w - crop + 1, (1,), generator=g))
        v = clips.video_float(i)[:, s : s + frames, y : y + crop, x : x + crop]  # (3, T, c, c)
        if torch.rand((), generator=g) < ref_p:
            v = torch.cat([clips.ref_float(i)[:, None, y : y + crop, x : x + crop], v[:, 1:]], dim=1)
        mask = torch.zeros(1, 1, h, w)
        if boxes is not None:
            y0, y1, x0, x1 = boxes[i]
            mask[..., y0:y1, x0:x1] = 1
        out.append(v)
        masks.append(mask[..., y : y + crop, x : x + crop])
    return torch.stack(out), torch.stack(masks)


@torch.no_grad()
def measure_latent_stats(vae: WanVAE, clips: ClipSet, n: int = 16) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of the raw posterior mean over `n` full clips."""
    mus = [vae.encode_moments(clips.video_float(i)[None], chunked=False)[0] for i in range(min(n, len(clips)))]
    mu = torch.cat([m.transpose(0, 1).flatten(1) for m in mus], dim=1)  # (z, N)
    return mu.mean(1).tolist(), mu.std(1).clamp_min(1e-3).tolist()


def train_vae(clips: ClipSet, out: Path, cfg: VAEConfig, *, steps: int, batch: int = 2, frames: int = 9,
              crop: int = 64, lr: float = 4e-4, kl_weight: float = 1e-6, seed: int = 0, ckpt_every: int = 200,
              progress: bool = True, sample_posterior: bool = False, finalize: bool = True, mouth_p: float = 0.0,
              mouth_weight: float = 0.0, ref_p: float = 0.3) -> VAEConfig:
    """Flat loop: sample crops -> encode -> reparameterise -> decode -> loss -> step; resumable from out/vae_ckpt.pt.

    ``mouth_p``/``mouth_weight``: over-sample mouth-centred crops and add ``mouth_weight`` x the L1 loss inside
    the mouth box (a lip-region loss: the mouth is small, but audio-mouth sync lives there). The learning rate
    follows a cosine from ``lr`` over this call's steps (resumed phases restart their own cosine)."""
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "vae_ckpt.pt"
    torch.manual_seed(seed)
    vae = WanVAE(cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    step = 0
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        vae.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step = int(ck["step"])
        log.info("resumed VAE training at step %d", step)
    g = torch.Generator().manual_seed(seed + step)
    start = step
    boxes = mouth_boxes(clips) if (mouth_p > 0 or mouth_weight > 0) else None
    logf = (out / "vae_loss.jsonl").open("a")
    bar = tqdm(total=steps, initial=step, desc="train vae", disable=not progress)
    t0 = time.perf_counter()
    while step < steps:
        x, mask = random_crops(clips, g, batch, frames, crop, boxes=boxes, mouth_p=mouth_p, ref_p=ref_p)
        mu, logvar = vae.encode_moments(x, chunked=False)
        # The DiT only ever sees mu (the official encode drops log_var), so sampling the posterior is optional;
        # the deterministic path converges much faster on CPU budgets.
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar.clamp(-30, 20)) if sample_posterior else mu
        # decode() expects a normalised latent; during training the stats are (0, 1), so z is used as is.
        rec = vae.decode(z, clamp=False, chunked=False)
        rec_loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        if mouth_weight > 0 and mask.sum() > 0:
            m = mask.expand_as(x)
            rec_loss = rec_loss + mouth_weight * ((rec - x).abs() * m).sum() / m.sum()
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        loss = rec_loss + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        for group in opt.param_groups:  # cosine decay over the run
            frac = (step - start) / max(steps - start, 1)
            group["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        opt.step()
        step += 1
        bar.update(1)
        if step % 20 == 0:
            rec_psnr = -10 * torch.log10(F.mse_loss(rec.detach().clamp(-1, 1), x) / 4).item()
            logf.write(json.dumps({"step": step, "loss": loss.item(), "psnr": rec_psnr,
                                   "t": time.perf_counter() - t0}) + "\n")
            logf.flush()
            bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{rec_psnr:.1f}")
        if step % ckpt_every == 0 or step == steps:
            tmp = ckpt_path.with_suffix(".tmp")
            torch.save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step,
                        "config": json.dumps(dataclasses.asdict(cfg))}, tmp)
            tmp.replace(ckpt_path)
    bar.close()
    if not finalize:
        return cfg
    mean, std = measure_latent_stats(vae.eval(), clips)
    final = dataclasses.replace(cfg, mean=tuple(round(m, 5) for m in mean), std=tuple(round(s, 5) for s in std))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(out / "vae.safetensors"),
              metadata={"config": json.dumps(dataclasses.asdict(final))})
    return final
