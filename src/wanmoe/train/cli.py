"""`wanmoe train`: the embedded model's training stages, each resumable, run in order.

    wanmoe train clips   --out runs/mini --n 240          # render and cache avatar clips
    wanmoe train vae     --out runs/mini --steps 1800     # the small Wan-2.1-architecture VAE
    wanmoe train latents --out runs/mini                  # encode clips, audio and prompts once
    wanmoe train expert  --out runs/mini --expert high    # one noise expert (or `low`, or `dense` baseline)
    wanmoe train export  --out runs/mini --dest DIR       # write the model in the layout generate.py loads
    wanmoe train lora    --out runs/lora --expert high    # a style LoRA on one expert of the shipped model
    wanmoe train distill --out runs/distill --steps_fast 2  # step-distillation LoRAs, one per expert

`--smoke` shrinks every stage to seconds (CI).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import torch

from wanmoe.configs import PRESETS, PipelineConfig
from wanmoe.models.vae import VAEConfig
from wanmoe.train.clips import ClipSet, build_clips, load_clips, save_clips
from wanmoe.train.state import load_tensors

log = logging.getLogger("wanmoe.train")
TEXT_SEED = 1234  # the frozen byte-level text encoder is a fixed random projection of the prompt bytes


def frozen_text_encoder(cfg: PipelineConfig):  # noqa: ANN201
    from wanmoe.encoders.text import ByteTextEncoder

    torch.manual_seed(TEXT_SEED)
    return ByteTextEncoder(cfg.byte_text).eval().requires_grad_(False)


def build_latents(cfg: PipelineConfig, clips: ClipSet, vae, text_encoder, *, progress: bool = True,  # noqa: ANN001, ANN201
                  continuation: bool = False):
    """Encode every clip as [ref | first infer_frames frames], its audio features and its prompt, once.

    ``continuation``: instead, each clip as a clip after the first (`pipeline.S2VClips`, r > 0): its first
    ``motion_frames`` pixel frames are the motion context and the next infer_frames the targets. The window
    [motion | targets] is encoded in one pass; the causal encoder makes its first latent frames those of the
    motion frames alone, which is what the pipeline encodes. The reference image is encoded alone."""
    from tqdm import tqdm

    from wanmoe.encoders.audio import MelAudioEncoder
    from wanmoe.train.loop import LatentSet, mouth_cells
    from wanmoe.train.vae_train import mouth_boxes

    mel = MelAudioEncoder(cfg.mel)
    nf = cfg.infer_frames
    mf = cfg.dit.s2v.motion_frames if continuation else 0
    fm = cfg.dit.s2v.lat_motion_frames
    if clips.video.shape[2] < mf + nf:
        raise ValueError(f"continuation latents need clips of at least {mf + nf} frames (motion {mf} + {nf}); "
                         f"these have {clips.video.shape[2]} (render them with `wanmoe train clips --continuation`)")
    lats, auds, motion = [], [], []
    hp, wp = clips.ref.shape[-2:]
    stride = vae.cfg.stride[1]
    mouth = torch.stack([mouth_cells(b, (hp // stride, wp // stride), stride) for b in mouth_boxes(clips)])
    with torch.no_grad():
        # Batches of 2 through the one-pass encoder: oneDNN kernels at batch >= 2 are several times faster on CPU.
        for i in tqdm(range(0, len(clips), 2), desc="encode clips", disable=not progress):
            idx = list(range(i, min(i + 2, len(clips))))
            if continuation:
                ref = vae.encode(torch.stack([clips.ref_float(j)[:, None] for j in idx]), chunked=False)
                win = vae.encode(torch.stack([clips.video_float(j)[:, : mf + nf] for j in idx]), chunked=False)
                lats.extend(torch.cat([ref, win[:, :, fm:]], dim=2))  # b x (C, 1 + nf/4, H, W)
                motion.extend(win[:, :, :fm])  # b x (C, Fm, H, W)
            else:
                pix = torch.stack([torch.cat([clips.ref_float(j)[:, None], clips.video_float(j)[:, :nf]], dim=1)
                                   for j in idx])  # (b, 3, 1 + nf, Hp, Wp)
                lats.extend(vae.encode(pix, chunked=False))  # b x (C, 1 + nf/4, H, W)
            for j in idx:
                a = mel(clips.audio[j].numpy(), clips.sr, clips.fps)[..., mf : mf + nf]  # (1, Dm, <=nf)
                auds.append(torch.nn.functional.pad(a, (0, nf - a.shape[-1])))
        ctx = torch.cat([text_encoder([p]) for p in clips.prompts])  # (N, S, text_dim)
        null = text_encoder([""])[0]
    if not continuation:
        return LatentSet(torch.stack(lats), torch.stack(auds), ctx, null, mouth)
    return LatentSet(torch.stack(lats), torch.stack(auds), ctx, null, mouth, torch.stack(motion),
                     torch.ones(len(lats), dtype=torch.bool))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="wanmoe train", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("stage", choices=["clips", "vae", "latents", "expert", "export", "lora", "distill", "pairs",
                                      "decoder"])
    p.add_argument("--task", default="s2v-mini", choices=[k for k, v in PRESETS.items() if v.text_encoder == "byte"])
    p.add_argument("--out", type=Path, default=Path("runs/mini"))
    p.add_argument("--n", type=int, default=None,
                   help="clips: how many training clips (default 240; lora: 48; distill: 96 teacher runs)")
    p.add_argument("--start", type=int, default=0, help="clips: first training-split seed")
    p.add_argument("--speech", default="synthetic", choices=["synthetic", "espeak"],
                   help="clips: procedural speech-like audio, or real espeak-ng sentences")
    p.add_argument("--latents", default=None,
                   help="expert: comma list of latent files to train on together (default: OUT/latents.pt)")
    p.add_argument("--steps", type=int, default=None,
                   help="vae/expert: total optimisation steps (lora: 600; distill: 1200 per expert)")
    p.add_argument("--expert", default="high",
                   help="expert/lora: high | low, or dense (expert: the single-expert baseline)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads (train experts side by side, one each)")
    p.add_argument("--max_minutes", type=float, default=None,
                   help="expert/vae/lora/distill (distill: per expert): stop (and checkpoint) after this long; "
                        "a later run resumes")
    p.add_argument("--phases", default="1800:5:48:4:6e-4,2400:49:24:2:4e-4",
                   help="vae: end_step:frames:crop:batch:lr[:sample][:mouth] per phase, each resuming the previous "
                        "(sample: draw from the posterior; mouth: over-sample mouth crops with a lip-region loss)")
    p.add_argument("--vae_dim", type=int, default=None, help="vae: base width (default: the preset's)")
    p.add_argument("--vae_res_blocks", type=int, default=None,
                   help="vae: residual blocks per encoder stage, decoder stages one more (default: the preset's)")
    p.add_argument("--vae_mult", default=None,
                   help="vae: stage width multipliers, comma list, e.g. 1,2,4,8 (default: the preset's)")
    p.add_argument("--z_dim", type=int, default=None, help="vae: latent channels (default: the preset's)")
    p.add_argument("--vae_init", type=Path, default=None,
                   help="vae: start from this trained VAE (.safetensors or checkpoint) when OUT/vae has no checkpoint; "
                        "the latent may be wider (the new channels start unused)")
    p.add_argument("--clips", default=None,
                   help="vae: comma list of clip files to train on together (default: OUT/clips.pt)")
    p.add_argument("--heldout", type=int, default=0,
                   help="vae: held-out whole clips measured during training (OUT/vae/vae_heldout.jsonl; 0: none)")
    p.add_argument("--eval_every", type=float, default=120.0, help="vae: seconds of training between measurements")
    p.add_argument("--device", default="cpu", help="vae: where to train (cpu, cuda, cuda:1, ...)")
    p.add_argument("--decoder_only", action="store_true",
                   help="vae: train the decoder only, the encoder frozen at --vae_init's weights; the latents and "
                        "their statistics stay the same, so the experts trained on them need no retraining")
    p.add_argument("--warmup", type=int, default=0,
                   help="vae: linear learning-rate warm-up steps when training starts without optimizer state "
                        "(scratch or --vae_init)")
    p.add_argument("--dest", type=Path, default=None,
                   help="export: destination folder; pairs: the pair file to write (default OUT/pairs.pt)")
    p.add_argument("--model", default=None,
                   help="pairs: the model (folder or task name) whose generated latents pair with OUT/clips.pt")
    p.add_argument("--crop", type=int, default=48,
                   help="decoder: crop size in pixels (a multiple of the VAE's spatial stride)")
    p.add_argument("--stop_step", type=int, default=None,
                   help="decoder: stop (and write the weights) at this step of the --steps cosine")
    p.add_argument("--mouth_anchor", type=Path, default=None,
                   help="decoder: inside the mouth box, learn this VAE's decode of the latent instead of the ground "
                        "truth (keeps its mouth rendering and lip sync; e.g. the decoder being replaced)")
    p.add_argument("--pairs", default=None,
                   help="decoder: comma list of pair files (`pairs` stage) to tune --vae_init's decoder on")
    p.add_argument("--init", type=Path, default=None,
                   help="expert: start from this checkpoint's EMA weights (e.g. runs/mini/experts/high.pt) or a "
                        "shipped expert's folder (e.g. src/wanmoe/assets/s2v-mini/high_noise_model)")
    p.add_argument("--mouth_weight", type=float, default=0.0,
                   help="expert: extra loss weight on the latent cells over the mouth (lip-region loss)")
    p.add_argument("--attribute", default="green", help="lora: the face colour the LoRA paints every face in")
    p.add_argument("--rank", type=int, default=8, help="lora/distill: rank of each adapted Linear")
    p.add_argument("--eval_n", type=int, default=6,
                   help="lora/distill: held-out avatars measured after training (0: none)")
    p.add_argument("--steps_fast", type=int, default=2, help="distill: the student's steps (a divisor of 20)")
    p.add_argument("--continuation", action="store_true",
                   help="clips: render motion_frames more frames per clip; latents: encode them as clips after the "
                        "first (motion frames, then targets) into OUT/latents_cont.pt")
    p.add_argument("--cont_frac", type=float, default=0.5,
                   help="expert: share of batches drawn from continuation clips, where the latents have them")
    p.add_argument("--motion_lr_mult", type=float, default=1.0,
                   help="expert: learning-rate multiplier for the motion-frame packer (untrained in a model that saw "
                        "first clips only)")
    p.add_argument("--motion_noise", type=float, default=0.1,
                   help="expert: largest std of the noise added to continuation clips' motion latents")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and a few steps (CI)")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    a.n = a.n if a.n is not None else {"lora": 48, "distill": 96}.get(a.stage, 240)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(a.threads)
    cfg = PRESETS[a.task]
    if a.smoke:
        cfg = dataclasses.replace(cfg, infer_frames=8)
    a.out.mkdir(parents=True, exist_ok=True)
    progress = not a.quiet
    if a.stage == "clips":
        from wanmoe.data.avatar import split_seeds

        frames = cfg.infer_frames + (cfg.dit.s2v.motion_frames if a.continuation else 1)
        size = 64 if a.smoke else int(cfg.default_size.split("*")[0])
        seeds = split_seeds("train")[a.start : a.start + a.n]
        save_clips(build_clips(seeds, frames=frames, size=size, progress=progress, speech=a.speech), a.out / "clips.pt")
    elif a.stage == "vae":
        vae_stage(cfg, a, progress)
    elif a.stage == "latents":
        from wanmoe.loading import load_small_vae

        vae = load_small_vae(a.out / "vae" / "vae.safetensors", torch.device("cpu"))
        clips = load_clips(a.out / "clips.pt").subset(a.n)
        lat = build_latents(cfg, clips, vae, frozen_text_encoder(cfg), progress=progress, continuation=a.continuation)
        lat.save(a.out / ("latents_cont.pt" if a.continuation else "latents.pt"))
    elif a.stage == "expert":
        from wanmoe.train.loop import LatentSet, latent_config, train_expert

        steps = a.steps or (3 if a.smoke else 4000)
        files = [Path(f) for f in a.latents.split(",")] if a.latents else [a.out / "latents.pt"]
        data = LatentSet.cat([LatentSet.load(f) for f in files])
        if data.latents.shape[1] != cfg.vae.z_dim:  # latents of a retrained VAE: the DiT's channels follow them
            cfg = latent_config(cfg, data.latents.shape[1])
        train_expert(cfg, data, a.out / "experts", expert=a.expert, steps=steps,
                     batch=a.batch, lr=a.lr or 5e-4, progress=progress, mouth_weight=a.mouth_weight, init=a.init,
                     cont_frac=a.cont_frac, motion_noise=a.motion_noise, motion_lr_mult=a.motion_lr_mult,
                     max_seconds=None if a.max_minutes is None else a.max_minutes * 60)
    elif a.stage == "lora":
        lora_stage(cfg, a.out, expert=a.expert, attribute=a.attribute, n=2 if a.smoke else a.n,
                   start=a.start, steps=a.steps or (3 if a.smoke else 600), rank=a.rank, lr=a.lr or 2e-3,
                   batch=a.batch, eval_n=0 if a.smoke else a.eval_n, max_minutes=a.max_minutes, smoke=a.smoke,
                   progress=progress)
    elif a.stage == "distill":
        from wanmoe.train.distill import distill_stage

        distill_stage(cfg, a.out, steps_fast=a.steps_fast, n=2 if a.smoke else a.n, start=a.start,
                      steps=a.steps or (2 if a.smoke else 1200), rank=a.rank, lr=a.lr or 1e-3, batch=a.batch,
                      eval_n=0 if a.smoke else a.eval_n, max_minutes=a.max_minutes, smoke=a.smoke,
                      progress=progress)
    elif a.stage == "export":
        export(cfg, a.out, a.dest or a.out / "export")
    elif a.stage in ("pairs", "decoder"):
        decoder_stages(cfg, a, progress)
    return 0


def vae_config(cfg: PipelineConfig, a: argparse.Namespace) -> VAEConfig:
    """The preset's VAE with the --vae_dim/--vae_res_blocks/--vae_mult/--z_dim overrides and stats (0, 1)."""
    over: dict = {}
    if a.vae_dim is not None:
        over["dim"] = a.vae_dim
    if a.vae_res_blocks is not None:
        over["num_res_blocks"] = a.vae_res_blocks
    if a.vae_mult is not None:
        try:
            over["dim_mult"] = tuple(int(m) for m in a.vae_mult.split(","))
        except ValueError:
            raise SystemExit(f"--vae_mult {a.vae_mult!r}: expected a comma list of integers, e.g. 1,2,4,8") from None
        if len(over["dim_mult"]) != len(cfg.vae.dim_mult):
            # The stride (and so every latent shape downstream) follows the number of stages.
            raise SystemExit(f"--vae_mult needs {len(cfg.vae.dim_mult)} entries (the stride stays "
                             f"{cfg.vae.stride}), got {a.vae_mult!r}")
    z = a.z_dim if a.z_dim is not None else cfg.vae.z_dim
    vcfg = dataclasses.replace(cfg.vae, **over, z_dim=z, mean=(0.0,) * z, std=(1.0,) * z)
    try:
        vcfg.validate()
    except ValueError as e:
        raise SystemExit(f"vae: {e}") from None
    return vcfg


