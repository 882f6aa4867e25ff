"""Train the small Wan-2.1-architecture VAE of the embedded model on cached avatar clips (CPU friendly).

Axis legend: B batch, T pixel frames, Hp/Wp pixel height/width, z latent channels, F latent frames.

The VAE is fully convolutional, so it trains on small random crops of few frames (T = 1 + 4k) and runs on
full frames afterwards. Loss: L1 + MSE reconstruction + a tiny KL to keep the posterior well behaved. After
training, the per-channel latent mean/std are measured on full clips and written into the config, as the
official VAE carries its 16 constants.

Held-out measurement (`heldout_psnr`): whole clips in the S2V layout [reference | 68 frames], reference dropped,
PSNR over all frames, over the late frames (>= 40) and inside the mouth box; the training loop logs it on a
wall-clock schedule so runs of different cost compare at equal time.
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
from wanmoe.train.state import load_tensors, save_atomic

log = logging.getLogger(__name__)


def mouth_boxes(clips: ClipSet) -> list[tuple[int, int, int, int]]:
    """Per clip, the (y0, y1, x0, x1) pixel box of the mouth found on its reference image (eval's own finder)."""
    from wanmoe.eval.metrics import locate_mouth

    boxes = []
    for i in range(len(clips)):
        r = locate_mouth(clips.ref_float(i))
        boxes.append((r.y0, r.y1, r.x0, r.x1))
    return boxes


def cat_clips(sets: list[ClipSet]) -> ClipSet:
    """One ClipSet from several (e.g. procedural + espeak speech clips); audio cut to the shortest."""
    if len(sets) == 1:
        return sets[0]
    n_audio = min(c.audio.shape[1] for c in sets)
    return ClipSet(torch.cat([c.video for c in sets]), torch.cat([c.ref for c in sets]),
                   torch.cat([c.audio[:, :n_audio] for c in sets]), [s for c in sets for s in c.seeds],
                   [p for c in sets for p in c.prompts], sets[0].sr, sets[0].fps)


def recon_loss(rec: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, mouth_weight: float) -> torch.Tensor:
    """L1 + MSE of a decoded crop against its frames, plus ``mouth_weight`` x the L1 inside the mouth box
    (``mask``: 1 there, broadcast over channels and frames; the lip-region loss)."""
    loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
    if mouth_weight > 0 and mask.sum() > 0:
        m = mask.expand_as(x)
        loss = loss + mouth_weight * ((rec - x).abs() * m).sum() / m.sum()
    return loss


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
        v = clips.video[i, :, s : s + frames, y : y + crop, x : x + crop].float() / 127.5 - 1.0  # (3, T, c, c)
        if torch.rand((), generator=g) < ref_p:
            r = clips.ref[i, :, None, y : y + crop, x : x + crop].float() / 127.5 - 1.0  # (3, 1, c, c)
            v = torch.cat([r, v[:, 1:]], dim=1)
        mask = torch.zeros(1, 1, h, w)
        if boxes is not None:
            y0, y1, x0, x1 = boxes[i]
            mask[..., y0:y1, x0:x1] = 1
        out.append(v)
        masks.append(mask[..., y : y + crop, x : x + crop])
    return torch.stack(out), torch.stack(masks)


@dataclasses.dataclass
class HeldOut:
    """Held-out whole clips for `heldout_psnr`: pixels [ref | video] (N, 3, 69, Hp, Wp) and mouth boxes."""

    pixels: torch.Tensor
    boxes: list[tuple[int, int, int, int]]
    seeds: list[int]

    @classmethod
    def make(cls, n: int, frames: int = 68, size: int = 128) -> HeldOut:
        from wanmoe.data.avatar import make_sample, split_seeds
        from wanmoe.eval.metrics import locate_mouth

        pix, boxes = [], []
        for seed in split_seeds("heldout", n):
            s = make_sample(seed, frames=frames, size=size)
            pix.append(torch.cat([s.ref[:, None], s.video], 1))  # (3, 1 + frames, Hp, Wp)
            r = locate_mouth(s.ref)
            boxes.append((r.y0, r.y1, r.x0, r.x1))
        return cls(torch.stack(pix), boxes, list(split_seeds("heldout", n)))


def _psnr01(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two [-1, 1] tensors on the [0, 1] scale (eval.metrics.psnr's definition)."""
    mse = ((a.double() - b.double()) / 2).pow(2).mean().clamp_min(1e-10)
    return float(-10 * torch.log10(mse))


@torch.no_grad()
def heldout_psnr(vae: WanVAE, held: HeldOut, *, late_from: int = 40, chunked: bool = False) -> dict[str, list[float]]:
    """Per clip: PSNR of the reconstruction over all video frames ("all"), frames >= ``late_from`` ("late") and
    the mouth box over all frames ("mouth"); the reference frame is encoded (S2V layout) but not scored."""
    res: dict[str, list[float]] = {"all": [], "late": [], "mouth": []}
    for i in range(len(held.seeds)):
        x = held.pixels[i : i + 1].to(vae.conv1.weight.device)  # (1, 3, 1 + T, Hp, Wp)
        rec = vae.decode(vae.encode(x, chunked=chunked), chunked=chunked)[:, :, 1:]  # (1, 3, T, Hp, Wp)
        v = x[:, :, 1:]
        y0, y1, x0, x1 = held.boxes[i]
        res["all"].append(_psnr01(rec, v))
        res["late"].append(_psnr01(rec[:, :, late_from:], v[:, :, late_from:]))
        res["mouth"].append(_psnr01(rec[..., y0:y1, x0:x1], v[..., y0:y1, x0:x1]))
    return res


def widen_latent(state: dict[str, torch.Tensor], init: dict[str, torch.Tensor], z_old: int,
                 z_new: int) -> dict[str, torch.Tensor]:
    """Embed a trained z_old-channel VAE in a z_new-channel one of the same widths (warm start).

    The old latent channels become the first z_old of the new ones; the new encoder channels start from their
    random init (``init``, the fresh model's state) and the decoder weights reading them start at zero, so the
    widened model computes exactly the old reconstruction at step 0 and learns what to put in the new channels.
    The 1x1 convs around the latent get an identity on the new channels."""
    if z_new < z_old:
        raise ValueError(f"z_dim can only grow in a warm start, got {z_old} -> {z_new}")
    out = {}
    for k, v in init.items():
        old = state.get(k)
        if old is None:
            raise ValueError(f"warm start: {k} missing from the initial weights")
        if old.shape == v.shape:
            out[k] = old.clone()
            continue
        new = v.clone()
        if k in ("encoder.head.2.weight", "encoder.head.2.bias"):  # out channels [mu | log_var]
            new[:z_old] = old[:z_old]
            new[z_new : z_new + z_old] = old[z_old:]
        elif k in ("conv1.weight", "conv1.bias"):  # (2z, 2z) 1x1 on [mu | log_var]
            new.zero_()
            rows = [*range(z_old), *range(z_new, z_new + z_old)]
            if new.dim() == 1:
                new[rows] = old
            else:
                new[torch.arange(2 * z_new), torch.arange(2 * z_new)] = 1.0  # identity, then the old block
                new[[[r] for r in rows], rows] = old
        elif k in ("conv2.weight", "conv2.bias"):  # (z, z) 1x1 on the latent
            new.zero_()
            if new.dim() == 1:
                new[:z_old] = old
            else:
                new[torch.arange(z_new), torch.arange(z_new)] = 1.0
                new[:z_old, :z_old] = old
        elif k == "decoder.conv1.weight":  # (C, z, 3, 3, 3): the new input channels start unread
            new.zero_()
            new[:, :z_old] = old
        else:
            raise ValueError(f"warm start: {k} is {tuple(old.shape)} in the initial weights, {tuple(v.shape)} here; "
                             "only the latent width (z_dim) may differ")
        out[k] = new
    return out


def init_config(path: Path) -> dict:
    """The VAEConfig fields (latent statistics included) of a trained VAE: a safetensors file's metadata or a
    training checkpoint's config."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return json.loads((f.metadata() or {})["config"])
    return json.loads(load_tensors(path)["config"])


def load_init(vae: WanVAE, path: Path) -> None:
    """Start ``vae`` from a trained VAE (safetensors with its config, or a training checkpoint), widening the
    latent if this one has more channels (`widen_latent`)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        meta, state = init_config(path), load_file(str(path))
    else:
        ck = load_tensors(path)
        meta, state = json.loads(ck["config"]), ck["model"]
    # The latent stats need no folding: training feeds the raw mu to decode() with stats (0, 1), and the trained
    # model's decode(normalised z) computes conv2(z * std + mean) = conv2(raw mu), the same function.
    z_old = int(meta["z_dim"])
    cur = {k: v.cpu() for k, v in vae.state_dict().items()}
    vae.load_state_dict(widen_latent(state, cur, z_old, vae.cfg.z_dim))


@torch.no_grad()
def measure_latent_stats(vae: WanVAE, clips: ClipSet, n: int = 16) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of the raw posterior mean over `n` full clips."""
    dev = vae.conv1.weight.device
    mus = [vae.encode_moments(clips.video_float(i)[None].to(dev), chunked=False)[0].cpu()
           for i in range(min(n, len(clips)))]
    mu = torch.cat([m.transpose(0, 1).flatten(1) for m in mus], dim=1)  # (z, N)
    return mu.mean(1).tolist(), mu.std(1).clamp_min(1e-3).tolist()


def train_vae(clips: ClipSet, out: Path, cfg: VAEConfig, *, steps: int, batch: int = 2, frames: int = 9,
              crop: int = 64, lr: float = 4e-4, kl_weight: float = 1e-6, seed: int = 0, ckpt_every: int = 200,
              progress: bool = True, sample_posterior: bool = False, finalize: bool = True, mouth_p: float = 0.0,
              mouth_weight: float = 0.0, ref_p: float = 0.3, init: Path | None = None,
              deadline: float | None = None, held: HeldOut | None = None, eval_every_s: float = 120.0,
              warmup: int = 0, decoder_only: bool = False,
              device: str | torch.device = "cpu") -> tuple[VAEConfig, bool]:
    """Flat loop: sample crops -> encode -> reparameterise -> decode -> loss -> step; resumable from out/vae_ckpt.pt.

    ``mouth_p``/``mouth_weight``: over-sample mouth-centred crops and add ``mouth_weight`` x the L1 loss inside
    the mouth box (a lip-region loss: the mouth is small, but audio-mouth sync lives there). The learning rate
    follows a cosine from ``lr`` over this call's steps (a phase that starts from an earlier phase's checkpoint
    starts its own cosine; one interrupted by ``deadline`` continues its cosine when resumed).
    ``init``: a trained VAE to start from when no checkpoint exists yet (`load_init`). ``deadline`` (a
    ``time.time()`` value): checkpoint and stop there; returns (config, finished). ``held``: held-out clips
    measured every ``eval_every_s`` seconds of training (wall time not counting the measurement) into
    out/vae_heldout.jsonl. ``warmup``: the learning rate ramps up linearly over the first steps of a run that
    starts without optimizer state (a fresh AdamW's first updates are lr-sized on every weight, which undoes much
    of a warm start); a phase resuming a checkpoint keeps its AdamW state and needs none. ``device``: where the
    model and each batch of crops live (the clips stay in host memory as uint8); checkpoints load on any device.
    ``decoder_only``: the encoder (and its moments conv) stays frozen at ``init``'s weights and only the decoder side
    trains, so the latents, their statistics (copied from ``init``, not re-measured) and every DiT trained on them
    stay valid: a better decoder drops into a shipped model without retraining its experts."""
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "vae_ckpt.pt"
    torch.manual_seed(seed)
    vae = WanVAE(cfg)
    if init is not None and not ckpt_path.exists():
        load_init(vae, init)
        log.info("VAE starts from %s", init)
    vae = vae.to(device)
    if decoder_only:
        if init is None:
            raise ValueError("decoder_only needs init: the frozen encoder must be a trained one")
        kept = init_config(init)  # the frozen encoder's latent: its width and statistics are init's
        if kept["z_dim"] != cfg.z_dim:
            raise ValueError(f"decoder_only keeps init's latent; it has {kept['z_dim']} channels, "
                             f"this VAE {cfg.z_dim} (pass the same --z_dim)")
        frozen = [*vae.encoder.parameters(), *vae.conv1.parameters()]
        for p in frozen:
            p.requires_grad_(False)
    trainable = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    step, train_s, cosine_start = 0, 0.0, None
    ramp_from = 0 if warmup > 0 else -1  # the step the warm-up began at (-1: none); only a fresh AdamW needs one
    if ckpt_path.exists():
        ck = load_tensors(ckpt_path)
        if bool(ck.get("decoder_only", False)) != decoder_only:
            raise ValueError(f"{ckpt_path} was trained with decoder_only={bool(ck.get('decoder_only', False))}; "
                             "resume it the same way (or start a new --out)")
        vae.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, train_s = int(ck["step"]), float(ck.get("train_s", 0.0))
        ramp_from = -1
        if ck.get("cosine_end") == steps:  # resuming an interrupted phase: continue its cosine (and warm-up)
            cosine_start, ramp_from = int(ck["cosine_start"]), int(ck.get("ramp_from", -1))
        log.info("resumed VAE training at step %d", step)
    g = torch.Generator().manual_seed(seed + step)
    start = step if cosine_start is None else cosine_start
    boxes = mouth_boxes(clips) if (mouth_p > 0 or mouth_weight > 0) else None
    logf = (out / "vae_loss.jsonl").open("a")
    bar = tqdm(total=steps, initial=step, desc="train vae", disable=not progress)

    def save() -> None:
        save_atomic({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step, "train_s": train_s,
                     "cosine_start": start, "cosine_end": steps, "ramp_from": ramp_from, "decoder_only": decoder_only,
                     "config": json.dumps(dataclasses.asdict(cfg))}, ckpt_path)

    def measure() -> None:
        r = heldout_psnr(vae, held)
        row = {"step": step, "train_s": round(train_s, 1), **{k: sum(v) / len(v) for k, v in r.items()}}
        with (out / "vae_heldout.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        log.info("held-out step %d (%.0f s): all %.2f dB, late %.2f, mouth %.2f", step, train_s, row["all"],
                 row["late"], row["mouth"])

    next_eval = (train_s // eval_every_s + 1) * eval_every_s
    if held is not None and step == 0:
        measure()
    finished = True
    while step < steps:
        if deadline is not None and time.time() >= deadline:
            finished = False
            break
        t0 = time.perf_counter()
        x, mask = random_crops(clips, g, batch, frames, crop, boxes=boxes, mouth_p=mouth_p, ref_p=ref_p)
        x, mask = x.to(device, non_blocking=True), mask.to(device, non_blocking=True)
        with torch.set_grad_enabled(not decoder_only):
            mu, logvar = vae.encode_moments(x, chunked=False)
        # The DiT only ever sees mu (the official encode drops log_var), so sampling the posterior is optional;
        # the deterministic path converges much faster on CPU budgets.
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar.clamp(-30, 20)) if sample_posterior else mu
        # decode() expects a normalised latent; during training the stats are (0, 1), so z is used as is.
        rec = vae.decode(z, clamp=False, chunked=False)
        rec_loss = recon_loss(rec, x, mask, mouth_weight)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        loss = rec_loss + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        for group in opt.param_groups:  # cosine decay over the run
            frac = (step - start) / max(steps - start, 1)
            ramp = min(1.0, (step - ramp_from + 1) / warmup) if ramp_from >= 0 else 1.0
            group["lr"] = ramp * lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        opt.step()
        step += 1
        train_s += time.perf_counter() - t0
        bar.update(1)
        if step % 20 == 0:
            rec_psnr = -10 * torch.log10(F.mse_loss(rec.detach().clamp(-1, 1), x) / 4).item()
            logf.write(json.dumps({"step": step, "loss": loss.item(), "psnr": rec_psnr, "t": train_s}) + "\n")
            logf.flush()
            bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{rec_psnr:.1f}")
        if step % ckpt_every == 0 or step == steps:
            save()
        if held is not None and train_s >= next_eval:
            measure()
            next_eval += eval_every_s
    bar.close()
    save()
    if held is not None and not finished:
        measure()
    if not finalize or not finished:
        return cfg, finished
    if decoder_only:  # the encoder is init's: so are its latents' statistics (the experts were trained on them)
        mean, std = kept["mean"], kept["std"]
    else:
        mean, std = measure_latent_stats(vae.eval(), clips)
    final = dataclasses.replace(cfg, mean=tuple(round(m, 5) for m in mean), std=tuple(round(s, 5) for s in std))
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}, str(out / "vae.safetensors"),
              metadata={"config": json.dumps(dataclasses.asdict(final))})
    return final, True
