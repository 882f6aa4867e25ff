"""VAE reconstruction of held-out talking-avatar clips: PSNR (whole clip, late frames, mouth box), audio-mouth
sync, and the decode time of one default clip.

    python benchmarks/vae_recon.py                          # the shipped s2v-mini VAE
    python benchmarks/vae_recon.py --vae path/to/vae.safetensors --n 6 --threads 1

Each clip is encoded in the S2V layout [reference | 68 frames] and decoded (streamed, as the pipeline does); the
reference frame is dropped. PSNR over all 68 frames, over frames < 20 and >= 40 (late), and inside the mouth box
(found on the reference image with eval's `locate_mouth`) over all frames. No DiT is involved, so this is the
ceiling every generated video is under: if the reconstruction's mouth does not follow the audio, no model trained
on these latents can show it. The decode time is `WanVAE.decode` of a 17-frame 16x16 latent (one default clip:
1 + 64 frames at 128x128), best of ``--repeat``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from wanmoe.configs import ASSETS
from wanmoe.data.avatar import make_sample, split_seeds
from wanmoe.eval import metrics as m
from wanmoe.eval.metrics import locate_mouth
from wanmoe.loading import load_small_vae


def decode_seconds(vae, repeat: int) -> float:  # noqa: ANN001
    z = torch.randn(1, vae.cfg.z_dim, 17, 16, 16, generator=torch.Generator().manual_seed(0))
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeat):
            t = time.perf_counter()
            vae.decode(z)
            best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vae", type=Path, default=ASSETS / "s2v-mini" / "vae.safetensors")
    p.add_argument("--n", type=int, default=3, help="held-out clips (the first n held-out seeds)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3, help="decode timing: best of this many (0: no timing)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    vae = load_small_vae(a.vae, torch.device("cpu"))
    rows = []
    for seed in split_seeds("heldout", a.n):
        s = make_sample(seed, frames=68)
        with torch.no_grad():
            rec = vae.decode(vae.encode(torch.cat([s.ref[:, None], s.video], 1)[None]))[0][:, 1:]
        mb = locate_mouth(s.ref)
        box = (slice(None), slice(None), slice(mb.y0, mb.y1), slice(mb.x0, mb.x1))
        r = (m.psnr(rec, s.video), m.psnr(rec[:, :20], s.video[:, :20]), m.psnr(rec[:, 40:], s.video[:, 40:]),
             m.psnr(rec[box], s.video[box]), m.mouth_sync(rec, s.envelope, s.ref)["sync"])
        rows.append(r)
        print(f"seed {seed}: psnr {r[0]:.2f} dB, frames<20 {r[1]:.2f}, frames>=40 {r[2]:.2f}, mouth {r[3]:.2f}, "
              f"sync {r[4]:.3f}", flush=True)
    mean = [sum(c) / len(c) for c in zip(*rows)]
    worst = [min(c) for c in zip(*rows)]
    print(f"mean: psnr {mean[0]:.2f} dB, frames<20 {mean[1]:.2f}, frames>=40 {mean[2]:.2f}, mouth {mean[3]:.2f}, "
          f"sync {mean[4]:.3f}")
    print(f"worst clip: psnr {worst[0]:.2f} dB, frames>=40 {worst[2]:.2f}, mouth {worst[3]:.2f}")
    if a.repeat > 0:
        print(f"decode of a 17x16x16 latent ({a.threads} thread(s)): {decode_seconds(vae, a.repeat):.3f} s")


if __name__ == "__main__":
    main()
