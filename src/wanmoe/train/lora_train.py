"""Train a LoRA on one noise expert of the embedded model for an attribute it never saw, then measure it.

    wanmoe train lora --out runs/lora --expert high --attribute green    # clips -> latents -> LoRA -> eval

The attribute is a recolouring style the base model lacks: every face painted in one colour (default green),
whatever the reference image shows. The base model always copies the reference's face colour; each training clip
is a train-split avatar whose *target* video shows its face in the attribute colour while its reference image and
prompt keep the avatar's own colour, so the change must come from the LoRA, not from the conditioning. The colour
is one of `data.avatar.FACE_COLORS`: the small VAE was trained on those alone and cannot represent others (an
unseen magenta face comes back pale pink from encode/decode, 16.7 dB against 21.7 dB for a table colour).
The base expert stays frozen; rank-r factors beside its attention and FFN Linears (forward hooks, the same
`x A^T B^T alpha/r` that `wanmoe.lora` runs at inference) are trained with the expert's flow-matching loss on
the expert's noise range (`experts.expert_sigma_range`), and written in the ComfyUI/kohya layout users share
(`lora.save_lora`), which `pipe.load_lora` and `--lora` read back.

The held-out measurement (`evaluate`) generates held-out avatars with and without the LoRA through the Python
API and compares each with two ground-truth renders of the same avatar and audio, in its own colour and in the
attribute colour. The face mask is where those two renders differ; "rest of the frame" is everything outside
the mask grown by 2 pixels (the generated face moves by a pixel or two against the render).

Axis legend: B batch, C latent channels, F latent frames, H/W latent height/width, T pixel frames,
Hp/Wp pixel height/width, r rank, L tokens.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from wanmoe import experts as ex
from wanmoe.configs import PipelineConfig
from wanmoe.models.s2v import S2VInputs
from wanmoe.train.clips import ClipSet
from wanmoe.train.loop import LatentSet, sample_sigmas, velocity_loss
from wanmoe.train.state import load_tensors, save_atomic

log = logging.getLogger(__name__)


def lora_paths(cfg: PipelineConfig) -> list[str]:
    """The Linears a trained LoRA adapts: every block's self/cross-attention projections and its FFN."""
    return [f"blocks.{i}.{a}.{x}" for i in range(cfg.dit.num_layers) for a in ("self_attn", "cross_attn")
            for x in "qkvo"] + [f"blocks.{i}.ffn.{j}" for i in range(cfg.dit.num_layers) for j in (0, 2)]


