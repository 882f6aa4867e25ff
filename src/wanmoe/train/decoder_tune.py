"""Tune a small model's VAE decoder on the latents its own experts make (`wanmoe train pairs` / `decoder`).

A VAE decoder is trained on the encoder's latents; a generated video is the decode of the DiTs' latents, which
differ from any encoding (docs/results.md: a decoder retrained on encodings reconstructs better and decodes the
experts' latents worse). Here the decoder learns the map the product uses: the latent a model generates for a
training clip (its reference image, audio and prompt, at the model's own defaults) to that clip's ground-truth
frames.

1. `build_pairs`: each training clip through the model's pipeline (first-clip layout, seed = the clip's index in
   its set); the latent the pipeline decodes ([reference latent | generated latents], normalised as `WanVAE.decode`
   takes it) is kept with the clip's index. Pairs from several models (the two experts and the single-expert
   baseline) train one decoder, so both set-ups keep the same VAE.
2. `tune_decoder`: crops of 69 frames (all of a clip's frames, as the decode sees them) x ``crop`` pixels; the
   latent crop is the matching window of latent cells (stride 8); L1 + MSE against [reference | frames], plus
   ``mouth_weight`` x L1 inside the mouth box; crops centred near the mouth with probability ``mouth_p``. With
   ``mouth_anchor`` (a VAE file, e.g. the decoder being replaced) the target inside the mouth box is that VAE's
   decode of the same latent instead of the ground truth: the mouth keeps the anchor's rendering (and its sync with
   the audio) while the rest of the picture learns the truth. Only the decoder side trains (`decoder.*`,
   `conv2.*`); the encoder, its latent statistics and every DiT stay as they were. Resumable from
   out/decoder_ckpt.pt; writes out/vae/vae.safetensors at the end.

Axis legend: N pairs, C latent channels, F latent frames (1 + generated), H/W latent height/width, T pixel frames.
"""

from __future__ import annotations

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

from wanmoe.train.clips import ClipSet
from wanmoe.train.state import load_tensors, save_atomic

log = logging.getLogger(__name__)


@dataclass
class PairSet:
    """Generated latents and the training clips they were made for."""

    latents: Tensor  # (N, C, 1 + F, H, W) normalised: [reference latent | generated latents]
    clip: Tensor  # (N,) int64 index of the pair's clip in its ClipSet
    clips_file: str = ""  # the clips file those indices refer to
    model: str = ""  # the model that made the latents

    def save(self, path: Path) -> None:
        save_atomic({"latents": self.latents, "clip": self.clip, "clips_file": self.clips_file,
                     "model": self.model}, path)

    @classmethod
    def load(cls, path: Path) -> PairSet:
        d = load_tensors(path)
        return cls(d["latents"], d["clip"], d.get("clips_file", ""), d.get("model", ""))


def load_pair_files(files: list[Path]) -> tuple[PairSet, ClipSet]:
    """Several pair files (each naming its clips file; files may share one) as one PairSet over one ClipSet."""
    from wanmoe.train.clips import load_clips
    from wanmoe.train.vae_train import cat_clips

    sets = [PairSet.load(f) for f in files]
    order: dict[str, int] = {}  # clips file -> offset in the combined ClipSet
    clip_sets = []
    for s in sets:
        if not s.clips_file or not Path(s.clips_file).is_file():
            raise ValueError(f"a pair file names clips {s.clips_file!r}, which is not a file")
        if s.clips_file not in order:
            order[s.clips_file] = sum(len(c) for c in clip_sets)
            clip_sets.append(load_clips(Path(s.clips_file)))
    pairs = PairSet(torch.cat([s.latents for s in sets]),
                    torch.cat([s.clip + order[s.clips_file] for s in sets]))
    return pairs, cat_clips(clip_sets)


def decoded_latent(vae: torch.nn.Module, ref: Tensor, seen: list) -> Tensor:
    """The (1, C, 1 + F, H, W) latent a one-clip S2V run decodes: the reference image ``ref`` (3, H, W) in [-1, 1]
    encoded as the pipeline encodes it, then the last step's x0 prediction among the run's `preview` records."""
    with torch.no_grad():
        ref_lat = vae.encode(ref[None, :, None].float())  # (1, C, 1, H, W)
    last = [p.latent for p in seen if p.latent is not None][-1]
    return torch.cat([ref_lat, last.float()], dim=2)


