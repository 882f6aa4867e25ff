"""`wanmoe verify`: check a downloaded checkpoint folder without loading it, and report every problem at once.

Only metadata is read: file names and sizes, each safetensors header (the 8-byte little-endian length and the
JSON after it), config.json, the shard index, the VAE config in the metadata of the small layout's
vae.safetensors, and the central directory of zip-format `.pth` files. The tensor shapes in the headers are
compared with the model each config describes, built on the meta device (no memory, no tensor data).
Checksum lists (`md5sum.txt`, `*.md5`, `sha256sum.txt`, `*.sha256`, lines `<hex>  <relative path>`) are the
slow part: every listed file is hashed in full, streamed in chunks; `cheap=True` skips them.

`cheap_check(root, cfg)` runs the task's part of it (layout, headers, index, config, shapes; no hashing) and is
what the generate path calls before loading any weights. Every problem is one line that starts with the file it
is about, relative to the checkpoint folder; nothing here raises on a malformed file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from wanmoe import checkpoint as ck
from wanmoe import layouts
from wanmoe.checksums import check_checksums, walk_files
from wanmoe.configs import PRESETS, PipelineConfig
from wanmoe.encoders.text import ByteTextEncoder
from wanmoe.models.dit import DiT, DiTConfig
from wanmoe.models.state_check import first_items, mismatch_report
from wanmoe.models.vae import VAEConfig, WanVAE
from wanmoe.st_header import Header, is_int, plural, read_safetensors_header, short_json

__all__ = ["VerifyReport", "verify_checkpoint", "cheap_check", "main"]

# config.json fields that identify a task's DiT, compared when inferring the task from a folder.
IDENTITY_FIELDS = ("model_type", "in_dim", "out_dim", "dim", "ffn_dim", "num_heads", "num_layers")
Shapes = dict[str, tuple[int, ...] | None]  # tensor name -> shape in a header (None: malformed there)


@dataclass
class VerifyReport:
    """What `verify_checkpoint` looked at (one line per check) and every problem it found (one line each)."""

    root: Path
    task: str | None = None
    problems: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


# ---------------------------------------------------------------------------------------------- the checker


class _Checker:
    """Collects problems and checked lines; each file's header is parsed (and its problems reported) once."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).absolute()
        self.problems: list[str] = []
        self.checked: list[str] = []
        self.headers: dict[Path, Header] = {}
        self._shapes: dict[object, dict[str, tuple[int, ...]]] = {}

    def rel(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix() or "."
        except ValueError:
            return str(path)

    def problem(self, path: Path, msg: str) -> None:
        self.problems.append(f"{self.rel(path)}: {msg}")

    def error(self, e: ValueError) -> None:
        """A checkpoint.py error (which names absolute paths) as a problem line relative to the root."""
        self.problems.append(str(e).replace(str(self.root) + os.sep, ""))

    def header(self, path: Path) -> Header:
        if path not in self.headers:
            h = self.headers[path] = read_safetensors_header(path)
            for p in h.problems:
                self.problem(path, p)
            if not h.problems:
                count = plural(len(h.tensors), "tensor")
                self.checked.append(f"{self.rel(path)}: header OK ({count}, {h.nbytes:,} bytes)")
        return self.headers[path]

    def model_shapes(self, key: object, build: Callable[[], nn.Module]) -> dict[str, tuple[int, ...]]:
        """State-dict shapes of a module built on the meta device (no memory); cached per config."""
        if key not in self._shapes:
            with torch.device("meta"):
                model = build()
            self._shapes[key] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        return self._shapes[key]

    def compare(self, what: Path, header_shapes: Shapes, key: object,
                build: Callable[[], nn.Module], model_desc: str) -> None:
        try:
            expected = dict(self.model_shapes(key, build))
        except (ValueError, TypeError, RuntimeError) as e:  # a config the model cannot be built from
            self.problem(what, f"cannot build the model {model_desc} describes: {e}")
            return
        unknown = {k for k, s in header_shapes.items() if s is None}  # malformed entries, reported already
        got = {k: s for k, s in header_shapes.items() if s is not None}
        lines = mismatch_report({k: v for k, v in expected.items() if k not in unknown}, got)
        for line in lines:
            self.problem(what, f"tensors do not match the model {model_desc}: {line}")
        if not lines:
            self.checked.append(f"{self.rel(what)}: {plural(len(got), 'tensor shape')} match the model {model_desc}")


# ---------------------------------------------------------------------------------------------- DiT folders


def _config_diff(got: object, want: object, skip: tuple[str, ...]) -> list[str]:
    out = []
    for f in dataclasses.fields(want):  # type: ignore[arg-type]
        a, b = getattr(got, f.name, None), getattr(want, f.name)
        if f.name in skip or a == b:
            continue
        if dataclasses.is_dataclass(b) and a is not None:
            out += [f"{f.name}.{d}" for d in _config_diff(a, b, skip)]
        else:
            out.append(f"{f.name} {a!r} (task: {b!r})")
    return out


def _check_config(c: _Checker, folder: Path, cfg: PipelineConfig, small: bool) -> DiTConfig | None:
    path = folder / ck.CONFIG_NAME
    if not path.is_file():
        c.problem(path, "missing (every DiT folder holds its config.json)")
        return None
    try:
        raw = ck.read_json_file(path, ck.MAX_CONFIG_BYTES)
    except ValueError as e:
        c.error(e)
        return None
    if not isinstance(raw, dict):
        c.problem(path, f"must hold a JSON object, got {type(raw).__name__}")
        return None
    wrong = ck.config_problems(raw)
    for w in wrong:
        c.problem(path, w)
    if wrong:
        return None
    try:
        got = ck.read_dit_config(folder)
    except ValueError as e:
        c.error(e)
        return None
    # The small models take the sizes config.json cannot express (text_dim, audio layers, motion frames) from the
    # preset; the official ones must match the preset except text_len, as the loader requires.
    skip = ("text_dim", "num_audio_layers", "motion_frames", "zip_frame_buckets", "drop_first_motion", "ref_rope_t",
            "adain_eps") if small else ("text_len",)
    diff = _config_diff(got, cfg.dit, skip)
    if diff:
        c.problem(path, f"describes a different model than task {cfg.task}: " + "; ".join(diff))
    else:
        c.checked.append(f"{c.rel(path)}: {got.model_type}, dim {got.dim}, {got.num_layers} layers (task {cfg.task})")
    return got


def _check_weights(c: _Checker, folder: Path) -> tuple[Path, Shapes] | None:
    """(file to name, key -> header shape) of a DiT folder's weights; None when they cannot be compared."""
    single, index = folder / ck.WEIGHTS_NAME, folder / ck.INDEX_NAME
    strays = sorted(folder.glob("diffusion_pytorch_model-*.safetensors"))
    if single.is_file() and index.is_file():
        c.problem(folder, f"holds both {ck.WEIGHTS_NAME} and {ck.INDEX_NAME}; the loader refuses mixed layouts")
        return None
    if single.is_file():
        for s in strays:
            c.problem(s, f"stray shard next to the single-file {ck.WEIGHTS_NAME}")
        h = c.header(single)
        return (single, {k: e.shape for k, e in h.tensors.items()}) if h.parsed else None
    if not index.is_file():
        c.problem(folder, f"no weights: expected {ck.WEIGHTS_NAME}, or shards + {ck.INDEX_NAME}")
        return None
    return _check_index(c, folder, index, strays)


def _check_index(c: _Checker, folder: Path, index: Path, strays: list[Path]) -> tuple[Path, Shapes] | None:
    try:
        raw = ck.read_json_file(index, ck.MAX_INDEX_BYTES)
    except ValueError as e:
        c.error(e)
        return None
    wm = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(wm, dict) or not wm:
        c.problem(index, "has no non-empty 'weight_map' object (tensor name -> shard file name)")
        return None
    names: dict[str, list[str]] = {}  # shard -> the tensors the index assigns to it
    not_names = []
    for k, v in wm.items():
        if isinstance(v, str):
            names.setdefault(v, []).append(k)
        else:
            not_names.append(k)
    if not_names:
        c.problem(index, f"weight_map values must be shard file names; not for {first_items(not_names, 5)}")
    shapes: Shapes = {}
    total, complete = 0, not not_names
    for name, keys in sorted(names.items()):
        why = ck.shard_name_problem(folder, name)
        shard = folder / name
        if why or not shard.is_file():
            c.problem(index, why or f"names shard {name}, which is missing ({plural(len(keys), 'tensor')})")
            complete = False
            continue
        h = c.header(shard)
        if not h.parsed:
            complete = False
            continue
        lacks, extra = set(keys) - h.tensors.keys(), h.tensors.keys() - set(keys)
        if lacks:
            c.problem(shard, f"lacks {plural(len(lacks), 'tensor')} the index assigns to it: {first_items(lacks, 5)}")
        if extra:
            c.problem(shard, f"holds {plural(len(extra), 'tensor')} the index does not assign to it: "
                             f"{first_items(extra, 5)}")
        shapes.update({k: e.shape for k, e in h.tensors.items()})
        total += h.nbytes
    for s in strays:
        if s.name not in names:
            c.problem(s, f"shard not named by {ck.INDEX_NAME} (left over from another download?)")
    meta = raw.get("metadata", {})
    size = meta.get("total_size") if isinstance(meta, dict) else None
    if not isinstance(meta, dict):
        c.problem(index, f"metadata must be an object, got {short_json(meta)}")
    elif size is not None and not is_int(size):
        c.problem(index, f"metadata.total_size must be an integer, got {short_json(size)}")
    elif size is not None and complete and size != total:
        c.problem(index, f"metadata.total_size {size:,} differs from the {total:,} bytes of tensor data in the shards")
    c.checked.append(f"{c.rel(index)}: {plural(len(wm), 'tensor')} in {plural(len(names), 'shard')}")
    return (index, shapes) if complete else None


def _check_dit(c: _Checker, folder: Path, cfg: PipelineConfig, small: bool) -> None:
    got = _check_config(c, folder, cfg, small)
    weights = _check_weights(c, folder)
    dit = cfg.dit if small else got  # what the loader builds: the preset for small models, else config.json
    if weights is None or dit is None:
        c.checked.append(f"{c.rel(folder)}: tensor shapes not compared (see the problems above)")
        return
    what, shapes = weights
    desc = f"task {cfg.task}" if small else c.rel(folder / ck.CONFIG_NAME)
    c.compare(what, shapes, dit, lambda: DiT(dit), f"{desc} describes")


# ---------------------------------------------------------------------------------------------- the task's tree


def _needs(cfg: PipelineConfig) -> tuple[layouts.Need, ...]:
    layout = getattr(cfg, "layout", None) or cfg.task.lower()
    if cfg.text_encoder == "byte":
        layout = layouts.SMALL_LAYOUT
    return layouts.layout_needs(layout, cfg.experts)


def _for_folder(root: Path, cfg: PipelineConfig) -> PipelineConfig:
    """A single-DiT folder of a two-expert task holds that task served by one expert (a dense baseline); a small
    model takes its VAE's latent width (`PipelineConfig.with_vae`), as the loader does."""
    try:
        cfg = layouts.fit_small(cfg, root)
    except Exception:  # noqa: BLE001 (a broken VAE file is reported by _check_small_files, not here)
        pass
    single = (root / ck.CONFIG_NAME).is_file() and not any((root / d).is_dir() for _, d in layouts.EXPERT_FOLDERS)
    if single and len(cfg.experts) > 1 and hasattr(cfg, "single_expert"):
        return cfg.single_expert()
    return cfg


def _check_task(c: _Checker, cfg: PipelineConfig) -> None:
    try:
        needs = _needs(cfg)
    except ValueError as e:
        c.problems.append(f"{c.root}: {e}")
        return
    small = cfg.text_encoder == "byte"
    c.checked.append(f"layout of task {cfg.task}: " + ", ".join(n.path or "./" for n in needs))
    for n in needs:
        path = c.root / n.path
        if n.kind == "dit":
            if path.is_dir():
                _check_dit(c, path, cfg, small)
            else:
                c.problem(path, f"missing folder ({n.what}, needed by task {cfg.task})")
        elif n.kind == "dir":
            if not path.is_dir():
                c.problem(path, f"missing folder ({n.what}, needed by task {cfg.task})")
            elif not any((path / a).exists() for a in n.any_of):
                c.problem(path, f"holds none of {', '.join(n.any_of)} ({n.what})")
        elif not path.is_file():
            c.problem(path, f"missing ({n.what}, needed by task {cfg.task})")
        elif path.suffix == ".pth":
            _check_pth(c, path)
    if small:
        _check_small_files(c, cfg)


def _check_pth(c: _Checker, path: Path) -> None:
    """torch.save files are zip archives whose directory sits at the end: a truncated one loses it."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        if not magic:
            c.problem(path, "empty file")
            return
        if magic != b"PK\x03\x04":
            c.checked.append(f"{c.rel(path)}: not a zip archive (legacy torch format), contents not checked")
            return
        with zipfile.ZipFile(path) as z:
            n = len(z.infolist())
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        c.problem(path, f"truncated or corrupt (its zip directory cannot be read: {e})")
        return
    c.checked.append(f"{c.rel(path)}: zip directory OK ({n} entries)")


def _check_small_files(c: _Checker, cfg: PipelineConfig) -> None:
    vae = c.root / layouts.SMALL_VAE_NAME
    h = c.header(vae) if vae.is_file() else Header()
    if h.parsed:
        try:
            d = json.loads(h.metadata["config"])
            vcfg = VAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
        except (KeyError, json.JSONDecodeError, TypeError, AttributeError) as e:
            c.problem(vae, f"metadata 'config' is missing or not a VAE config ({type(e).__name__}: {e})")
        else:
            shapes = {k: e.shape for k, e in h.tensors.items()}
            c.compare(vae, shapes, ("vae", json.dumps(d, sort_keys=True)), lambda: WanVAE(vcfg),
                      "its metadata config describes")
    text = c.root / layouts.BYTE_TEXT_NAME
    h = c.header(text) if text.is_file() else Header()
    if h.parsed and cfg.byte_text is not None:
        shapes = {k: e.shape for k, e in h.tensors.items()}
        c.compare(text, shapes, cfg.byte_text, lambda: ByteTextEncoder(cfg.byte_text),
                  f"task {cfg.task} describes")


# ---------------------------------------------------------------------------------------------- task inference


def _looks_like(root: Path, cfg: PipelineConfig) -> bool:
    try:
        needs = _needs(cfg)
    except ValueError:
        return False
    for n in needs:
        p = root / n.path
        if (n.kind == "file" and not p.is_file()) or (n.kind == "dir" and not p.is_dir()):
            return False
        if n.kind == "dit":
            try:
                raw = ck.read_json_file(p / ck.CONFIG_NAME, ck.MAX_CONFIG_BYTES)
            except ValueError:  # missing or unreadable: the layout still counts, the full check reports it
                raw = {} if (p / ck.CONFIG_NAME).is_file() else None
            if raw is None:
                return False
            for k in IDENTITY_FIELDS:  # fields of the wrong type are reported later, not used to decide
                v = raw.get(k) if isinstance(raw, dict) else None
                want = getattr(cfg.dit, k)
                if type(v) is type(want) and v != want:
                    return False
    return True


def _infer_task(c: _Checker) -> PipelineConfig | None:
    pairs = [(p, _for_folder(c.root, p)) for p in PRESETS.values()]
    found = [(p, d) for p, d in pairs if _looks_like(c.root, d)]
    if len(found) == 1:
        preset, cfg = found[0]
        one = " (served by one expert)" if cfg is not preset else ""
        c.checked.append(f"task {cfg.task}{one}: inferred from the layout and config.json")
        return cfg
    what = f"fits several tasks ({', '.join(d.task for _, d in found)})" if found else "fits no task's layout"
    c.problems.append(f"{c.root}: the folder {what}; pass --task (one of {', '.join(PRESETS)}) to check it "
                      "against one")
    return None


def _resolve_task(task: str) -> PipelineConfig:
    for name, cfg in PRESETS.items():
        if name.lower() == task.lower():
            return cfg
    raise ValueError(f"unknown task {task!r}; known: {', '.join(PRESETS)}")


# ---------------------------------------------------------------------------------------------- entry points


def verify_checkpoint(root: str | os.PathLike, task: str | None = None, *, cheap: bool = False) -> VerifyReport:
    """Check every file of a checkpoint folder for `task` (inferred when None) without loading any tensor.

    Raises ValueError only for an unknown task name; every problem with the folder is a line of the report.
    """
    cfg = _resolve_task(task) if task is not None else None
    c = _Checker(root)
    report = VerifyReport(c.root)
    if not c.root.is_dir():
        c.problems.append(f"{c.root}: not a folder")
    else:
        cfg = _infer_task(c) if cfg is None else _for_folder(c.root, cfg)
        if cfg is not None:
            report.task = cfg.task
            _check_task(c, cfg)
        for path in walk_files(c.root):  # every other safetensors file in the tree, for a full report
            if path.suffix == ".safetensors":
                c.header(path)
        check_checksums(c, cheap)
    report.problems, report.checked = c.problems, c.checked
    return report


def cheap_check(root: str | os.PathLike, cfg: PipelineConfig) -> list[str]:
    """The files task `cfg` reads from root: layout, headers, index, config.json and shapes, no hashing.

    Returns one line per problem (empty when the folder is fit to load), each naming its file relative to root.
    Reads only headers and small JSON files, so it runs in well under a second even for a 14B checkpoint.
    """
    c = _Checker(root)
    if not c.root.is_dir():
        return [f"{c.root}: not a folder"]
    _check_task(c, _for_folder(c.root, cfg))
    return c.problems


def main(argv: list[str] | None = None) -> int:
    """`wanmoe verify`: exit 0 when the folder is fine, 1 when problems were found, 2 for a usage error."""
    parser = argparse.ArgumentParser(
        prog="wanmoe verify", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Check a downloaded checkpoint folder without loading it: layout, every safetensors header, "
                    "the shard index, config.json against the tensor shapes, and checksum lists when present.")
    parser.add_argument("--ckpt_dir", required=True, metavar="DIR", help="the checkpoint folder to check")
    parser.add_argument("--task", default=None, help=f"the task it is for (one of {', '.join(PRESETS)}); "
                                                     "inferred from the folder when omitted")
    parser.add_argument("--cheap", action="store_true", help="skip the checksum lists (reads headers only)")
    args = parser.parse_args(argv)
    try:
        report = verify_checkpoint(args.ckpt_dir, args.task, cheap=args.cheap)
    except ValueError as e:  # an unknown --task
        parser.error(f"--task: {e}")
    except KeyboardInterrupt:
        print("wanmoe verify: interrupted", file=sys.stderr)
        return 130
    for line in report.checked:
        print(f"  ok       {line}")
    for line in report.problems:
        print(f"  PROBLEM  {line}")
    task = f" for task {report.task}" if report.task else ""
    if report.ok:
        print(f"{args.ckpt_dir}: OK{task} ({len(report.checked)} checks)")
        return 0
    print(f"{args.ckpt_dir}: {plural(len(report.problems), 'problem')}{task}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
