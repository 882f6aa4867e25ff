"""CPU forward time of one DiT in float32, with weight-only int8 Linears and with int8 activations as well, side
by side (alternating, medians), and each int8 output's SNR against float32.

    python benchmarks/int8_speed.py [--rounds 5] [--threads 1]

Configs are dit_speed.py's: medium (dim 512, 8 layers, 1088 tokens) and the embedded model's size (dim 96, 4
layers, 1088 tokens). The last line is `int8_act_speedup=<float32 time / int8-activations time>` at medium.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from dataclasses import replace

import torch

from wanmoe.memory.quantize import quantize_, set_int8_activations
from wanmoe.models.dit import DIT_PRESETS, DiT

try:
    from dit_speed import alternate
except ImportError:  # imported as benchmarks.int8_speed
    from benchmarks.dit_speed import alternate

CONFIGS = {  # DiT overrides, latent (F, H, W), text tokens
    "embedded-size": (dict(dim=96, ffn_dim=256, num_heads=3, num_layers=4), (17, 16, 16), 64),
    "medium": (dict(dim=512, ffn_dim=1536, num_heads=4, num_layers=8), (17, 16, 16), 64),
}


def snr_db(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Signal to error power of a DiT output (velocity, not an image: no peak to speak of), dB."""
    return float(10 * torch.log10(ref.pow(2).mean() / (a - ref).pow(2).mean()))


def run(name: str, rounds: int) -> float:
    over, (f, h, w), s = CONFIGS[name]
    torch.manual_seed(0)
    cfg = replace(DIT_PRESETS["t2v-a14b-tiny"], text_len=s, **over)
    base = DiT(cfg).eval().requires_grad_(False)
    with torch.no_grad():  # the zero-initialised head would hide the blocks
        for p in base.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    w8 = quantize_(copy.deepcopy(base), "int8")
    w8a8 = quantize_(copy.deepcopy(base), "int8")
    set_int8_activations(w8a8)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, cfg.in_dim, f, h, w, generator=g)  # patch (1, 2, 2): 17 x 8 x 8 = 1088 tokens
    t = torch.tensor([500.0])
    ctx = torch.randn(1, s, cfg.text_dim, generator=g)
    models = {"float32": base, "int8": w8, "int8+act": w8a8}
    with torch.inference_mode():
        out = {k: m(x, t, ctx) for k, m in models.items()}
        times = alternate({k: (lambda m=m: m(x, t, ctx)) for k, m in models.items()}, rounds)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k in models:
        acc = "" if k == "float32" else f"  SNR vs float32 {snr_db(out[k], out['float32']):.1f} dB"
        print(f"{name:13s} {k:9s} {med[k] * 1e3:8.1f} ms  ({med['float32'] / med[k]:.2f}x float32){acc}")
    return med["float32"] / med["int8+act"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    run("embedded-size", a.rounds)
    print(f"int8_act_speedup={run('medium', a.rounds):.3f}")


if __name__ == "__main__":
    main()
