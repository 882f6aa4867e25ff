"""Generated latents against the ground truth's: where a small S2V model's picture is lost, DiT or VAE.

    python benchmarks/latent_check.py                              # the shipped s2v-mini
    python benchmarks/latent_check.py --model runs/r8/export --n 3 --speech 3

For each held-out avatar (and espeak-ng sentence, `wanmoe eval`'s cases), the model generates its first clip at
its defaults (seed 0) and the latent it decodes is taken from the `preview` callback (the last step's x0
prediction, which is what the pipeline decodes); the ground truth is encoded in the training layout
[reference | 68 frames]. Per case:
- `vae_psnr`: the ground truth's own reconstruction against the render (the VAE's ceiling),
- `gen_psnr`: the generated video against the render (what `wanmoe eval` calls PSNR),
- `std_ratio`: standard deviation of the generated latent over that of the ground truth's (1 is right; a
  denoiser's mean estimate is, if anything, below 1),
- `lat_rmse`: RMS difference between the two latents,
- `unreached_rms` / `noise_rms`: per token, the DiT's head writes `dim` values into a patch of out_dim x 2 x 2
  latent values; the part of the patch space outside the head's column space is never moved by the velocity, so
  whatever the sampler starts there stays. The RMS of the generated latent in that part, and of the starting noise
  there (0 and 0 when the head reaches the whole patch);
- `psnr_unreached_zero` / `psnr_unreached_truth`: the generated video again with that part of the latent set to zero
  / to the ground truth's (how much it costs the picture);
- `x0_psnr@k` / `x0_ssim@k`: the decode of the x0 prediction after sampling step k (which expert's picture is
  closer to the ground truth).
Then, per expert, the head's rank against the patch size.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

from wanmoe import layouts
from wanmoe.api import load
from wanmoe.configs import ASSETS
from wanmoe.eval import metrics as m
from wanmoe.eval.cli import DROPPED, held_out_cases
from wanmoe.pipeline import draw_noise


def head_weights(root: Path) -> dict[str, torch.Tensor]:
    """Expert name -> its head's weight (patch values x width), read from the folder's safetensors."""
    out = {}
    for name, folder in layouts.find_experts(root).items():
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as st:
                if "head.head.weight" in st.keys():
                    out[name] = st.get_tensor("head.head.weight").float()
    return out


def unreached_basis(w: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (patch values x k) of the patch space the head (patch values x width) cannot write."""
    u, s, _ = torch.linalg.svd(w, full_matrices=True)
    rank = int((s > 1e-6 * s[0]).sum())
    return u[:, rank:]


def patches(z: torch.Tensor) -> torch.Tensor:
    """(1, C, F, H, W) latent -> (tokens, 4 C) patch values, ordered as the head writes them: "(p q r c)"."""
    _, c, f, h, w = z.shape
    z = z.reshape(1, c, f, h // 2, 2, w // 2, 2).permute(0, 2, 3, 5, 4, 6, 1)  # (1, F, h, w, q, r, C)
    return z.reshape(-1, 4 * c)


def keep_latents(into: list[torch.Tensor]):  # noqa: ANN201 (a preview callback)
    """A `preview` callback that appends each step's x0 prediction to ``into``."""
    return lambda p: into.append(p.latent) if p.latent is not None else None


def unpatch(p: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `patches`."""
    _, c, f, h, w = shape
    return p.reshape(1, f, h // 2, w // 2, 2, 2, c).permute(0, 6, 1, 2, 4, 3, 5).reshape(shape)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", type=Path, default=ASSETS / "s2v-mini", help="an s2v-mini model folder")
    ap.add_argument("--n", type=int, default=3, help="held-out avatars")
    ap.add_argument("--speech", type=int, default=0, help="espeak-ng sentences too")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    pipe = load(a.model, task=None)
    vae, frames = pipe.components.vae, pipe.cfg.infer_frames
    heads = head_weights(a.model)
    basis = {n: unreached_basis(w) for n, w in heads.items()}
    # The last expert to run (lowest noise) made the final latent; its unreached part is the one that stays.
    last = list(basis)[-1]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in held_out_cases(a.n, frames, a.speech, Path(tmp)):
            s = case["sample"]
            seen: list[torch.Tensor] = []
            video = pipe(s.prompt, image=case["image"], audio=case["audio"], seed=0, preview=keep_latents(seen))
            z_gen = seen[-1].float()
            with torch.no_grad():
                z = vae.encode(torch.cat([s.ref[:, None], s.video[:, :frames]], 1)[None].float())
                rec = vae.decode(z)[0, :, 1 + DROPPED:].clamp(-1, 1)
            z_gt = z[:, :, 1:]
            t = min(rec.shape[1], video.frames.shape[1], s.video.shape[1] - DROPPED)
            gt = s.video[:, DROPPED: DROPPED + t]
            q = basis[last]
            noise = draw_noise(tuple(z_gen.shape), 0, torch.device("cpu"))
            row = {"case": case["name"], "vae_psnr": m.psnr(rec[:, :t], gt),
                   "gen_psnr": m.psnr(video.frames[:, :t], gt), "std_ratio": (z_gen.std() / z_gt.std()).item(),
                   "lat_rmse": (z_gen - z_gt).pow(2).mean().sqrt().item(),
                   "unreached_rms": (patches(z_gen) @ q).pow(2).mean().sqrt().item() if q.shape[1] else 0.0,
                   "noise_rms": (patches(noise) @ q).pow(2).mean().sqrt().item() if q.shape[1] else 0.0}

            def decoded(lat: torch.Tensor, ref: torch.Tensor = z[:, :, :1], t: int = t) -> torch.Tensor:
                with torch.no_grad():
                    return vae.decode(torch.cat([ref, lat], 2))[0, :, 1 + DROPPED: 1 + DROPPED + t].clamp(-1, 1)

            if q.shape[1]:
                pg, pt = patches(z_gen), patches(z_gt)
                kept = pg - (pg @ q) @ q.T
                row["psnr_unreached_zero"] = m.psnr(decoded(unpatch(kept, z_gen.shape)), gt)
                row["psnr_unreached_truth"] = m.psnr(decoded(unpatch(kept + (pt @ q) @ q.T, z_gen.shape)), gt)
            for k in sorted({1, len(seen) // 3, len(seen) // 2, 2 * len(seen) // 3, len(seen)}):
                d = decoded(seen[k - 1].float())
                row[f"x0_psnr@{k}"], row[f"x0_ssim@{k}"] = m.psnr(d, gt), m.ssim(d, gt)
            rows.append(row)
            print("  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    for k in rows[0]:
        if k != "case":
            print(f"mean {k} {statistics.mean(r[k] for r in rows):.3f}")
    for n, w in heads.items():
        print(f"expert {n}: head writes {w.shape[1]} of {w.shape[0]} patch values a token "
              f"(rank {w.shape[0] - basis[n].shape[1]}; unreached dimensions {basis[n].shape[1]})")


if __name__ == "__main__":
    main()
