"""CPU forward-time comparison: wanmoe DiT vs diffusers' WanTransformer3DModel at the same sizes.

Both models get random weights (speed only); runs alternate ours/theirs so load changes hit both equally, and the
median per model is reported. The last line is ``speed_ratio=<diffusers time / our time>`` for the medium config
(> 1 means wanmoe is faster). Usage: python benchmarks/dit_speed.py [--reps 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from wanmoe.models.dit import DIT_PRESETS, DiT

CONFIGS = {
    # name: (dim, ffn_dim, heads, layers, latent (F, H, W), text tokens)
    "tiny": (64, 128, 2, 2, (3, 8, 8), 16),
    "medium": (512, 1536, 4, 4, (5, 16, 24), 64),
}


def _time(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench(name: str, reps: int) -> float:
    from diffusers import WanTransformer3DModel  # benchmark-only oracle dependency

    dim, ffn, heads, layers, fhw, s = CONFIGS[name]
    cfg = replace(DIT_PRESETS["t2v-a14b"], dim=dim, ffn_dim=ffn, num_heads=heads, num_layers=layers, text_len=s)
    torch.manual_seed(0)
    ours = DiT(cfg).eval()
    theirs = WanTransformer3DModel(
        num_attention_heads=heads,
        attention_head_dim=dim // heads,
        in_channels=16,
        out_channels=16,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=ffn,
        num_layers=layers,
    ).eval()
    x = torch.randn(1, 16, *fhw)
    t = torch.tensor([500.0])
    ctx = torch.randn(1, s, cfg.text_dim)
    run_ours = lambda: ours(x, t, ctx)  # noqa: E731
    run_theirs = lambda: theirs(x, t, ctx, return_dict=False)  # noqa: E731
    ta, tb = [], []
    with torch.inference_mode():
        run_ours(), run_theirs()  # warm-up
        for _ in range(reps):  # alternate
            ta += _time(run_ours, 1)
            tb += _time(run_theirs, 1)
    a, b = statistics.median(ta), statistics.median(tb)
    print(
        f"{name}: tokens={fhw[0] * fhw[1] * fhw[2] // 4} wanmoe={a * 1e3:.1f}ms "
        f"diffusers={b * 1e3:.1f}ms ratio={b / a:.3f}"
    )
    return b / a


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--reps", type=int, default=5, help="timed runs per model per config")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bench("tiny", args.reps)
    ratio = bench("medium", args.reps)
    print(f"speed_ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