def build_pairs(model: str | Path, clips: ClipSet, indices: list[int], *, progress: bool = True,
                **settings: object) -> PairSet:
    """The latent `wanmoe.load(model)` decodes for each clip in ``indices`` (its reference, the audio of its first
    `infer_frames` frames and its prompt; seed = index); ``settings`` are request keywords (steps, ...)."""
    from wanmoe.api import load
    from wanmoe.inputs import read_inputs
    from wanmoe.pipeline import first_clip_latent

    pipe = load(model, task=None)
    nf = int(settings.get("infer_frames", pipe.cfg.infer_frames))
    w, h = (int(v) for v in pipe.request(**settings).size)
    if (h, w) != tuple(clips.ref.shape[-2:]):
        raise ValueError(f"{model} makes {w}x{h} video; these clips are {clips.ref.shape[-1]}x{clips.ref.shape[-2]}: "
                         "pairs need the clips' size")
    n_audio = int(round(clips.sr * nf / clips.fps))
    lats = []
    for i in tqdm(indices, desc=f"pairs {Path(str(model)).name}", disable=not progress):
        req = pipe.request(prompt=clips.prompts[i], seed=int(i), num_clip=1, **settings)
        inputs = read_inputs(pipe.cfg, image=clips.ref_float(i), audio=clips.audio[i, :n_audio].numpy(), sr=clips.sr)
        lats.append(first_clip_latent(pipe.components, req, inputs)[0].cpu())  # sampled, not decoded
    return PairSet(torch.stack(lats), torch.tensor(indices, dtype=torch.int64), model=str(model))


