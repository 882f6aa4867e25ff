"""Frame strips of the embedded model (docs/results.md): the default video and a held-out avatar, each with its
ground-truth render above the model's video, six frames from the first to the last.

    python scripts/frame_strips.py [--out docs/results] [--seed 0] [--threads 2]

The default video is `wanmoe.load("s2v-mini")(seed=...)`: the shipped example, which is the procedural sample of
the seed in `assets/s2v-mini/example/SEED`, so its ground truth can be rendered again here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import wanmoe
from wanmoe.data.avatar import make_sample, split_seeds
from wanmoe.eval.motion import save_strip


def strip(pipe, sample, seed: int, path: Path, **settings: object) -> None:  # noqa: ANN001
    drop = pipe.cfg.dropped_frames(start_from_ref=False)
    image = ((sample.ref.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    video = pipe(sample.prompt, image=image, audio=(sample.audio, sample.sr), seed=seed, **settings)
    t = min(video.frames.shape[1], sample.video.shape[1] - drop)  # generated frame k shows ground-truth k + drop
    save_strip(path, [sample.video[:, drop : drop + t], video.frames[:, :t]])
    print(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("docs/results"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    pipe = wanmoe.load("s2v-mini")
    example = int((pipe.cfg.example_files()["prompt"].parent / "SEED").read_text())
    frames = pipe.cfg.infer_frames
    strip(pipe, make_sample(example, frames=frames), a.seed, a.out / "strip_default.png")
    strip(pipe, make_sample(split_seeds("heldout")[0], frames=frames), a.seed, a.out / "strip_heldout.png")


if __name__ == "__main__":
    main()
