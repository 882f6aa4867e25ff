"""Training files (clips, latents, checkpoints) written whole or not at all, and read without pickle code.

`save_atomic` writes to `<path>.tmp` and renames it over `<path>`, so a run killed mid-write (the training stages
stop at --max_minutes, or are interrupted) leaves the previous file intact; `load_tensors` reads with
`torch.load(weights_only=True)`: tensors, lists, dicts, strings and numbers only.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["save_atomic", "load_tensors"]


def save_atomic(obj: dict, path: Path) -> None:
    tmp = Path(str(path) + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def load_tensors(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