def vae_stage(cfg: PipelineConfig, a: argparse.Namespace, progress: bool) -> None:
    """`wanmoe train vae`: the --phases in order, each resuming the last; stops at --max_minutes (resumable)."""
    import time

    from wanmoe.train.vae_train import HeldOut, cat_clips, train_vae

    vcfg = vae_config(cfg, a)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {a.device}: CUDA is not available here (use --device cpu)")
    files = [Path(f) for f in a.clips.split(",")] if a.clips else [a.out / "clips.pt"]
    clips = cat_clips([load_clips(f) for f in files])
    phases = [ph.split(":") for ph in a.phases.split(",")]
    if a.smoke:
        phases = [["3", "5", "16", "2", "1e-3"]]
    held = HeldOut.make(a.heldout, size=64 if a.smoke else 128) if a.heldout > 0 else None
    deadline = None if a.max_minutes is None else time.time() + a.max_minutes * 60
    final = vcfg
    for k, ph in enumerate(phases):  # end_step:frames:crop:batch:lr[:sample][:mouth]; each resumes the last
        flags = set(ph[5:])
        if flags - {"sample", "mouth"}:
            raise SystemExit(f"--phases: unknown flag(s) {sorted(flags - {'sample', 'mouth'})} in {':'.join(ph)}")
        mouth = "mouth" in flags
        final, finished = train_vae(
            clips, a.out / "vae", vcfg, steps=int(ph[0]), frames=int(ph[1]), crop=int(ph[2]), batch=int(ph[3]),
            lr=float(ph[4]), sample_posterior="sample" in flags, mouth_p=0.6 if mouth else 0.0,
            mouth_weight=4.0 if mouth else 0.0, ref_p=0.5 if mouth else 0.3, ckpt_every=50, progress=progress,
            finalize=k == len(phases) - 1, init=a.vae_init, deadline=deadline, held=held,
            eval_every_s=a.eval_every, warmup=a.warmup, decoder_only=a.decoder_only, device=a.device)
        if not finished:
            log.info("vae: stopped at --max_minutes in phase %d; run the same command again to resume", k + 1)
            return
    (a.out / "vae" / "config.json").write_text(json.dumps(dataclasses.asdict(final)))


