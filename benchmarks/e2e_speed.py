"""End-to-end CPU time of two-expert T2V sampling + decode: wanmoe against diffusers' WanPipeline, same weights.

    python benchmarks/e2e_speed.py                  # tiny and medium configurations, 5 rounds each
    python benchmarks/e2e_speed.py --rounds 7 --steps 10 --threads 2

Both sides get the same two random DiT experts (high / low noise, weights mapped into diffusers' layout), the same
VAE, the same text embeddings (conditional and negative), the same starting noise, the same Euler sigmas (diffusers'
FlowMatchEulerDiscreteScheduler with shift 12, taken over by ours), the same expert boundary (0.875, the t2v-A14B
one) and guidance scales (4.0 high, 3.0 low). Our side is assembled from the stable low-level pieces
(`wanmoe.sampling` solver and guidance, `wanmoe.experts.route`, the models), not from `wanmoe.pipeline`. Each side's
stages are timed (sample = the denoising loop, decode = latent -> video), the two runs alternate for --rounds
rounds and the medians are reported with the video difference between the two and GFLOP/s against this machine's
fp32 matmul peak, sampled in every round.

The last line is ``e2e_ratio=<diffusers total / our total>`` for the tiny configuration.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass, replace

import torch
from dit_speed import PeakProbe, dit_flops, random_dit, rel_err, to_diffusers_dit
from vae_speed import decode_flops, diffusers_decode, random_vae, to_diffusers_vae

from wanmoe.experts import ExpertSpec, route
from wanmoe.models.dit import DIT_PRESETS
from wanmoe.models.vae import VAE_TINY, VAEConfig
from wanmoe.sampling.guidance import cfg as guided
from wanmoe.sampling.solvers import sample_euler

BOUNDARY, SHIFT, SCALES = 0.875, 12.0, {"high": 4.0, "low": 3.0}  # t2v-A14B (wanmoe.experts.TASK_DEFAULTS)


@dataclass(frozen=True)
class Case:
    dit: dict  # DiT overrides of the t2v-a14b preset
    vae: VAEConfig
    frames: int  # video frames (4n + 1)
    size: int  # square frame side in pixels


CASES = {
    # STYLE.md's tiny preset: 2 layers, 2 heads, width 64, 16x16 latents, 9 frames; VAE 12x narrower than official.
    "tiny": Case(dict(dim=64, ffn_dim=128, num_heads=2, num_layers=2, freq_dim=32, text_dim=32, text_len=16),
                 VAE_TINY, 9, 128),
    # Medium: dim 512, 8 layers over 3x8x8 = 192 tokens; the shipped small VAE's architecture, 128x128.
    "medium": Case(dict(dim=512, ffn_dim=1536, num_heads=4, num_layers=8, text_len=64),
                   VAEConfig(dim=16, num_res_blocks=1, mean=(0.0,) * 16, std=(1.0,) * 16), 9, 128),
}


def build(name: str, steps: int):
    """Models, inputs and the two run functions (each returning (video, {stage: seconds}))."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline  # benchmark-only peer

    case = CASES[name]
    dcfg = replace(DIT_PRESETS["t2v-a14b"], **case.dit)
    experts = {"high": random_dit(dcfg, seed=1), "low": random_dit(dcfg, seed=2)}
    vae = random_vae(case.vae, seed=3)
    g = torch.Generator().manual_seed(4)
    lat = (1, dcfg.in_dim, 1 + (case.frames - 1) // 4, case.size // 8, case.size // 8)
    noise = torch.randn(lat, generator=g)
    ctx = torch.randn(1, dcfg.text_len, dcfg.text_dim, generator=g)  # full text_len: neither side pads
    neg = torch.randn(1, dcfg.text_len, dcfg.text_dim, generator=g)

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=to_diffusers_vae(vae), scheduler=sched,
                       transformer=to_diffusers_dit(experts["high"]), transformer_2=to_diffusers_dit(experts["low"]),
                       boundary_ratio=BOUNDARY)
    pipe.set_progress_bar_config(disable=True)
    sched.set_timesteps(steps)
    sigmas = sched.sigmas.to(torch.float64)  # (steps + 1,), ends at 0: our solver runs on diffusers' grid
    spec = ExpertSpec(("high", "low"), boundary=BOUNDARY)

    def denoiser(model, c):
        # Model timestep sigma * 1000 as a float, which is what diffusers' scheduler hands its transformer.
        return lambda x, sigma: model(x, (sigma * 1000).to(torch.float32).expand(x.shape[0]), c)

    def run_ours():
        t0 = time.perf_counter()
        den = {n: guided(denoiser(m, ctx), denoiser(m, neg), SCALES[n]) for n, m in experts.items()}
        latent = sample_euler(route(den, spec, sigmas), noise, sigmas)
        t1 = time.perf_counter()
        video = vae.decode(latent)
        t2 = time.perf_counter()
        return video, {"sample": t1 - t0, "decode": t2 - t1}

    def run_theirs():
        t0 = time.perf_counter()
        latent = pipe(prompt_embeds=ctx, negative_prompt_embeds=neg, height=case.size, width=case.size,
                      num_frames=case.frames, num_inference_steps=steps, guidance_scale=SCALES["high"],
                      guidance_scale_2=SCALES["low"], latents=noise, output_type="latent", return_dict=False)[0]
        t1 = time.perf_counter()
        video = diffusers_decode(pipe.vae, latent)
        t2 = time.perf_counter()
        return video, {"sample": t1 - t0, "decode": t2 - t1}

    plan = route({n: None for n in spec.names}, spec, sigmas).plan
    split = {n: sum(1 for w in plan if n in w) for n in spec.names}
    # Both CFG passes of every step, plus the decode.
    flops = 2 * steps * dit_flops(dcfg, lat[2:], dcfg.text_len) + decode_flops(case.vae, lat)
    return dcfg, case, split, flops, run_ours, run_theirs


