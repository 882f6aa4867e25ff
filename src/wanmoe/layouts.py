"""The tree of files each task reads from a checkpoint folder: the official Wan2.2 download layouts (expert
folders or a single DiT, umT5, the Wan2.1 VAE, wav2vec2) and wanmoe's own small-model layout.

`find_experts` says where the DiTs are, `check_layout` that an official tree is complete (one message listing
every missing or invalid entry against the expected tree), `layout_needs` the expected entries themselves (the
table `wanmoe verify` walks). The files inside each entry are read by `wanmoe.checkpoint`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from wanmoe.checkpoint import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, find_weight_files
from wanmoe.models.vae import VAEConfig

__all__ = ["EXPERT_FOLDERS", "SINGLE_EXPERT", "Need", "TASK_LAYOUTS", "SMALL_LAYOUT", "SMALL_VAE_NAME",
           "BYTE_TEXT_NAME", "find_experts", "layout_needs", "check_layout", "small_vae_config",
           "fit_small"]


# Noise-expert folders, high noise first; a further expert is one more row, in trajectory order.
EXPERT_FOLDERS: tuple[tuple[str, str], ...] = (("high", "high_noise_model"), ("low", "low_noise_model"))
SINGLE_EXPERT = "only"  # name of the one DiT of a single-folder checkpoint (S2V-14B)


def find_experts(ckpt_dir: str | os.PathLike) -> dict[str, Path]:
    """Expert name -> DiT folder, ordered high noise first; {SINGLE_EXPERT: root} for a single-DiT checkpoint."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        raise ValueError(f"checkpoint directory not found: {root}")
    present = {name: root / sub for name, sub in EXPERT_FOLDERS if (root / sub).is_dir()}
    has_root = (root / CONFIG_NAME).is_file()
    layouts = (f"either expert folders {', '.join(sub + '/' for _, sub in EXPERT_FOLDERS)} each holding "
               f"{CONFIG_NAME} + weights (A14B), or {CONFIG_NAME} + weights at the root (S2V-14B)")
    if present and has_root:
        raise ValueError(f"{root} holds both expert folders and a root {CONFIG_NAME}; expected {layouts}")
    if has_root:
        return {SINGLE_EXPERT: root}
    if not present:
        raise ValueError(f"no DiT found in {root}; expected {layouts}")
    absent = [sub for name, sub in EXPERT_FOLDERS if name not in present]
    if absent:
        raise ValueError(f"{root} has only some expert folders; missing {', '.join(absent)}; expected {layouts}")
    no_cfg = [str(p / CONFIG_NAME) for p in present.values() if not (p / CONFIG_NAME).is_file()]
    if no_cfg:
        raise ValueError(f"expert folder(s) without {CONFIG_NAME}: {', '.join(no_cfg)}")
    return present


@dataclass(frozen=True)
class Need:
    """One entry of a task's expected tree: a file, a folder holding one of `any_of`, or DiT weights."""

    role: str
    path: str  # relative to the checkpoint root; "" = the root itself (single-DiT checkpoints)
    kind: str  # "file" | "dir" | "dit"
    what: str
    any_of: tuple[str, ...] = ()


_T5 = Need("t5", "models_t5_umt5-xxl-enc-bf16.pth", "file", "umT5-XXL encoder weights")
_TOK = Need("tokenizer", "google/umt5-xxl", "dir", "umT5 tokenizer files", ("tokenizer.json", "spiece.model"))
_VAE21 = Need("vae", "Wan2.1_VAE.pth", "file", "Wan2.1 VAE weights")
_EXPERTS = tuple(Need(name, sub, "dit", f"{name}-noise expert DiT") for name, sub in EXPERT_FOLDERS)
# Expected tree per task (the official download layouts): the single table check_layout reads.
TASK_LAYOUTS: dict[str, tuple[Need, ...]] = {
    "t2v-a14b": (*_EXPERTS, _T5, _TOK, _VAE21),
    "i2v-a14b": (*_EXPERTS, _T5, _TOK, _VAE21),
    "s2v-14b": (Need(SINGLE_EXPERT, "", "dit", "DiT"), _T5, _TOK, _VAE21,
                Need("wav2vec", "wav2vec2-large-xlsr-53-english", "dir", "wav2vec2 model + processor",
                     ("config.json",))),
}


