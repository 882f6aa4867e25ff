"""VAE reconstruction of held-out talking-avatar clips: PSNR (all, frames < 20, frames >= 40) and audio-mouth sync.

    python benchmarks/vae_recon.py                          # the shipped s2v-mini VAE
    python benchmarks/vae_recon.py --vae path/to/vae.safetensors --n 3

Each clip is encoded in the S2V layout [reference | 68 frames] and decoded; the reference frame is dropped. No
DiT is involved, so this is the ceiling every generated video is under: if the reconstruction's mouth does not
follow the audio, no model trained on these latents can show it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from wanmoe.configs import ASSETS
from wanmoe.data.avatar import make_sample, split_seeds
from wanmoe.eval import metrics as m
from wanmoe.loading import load_small_vae


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vae", type=Path, default=ASSETS / "s2v-mini" / "vae.safetensors")
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    vae = load_small_vae(a.vae, torch.device("cpu"))
    rows = []
    for seed in split_seeds("heldout", a.n):
        s = make_sample(seed, frames=68)
        with torch.no_grad():
            rec = vae.decode(vae.encode(torch.cat([s.ref[:, None], s.video], 1)[None]))[0][:, 1:]
        r = (m.psnr(rec, s.video), m.psnr(rec[:, :20], s.video[:, :20]), m.psnr(rec[:, 40:], s.video[:, 40:]),
             m.mouth_sync(rec, s.envelope, s.ref)["sync"])
        rows.append(r)
        print(f"seed {seed}: psnr {r[0]:.2f} dB, frames<20 {r[1]:.2f}, frames>=40 {r[2]:.2f}, sync {r[3]:.3f}",
              flush=True)
    mean = [sum(c) / len(c) for c in zip(*rows)]
    print(f"mean: psnr {mean[0]:.2f} dB, frames<20 {mean[1]:.2f}, frames>=40 {mean[2]:.2f}, sync {mean[3]:.3f}")


if __name__ == "__main__":
    main()