def bench(name: str, rounds: int, steps: int) -> float:
    dcfg, case, split, flops, run_ours, run_theirs = build(name, steps)
    with torch.inference_mode():
        v_ours, _ = run_ours()  # warm-up, and the videos to compare
        v_theirs, _ = run_theirs()
        err = rel_err(v_ours, v_theirs)
        times: dict[str, dict[str, list[float]]] = {"wanmoe": {}, "diffusers": {}}
        probe = PeakProbe()
        for r in range(rounds):  # alternate, and swap who goes first each round
            probe()
            for who, fn in (("wanmoe", run_ours), ("diffusers", run_theirs))[:: 1 if r % 2 == 0 else -1]:
                for stage, sec in fn()[1].items():
                    times[who].setdefault(stage, []).append(sec)
    tokens = (1 + (case.frames - 1) // 4) * (case.size // 16) ** 2  # latent frames x (H/2) x (W/2) patches
    print(f"{name}: DiT dim {dcfg.dim} x {dcfg.num_layers} layers x 2 experts, {tokens} tokens; VAE dim "
          f"{case.vae.dim}; {case.frames} frames of {case.size}x{case.size}; {steps} Euler steps with CFG "
          f"(steps per expert {split}); {flops / 1e9:.2f} GFLOP per run; video rel. diff vs diffusers {err:.1e}")
    med = {who: {s: statistics.median(v) for s, v in st.items()} for who, st in times.items()}
    peak, kernel = probe.peak()
    print(f"  {name} fp32 matmul peak during these rounds: {peak:.1f} GFLOP/s ({kernel}, 2048^3)")
    for who, st in med.items():
        total = sum(st.values())
        gf = flops / total / 1e9
        stages = "  ".join(f"{s} {sec:7.3f} s" for s, sec in st.items())
        print(f"  {name} {who:10s} {stages}  total {total:7.3f} s  {gf:6.1f} GFLOP/s = "
              f"{100 * gf / peak:5.1f} % of peak")
    for s in med["wanmoe"]:
        print(f"  {name} {s} ratio diffusers/wanmoe = {med['diffusers'][s] / med['wanmoe'][s]:.3f}")
    totals = {who: [sum(v) for v in zip(*st.values())] for who, st in times.items()}
    per_round = sorted(b / a for a, b in zip(totals["wanmoe"], totals["diffusers"]))
    ratio = statistics.median(totals["diffusers"]) / statistics.median(totals["wanmoe"])
    print(f"  {name} total ratio diffusers/wanmoe = {ratio:.3f} (per round {per_round[0]:.2f}..{per_round[-1]:.2f})")
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (each runs both pipelines once)")
    ap.add_argument("--steps", type=int, default=10, help="sampling steps (each with CFG: 2 DiT calls)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave default)")
    ap.add_argument("--only", choices=sorted(CASES), default=None, help="run one configuration")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    ratios = {}
    for name in ("medium", "tiny"):  # tiny last: its ratio is the last line
        if args.only in (None, name):
            ratios[name] = bench(name, args.rounds, args.steps)
    for name, r in ratios.items():
        print(f"e2e_ratio_{name}={r:.3f}")
    if "tiny" in ratios:
        print(f"e2e_ratio={ratios['tiny']:.3f}")


if __name__ == "__main__":
    main()
