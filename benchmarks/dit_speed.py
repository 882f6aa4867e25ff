"""CPU forward time: wanmoe DiT against diffusers' WanTransformer3DModel holding the same weights.

    python benchmarks/dit_speed.py                 # tiny and medium (dim 512, 8 layers, 1088 tokens)
    python benchmarks/dit_speed.py --rounds 9 --threads 2

Our weights are mapped key by key into diffusers' layout (`to_diffusers_dit`) and the two outputs are compared
before timing. Contenders run alternately, round after round, so a load change on a shared machine hits all of
them; the median per contender is reported. "wanmoe[default kernels]" is our model with `wanmoe.backends` off
(PyTorch's own kernel choices), to show what the measured backends add. Each config also prints achieved GFLOP/s
(matmul + attention + conv FLOPs, counted once) against this machine's fp32 matmul peak measured in the same run.
The last line is ``speed_ratio=<diffusers time / our time>`` at the medium config (> 1: wanmoe is faster).

Also imported by benchmarks/e2e_speed.py (`to_diffusers_dit`, `matmul_peak`, `count_flops`, `alternate`).
"""

from __future__ import annotations

import argparse
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


def alternate(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Wall times of each callable, run in turn once per round after one warm-up call each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def matmul_peak(n: int = 2048, rounds: int = 5) -> tuple[float, str]:
    """Best fp32 GFLOP/s of an n^3 matmul on this machine now, over MKL sgemm (F.linear) and oneDNN."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    fns = {"sgemm": lambda: F.linear(a, b)}
    if backends.onednn_available():
        fns["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    with torch.inference_mode():
        times = alternate(fns, rounds)
    best = {k: 2 * n**3 / min(v) / 1e9 for k, v in times.items()}
    kernel = max(best, key=best.get)
    return best[kernel], kernel


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call (matmul, conv, attention), counted through PyTorch's default kernels.

    The backends' oneDNN ops are not in the FLOP counter's table, so counting runs with them off (same math)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    aten = torch.ops.aten
    custom = {aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, **kw: sdpa_flop_count(q, k, v)}
    with backends.use_mode("default"), torch.inference_mode():
        counter = FlopCounterMode(display=False, custom_mapping=custom)
        with counter:
            fn()
    return counter.get_total_flops()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def report(name: str, times: dict[str, list[float]], flops: int, peak: float, ours: str, theirs: str) -> float:
    """Print one line per contender (median ms, GFLOP/s, % of peak) and the ratio; return theirs / ours."""
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


def bench(name: str, rounds: int, peak: float) -> float:
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
        flops = count_flops(run_ours)
        times = alternate({"wanmoe": run_ours, "wanmoe[default kernels]": run_plain, "diffusers": run_theirs}, rounds)
    tokens = fhw[0] * fhw[1] * fhw[2] // 4
    print(f"{name}: dim {cfg.dim}, {cfg.num_layers} layers, {tokens} tokens, {s} text tokens; "
          f"{flops / 1e9:.2f} GFLOP per forward; output rel. diff vs diffusers {err:.1e}")
    return report(name, times, flops, peak, "wanmoe", "diffusers")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (each runs every contender once)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    peak, kernel = matmul_peak()
    print(f"threads {torch.get_num_threads()}; fp32 matmul peak {peak:.1f} GFLOP/s ({kernel}, 2048^3); "
          f"linear kernel chosen: small {backends.linear_choice(1)}, large {backends.linear_choice(1 << 30)}")
    bench("tiny", args.rounds, peak)
    ratio = bench("medium", args.rounds, peak)
    print(f"speed_ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
