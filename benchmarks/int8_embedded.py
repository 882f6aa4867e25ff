"""The embedded model with 8-bit experts against the unquantized one (same seed, same inputs): PSNR of the video
and the time of the transformer work, weight-only int8, int8 with int8 activations and fp8 side by side.

Usage: python benchmarks/int8_embedded.py [--rounds 3] [--threads 2]
The last lines are `int8_psnr_db=<value>` (weight-only; issue 6 asks >= 35 dB) and `int8_act_psnr_db=<value>`
(int8 activations; issue 13 asks >= 40 dB for a fast int8 path), then `fp8_psnr_db=<value>` (fp8 e4m3 weights;
on the CPU weight-only). Times: `timings["sample_s"]` of each
generation (the denoising loop, where the experts run), the contenders alternating, median of the rounds.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import wanmoe
from wanmoe.eval.metrics import psnr
from wanmoe.memory.quantize import weight_bytes

SETUPS = {"float32": {}, "int8": {"int8": True}, "int8+act": {"int8": True, "int8_activations": True},
          "fp8": {"quant": "fp8"}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    pipes = {k: wanmoe.load("s2v-mini", **kw) for k, kw in SETUPS.items()}
    frames, times = {}, {k: [] for k in SETUPS}
    for r in range(a.rounds):
        for k in (list(SETUPS) if r % 2 == 0 else list(SETUPS)[::-1]):
            video = pipes[k](seed=0)
            frames[k] = video.frames
            times[k].append(video.timings["sample_s"])
    b = {k: weight_bytes(pipes[k].components.experts.get("high")) for k in SETUPS}
    for k in SETUPS:
        med = statistics.median(times[k])
        rounds = ", ".join(f"{t:.3f}" for t in times[k])
        print(f"{k:9s} expert bytes {b[k]:>9d}  sample_s median {med:.3f} (rounds {rounds})"
              f"  speed vs float32 {statistics.median(times['float32']) / med:.2f}x")
    print(f"int8_psnr_db={psnr(frames['int8'], frames['float32']):.2f}")
    print(f"int8_act_psnr_db={psnr(frames['int8+act'], frames['float32']):.2f}")
    print(f"fp8_psnr_db={psnr(frames['fp8'], frames['float32']):.2f}")


if __name__ == "__main__":
    main()
