"""Official Wan2.2 checkpoint files: config.json, sharded safetensors + index, VAE .pth (the per-task trees:
`wanmoe.layouts`).

No tensor axes are manipulated here: state dicts move whole, keyed by the official module-tree names,
so no key remapping is needed. Shapes in messages are the tensors' own.

Loading: build on the meta device, validate keys and shapes against the files *before*
touching the module, then `load_state_dict(strict=True, assign=True)`; on any failure a ValueError names
the expected layout and what differs, and no model is returned. Weights are read with safetensors
(memory-mapped through `safe_open`) or `torch.load(weights_only=True)`, never with plain pickle.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from wanmoe.models.dit import DiT, DiTConfig
from wanmoe.models.s2v import S2VConfig
from wanmoe.models.state_check import first_items, mismatch_report
from wanmoe.models.vae import VAE21, VAEConfig, WanVAE, load_wan21_vae

__all__ = [
    "CONFIG_NAME", "WEIGHTS_NAME", "INDEX_NAME", "WeightFiles",
    "read_dit_config", "write_dit_config", "dit_config_to_json", "find_weight_files", "load_state_dict_files",
    "load_dit", "save_dit", "load_vae", "load_into_meta_model", "config_problems",
    "shard_name_problem", "read_json_file",
]

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
SHARD_NAME = "diffusion_pytorch_model-{i:05d}-of-{n:05d}.safetensors"

# WanModel.ignore_for_config: never read from config.json; the constructor defaults always apply.
FIXED_FIELDS: dict[str, object] = {
    "patch_size": (1, 2, 2), "cross_attn_norm": True, "qk_norm": True, "text_dim": 4096, "window_size": (-1, -1),
}
MODEL_TYPES = ("t2v", "i2v", "ti2v", "s2v")
CLASS_NAMES = {"t2v": "WanModel", "i2v": "WanModel", "ti2v": "WanModel", "s2v": "WanModel_S2V"}
# Sizes every official config.json carries; refusing a file without them beats silently building the
# constructor default (dim 2048, 32 layers) the official loader would fall back to.
REQUIRED_KEYS = ("model_type", "in_dim", "out_dim", "dim", "ffn_dim", "num_heads", "num_layers")
OPTIONAL_DEFAULTS: dict[str, object] = {"freq_dim": 256, "eps": 1e-6, "text_len": 512}  # WanModel.__init__ defaults
# WanModel_S2V.__init__ defaults: a key absent from config.json takes these, as in the official loader.
S2V_DEFAULTS: dict[str, object] = {
    "cond_dim": 0, "audio_dim": 5120, "num_audio_token": 4, "enable_adain": False, "adain_mode": "attn_norm",
    "audio_inject_layers": [0, 4, 8, 12, 16, 20, 24, 27], "zero_init": False, "zero_timestep": False,
    "enable_motioner": True, "add_last_motion": True, "enable_tsm": False, "trainable_token_pos_emb": False,
    "motion_token_num": 1024, "enable_framepack": False, "framepack_drop_mode": "drop",
}
# The one S2V variant implemented (the released S2V-14B): switches S2VConfig does not model must hold
# these values, because any other value changes the module tree or the forward pass.
S2V_SUPPORTED: dict[str, object] = {
    "enable_motioner": False, "enable_framepack": True, "enable_adain": True, "adain_mode": "attn_norm",
    "zero_timestep": True, "add_last_motion": True, "enable_tsm": False, "trainable_token_pos_emb": False,
    "framepack_drop_mode": "padd",
}
# Training-init or motioner-only switches: no effect on a loaded S2V-14B model, accepted with any value.
S2V_INERT = ("zero_init", "motion_token_num")
# Keys the official constructors swallow without effect (diffusers bookkeeping and **kwargs).
PASSIVE_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "motion_frames", "trainable_token")


# ---------------------------------------------------------------------------------------------- config.json

# Integer fields of config.json and their sane ranges: a 10**9-layer config would hang even a meta-device build.
_MAX_WIDTH = 1 << 20
_INT_FIELDS: dict[str, tuple[int, int]] = {
    "in_dim": (1, _MAX_WIDTH), "out_dim": (1, _MAX_WIDTH), "dim": (1, _MAX_WIDTH), "ffn_dim": (1, _MAX_WIDTH),
    "freq_dim": (2, _MAX_WIDTH), "num_heads": (1, 4096), "num_layers": (1, 4096), "text_len": (1, _MAX_WIDTH),
    "cond_dim": (0, _MAX_WIDTH), "audio_dim": (1, _MAX_WIDTH), "num_audio_token": (1, 4096),
    "motion_token_num": (0, _MAX_WIDTH),
}
# Fields the official loader ignores (FIXED_FIELDS, PASSIVE_KEYS) are not type-checked: any value is ignored.
_BOOL_FIELDS = ("enable_adain", "zero_init", "zero_timestep", "enable_motioner",
                "add_last_motion", "enable_tsm", "trainable_token_pos_emb", "enable_framepack")
_STR_FIELDS = ("_class_name", "adain_mode", "framepack_drop_mode")
MAX_CONFIG_BYTES = 1 << 20  # an official config.json is under 1 KB


def _as_value(v: object) -> object:
    return tuple(v) if isinstance(v, list) else v


def read_json_file(path: Path, max_bytes: int) -> object:
    """One JSON file, bounded in size; ValueError naming the file for unreadable, oversized, non-UTF-8 or bad JSON."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ValueError(f"{path}: {size} bytes, too large for this file (at most {max_bytes})")
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    except RecursionError as e:  # pathologically nested arrays
        raise ValueError(f"{path}: not valid JSON (nested too deeply)") from e