def decoder_stages(cfg: PipelineConfig, a: argparse.Namespace, progress: bool) -> None:
    """`pairs`: a model's generated latents for the first --n clips of OUT/clips.pt (from --start); `decoder`: the
    decoder of --vae_init tuned on --pairs (wanmoe.train.decoder_tune)."""
    from wanmoe.train import decoder_tune as dt

    if a.stage == "pairs":
        clips_file = a.out / "clips.pt"
        clips = load_clips(clips_file)
        stop = len(clips) if a.n is None else min(len(clips), a.start + a.n)
        settings = {"steps": 2, "infer_frames": cfg.infer_frames} if a.smoke else {}
        pairs = dt.build_pairs(a.model or cfg.task, clips, list(range(a.start, stop)), progress=progress, **settings)
        pairs.clips_file = str(clips_file.resolve())
        pairs.save(a.dest or a.out / "pairs.pt")
        return
    if not a.pairs or a.vae_init is None:
        raise SystemExit("wanmoe train decoder: give --pairs (pair files) and --vae_init (the VAE to tune)")
    pairs, clips = dt.load_pair_files([Path(f) for f in a.pairs.split(",")])
    steps = a.steps or (2 if a.smoke else 3000)
    dt.tune_decoder(a.vae_init, clips, pairs, a.out, steps=steps, batch=a.batch, lr=a.lr or 1e-4,
                    warmup=a.warmup or (0 if a.smoke else 100), crop=32 if a.smoke else a.crop,
                    max_seconds=None if a.max_minutes is None else a.max_minutes * 60, stop_step=a.stop_step,
                    mouth_anchor=a.mouth_anchor, progress=progress)


