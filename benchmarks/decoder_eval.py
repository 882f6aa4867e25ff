"""`wanmoe eval`'s table for other VAE decoders, without generating again.

    python benchmarks/decoder_eval.py --vae train_state/decoder_tuned_r8.safetensors
    python benchmarks/decoder_eval.py --latents runs/dec_eval.pt --vae a.safetensors,b.safetensors --setups two,one

A one-clip sample's generated latent does not depend on the decoder (the experts never see decoded frames), so the
latents of `wanmoe eval --n N --speech K --setups ...` (same cases, seed 0, each set-up's own defaults) are made
once and kept in `--latents`; each VAE file in `--vae` (the model's own first, unless `--skip_own`) then decodes
them as the pipeline does ([reference latent | generated latents], the first clip's dropped frames removed), and the
frames are scored with the evaluation's own functions. While generating, the model's own decode of each latent is
checked against the pipeline's video (1e-4): this is the evaluation's table, not an approximation of it. The encoder and
latent statistics of every VAE file must be the model's (a decoder tuned with `wanmoe train decoder` keeps them).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from wanmoe.api import load
from wanmoe.configs import ASSETS, PRESETS
from wanmoe.eval.cli import DROPPED, SETUPS, held_out_cases, score, summarize
from wanmoe.inputs import load_image
from wanmoe.loading import load_small_vae
from wanmoe.train.decoder_tune import decoded_latent

COLUMNS = ("psnr", "ssim", "sync", "identity", "sync_speech", "sync_speech_min")


def generate_latents(root: Path, setups: list[str], cases: list[dict], seed: int) -> dict[str, list[torch.Tensor]]:
    """Per set-up, per case: the latent its pipeline decodes, with the reference latent in front."""
    out = {}
    for name in setups:
        sub, settings, options = SETUPS[name]
        if sub is None:
            raise SystemExit("the 'still' control has no latents")
        pipe = load(root / sub, task=None, **options)
        vae = pipe.components.vae
        lats = []
        for c in cases:
            seen: list = []  # wanmoe.pipeline.Preview records
            video = pipe(c["sample"].prompt, image=c["image"], audio=c["audio"], seed=seed, preview=seen.append,
                         **settings)
            z = decoded_latent(vae, load_image(c["image"]), seen)
            with torch.no_grad():
                frames = vae.decode(z)[0, :, 1 + DROPPED :]
            torch.testing.assert_close(frames, video.frames, atol=1e-4, rtol=0)  # the pipeline's own decode
            lats.append(z)
            print(f"  {name} {c['name']}", flush=True)
        out[name] = lats
    return out


def score_decoder(vae_file: Path, lats: list[torch.Tensor], cases: list[dict]) -> dict:
    vae = load_small_vae(vae_file, torch.device("cpu")).eval()
    rows, videos = [], []
    for z, c in zip(lats, cases):
        with torch.no_grad():
            frames = vae.decode(z)[0, :, 1 + DROPPED :]
        rows.append({"case": c["name"], **score(frames, c["sample"])})
        videos.append(frames)
    return {**summarize(rows, videos, cases), "cases": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=ASSETS / "s2v-mini", help="model root (two experts, single_expert/)")
    p.add_argument("--vae", default="", help="comma list of VAE files to score besides the model's own")
    p.add_argument("--setups", default="two,one")
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--speech", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--latents", type=Path, default=Path("runs/decoder_eval_latents.pt"),
                   help="cache of the generated latents (made when missing or made for other cases)")
    p.add_argument("--json", type=Path, default=None, help="write every score here")
    p.add_argument("--skip_own", action="store_true", help="score only --vae, not the model's own VAE again")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    setups = [s for s in a.setups.split(",") if s]
    cfg = PRESETS["s2v-mini"]
    key = {"model": str(a.model.resolve()), "n": a.n, "speech": a.speech, "seed": a.seed}
    with tempfile.TemporaryDirectory() as work:
        cases = held_out_cases(a.n, cfg.infer_frames, a.speech, Path(work))
        cached = torch.load(a.latents, weights_only=True) if a.latents.is_file() else None
        if cached is None or cached["key"] != json.dumps(key) or any(s not in cached["lats"] for s in setups):
            print(f"generating the latents of {len(cases)} cases x {setups} ...", flush=True)
            cached = {"key": json.dumps(key), "lats": generate_latents(a.model, setups, cases, a.seed)}
            a.latents.parent.mkdir(parents=True, exist_ok=True)
            torch.save(cached, a.latents)
        files = [] if a.skip_own else [a.model / "vae.safetensors"]
        files += [Path(f) for f in a.vae.split(",") if f]
        results = {}
        print("| vae | setup | " + " | ".join(COLUMNS) + " |")
        print("|---|---|" + "---:|" * len(COLUMNS))
        for f in files:
            for name in setups:
                r = results[f"{f}/{name}"] = score_decoder(f, cached["lats"][name], cases)
                print(f"| {f} | {name} | " + " | ".join(f"{r[k]:.4g}" for k in COLUMNS if k in r) + " |", flush=True)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