def config_problems(raw: Mapping[str, object]) -> list[str]:
    """Every field of a config.json dict whose JSON type or range is wrong, one line each (empty when all fit).

    A string "96" or a float 96.0 where the official loader expects an int would otherwise reach the model
    constructor and fail there with a TypeError, or worse build a different model.
    """
    problems = []
    for key, (lo, hi) in _INT_FIELDS.items():
        if key not in raw:
            continue
        v = raw[key]
        if isinstance(v, bool) or not isinstance(v, int):
            problems.append(f"{key} must be an integer, got {_shown(v)} ({_json_type(v)})")
        elif not lo <= v <= hi:
            problems.append(f"{key} must be in [{lo}, {hi}], got {v}")
    for key in _BOOL_FIELDS:
        if key in raw and not isinstance(raw[key], bool):
            problems.append(f"{key} must be true or false, got {_shown(raw[key])} ({_json_type(raw[key])})")
    for key in _STR_FIELDS:
        if key in raw and not isinstance(raw[key], str):
            problems.append(f"{key} must be a string, got {_shown(raw[key])} ({_json_type(raw[key])})")
    if "eps" in raw:
        v = raw["eps"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and 0 < v < 1):
            problems.append(f"eps must be a finite number in (0, 1), got {_shown(v)}")
    if "audio_inject_layers" in raw:
        v = raw["audio_inject_layers"]
        if not isinstance(v, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in v):
            problems.append(f"audio_inject_layers must be a list of integers, got {_shown(v)}")
    return problems


def _shown(v: object) -> str:
    text = json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_type(v: object) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object",
            type(None): "null"}.get(type(v), type(v).__name__)


