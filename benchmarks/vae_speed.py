"""CPU VAE decode time: wanmoe WanVAE against diffusers' AutoencoderKLWan holding the same weights.

    python benchmarks/vae_speed.py                  # shipped small VAE, then the official full size
    python benchmarks/vae_speed.py --rounds 7 --threads 2

Two configurations: the small VAE that ships in src/wanmoe/assets/s2v-mini (its trained weights; 128x128 video,
the size `python generate.py` decodes) and the official Wan 2.1 VAE size (dim 96, random weights; a small 64x64
frame so a round stays short). Both sides decode the same latent chunk by chunk (one latent frame at a time, as the
official code does), outputs are compared first, then contenders alternate for --rounds rounds; medians reported.
"wanmoe[default kernels]" is our VAE with `wanmoe.backends` off. GFLOP/s counts the convolution and attention
FLOPs of one decode against this machine's fp32 matmul peak, sampled in every round.

The last two lines: the full-size ratio, then ``vae_ratio=<diffusers time / our time>`` for the shipped small VAE.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import torch
from dit_speed import PeakProbe, alternate, count_flops, rel_err, report

from wanmoe import backends
from wanmoe.models.vae import VAE21, VAEConfig, WanVAE

SMALL_VAE = Path(__file__).resolve().parents[1] / "src/wanmoe/assets/s2v-mini/vae.safetensors"

# name: latent (F, H, W) decoded per round
SHAPES = {"small": (3, 16, 16), "full": (2, 8, 8)}


def _diffusers_vae_key(k: str, ours: WanVAE) -> str:
    """wanmoe/official VAE key -> diffusers AutoencoderKLWan key (the layout of diffusers' convert script)."""
    top = {"conv1.": "quant_conv.", "conv2.": "post_quant_conv."}
    for a, b in top.items():
        if k.startswith(a):
            return b + k[len(a) :]
    side, rest = k.split(".", 1)
    rest = re.sub(r"^conv1\.", "conv_in.", rest)
    rest = re.sub(r"^head\.0\.", "norm_out.", rest)
    rest = re.sub(r"^head\.2\.", "conv_out.", rest)
    # A residual block's Sequential slots -> diffusers' names.
    res = {"residual.0.": "norm1.", "residual.2.": "conv1.", "residual.3.": "norm2.", "residual.6.": "conv2.",
           "shortcut.": "conv_shortcut."}
    m = re.match(r"^middle\.(\d)\.(.*)$", rest)
    if m:
        i, tail = int(m.group(1)), m.group(2)
        if i == 1:
            return f"{side}.mid_block.attentions.0.{tail}"
        for a, b in res.items():
            tail = tail.replace(a, b) if tail.startswith(a) else tail
        return f"{side}.mid_block.resnets.{i // 2}.{tail}"
    m = re.match(r"^(downsamples|upsamples)\.(\d+)\.(.*)$", rest)
    if m:
        i, tail = int(m.group(2)), m.group(3)
        for a, b in res.items():
            tail = tail.replace(a, b) if tail.startswith(a) else tail
        if side == "encoder":
            return f"encoder.down_blocks.{i}.{tail}"
        # The decoder's flat list regroups into up_blocks[stage].resnets[j] / upsamplers[0].
        stage = j = 0
        for n, block in enumerate(ours.decoder.upsamples):
            if n == i:
                break
            if type(block).__name__ == "Resample":
                stage, j = stage + 1, 0
            else:
                j += 1
        if type(ours.decoder.upsamples[i]).__name__ == "Resample":
            return f"decoder.up_blocks.{stage}.upsamplers.0.{tail}"
        return f"decoder.up_blocks.{stage}.resnets.{j}.{tail}"
    return f"{side}.{rest}"


def to_diffusers_vae(ours: WanVAE):
    """A diffusers AutoencoderKLWan (eval, fp32) with exactly our weights and latent statistics (strict load)."""
    from diffusers import AutoencoderKLWan  # benchmark-only peer

    c = ours.cfg
    theirs = AutoencoderKLWan(
        base_dim=c.dim, z_dim=c.z_dim, dim_mult=list(c.dim_mult), num_res_blocks=c.num_res_blocks,
        attn_scales=list(c.attn_scales), temperal_downsample=list(c.temporal_downsample), dropout=c.dropout,
        latents_mean=list(c.mean), latents_std=list(c.std),
    )
    sd = {_diffusers_vae_key(k, ours): v for k, v in ours.state_dict().items()}
    # diffusers stores the attention norm's gamma as (C, 1, 1) like ours; shapes must match exactly.
    theirs.load_state_dict(sd, strict=True)
    return theirs.eval()


def diffusers_decode(theirs, z: torch.Tensor) -> torch.Tensor:
    """What WanPipeline does with a normalised latent: undo the normalisation, then decode (clamped)."""
    c = theirs.config
    mean = torch.tensor(c.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(c.latents_std).view(1, -1, 1, 1, 1)
    return theirs.decode(z * std + mean, return_dict=False)[0]


def random_vae(cfg: VAEConfig, seed: int = 0) -> WanVAE:
    """A VAE with the default init, plus weights in the attention projections (which that init leaves at 0)."""
    torch.manual_seed(seed)
    vae = WanVAE(cfg).eval()
    with torch.no_grad():
        for n, p in vae.named_parameters():
            if n.endswith("proj.weight"):
                p.normal_(0, p[0].numel() ** -0.5)
    return vae


def decode_flops(cfg: VAEConfig, latent: tuple[int, ...]) -> int:
    """FLOPs of one chunked decode of a (B, z, F, H, W) latent (counted on the meta device)."""
    with torch.device("meta"):
        vae = WanVAE(cfg)
        z = torch.empty(latent)
    return count_flops(lambda: vae.decode(z))


def load_vae(name: str) -> WanVAE:
    if name == "small":
        from wanmoe.loading import load_small_vae

        return load_small_vae(SMALL_VAE, torch.device("cpu"))
    return random_vae(VAE21)


def bench(name: str, rounds: int) -> float:
    ours = load_vae(name)
    theirs = to_diffusers_vae(ours)
    f, h, w = SHAPES[name]
    z = torch.randn(1, ours.cfg.z_dim, f, h, w, generator=torch.Generator().manual_seed(0))

    def run_plain():
        with backends.use_mode("default"):
            return ours.decode(z)

    fns = {"wanmoe": lambda: ours.decode(z), "wanmoe[default kernels]": run_plain,
           "diffusers": lambda: diffusers_decode(theirs, z)}
    with torch.inference_mode():
        err = rel_err(fns["wanmoe"](), fns["diffusers"]())
    flops = decode_flops(ours.cfg, tuple(z.shape))
    probe = PeakProbe()
    with torch.inference_mode():
        times = alternate(fns, rounds, probe)
    print(f"{name} VAE (dim {ours.cfg.dim}, {ours.cfg.num_res_blocks} res blocks): decode latent {f}x{h}x{w} -> "
          f"{1 + 4 * (f - 1)} frames of {8 * h}x{8 * w}; {flops / 1e9:.2f} GFLOP per decode; output rel. diff vs "
          f"diffusers {err:.1e}")
    return report(name, times, flops, probe, "wanmoe", "diffusers")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (each runs every contender once)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    small = bench("small", args.rounds)
    full = bench("full", args.rounds)
    print(f"vae_ratio_full={full:.3f}")
    print(f"vae_ratio={small:.3f}")


if __name__ == "__main__":
    main()
