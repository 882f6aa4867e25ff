"""PSNR of the embedded model's output with int8 experts against the unquantized output (same seed, same inputs).

Usage: python benchmarks/int8_embedded.py ; last line `int8_psnr_db=<value>` (issue 6 asks >= 35 dB).
"""

from __future__ import annotations

import torch

import wanmoe
from wanmoe.eval.metrics import psnr
from wanmoe.memory.quantize import weight_bytes


def run(int8: bool) -> tuple[torch.Tensor, int]:
    pipe = wanmoe.load("s2v-mini", int8=int8)
    video = pipe(seed=0)
    return video.frames, weight_bytes(pipe.components.experts.get("high"))


def main() -> None:
    torch.set_num_threads(2)
    ref, b_float = run(False)
    q, b_int8 = run(True)
    print(f"expert weight bytes: float32 {b_float}, int8 {b_int8} ({b_int8 / b_float:.3f} of fp32)")
    print(f"int8_psnr_db={psnr(q, ref):.2f}")


if __name__ == "__main__":
    main()