def read_dit_config(folder: str | os.PathLike) -> DiTConfig:
    """Parse an official config.json into a DiTConfig; the ignore_for_config fields are fixed, never read."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"no {CONFIG_NAME} in {folder}: an official DiT folder holds {CONFIG_NAME} and the weights")
    raw = read_json_file(path, MAX_CONFIG_BYTES)
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, got {_json_type(raw)}")
    wrong = config_problems(raw)
    if wrong:
        raise ValueError(f"{path}: " + "; ".join(wrong))
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{path}: unsupported model_type {model_type!r}; supported: {', '.join(MODEL_TYPES)}")
    class_name = raw.get("_class_name", CLASS_NAMES[model_type])
    if class_name != CLASS_NAMES[model_type]:
        hint = " (the diffusers '-Diffusers' layout is not supported)" if "Transformer" in str(class_name) else ""
        raise ValueError(f"{path}: _class_name {class_name!r} does not match model_type {model_type!r} "
                         f"(expected {CLASS_NAMES[model_type]!r}){hint}")
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise ValueError(f"{path}: missing required keys {missing}")
    window = raw.get("window_size", FIXED_FIELDS["window_size"])
    if _as_value(window) != FIXED_FIELDS["window_size"]:
        # The official loader would ignore it and run full attention; refuse rather than silently differ from
        # what the file asks for.
        raise ValueError(f"{path}: window_size {window} (local attention) is not supported; only (-1, -1)")
    for k in ("patch_size", "cross_attn_norm", "qk_norm", "text_dim"):
        if k in raw and _as_value(raw[k]) != FIXED_FIELDS[k]:
            logger.warning("%s: ignoring %s=%r as the official loader does; using %r", path, k, raw[k], FIXED_FIELDS[k])

    s2v_keys = set(S2V_DEFAULTS) if model_type == "s2v" else set()
    known = set(REQUIRED_KEYS) | set(OPTIONAL_DEFAULTS) | set(FIXED_FIELDS) | set(PASSIVE_KEYS) | s2v_keys
    unknown = sorted(k for k in raw if k not in known)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown} for model_type {model_type!r}; known: {sorted(known)}")

    dit_fields = {f.name for f in dataclasses.fields(DiTConfig)}
    kwargs: dict[str, object] = {k: _as_value(raw[k]) for k in REQUIRED_KEYS}
    kwargs.update({k: _as_value(raw.get(k, d)) for k, d in OPTIONAL_DEFAULTS.items()})
    kwargs.update({k: v for k, v in FIXED_FIELDS.items() if k in dit_fields})
    if model_type == "s2v":
        kwargs["s2v"] = _read_s2v(path, {**S2V_DEFAULTS, **{k: raw[k] for k in s2v_keys if k in raw}})
    cfg = DiTConfig(**kwargs)  # type: ignore[arg-type]
    try:
        cfg.validate()  # sizes the model cannot be built with fail here, naming the file
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    return cfg


def _read_s2v(path: Path, values: dict[str, object]) -> S2VConfig:
    if values["enable_motioner"]:
        raise ValueError(f"{path}: enable_motioner=true (the MotionerTransformers path) is not supported; "
                         "only the frame-pack motion path of S2V-14B (enable_framepack=true)")
    fields = {f.name for f in dataclasses.fields(S2VConfig)}
    kwargs: dict[str, object] = {}
    for k, v in values.items():
        if k in fields:
            kwargs[k] = _as_value(v)
        elif k in S2V_SUPPORTED and v != S2V_SUPPORTED[k]:
            raise ValueError(f"{path}: {k}={v!r} is not supported; only {S2V_SUPPORTED[k]!r} (the S2V-14B value)")
        elif k not in S2V_SUPPORTED and k not in S2V_INERT:
            raise ValueError(f"{path}: S2VConfig has no field for {k}={v!r}")  # internal table out of sync
    return S2VConfig(**kwargs)  # type: ignore[arg-type]


def dit_config_to_json(cfg: DiTConfig) -> dict[str, object]:
    """The config.json dict the official loader reads for cfg (fixed fields are left out, as it does)."""
    out: dict[str, object] = {"_class_name": CLASS_NAMES[cfg.model_type]}
    for k in (*REQUIRED_KEYS, *OPTIONAL_DEFAULTS):
        out[k] = getattr(cfg, k)
    if cfg.model_type == "s2v":
        if cfg.s2v is None:
            raise ValueError("model_type 's2v' needs cfg.s2v")
        fields = {f.name for f in dataclasses.fields(S2VConfig)}
        for k in S2V_DEFAULTS:
            if k in fields:
                v = getattr(cfg.s2v, k)
                out[k] = list(v) if isinstance(v, tuple) else v
            elif k in S2V_SUPPORTED:
                out[k] = S2V_SUPPORTED[k]
        out["zero_init"] = True  # the released value; it only affects initialisation of a fresh model
    return out


def write_dit_config(cfg: DiTConfig, folder: str | os.PathLike) -> Path:
    """Write cfg as an official config.json into folder (created if needed); returns the file path."""
    path = Path(folder) / CONFIG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(path, json.dumps(dit_config_to_json(cfg), indent=2, sort_keys=True) + "\n")
    return path


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class WeightFiles:
    """The safetensors files of one DiT folder and which file holds each key (validated)."""

    folder: Path
    files: tuple[Path, ...]
    weight_map: dict[str, Path]
    index: Path | None  # None for the single-file layout


def _layout_text(folder: Path) -> str:
    return (f"expected in {folder}: {CONFIG_NAME} and either a single {WEIGHTS_NAME}, or shards "
            f"{SHARD_NAME.format(i=1, n=4)} ... plus {INDEX_NAME} (weight_map + metadata.total_size)")


def _shard_keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read {path}: truncated or corrupt safetensors file ({e})") from e


def shard_name_problem(folder: Path, name: object) -> str | None:
    """Why an index's shard name is unsafe or unusable (None when it is a plain file name inside folder).

    Names come from a downloaded JSON file: an absolute path, `..` or a separator would make the loader read a
    file outside the checkpoint. A symlink may point inside the folder, or into the `blobs/` folder of the
    Hugging Face cache repo that holds the folder (how `snapshot_download` lays out every file).
    """
    if not isinstance(name, str) or not name:
        return f"shard name {_shown(name)} is not a file name"
    if name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        return (f"shard name {name!r} is not a plain file name inside the folder (absolute paths, '..' and path "
                "separators are refused)")
    path = folder / name
    if path.is_symlink():
        target = path.resolve()
        if not (_is_within(target, folder.resolve()) or _in_hf_blobs(folder, target)):
            return f"shard {name} is a symlink to {target}, outside {folder}"
    return None


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
    except ValueError:
        return False
    return True


def _in_hf_blobs(folder: Path, target: Path) -> bool:
    """target is a blob of the Hugging Face cache repo whose `snapshots/<revision>/` holds folder."""
    parts = folder.absolute().parts
    if "snapshots" not in parts:
        return False
    i = len(parts) - 1 - parts[::-1].index("snapshots")
    return target.parent == (Path(*parts[:i]) / "blobs").resolve()


MAX_INDEX_BYTES = 64 << 20  # an official index (a few thousand keys) is ~100 KB


def find_weight_files(folder: str | os.PathLike) -> WeightFiles:
    """Locate and cross-check the weight files of an official DiT folder (no tensor data is read)."""
    folder = Path(folder)
    single, index = folder / WEIGHTS_NAME, folder / INDEX_NAME
    if single.is_file() and index.is_file():
        raise ValueError(f"{folder} holds both {WEIGHTS_NAME} and {INDEX_NAME}; keep one layout")
    if single.is_file():
        return WeightFiles(folder, (single,), {k: single for k in _shard_keys(single)}, None)
    if not index.is_file():
        present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise ValueError(f"no weights found: {_layout_text(folder)}; found {present or 'nothing'}")
    raw = read_json_file(index, MAX_INDEX_BYTES)
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index} has no 'weight_map' object; {_layout_text(folder)}")
    bad = [p for p in dict.fromkeys(shard_name_problem(folder, v) for v in weight_map.values()) if p]
    if bad:
        raise ValueError(f"{index}: " + "; ".join(bad))
    names = sorted(set(weight_map.values()))
    absent = [n for n in names if not (folder / n).is_file()]
    if absent:
        raise ValueError(f"{index} names {len(absent)} missing shard file(s): {', '.join(absent)}; "
                         f"{_layout_text(folder)}")
    problems = []
    for name in names:
        in_file = set(_shard_keys(folder / name))
        in_index = {k for k, v in weight_map.items() if v == name}
        if in_file != in_index:
            problems.append(f"{name}: keys in the file but not the index [{first_items(in_file - in_index, 5)}], "
                            f"in the index but not the file [{first_items(in_index - in_file, 5)}]")
    if problems:
        raise ValueError(f"shards disagree with {index}:\n  " + "\n  ".join(problems))
    return WeightFiles(folder, tuple(folder / n for n in names), {k: folder / v for k, v in weight_map.items()},
                       index)


def load_state_dict_files(
    folder: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
    keep_dtype: Callable[[str], bool] | None = None,
) -> dict[str, Tensor]:
    """Read every tensor of an official DiT folder (single file or shards + index) through safe_open.

    dtype casts floating tensors as they are read, so peak memory stays one copy in the target dtype;
    keys for which keep_dtype(key) is true keep their stored dtype.
    """
    wf = find_weight_files(folder)
    out: dict[str, Tensor] = {}
    for path in wf.files:
        try:
            with safe_open(str(path), framework="pt", device=str(torch.device(device))) as f:
                for k in f.keys():
                    t = f.get_tensor(k)
                    if dtype is not None and t.is_floating_point() and not (keep_dtype and keep_dtype(k)):
                        t = t.to(dtype)
                    out[k] = t
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read {path}: truncated or corrupt safetensors file ({e})") from e
    if wf.index is not None:
        _check_total_size(wf.index, out)
    return out


def _check_total_size(index: Path, sd: Mapping[str, Tensor]) -> None:
    raw = read_json_file(index, MAX_INDEX_BYTES)
    meta = raw.get("metadata") if isinstance(raw, dict) else None
    total = meta.get("total_size") if isinstance(meta, dict) else None
    actual = sum(t.numel() * t.element_size() for t in sd.values())
    if total is not None and total != actual:
        # Keys and shapes were already checked; a stale size field alone is not worth refusing 50 GB for.
        logger.warning("%s: metadata.total_size %s differs from the bytes read (%d)", index, total, actual)


# ---------------------------------------------------------------------------------------------- meta loading


def _check_matches(model: nn.Module, shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
    problems = mismatch_report({k: tuple(v.shape) for k, v in model.state_dict().items()}, shapes)
    if problems:
        raise ValueError(f"weights in {source} do not match the model:\n  " + "\n  ".join(problems))


def load_into_meta_model(model: nn.Module, sd: Mapping[str, Tensor], *, source: str) -> nn.Module:
    """Strict, assigning load of sd into a model built on the meta device; validated before any change."""
    _check_matches(model, {k: tuple(v.shape) for k, v in sd.items()}, source)
    model.load_state_dict(sd, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        # Non-persistent buffers are not in any file; the module must rebuild them itself.
        raise ValueError(f"{type(model).__name__} still has meta tensors after loading {source}: {first_items(left)}")
    return model


def _header_shapes(wf: WeightFiles) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from the safetensors headers alone: a mismatch is reported before any data is read."""
    out: dict[str, tuple[int, ...]] = {}
    for path in wf.files:
        try:
            with safe_open(str(path), framework="pt") as f:
                out.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read {path}: truncated or corrupt safetensors file ({e})") from e
    return out


