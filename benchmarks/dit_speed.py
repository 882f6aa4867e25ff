"""CPU forward time: wanmoe DiT against diffusers' WanTransformer3DModel holding the same weights.

    python benchmarks/dit_speed.py                 # tiny and medium (dim 512, 8 layers, 1088 tokens)
    python benchmarks/dit_speed.py --rounds 9 --threads 2

Our weights are mapped key by key into diffusers' layout (`to_diffusers_dit`) and the two outputs are compared
before timing. Contenders run alternately, round after round, so a load change on a shared machine hits all of
them; the median per contender is reported. "wanmoe[default kernels]" is our model with `wanmoe.backends` off
(PyTorch's own kernel choices), to show what the measured backends add. Each config also prints achieved GFLOP/s
(matmul + attention + conv FLOPs, counted on the meta device) against this machine's fp32 matmul peak, sampled
in every round between the contenders.
The last line is ``speed_ratio=<diffusers time / our time>`` at the medium config (> 1: wanmoe is faster).

Also imported by vae_speed.py and e2e_speed.py (`to_diffusers_dit`, `PeakProbe`, `count_flops`, ...).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F

from wanmoe import backends
from wanmoe.models.dit import DIT_PRESETS, DiT

CONFIGS = {
    # name: DiT overrides, latent (F, H, W), text tokens
    "tiny": (dict(dim=64, ffn_dim=128, num_heads=2, num_layers=2, freq_dim=32, text_dim=32), (3, 8, 8), 16),
    "medium": (dict(dim=512, ffn_dim=1536, num_heads=4, num_layers=8), (17, 16, 16), 64),  # 1088 tokens
}


# ---- shared helpers (also used by vae_speed.py / e2e_speed.py) ------------------------------------------------


class PeakProbe:
    """This machine's fp32 matmul peak (n^3, best of MKL sgemm and oneDNN), sampled once per round between the
    contenders, so it sees the same load as they do (on a shared machine the peak itself moves with the load)."""

    def __init__(self, n: int = 2048) -> None:
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
        self.flops = 2 * n**3
        self.fns = {"sgemm": lambda: F.linear(a, b)}
        if backends.onednn_available():
            self.fns["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
        self.best = {name: float("inf") for name in self.fns}

    def __call__(self) -> None:
        with torch.inference_mode():
            for name, fn in self.fns.items():
                t0 = time.perf_counter()
                fn()
                self.best[name] = min(self.best[name], time.perf_counter() - t0)

    def peak(self) -> tuple[float, str]:
        """(GFLOP/s, kernel) of the best sample so far."""
        kernel = min(self.best, key=self.best.get)
        return self.flops / self.best[kernel] / 1e9, kernel


def alternate(fns: dict[str, Callable[[], object]], rounds: int, probe: PeakProbe | None = None
              ) -> dict[str, list[float]]:
    """Wall times of each callable, run in turn once per round after one warm-up call each (and the probe).

    The order rotates from round to round: whoever runs first after the probe's large matmul finds cold caches,
    which cost a tiny model 2x, so no contender may always be first."""
    for fn in fns.values():
        fn()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        if probe is not None:
            probe()
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (matmul, conv, attention) of one call of fn, which should run models built on the meta device:
    PyTorch's FLOP counter reads the shapes, nothing is computed, and the meta path is PyTorch's own ops (the
    oneDNN calls of `wanmoe.backends` are for CPU tensors only), so the count is that of the same math."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    aten = torch.ops.aten
    custom = {aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, **kw: sdpa_flop_count(q, k, v)}
    with torch.inference_mode():
        counter = FlopCounterMode(display=False, custom_mapping=custom)
        with counter:
            fn()
    return counter.get_total_flops()


def dit_flops(cfg, fhw: tuple[int, int, int], text_tokens: int) -> int:
    """FLOPs of one DiT forward at latent (F, H, W) with `text_tokens` context tokens (counted on meta)."""
    with torch.device("meta"):
        model = DiT(cfg)
        x = torch.empty(1, cfg.in_dim, *fhw)
        ctx = torch.empty(1, text_tokens, cfg.text_dim)
    return count_flops(lambda: model(x, torch.full((1,), 500.0, device="meta"), ctx))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def report(name: str, times: dict[str, list[float]], flops: int, probe: PeakProbe, ours: str, theirs: str) -> float:
    """Print one line per contender (median ms, GFLOP/s, % of peak) and the ratio; return theirs / ours."""
    peak, kernel = probe.peak()
    print(f"  {name} fp32 matmul peak during these rounds: {peak:.1f} GFLOP/s ({kernel}, 2048^3)")
    for who, ts in times.items():
        med = statistics.median(ts)
        gf = flops / med / 1e9
        print(f"  {name} {who:28s} median {med * 1e3:9.1f} ms  {gf:7.1f} GFLOP/s = {100 * gf / peak:5.1f} % of peak"
              f"  (min {min(ts) * 1e3:.1f}, max {max(ts) * 1e3:.1f})")
    ratio = statistics.median(times[theirs]) / statistics.median(times[ours])
    # Per-round ratios too: on a loaded machine their spread says more than one median.
    per_round = sorted(b / a for a, b in zip(times[ours], times[theirs]))
    print(f"  {name} ratio {theirs}/{ours} = {ratio:.3f} (per round {per_round[0]:.2f}..{per_round[-1]:.2f})")
    return ratio


# ---- DiT --------------------------------------------------------------------------------------------------------


def _diffusers_key(k: str) -> str:
    """Official/wanmoe DiT key -> diffusers WanTransformer3DModel key (the mapping of diffusers' convert script)."""
    fixed = {
        "text_embedding.0": "condition_embedder.text_embedder.linear_1",
        "text_embedding.2": "condition_embedder.text_embedder.linear_2",
        "time_embedding.0": "condition_embedder.time_embedder.linear_1",
        "time_embedding.2": "condition_embedder.time_embedder.linear_2",
        "time_projection.1": "condition_embedder.time_proj",
        "head.head": "proj_out",
    }
    if k == "head.modulation":
        return "scale_shift_table"
    for a, b in fixed.items():
        if k.startswith(a + "."):
            return b + k[len(a) :]
    parts = k.split(".")
    if parts[0] == "blocks":
        i, rest = parts[1], ".".join(parts[2:])
        sub = {
            "modulation": "scale_shift_table",
            "norm3.weight": "norm2.weight",
            "norm3.bias": "norm2.bias",
            "ffn.0.weight": "ffn.net.0.proj.weight",
            "ffn.0.bias": "ffn.net.0.proj.bias",
            "ffn.2.weight": "ffn.net.2.weight",
            "ffn.2.bias": "ffn.net.2.bias",
        }
        if rest in sub:
            return f"blocks.{i}.{sub[rest]}"
        attn, name, *tail = rest.split(".")
        attn = {"self_attn": "attn1", "cross_attn": "attn2"}[attn]
        name = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0"}.get(name, name)
        return ".".join([f"blocks.{i}", attn, name, *tail])
    return k


def to_diffusers_dit(ours: DiT):
    """A diffusers WanTransformer3DModel (eval, fp32) with exactly our weights (strict load)."""
    from diffusers import WanTransformer3DModel  # benchmark-only peer

    c = ours.cfg
    theirs = WanTransformer3DModel(
        patch_size=c.patch_size, num_attention_heads=c.num_heads, attention_head_dim=c.head_dim,
        in_channels=c.in_dim, out_channels=c.out_dim, text_dim=c.text_dim, freq_dim=c.freq_dim, ffn_dim=c.ffn_dim,
        num_layers=c.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=c.eps,
    )
    theirs.load_state_dict({_diffusers_key(k): v for k, v in ours.state_dict().items()}, strict=True)
    return theirs.eval()


def random_dit(cfg, seed: int = 0) -> DiT:
    """A DiT with non-trivial weights everywhere (the training init zeroes the head, so outputs would be 0)."""
    torch.manual_seed(seed)
    model = DiT(cfg).eval()
    with torch.no_grad():
        model.head.head.weight.normal_(0, cfg.dim**-0.5)
    return model


def bench(name: str, rounds: int) -> float:
    over, fhw, s = CONFIGS[name]
    cfg = replace(DIT_PRESETS["t2v-a14b"], **over, text_len=s)
    ours = random_dit(cfg)
    theirs = to_diffusers_dit(ours)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, cfg.in_dim, *fhw, generator=g)
    t = torch.tensor([500.0])
    ctx = torch.randn(1, s, cfg.text_dim, generator=g)  # S = text_len: neither side pads

    def run_ours():
        return ours(x, t, ctx)

    def run_plain():
        with backends.use_mode("default"):
            return ours(x, t, ctx)

    def run_theirs():
        return theirs(x, t, ctx, return_dict=False)[0]

    with torch.inference_mode():
        err = rel_err(run_ours(), run_theirs())
    flops = dit_flops(cfg, fhw, s)
    with torch.inference_mode():
        probe = PeakProbe()
        times = alternate({"wanmoe": run_ours, "wanmoe[default kernels]": run_plain, "diffusers": run_theirs}, rounds,
                          probe)
    tokens = fhw[0] * fhw[1] * fhw[2] // 4
    print(f"{name}: dim {cfg.dim}, {cfg.num_layers} layers, {tokens} tokens, {s} text tokens; "
          f"{flops / 1e9:.2f} GFLOP per forward; output rel. diff vs diffusers {err:.1e}")
    return report(name, times, flops, probe, "wanmoe", "diffusers")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (each runs every contender once)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}; wanmoe's linear kernel: "
          f"small products {backends.linear_choice(1)}, large {backends.linear_choice(1 << 30)}")
    bench("tiny", args.rounds)
    ratio = bench("medium", args.rounds)
    print(f"speed_ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
