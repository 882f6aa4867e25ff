"""PSNR of the embedded model's output with int8 experts against the unquantized output (same seed, same inputs).

Usage: python benchmarks/int8_embedded.py ; last line `int8_psnr_db=<value>` (issue 6 asks >= 35 dB).
"""

from __future__ import annotations

import torch

from wanmoe import pipeline
from wanmoe.cli import build_parser
from wanmoe.configs import PRESETS
from wanmoe.eval.metrics import psnr
from wanmoe.memory.quantize import weight_bytes


def run(flags: list[str]) -> tuple[torch.Tensor, int]:
    cfg = PRESETS["s2v-mini"]
    args = build_parser().parse_args(["generate", "--base_seed", "0", "--quiet", *flags])
    req = pipeline.request_from_args(args, cfg)
    comps = pipeline.load_components(cfg, req)
    res = pipeline.generate(comps, req, pipeline.read_inputs(req, cfg), progress=False)
    return res.video, weight_bytes(comps.experts.get("high"))


def main() -> None:
    torch.set_num_threads(2)
    ref, b_float = run([])
    q, b_int8 = run(["--int8"])
    print(f"expert weight bytes: float32 {b_float}, int8 {b_int8} ({b_int8 / b_float:.3f} of fp32)")
    print(f"int8_psnr_db={psnr(q, ref):.2f}")


if __name__ == "__main__":
    main()