def load_dit(
    folder: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
    attn_fn: Callable[..., Tensor] | None = None, cfg: DiTConfig | None = None,
) -> DiT:
    """Build the DiT described by folder/config.json on meta and load its official weights strictly.

    `cfg` overrides config.json for wanmoe's small models, whose sizes (text_dim, audio layers, motion frames)
    the official config.json cannot express; the weights are still checked key by key and shape by shape."""
    folder = Path(folder)
    cfg = read_dit_config(folder) if cfg is None else cfg
    with torch.device("meta"):
        model = DiT(cfg) if attn_fn is None else DiT(cfg, attn_fn=attn_fn)
    source = f"{folder} ({_layout_text(folder)})"
    _check_matches(model, _header_shapes(find_weight_files(folder)), source)
    sd = load_state_dict_files(folder, device=device, dtype=dtype, keep_dtype=_fp32_predicate(model))
    return load_into_meta_model(model, sd, source=source).eval()


def _fp32_predicate(model: nn.Module) -> Callable[[str], bool] | None:
    """Keys the numerics policy keeps out of a dtype cast (the model's FP32_MODULES) keep their stored dtype."""
    from wanmoe.numerics import fp32_predicate  # torch-only module; imported here to keep this edit local

    return fp32_predicate(model)


# ---------------------------------------------------------------------------------------------- saving


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                       ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def save_dit(
    model: DiT, folder: str | os.PathLike, *, max_shard_size: int | str | None = "10GB", overwrite: bool = False,
) -> list[Path]:
    """Write config.json + weights in the official layout: shards + index, or one file if max_shard_size is None.

    Tensors are packed in state-dict order; a shard is closed when the next tensor would push it past
    max_shard_size (a single larger tensor gets a shard of its own). Returns the files written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    existing = sorted(folder.glob("diffusion_pytorch_model*.safetensors*")) + sorted(folder.glob(CONFIG_NAME))
    if existing and not overwrite:
        raise ValueError(f"{folder} already holds a checkpoint ({', '.join(p.name for p in existing)}); "
                         "pass overwrite=True to replace it")
    for p in existing:
        p.unlink()
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    groups: list[dict[str, Tensor]] = [{}]
    if max_shard_size is not None:
        limit, used = _parse_size(max_shard_size), 0
        for k, t in sd.items():
            size = t.numel() * t.element_size()
            if groups[-1] and used + size > limit:
                groups.append({})
                used = 0
            groups[-1][k] = t
            used += size
    else:
        groups[0] = sd
    written = [write_dit_config(model.cfg, folder)]
    meta = {"format": "pt"}  # what torch-side safetensors writers put in every official shard
    if max_shard_size is None:
        written.append(_save_atomic(groups[0], folder / WEIGHTS_NAME, meta))
        return written
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups, start=1):
        name = SHARD_NAME.format(i=i, n=len(groups))
        written.append(_save_atomic(group, folder / name, meta))
        weight_map.update({k: name for k in group})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
             "weight_map": dict(sorted(weight_map.items()))}
    _atomic_write_text(folder / INDEX_NAME, json.dumps(index, indent=2) + "\n")
    written.append(folder / INDEX_NAME)
    return written


def _save_atomic(tensors: dict[str, Tensor], path: Path, meta: dict[str, str]) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def load_vae(
    path: str | os.PathLike, cfg: VAEConfig = VAE21, *, device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> WanVAE:
    """Wan2.1_VAE.pth (torch.load weights_only, mmap) or .safetensors -> frozen WanVAE; strict, built on meta.

    Delegates to the VAE module's own loader, so there is one implementation of the checks: a .pth holding
    pickled code is refused with a ValueError, and key/shape problems are listed before anything loads.
    """
    return load_wan21_vae(path, cfg, device, dtype=dtype)