def export(cfg: PipelineConfig, run: Path, dest: Path) -> None:
    """Write the two experts (EMA weights), the single-expert baseline, the VAE and the text encoder."""
    from wanmoe.loading import load_small_vae, save_small_model
    from wanmoe.models.dit import DiT

    vae = load_small_vae(run / "vae" / "vae.safetensors", torch.device("cpu"))
    cfg = cfg.with_vae(vae.cfg)  # a retrained VAE may have another latent width: the DiTs follow it

    def ema(name: str) -> DiT:
        m = DiT(cfg.dit)
        ck = load_tensors(run / "experts" / f"{name}.pt")
        m.load_state_dict(ck["ema"])
        return m.eval()

    text = frozen_text_encoder(cfg)
    save_small_model(dest, cfg, {n: ema(n) for n in cfg.experts}, vae, text, dit_dtype=torch.bfloat16)
    if (run / "experts" / "dense.pt").exists():
        single = dataclasses.replace(cfg, experts=("low",))
        save_small_model(dest / "single_expert", single, {"low": ema("dense")}, vae, text, dit_dtype=torch.bfloat16)


def lora_stage(cfg: PipelineConfig, out: Path, *, expert: str, attribute: str, n: int, start: int, steps: int,
               rank: int, lr: float, batch: int, eval_n: int, max_minutes: float | None, smoke: bool,
               progress: bool) -> dict | None:
    """`wanmoe train lora` (wanmoe.train.lora_train): attribute clips -> latents -> LoRA -> held-out measurement,
    each stage skipped when its file exists (resumable)."""
    from wanmoe.configs import ASSETS
    from wanmoe.data.avatar import FACE_COLORS, split_seeds
    from wanmoe.loading import BYTE_TEXT, VAE_SAFETENSORS, load_small_vae, load_text_encoder
    from wanmoe.train.loop import LatentSet
    from wanmoe.train.lora_train import attribute_clips, evaluate, train_lora

    if attribute not in FACE_COLORS:
        raise SystemExit(f"--attribute {attribute!r}: choose a face colour of {sorted(FACE_COLORS)}")
    if expert not in cfg.experts:
        raise SystemExit(f"--expert {expert!r}: {cfg.task} has experts {', '.join(cfg.experts)}")
    root = ASSETS / cfg.task
    for f in (VAE_SAFETENSORS, BYTE_TEXT):
        if not (root / f).is_file():
            raise SystemExit(f"the embedded model's {f} is missing from {root}")
    out.mkdir(parents=True, exist_ok=True)
    clips_file, latents_file = out / f"{attribute}_clips.pt", out / f"{attribute}_latents.pt"
    if not clips_file.exists():
        size = 64 if smoke else int(cfg.default_size.split("*")[0])
        seeds = split_seeds("train")[start : start + n]
        save_clips(attribute_clips(seeds, color=attribute, frames=cfg.infer_frames + 1, size=size,
                                   progress=progress), clips_file)
    if not latents_file.exists():
        vae = load_small_vae(root / VAE_SAFETENSORS, torch.device("cpu"))
        text = load_text_encoder(cfg, root, torch.device("cpu"), True)
        build_latents(cfg, load_clips(clips_file), vae, text, progress=progress).save(latents_file)
    file = train_lora(cfg, LatentSet.load(latents_file), root, out, expert=expert, attribute=attribute, rank=rank,
                      alpha=float(rank), steps=steps, batch=batch, lr=lr, progress=progress,
                      max_seconds=None if max_minutes is None else max_minutes * 60)
    log.info("wrote %s", file)
    if eval_n <= 0:
        return None
    res = evaluate(cfg, file, expert=expert, color=attribute, n=eval_n, progress=progress)
    (out / f"{attribute}_{expert}_eval.json").write_text(json.dumps(res, indent=1))
    m = res["mean"]
    print(f"held-out avatars: {eval_n}; LoRA {file.name} on expert {expert}")
    print("| | base | LoRA |\n|---|---|---|")
    for key, label in (("face_attr_fraction", f"face pixels closer to {attribute} than to the own colour"),
                       ("face_rgb_dist_attr", f"face RGB distance to {attribute}"),
                       ("psnr_face_vs_attr", f"face PSNR vs the {attribute} render (dB)"),
                       ("psnr_rest", "rest-of-frame PSNR vs ground truth (dB)")):
        print(f"| {label} | {m['base_' + key]:.3f} | {m['lora_' + key]:.3f} |")
    print(f"rest-of-frame PSNR change: {m['psnr_rest_delta']:+.2f} dB")
    return res


if __name__ == "__main__":
    raise SystemExit(main())