# wanmoe's own small models (the embedded one and the tiny test models): the official DiT folders, plus two
# safetensors files in place of the umT5 / Wan2.1 VAE / wav2vec2 files.
SMALL_LAYOUT = "small"
SMALL_VAE_NAME = "vae.safetensors"  # VAE weights, its VAEConfig (latent statistics included) in the metadata
BYTE_TEXT_NAME = "byte_text_encoder.safetensors"


def layout_needs(layout: str, experts: tuple[str, ...] = ("high", "low")) -> tuple[Need, ...]:
    """The expected tree: `SMALL_LAYOUT` for the small models (DiT folders for `experts`), else a TASK_LAYOUTS key."""
    if layout == SMALL_LAYOUT:
        folders = dict(EXPERT_FOLDERS)
        unknown = [e for e in experts if e not in folders]
        if len(experts) > 1 and unknown:
            raise ValueError(f"no folder for experts {unknown}; known: {list(folders)}")
        dits = ((Need(experts[0], "", "dit", "DiT"),) if len(experts) == 1
                else tuple(Need(e, folders[e], "dit", f"{e}-noise expert DiT") for e in experts))
        return (*dits, Need("vae", SMALL_VAE_NAME, "file", "VAE (config in the metadata)"),
                Need("text", BYTE_TEXT_NAME, "file", "byte-level text encoder"))
    key = layout.lower()
    if key not in TASK_LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; known: {', '.join([*TASK_LAYOUTS, SMALL_LAYOUT])}")
    return TASK_LAYOUTS[key]


def _need_tree(needs: tuple[Need, ...]) -> list[str]:
    lines = []
    for n in needs:
        if n.kind == "dit":
            prefix = f"{n.path}/" if n.path else ""
            lines.append(f"{prefix}{CONFIG_NAME} + ({WEIGHTS_NAME} | shards + {INDEX_NAME})   # {n.what}")
        elif n.kind == "dir":
            lines.append(f"{n.path}/ (with {' or '.join(n.any_of)})   # {n.what}")
        else:
            lines.append(f"{n.path}   # {n.what}")
    return lines


def _need_problems(root: Path, n: Need) -> list[str]:
    p = root / n.path
    if n.kind == "file":
        return [] if p.is_file() else [f"{n.path} (file)"]
    if n.kind == "dir":
        if not p.is_dir():
            return [f"{n.path}/ (folder)"]
        return [] if any((p / a).exists() for a in n.any_of) else [f"{n.path}/ has none of {list(n.any_of)}"]
    prefix = f"{n.path}/" if n.path else ""
    if not (p / CONFIG_NAME).is_file():
        return [f"{prefix}{CONFIG_NAME}"]
    try:
        find_weight_files(p)
    except ValueError as e:
        return [f"{prefix or './'} weights: {e}"]
    return []


def check_layout(ckpt_dir: str | os.PathLike, task: str) -> dict[str, Path]:
    """Verify the files a task needs exist under ckpt_dir; returns role -> path (experts by name, high first)."""
    key = task.lower()
    if key not in TASK_LAYOUTS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASK_LAYOUTS)}")
    root = Path(ckpt_dir)
    needs = TASK_LAYOUTS[key]
    missing = [m for n in needs for m in _need_problems(root, n)] if root.is_dir() else [f"{root} (folder)"]
    if missing:
        tree = "\n    ".join(_need_tree(needs))
        raise ValueError(f"checkpoint folder {root} is incomplete for task {key!r}.\n  expected:\n    {tree}\n"
                         f"  missing or invalid:\n    " + "\n    ".join(missing))
    return {n.role: root / n.path for n in needs}


def small_vae_config(path: Path) -> VAEConfig:
    """The VAEConfig a small model's VAE file (`SMALL_VAE_NAME`) carries in its metadata, latent statistics
    included; only the header is read."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise ValueError(f"{path} carries no VAE config in its metadata")
    d = json.loads(meta["config"])
    return VAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def fit_small(cfg, root: Path | None):  # noqa: ANN001, ANN201 (PipelineConfig -> PipelineConfig)
    """A small model's task config as its folder has it: `cfg.with_vae` with the config of the folder's VAE file
    (a retrained model may have another latent width, which its DiT's channels follow). `cfg` itself for official
    layouts, without a folder, or without a VAE file; ValueError when the file or the width does not fit."""
    if cfg.layout != SMALL_LAYOUT or root is None or not (root / SMALL_VAE_NAME).is_file():
        return cfg
    return cfg.with_vae(small_vae_config(root / SMALL_VAE_NAME))
