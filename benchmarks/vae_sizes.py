"""Cost of candidate VAE sizes for the embedded model: parameters, fp32 size, decode time and a training step.

    python benchmarks/vae_sizes.py                           # the candidates of docs/vae_v2.md, one thread
    python benchmarks/vae_sizes.py 16/1/1,2,4,4/32 24/1/1,2,4,4/16

A size is dim/num_res_blocks/dim_mult/z_dim. Decode: `WanVAE.decode` of a 17x16x16 latent (one default clip,
1 + 64 frames at 128x128), streamed as the pipeline does, best of 3. Training step: encode, decode, MSE, backward
and AdamW on 2 x 17 x 40 x 40 crops, best of 3. Random weights (the time does not depend on them).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from wanmoe.models.vae import VAEConfig, WanVAE

CANDIDATES = ("16/1/1,2,4,4/16", "16/1/1,2,4,4/32", "16/1/1,2,4,8/32", "16/2/1,2,4,4/32", "24/1/1,2,4,4/32",
              "32/1/1,2,4,4/32")


def parse(size: str) -> VAEConfig:
    dim, blocks, mult, z = size.split("/")
    zd = int(z)
    return VAEConfig(dim=int(dim), num_res_blocks=int(blocks), dim_mult=tuple(int(m) for m in mult.split(",")),
                     z_dim=zd, mean=(0.0,) * zd, std=(1.0,) * zd)


def best(fn, n: int = 3) -> float:  # noqa: ANN001
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure(cfg: VAEConfig) -> tuple[int, float, float]:
    """(parameters, decode seconds, training-step seconds) for one size."""
    torch.manual_seed(0)
    vae = WanVAE(cfg)
    z = torch.randn(1, cfg.z_dim, 17, 16, 16)
    with torch.no_grad():
        dec = best(lambda: vae.decode(z))
    opt = torch.optim.AdamW(vae.parameters(), 1e-4)
    x = torch.rand(2, 3, 17, 40, 40) * 2 - 1

    def step() -> None:
        mu, _ = vae.encode_moments(x, chunked=False)
        loss = F.mse_loss(vae.decode(mu, clamp=False, chunked=False), x)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return sum(p.numel() for p in vae.parameters()), dec, best(step)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sizes", nargs="*", default=list(CANDIDATES), help="dim/num_res_blocks/dim_mult/z_dim")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print("| size | params | fp32 MB | decode s | train step s |\n|---|---:|---:|---:|---:|")
    for size in a.sizes:
        n, dec, step = measure(parse(size))
        print(f"| {size} | {n / 1e6:.2f} M | {n * 4 / 1e6:.1f} | {dec:.3f} | {step:.3f} |", flush=True)


if __name__ == "__main__":
    main()