def pair_crops(pairs: PairSet, clips: ClipSet, g: torch.Generator, batch: int, crop: int, stride: int,
               t_stride: int, boxes: list[tuple[int, int, int, int]] | None,
               mouth_p: float) -> tuple[Tensor, Tensor, Tensor]:
    """(B, C, F, crop/stride, crop/stride) latent crops, the (B, 3, T, crop, crop) frames they should decode to
    ([reference | first T - 1 frames] in [-1, 1]) and a (B, 1, 1, crop, crop) mouth mask."""
    n, _, f, h, w = pairs.latents.shape
    cl = crop // stride
    t = 1 + t_stride * (f - 1)  # pixel frames of the causal decode: the reference, then t_stride per latent
    zs, xs, ms = [], [], []
    for _ in range(batch):
        k = int(torch.randint(n, (1,), generator=g))
        i = int(pairs.clip[k])
        if boxes is not None and torch.rand((), generator=g) < mouth_p:
            y0, y1, x0, x1 = boxes[i]
            jy, jx = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
            y = min(max(((y0 + y1) // 2 - crop // 2) // stride + jy, 0), h - cl)
            x = min(max(((x0 + x1) // 2 - crop // 2) // stride + jx, 0), w - cl)
        else:
            y, x = (int(v) for v in torch.randint(h - cl + 1, (2,), generator=g))
        py, px = y * stride, x * stride
        zs.append(pairs.latents[k, :, :, y : y + cl, x : x + cl])
        ref = clips.ref[i, :, None, py : py + crop, px : px + crop]
        frames = clips.video[i, :, : t - 1, py : py + crop, px : px + crop]
        xs.append(torch.cat([ref, frames], dim=1).float() / 127.5 - 1.0)
        m = torch.zeros(1, 1, clips.ref.shape[-2], clips.ref.shape[-1])
        if boxes is not None:
            b = boxes[i]
            m[..., b[0] : b[1], b[2] : b[3]] = 1
        ms.append(m[..., py : py + crop, px : px + crop])
    return torch.stack(zs), torch.stack(xs), torch.stack(ms)


def anchored_target(x: Tensor, mask: Tensor, z: Tensor, anchor: torch.nn.Module | None) -> Tensor:
    """The frames a latent crop ``z`` should decode to: the ground truth ``x`` (B, 3, T, c, c), with the mouth box
    (``mask`` (B, 1, 1, c, c), 1 inside) replaced by ``anchor``'s decode of ``z`` when an anchor VAE is given."""
    if anchor is None:
        return x
    with torch.no_grad():
        a = anchor.decode(z, clamp=False, chunked=False)
    m = mask.expand_as(x)
    return x * (1 - m) + a * m


def tune_decoder(vae_file: Path, clips: ClipSet, pairs: PairSet, out: Path, *, steps: int, batch: int = 2,
                 crop: int = 48, lr: float = 1e-4, warmup: int = 100, mouth_p: float = 0.5, mouth_weight: float = 2.0,
                 mouth_anchor: Path | None = None, seed: int = 0, ckpt_every: int = 100,
                 max_seconds: float | None = None, stop_step: int | None = None, progress: bool = True) -> Path:
    """Train the decoder side of ``vae_file``'s VAE on ``pairs`` (module docstring) and write
    out/vae/vae.safetensors. The learning rate follows one cosine over ``steps``; ``stop_step`` (a step of that
    cosine) or ``max_seconds`` stop the run early: the checkpoint and the file then hold the weights so far, and
    running again continues the same cosine."""
    from safetensors.torch import save_file

    from wanmoe.loading import load_small_vae
    from wanmoe.train.vae_train import init_config, mouth_boxes, recon_loss

    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "decoder_ckpt.pt"
    torch.manual_seed(seed)
    vae = load_small_vae(vae_file, torch.device("cpu"))
    if pairs.latents.shape[1] != vae.cfg.z_dim:
        raise ValueError(f"the pairs hold {pairs.latents.shape[1]}-channel latents; {vae_file} has {vae.cfg.z_dim}")
    for p in vae.parameters():
        p.requires_grad_(False)
    trainable = [*vae.decoder.parameters(), *vae.conv2.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    step = 0
    if ckpt_path.exists():
        ck = load_tensors(ckpt_path)
        vae.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step = int(ck["step"])
        log.info("resumed decoder tuning at step %d", step)
    vae.train()
    anchor = None
    if mouth_anchor is not None:
        anchor = load_small_vae(mouth_anchor, torch.device("cpu")).eval().requires_grad_(False)
        if anchor.cfg.z_dim != vae.cfg.z_dim or anchor.cfg.stride != vae.cfg.stride:
            raise ValueError(f"the mouth anchor {mouth_anchor} has another latent layout than {vae_file}")
    g = torch.Generator().manual_seed(seed * 1000 + step)
    boxes = mouth_boxes(clips) if (mouth_p > 0 or mouth_weight > 0 or anchor is not None) else None
    stride = vae.cfg.stride[1]
    logf = (out / "decoder_loss.jsonl").open("a")
    bar = tqdm(total=steps, initial=step, desc="tune decoder", disable=not progress)
    t0 = time.perf_counter()

    def save() -> None:
        save_atomic({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt_path)

    end = steps if stop_step is None else min(steps, stop_step)
    while step < end:
        z, x, mask = pair_crops(pairs, clips, g, batch, crop, stride, vae.cfg.stride[0], boxes, mouth_p)
        rec = vae.decode(z, clamp=False, chunked=False)  # (B, 3, T, crop, crop)
        loss = recon_loss(rec, anchored_target(x, mask, z, anchor), mask, mouth_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        ramp = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        for group in opt.param_groups:
            group["lr"] = ramp * lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        opt.step()
        step += 1
        bar.update(1)
        if step % 20 == 0:
            psnr = -10 * torch.log10(F.mse_loss(rec.detach().clamp(-1, 1), x) / 4).item()
            logf.write(json.dumps({"step": step, "loss": loss.item(), "psnr": psnr,
                                   "t": time.perf_counter() - t0}) + "\n")
            logf.flush()
            bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{psnr:.1f}")
        stop = max_seconds is not None and time.perf_counter() - t0 > max_seconds
        if step % ckpt_every == 0 or step == end or stop:
            save()
        if stop:
            log.info("time budget reached at step %d", step)
            break
    bar.close()
    dest = out / "vae" / "vae.safetensors"
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Same config and latent statistics as the file it started from: the encoder and the latents are unchanged.
    save_file({k: v.detach().contiguous() for k, v in vae.state_dict().items()}, str(dest),
              metadata={"config": json.dumps(init_config(vae_file))})
    return dest