class TrainableLoRA(nn.Module):
    """Rank-r factors beside Linears of a frozen model: layer(x) + alpha / r * (x A^T) B^T, through forward hooks.

    A starts like an nn.Linear weight (Kaiming-uniform), B at zero, so training starts from the base model
    (Hu et al. 2021, LoRA, section 4.1)."""

    def __init__(self, model: nn.Module, paths: Sequence[str], rank: int, alpha: float) -> None:
        super().__init__()
        self.paths, self.rank, self.alpha = list(paths), rank, alpha
        self.down, self.up = nn.ParameterList(), nn.ParameterList()
        for p in self.paths:
            lin = model.get_submodule(p)
            a = torch.empty(rank, lin.in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.down.append(nn.Parameter(a))  # (r, I)
            self.up.append(nn.Parameter(torch.zeros(lin.out_features, rank)))  # (O, r)
        self._handles = [model.get_submodule(p).register_forward_hook(self._hook(i)) for i, p in enumerate(paths)]

    def _hook(self, i: int):  # noqa: ANN202
        def hook(m: nn.Module, args: tuple, out: Tensor) -> Tensor:
            return out + F.linear(F.linear(args[0], self.down[i]), self.up[i]) * (self.alpha / self.rank)  # (.., L, O)

        return hook

    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        return {p: (d.detach(), u.detach()) for p, d, u in zip(self.paths, self.down, self.up)}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class LoraRun:
    """One resumable LoRA training run on a frozen expert: the factors, AdamW, the checkpoint `<stem>.pt` (tensors
    and strings only, read back with weights_only=True), the LoRA file `<stem>.safetensors` (kohya layout, written
    at every checkpoint and at the end), the loss log `<stem>_loss.jsonl` and a progress bar. `update(loss)` is
    one optimisation step; a training loop is `while run.step < steps: ... if run.update(loss): break`."""

    def __init__(self, cfg: PipelineConfig, root: Path, out: Path, stem: str, *, expert: str, rank: int,
                 alpha: float, lr: float, steps: int, meta: dict[str, str], desc: str, ckpt_every: int,
                 max_seconds: float | None, progress: bool) -> None:
        self.model = base_expert(cfg, root, expert)
        self.lora = TrainableLoRA(self.model, lora_paths(cfg), rank, alpha)
        self.opt = torch.optim.AdamW(self.lora.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
        out.mkdir(parents=True, exist_ok=True)
        self.ckpt, self.file = out / f"{stem}.pt", out / f"{stem}.safetensors"
        self.alpha, self.lr, self.steps, self.meta = alpha, lr, steps, meta
        self.ckpt_every, self.max_seconds = ckpt_every, max_seconds
        self.step = 0
        if self.ckpt.exists():
            ck = load_tensors(self.ckpt)
            self.lora.load_state_dict(ck["lora"])
            self.opt.load_state_dict(ck["opt"])
            self.step = int(ck["step"])
        self._log = (out / f"{stem}_loss.jsonl").open("a")
        self._bar = tqdm(total=steps, initial=self.step, desc=desc, disable=not progress)
        self._t0, self._ema = time.perf_counter(), None

    def update(self, loss: Tensor, **record: object) -> bool:
        """Backward, clip, the learning rate of this step (20-step warm-up, then cosine to 10%), AdamW; log and
        checkpoint. True when the time budget is spent (the checkpoint is then written)."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.lora.parameters(), 1.0)
        step, steps = self.step, self.steps
        for group in self.opt.param_groups:
            group["lr"] = self.lr * min(1.0, (step + 1) / 20) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        self.opt.step()
        self.step = step = step + 1
        value = loss.item()
        self._ema = value if self._ema is None else 0.95 * self._ema + 0.05 * value
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{self._ema:.4f}")
        self._log.write(json.dumps({"step": step, **record, "loss": value, "t": time.perf_counter() - self._t0}) + "\n")
        stop = self.max_seconds is not None and time.perf_counter() - self._t0 > self.max_seconds
        if step % self.ckpt_every == 0 or step == steps or stop:
            save_atomic({"lora": self.lora.state_dict(), "opt": self.opt.state_dict(), "step": step,
                         "config": json.dumps(self.meta)}, self.ckpt)
            self.save()
            self._log.flush()
        if stop:
            log.info("time budget reached at step %d", step)
        return stop

    def save(self) -> None:
        from wanmoe.lora import save_lora

        save_lora(self.file, self.lora.factors(), alpha=self.alpha, metadata={**self.meta, "steps": str(self.step)})

    def close(self) -> Path:
        """Write the LoRA file a last time, close the log and the bar; returns the file."""
        self._bar.close()
        self._log.close()
        self.save()
        return self.file


def attribute_clips(seeds: Sequence[int], *, color: str, frames: int, size: int, fps: float = 16.0,
                    progress: bool = True) -> ClipSet:
    """Train-split avatars whose target video has face colour `color`; reference image and prompt unchanged."""
    from wanmoe.data.avatar import make_sample, render_video
    from wanmoe.train.clips import _to_u8

    vids, refs, auds, prompts = [], [], [], []
    for seed in tqdm(list(seeds), desc=f"render {color} clips", disable=not progress):
        s = make_sample(int(seed), size=size, fps=fps, frames=frames)
        vids.append(_to_u8(render_video(dataclasses.replace(s.params, face_color=color), s.envelope, fps, size)))
        refs.append(_to_u8(s.ref))
        auds.append(torch.as_tensor(s.audio, dtype=torch.float32))
        prompts.append(s.prompt)
    n_audio = min(a.shape[0] for a in auds)
    return ClipSet(torch.stack(vids), torch.stack(refs), torch.stack([a[:n_audio] for a in auds]),
                   [int(s) for s in seeds], prompts, 16000, fps)


def base_expert(cfg: PipelineConfig, root: Path, expert: str) -> nn.Module:
    """The shipped expert in fp32, frozen."""
    from wanmoe import checkpoint as ck
    from wanmoe import layouts

    folder = root / dict(layouts.EXPERT_FOLDERS)[expert]
    return ck.load_dit(folder, dtype=torch.float32, cfg=cfg.dit).eval().requires_grad_(False)


def train_lora(cfg: PipelineConfig, data: LatentSet, root: Path, out: Path, *, expert: str, attribute: str,
               rank: int = 8, alpha: float = 8.0, steps: int = 600, batch: int = 2, lr: float = 2e-3,
               drop_text: float = 0.1, drop_audio: float = 0.1, seed: int = 0, ckpt_every: int = 25,
               max_seconds: float | None = None, progress: bool = True) -> Path:
    """Train a LoRA on `expert` of the model in `root`; resumable from out/<attribute>_<expert>.pt. Returns the
    safetensors file (`<attribute>_<expert>.safetensors`), written at every checkpoint and at the end."""
    spec = ex.ExpertSpec(names=cfg.experts, boundary=cfg.boundary)
    lo, hi = ex.expert_sigma_range(spec, expert)
    meta = {"task": cfg.task, "expert": expert, "attribute": attribute, "rank": str(rank), "range": f"{lo},{hi}"}
    run = LoraRun(cfg, root, out, f"{attribute}_{expert}", expert=expert, rank=rank, alpha=alpha, lr=lr, steps=steps,
                  meta=meta, desc=f"lora {expert} [{lo:.3f}, {hi:.3f}]", ckpt_every=ckpt_every,
                  max_seconds=max_seconds, progress=progress)
    model = run.model
    g = torch.Generator().manual_seed(seed * 1000 + run.step)
    n, fm = len(data.latents), cfg.dit.s2v.lat_motion_frames
    while run.step < steps:
        idx = torch.randint(n, (batch,), generator=g)
        z = data.latents[idx]  # (B, C, 1 + F, H, W): [reference in its own colour | attribute-coloured targets]
        ref, x0 = z[:, :, :1], z[:, :, 1:]
        audio, ctx = data.audio[idx].clone(), data.context[idx].clone()
        ctx[torch.rand(batch, generator=g) < drop_text] = data.context_null  # keep the unconditional passes valid
        audio[torch.rand(batch, generator=g) < drop_audio] = 0
        sigma = sample_sigmas(batch, lo, hi, cfg.sample_shift, g)  # (B,) in the expert's range, as it samples
        noise = torch.randn(x0.shape, generator=g)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        motion = x0.new_zeros(batch, x0.shape[1], fm, *x0.shape[3:])
        inp = S2VInputs(audio=audio, ref_latents=ref, motion_latents=motion, drop_motion_frames=True)
        if run.update(velocity_loss(model(xt, sigma * 1000, ctx, s2v=inp), noise - x0, None, 0.0)):
            break
    return run.close()


# ------------------------------------------------------------------------------------------- measurement


def _grow(mask: Tensor, px: int) -> Tensor:
    """(T, H, W) bool mask dilated by px pixels (a (2 px + 1)^2 max filter)."""
    return F.max_pool2d(mask[:, None].float(), 2 * px + 1, 1, px)[:, 0] > 0


def _psnr_on(a: Tensor, b: Tensor, mask: Tensor) -> float:
    """PSNR (dB, [0, 1] scale) over the masked pixels of (3, T, Hp, Wp) videos in [-1, 1]; mask (T, Hp, Wp)."""
    d = ((a - b) / 2).pow(2)[:, mask]  # (3, P)
    return 10 * math.log10(1.0 / max(float(d.mean()), 1e-10))


def attribute_scores(gen: Tensor, gt_own: Tensor, gt_attr: Tensor, color: Sequence[float]) -> dict[str, float]:
    """How much of the attribute a video shows and what it does to the rest; videos (3, T, Hp, Wp) in [-1, 1],
    aligned frame by frame. face: where the two renders differ (eroded 2 px for colour, grown 2 px for the rest)."""
    face = (gt_attr - gt_own).abs().amax(0) > 0.1  # (T, Hp, Wp)
    core, rest = ~_grow(~face, 2), ~_grow(face, 2)
    pix = (gen[:, core] + 1) / 2  # (3, P) in [0, 1]
    own = (gt_own[:, core] + 1) / 2
    target = torch.tensor(color).view(3, 1)
    d_attr = (pix - target).norm(dim=0)  # (P,) RGB distance to the attribute colour
    d_own = (pix - own).norm(dim=0)  # to what the avatar's own colour renders there
    return {"face_rgb_dist_attr": float(d_attr.mean()), "face_rgb_dist_own": float(d_own.mean()),
            "face_attr_fraction": float((d_attr < d_own).float().mean()),
            "psnr_face_vs_attr": _psnr_on(gen, gt_attr, core), "psnr_rest": _psnr_on(gen, gt_own, rest),
            "face_fraction": float(face.float().mean())}


def evaluate(cfg: PipelineConfig, lora_file: Path, *, expert: str, color: str, n: int = 6, seed: int = 0,
             scale: float = 1.0, progress: bool = True) -> dict:
    """The first n held-out avatars whose own face colour is not `color`, generated with and without the LoRA
    (same seed, inputs and settings); mean scores and per-avatar rows. The ground truth is rendered for the
    frames the video keeps (the first clip drops some)."""
    import numpy as np

    import wanmoe
    from wanmoe.data.avatar import FACE_COLORS, make_sample, render_video, sample_params, split_seeds

    dropped = cfg.dropped_frames(start_from_ref=False)
    pipe = wanmoe.load(cfg.task)
    rows = []
    avatars = [a for a in split_seeds("heldout", 4 * n) if sample_params(a).face_color != color][:n]
    for k, avatar in enumerate(tqdm(avatars, desc="held-out", disable=not progress)):
        s = make_sample(int(avatar), frames=cfg.infer_frames + 1)
        gt_attr = render_video(dataclasses.replace(s.params, face_color=color), s.envelope, s.fps, s.ref.shape[-1])
        row: dict = {"avatar": int(avatar), "own_color": s.params.face_color}
        for name in ("base", "lora"):
            if name == "lora":
                pipe.load_lora(lora_file, scale=scale, experts=expert)
            video = pipe(s.prompt, image=s.ref, audio=(s.audio, s.sr), seed=seed + k, num_clip=1).frames
            if name == "lora":
                pipe.unload_lora()
            t = min(video.shape[1], s.video.shape[1] - dropped)
            sc = attribute_scores(video[:, :t], s.video[:, dropped : dropped + t], gt_attr[:, dropped : dropped + t],
                                  FACE_COLORS[color])
            row.update({f"{name}_{key}": v for key, v in sc.items()})
        row["psnr_rest_delta"] = row["lora_psnr_rest"] - row["base_psnr_rest"]
        rows.append(row)
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k not in ("avatar", "own_color")}
    return {"expert": expert, "attribute": color, "scale": scale, "n": n, "lora": str(lora_file), "mean": mean,
            "rows": rows}

