"""A cached set of rendered talking-avatar clips for training (rendering is the slow part, so it runs once).

Axis legend: N clips, T pixel frames, H/W pixel height/width, A audio samples.

Each clip is `make_sample(seed, frames=frames)` from `wanmoe.data.avatar`; the reference image is stored beside
the video so a clip can be VAE-encoded as [ref | video] (the S2V first-clip layout, see train/loop.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from wanmoe.train.state import load_tensors, save_atomic


@dataclass
class ClipSet:
    video: Tensor  # (N, 3, T, H, W) uint8
    ref: Tensor  # (N, 3, H, W) uint8
    audio: Tensor  # (N, A) float32 mono
    seeds: list[int]
    prompts: list[str]
    sr: int
    fps: float

    def __len__(self) -> int:
        return len(self.seeds)

    def subset(self, n: int) -> ClipSet:
        """The first n clips."""
        return ClipSet(self.video[:n], self.ref[:n], self.audio[:n], self.seeds[:n], self.prompts[:n], self.sr,
                       self.fps)

    def video_float(self, i: int | Tensor) -> Tensor:
        """(.., 3, T, H, W) in [-1, 1]."""
        return self.video[i].float() / 127.5 - 1.0

    def ref_float(self, i: int | Tensor) -> Tensor:
        return self.ref[i].float() / 127.5 - 1.0


def _to_u8(x: Tensor) -> Tensor:
    return ((x.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


def build_clips(seeds: list[int] | range, *, frames: int, size: int, fps: float = 16.0,
                progress: bool = True, speech: str = "synthetic") -> ClipSet:
    """Render one clip per seed. ``speech``: 'synthetic' (the procedural speech-like audio of `make_sample`) or
    'espeak' (a real sentence from espeak-ng, `data.espeak`, driving the same seed's avatar)."""
    from wanmoe.data.avatar import make_sample, render_from_audio, sample_params
    from wanmoe.data.espeak import espeak_speech

    if speech not in ("synthetic", "espeak"):
        raise ValueError(f"speech={speech!r}; expected 'synthetic' or 'espeak'")
    vids, refs, auds, prompts, sr = [], [], [], [], 16000
    for seed in tqdm(list(seeds), desc="render clips", disable=not progress):
        if speech == "espeak":
            s = render_from_audio(sample_params(int(seed)), espeak_speech(int(seed), frames / fps, sr), sr, fps, size)
        else:
            s = make_sample(int(seed), size=size, fps=fps, frames=frames)
        vids.append(_to_u8(s.video))
        refs.append(_to_u8(s.ref))
        auds.append(torch.from_numpy(np.asarray(s.audio, dtype=np.float32)))
        prompts.append(s.prompt)
        sr = s.sr
    n_audio = min(a.shape[0] for a in auds)
    return ClipSet(torch.stack(vids), torch.stack(refs), torch.stack([a[:n_audio] for a in auds]),
                   [int(s) for s in seeds], prompts, sr, fps)


def save_clips(clips: ClipSet, path: Path) -> None:
    save_atomic({"video": clips.video, "ref": clips.ref, "audio": clips.audio, "seeds": clips.seeds,
                 "prompts": clips.prompts, "sr": clips.sr, "fps": clips.fps}, path)


def load_clips(path: Path) -> ClipSet:
    d = load_tensors(path)  # tensors, lists and numbers only: no pickle code
    return ClipSet(d["video"], d["ref"], d["audio"], list(d["seeds"]), list(d["prompts"]), int(d["sr"]),
                   float(d["fps"]))


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description="render and cache avatar clips for training")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--frames", type=int, default=69)
    p.add_argument("--size", type=int, default=128)
    a = p.parse_args()
    torch.set_num_threads(1)
    from wanmoe.data.avatar import split_seeds

    seeds = split_seeds(a.split)[a.start : a.start + a.n]
    save_clips(build_clips(seeds, frames=a.frames, size=a.size), a.out)


if __name__ == "__main__":
    main()
