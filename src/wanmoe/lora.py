"""LoRAs and full-weight deltas on noise experts, in the key formats users bring, merged exactly or run beside.

Every format maps onto the official Wan parameter names of `wanmoe.models.dit.DiT` through one table-driven
function, `resolve_key`: a key is `<prefix><module path><suffix>`, where
- the suffix (`SUFFIXES`) says what the tensor is: the low-rank pair (`lora_A`/`lora_B` of diffusers/PEFT,
  `lora_down`/`lora_up` of kohya/ComfyUI), its `alpha`, a PEFT `lora_B.bias`, or a full-weight `diff`/`diff_b`
  (LightX2V);
- the prefix (`PREFIXES`) says how the path is spelled: dotted (`diffusion_model.`, `transformer.`, none) or
  kohya's underscores (`lora_unet_`);
- the path is an official module name (`blocks.3.self_attn.q`) or its diffusers `WanTransformer3DModel` name
  (`blocks.3.attn1.to_q`, table `DIFFUSERS_NAMES`), looked up in the alias table built from the model itself.
Wan2.1 LoRAs use the official names too, so they load onto a Wan2.2 expert of the same size unchanged; keys for
Wan2.1's image cross-attention (`k_img`, `v_img`, `img_emb`), which Wan2.2 experts do not have, are refused
unless the caller asks to skip them. Any other key that maps to nothing is refused with the list of such keys.

A LoRA (B up (O, r), A down (r, I), alpha) adds `scale * alpha / r * B @ A` to the weight (alpha absent: alpha/r
= 1, as diffusers assumes); conv targets flatten the kernel axes into I. `merge` adds the delta in fp32 and
rounds once into the weight's dtype, keeping a reference to the original tensor so `remove()` restores it bit
for bit. 8-bit layers (`Int8Linear`, `Fp8Linear`) have no float weight to merge into, so their low-rank terms run
beside the layer as a forward hook adding `scale * alpha / r * (x A^T) B^T` (mode "runtime"; "auto" picks it for them).

In a pipeline the experts load lazily and may be dropped and reloaded (`ExpertPool` policy "free"), so a
`LoraStack` is the pool's `transform`: it applies the current LoRAs to every freshly loaded expert. Loading or
unloading a LoRA drops the affected experts; they reload from their files on next use, which is exact and keeps
no second copy of the weights.

Axis legend: O output features, I input features (times kernel size for convolutions), r rank, L tokens.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SUFFIXES", "PREFIXES", "DIFFUSERS_NAMES", "MODES", "Target", "Delta", "LoRA", "Applied",
           "model_targets", "alias_table", "resolve_key", "read_lora", "check_lora_file", "apply_lora", "save_lora",
           "structure_of", "check_path"]

log = logging.getLogger(__name__)

# Key suffix -> role of the tensor. Checked in order, so a longer suffix wins over its tail.
SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),  # PEFT, adapter name not stripped
    (".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_B.bias", "up_bias"),  # diffusers / PEFT
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),  # kohya, ComfyUI, musubi-tuner, LightX2V
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),  # older diffusers attention processors
    (".alpha", "alpha"), (".diff_b", "diff_b"), (".diff", "diff"),  # full-weight deltas (LightX2V)
)
# Key prefix -> how the module path after it is spelled ("." dotted, "_" kohya underscores). Longest first.
PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.diffusion_model.", "."), ("diffusion_model.", "."), ("base_model.model.", "."), ("transformer.", "."),
    ("lora_transformer_", "_"), ("lora_unet_", "_"), ("", "."),
)
# Official name -> diffusers WanTransformer3DModel name; "blocks.N." is kept in front of block-level names.
# diffusers swaps two norms: its norm2 is the official cross-attention norm3 (affine) and vice versa.
DIFFUSERS_NAMES: dict[str, str] = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0", "self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0", "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2", "norm3": "norm2", "modulation": "scale_shift_table",
    # top level
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out", "head.modulation": "scale_shift_table",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
# Wan2.1 I2V's image branch (CLIP image cross-attention), absent from every Wan2.2 expert.
WAN21_IMAGE = re.compile(r"(^|[._])(k_img|v_img|norm_k_img|img_emb|add_k_proj|add_v_proj|norm_added_k|image_embedder)"
                         r"([._]|$)")
MODES = ("auto", "merge", "runtime")
LOWRANK = ("down", "up", "alpha", "up_bias")


@dataclass(frozen=True)
class Target:
    """A place a LoRA can write: a module's weight (and bias), or a bare parameter (`blocks.0.modulation`)."""

    path: str  # official module (or parameter) name
    weight: str  # parameter name of the weight
    shape: tuple[int, ...]
    bias: str | None = None
    bias_shape: tuple[int, ...] | None = None

    @property
    def lowrank(self) -> bool:
        """A matrix (Linear) or a kernel (Conv): something B @ A can be added to."""
        return self.weight.endswith(".weight") and len(self.shape) >= 2


def model_targets(model: nn.Module) -> dict[str, Target]:
    """Every writable place of a float model (built on meta is enough), by official path; int8 layers count as
    the Linear they replace."""
    from wanmoe.memory.quantize import QuantLinear

    out: dict[str, Target] = {}
    for name, mod in model.named_modules():
        pre = f"{name}." if name else ""
        own = dict(mod.named_parameters(recurse=False))
        if isinstance(mod, QuantLinear):
            own = {"weight": torch.empty(mod.out_features, mod.in_features, device="meta"), **own}
        w, b = own.pop("weight", None), own.pop("bias", None)
        if w is not None:
            out[name] = Target(name, pre + "weight", tuple(w.shape), None if b is None else pre + "bias",
                               None if b is None else tuple(b.shape))
        for pname, p in own.items():  # bare parameters: only a full-weight diff applies
            out[pre + pname] = Target(pre + pname, pre + pname, tuple(p.shape))
    return out


def _diffusers_name(path: str) -> str | None:
    m = _BLOCK.match(path)
    if m:
        rest = DIFFUSERS_NAMES.get(m.group(2))
        return None if rest is None else f"blocks.{m.group(1)}.{rest}"
    return DIFFUSERS_NAMES.get(path)


def alias_table(targets: Iterable[str]) -> dict[str, dict[str, str]]:
    """{"." : dotted alias -> official path, "_": kohya underscored alias -> official path}, from the model's own
    paths and their diffusers names. An underscored alias two paths share is ambiguous and left out."""
    dotted: dict[str, str] = {}
    under: dict[str, str | None] = {}
    for path in targets:
        for alias in {path, _diffusers_name(path) or path}:
            dotted.setdefault(alias, path)
            u = alias.replace(".", "_")
            under[u] = path if under.get(u, path) == path else None
    return {".": dotted, "_": {k: v for k, v in under.items() if v is not None}}


def resolve_key(key: str, aliases: Mapping[str, Mapping[str, str]]) -> tuple[str, str] | None:
    """A LoRA file's key -> (official path, role), or None when it maps to nothing. The one mapping function."""
    split = next(((key[: -len(sfx)], role) for sfx, role in SUFFIXES if key.endswith(sfx)), None)
    if split is None:
        return None
    stem, role = split
    for prefix, style in PREFIXES:
        if stem.startswith(prefix):
            path = aliases[style].get(stem[len(prefix):])
            if path is not None:
                return path, role
    return None


@dataclass
class Delta:
    """The tensors a LoRA holds for one target (fp32, on the CPU); every field optional, checked together."""

    down: Tensor | None = None  # (r, I, *kernel)
    up: Tensor | None = None  # (O, r, *1)
    alpha: float | None = None
    up_bias: Tensor | None = None  # (O,) PEFT lora_B bias: scaled like the low-rank product
    diff: Tensor | None = None  # full weight delta, the weight's shape
    diff_b: Tensor | None = None  # full bias delta (O,)

    @property
    def factor(self) -> float:
        """alpha / rank (kohya, ComfyUI); 1 without an alpha (diffusers' default lora_alpha = rank)."""
        return 1.0 if self.alpha is None or self.down is None else self.alpha / self.down.shape[0]

    def problems(self, t: Target) -> list[str]:
        out = []
        if (self.down is None) != (self.up is None):
            out.append(f"{t.path}: has {'lora_down/lora_A' if self.up is None else 'lora_up/lora_B'} without its pair")
        if self.down is None and (self.alpha is not None or self.up_bias is not None):
            out.append(f"{t.path}: alpha or lora_B.bias without a low-rank pair")
        if self.down is not None and self.up is not None:
            r, o, i = self.down.shape[0], t.shape[0], math.prod(t.shape[1:])
            if not t.lowrank:
                out.append(f"{t.path}: a low-rank pair on a parameter of shape {list(t.shape)} (not a matrix)")
            elif self.up.flatten(1).shape != (o, r) or self.down.flatten(1).shape != (r, i):
                out.append(f"{t.path}: lora_up {list(self.up.shape)} @ lora_down {list(self.down.shape)} does not "
                           f"make the weight's shape {list(t.shape)}")
        if self.diff is not None and tuple(self.diff.shape) != t.shape:
            out.append(f"{t.path}: diff of shape {list(self.diff.shape)}, the weight is {list(t.shape)}")
        for name, b in (("diff_b", self.diff_b), ("lora_B.bias", self.up_bias)):
            if b is not None and (t.bias is None or tuple(b.shape) != t.bias_shape):
                has = "no bias" if t.bias is None else f"a bias of shape {list(t.bias_shape or ())}"
                out.append(f"{t.path}: {name} of shape {list(b.shape)}, the layer has {has}")
        return out

    def weight_delta(self, shape: Sequence[int], device: torch.device) -> Tensor | None:
        """The fp32 weight delta at user scale 1: factor * B @ A (+ diff)."""
        d = None
        if self.down is not None and self.up is not None:
            up, down = self.up.to(device).flatten(1), self.down.to(device).flatten(1)  # (O, r), (r, I)
            d = (up @ down).mul_(self.factor).reshape(shape)  # (O, I, *kernel)
        if self.diff is not None:
            d = self.diff.to(device) if d is None else d + self.diff.to(device)
        return d

    def bias_delta(self, device: torch.device) -> Tensor | None:
        d = None if self.up_bias is None else self.up_bias.to(device) * self.factor
        if self.diff_b is not None:
            d = self.diff_b.to(device) if d is None else d + self.diff_b.to(device)
        return d


@dataclass
class LoRA:
    """A LoRA file mapped onto official paths: target path -> Delta. `skipped` lists keys refused-but-skipped."""

    source: str
    deltas: dict[str, Delta]
    skipped: list[str] = field(default_factory=list)


def _header(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def check_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.suffix.lower() != ".safetensors":
        raise ValueError(f"{p}: LoRAs are read from .safetensors files only (pickled .pt/.ckpt/.bin files can run "
                         "code when loaded and are refused)")
    if not p.is_file():
        raise ValueError(f"{p}: no such file")
    return p


def _plan(keys: Iterable[str], targets: Mapping[str, Target], *, skip_wan21_image: bool,
          source: str) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """Map every key of a file onto (path, role), or refuse the file listing every key that maps to nothing."""
    aliases = alias_table(targets)
    plan: dict[str, tuple[str, str]] = {}
    unknown, image, twice = [], [], []
    seen: dict[tuple[str, str], str] = {}
    for k in sorted(keys):
        hit = resolve_key(k, aliases)
        if hit is None:
            (image if WAN21_IMAGE.search(k) else unknown).append(k)
        elif hit in seen:
            twice.append(f"{k} and {seen[hit]} (both {hit[1]} of {hit[0]})")
        else:
            plan[k], seen[hit] = hit, k
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} key(s) map to no parameter of this model: " + _few(unknown))
    if twice:
        problems.append(f"{len(twice)} key(s) name the same tensor twice: " + _few(twice))
    if image and not skip_wan21_image:
        problems.append(f"{len(image)} key(s) adapt Wan2.1's image cross-attention (k_img, v_img, img_emb), which "
                        "Wan2.2 experts do not have; load with skip_wan21_image=True to apply the rest: " + _few(image))
    if problems:
        raise ValueError(f"{source}: cannot load this LoRA: " + "; ".join(problems))
    return plan, image


def _few(items: Sequence[str], n: int = 12) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def structure_of(model_or_cfg: nn.Module | object) -> nn.Module:
    if isinstance(model_or_cfg, nn.Module):
        return model_or_cfg
    from wanmoe.models.dit import DiT

    with torch.device("meta"):
        return DiT(model_or_cfg)  # type: ignore[arg-type]


def _mapped(path: str | os.PathLike, structure: nn.Module, skip_wan21_image: bool):  # noqa: ANN202
    """Header-only: (the file, its targets, key -> (path, role), skipped Wan2.1 image keys); raises on problems."""
    p = check_path(path)
    targets = model_targets(structure)
    shapes = _header(p)
    plan, image = _plan(shapes, targets, skip_wan21_image=skip_wan21_image, source=str(p))
    _validate(_assemble(plan, {k: torch.empty(s, device="meta") for k, s in shapes.items()}), targets, str(p))
    return p, targets, plan, image


def check_lora_file(path: str | os.PathLike, model_or_cfg: nn.Module | object, *,
                    skip_wan21_image: bool = False) -> list[str]:
    """Header-only check (no tensor is read) that a file loads onto this model: every key maps to a target and
    every shape fits. Returns the Wan2.1 image keys that would be skipped; raises ValueError listing problems."""
    return _mapped(path, structure_of(model_or_cfg), skip_wan21_image)[3]


def _assemble(plan: Mapping[str, tuple[str, str]], tensors: Mapping[str, Tensor]) -> dict[str, Delta]:
    deltas: dict[str, Delta] = {}
    for key, (path, role) in plan.items():
        d = deltas.setdefault(path, Delta())
        t = tensors[key]
        if role == "alpha":
            d.alpha = float(t.float().item()) if not t.is_meta else 1.0
        else:
            setattr(d, role, t if t.is_meta else t.float())
    return deltas


def _validate(deltas: Mapping[str, Delta], targets: Mapping[str, Target], source: str) -> None:
    problems = [p for path, d in deltas.items() for p in d.problems(targets[path])]
    if problems:
        raise ValueError(f"{source}: the LoRA does not fit this model ({len(problems)} problem(s)): "
                         + "; ".join(problems[:20]) + (f"; ... ({len(problems) - 20} more)" if len(problems) > 20
                                                       else ""))


def read_lora(path: str | os.PathLike, model_or_cfg: nn.Module | object, *, skip_wan21_image: bool = False) -> LoRA:
    """Read a LoRA (safetensors only: `safetensors.torch.load_file`, never pickle) onto a model's official paths.

    `model_or_cfg` is the expert (any device, float or int8) or its `DiTConfig`. Keys are checked against the
    header before any tensor is read; ValueError lists every key that maps to nothing and every wrong shape.
    """
    from safetensors.torch import load_file

    p, _, plan, image = _mapped(path, structure_of(model_or_cfg), skip_wan21_image)
    tensors = load_file(str(p), device="cpu")
    bad = [k for k in plan if not torch.isfinite(tensors[k].float()).all()]
    if bad:
        raise ValueError(f"{p}: non-finite values (NaN/inf) in {_few(bad)}")
    if image:
        log.warning("%s: skipped %d key(s) of Wan2.1's image cross-attention: %s", p, len(image), _few(image, 4))
    return LoRA(str(p), _assemble(plan, tensors), image)


# ------------------------------------------------------------------------------------------- applying


class Applied:
    """What `apply_lora` changed on one model; `remove()` undoes it (originals restored bit for bit).

    Merges on the same parameters must be removed in reverse order of application (a stack).
    """

    def __init__(self) -> None:
        self._restore: list[tuple[nn.Parameter, Tensor | None, Tensor]] = []  # (param, original, merged)
        self._hooks: list[tuple[nn.Module, object, tuple[str, ...]]] = []

    def remove(self) -> None:
        for p, orig, merged in reversed(self._restore):
            if orig is None:
                raise ValueError("this LoRA was merged without keep_original; reload the model to remove it")
            if p.data_ptr() != merged.data_ptr():
                raise ValueError("a parameter changed after this LoRA was merged: remove LoRAs in reverse order")
            p.data = orig
        for mod, handle, names in self._hooks:
            handle.remove()  # type: ignore[attr-defined]
            for n in names:
                delattr(mod, n)
        self._restore, self._hooks = [], []


def _merge(p: nn.Parameter, delta: Tensor, scale: float, keep: bool, applied: Applied) -> None:
    # Sum in fp32, round once into the stored dtype; swap the tensor (a memory-mapped original is never written).
    merged = (p.detach().float() + delta.to(p.device) * scale).to(p.dtype)
    applied._restore.append((p, p.data if keep else None, merged))
    p.data = merged


def _runtime_hook(mod: nn.Module, d: Delta, scale: float, applied: Applied) -> None:
    """x -> layer(x) + scale * factor * (x A^T) B^T (+ x diff^T): the LoRA beside an int8 (or any) Linear.

    The factors live on the module as non-persistent buffers so they follow it between devices (offload)."""
    n = 0
    while hasattr(mod, f"lora_{n}_a"):  # one set of buffers per LoRA on this layer
        n += 1
    names = (f"lora_{n}_a", f"lora_{n}_b", f"lora_{n}_diff")
    a = None if d.down is None else d.down.flatten(1).to(_device(mod))  # (r, I)
    b = None if d.up is None else (d.up.flatten(1) * (scale * d.factor)).to(_device(mod))  # (O, r)
    diff = None if d.diff is None else (d.diff * scale).to(_device(mod))  # (O, I)
    for name, t in zip(names, (a, b, diff)):
        mod.register_buffer(name, t, persistent=False)

    def hook(m: nn.Module, args: tuple, out: Tensor) -> Tensor:
        x = args[0]  # (..., L, I) in the compute dtype; the factors are cast to it (r is small)
        a, b, diff = (getattr(m, k) for k in names)
        if a is not None:
            out = out + F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype)).to(out.dtype)  # (..., L, O)
        if diff is not None:
            out = out + F.linear(x, diff.to(x.dtype)).to(out.dtype)
        return out

    applied._hooks.append((mod, mod.register_forward_hook(hook), names))


def _device(mod: nn.Module) -> torch.device:
    for t in (*mod.parameters(), *mod.buffers()):
        return t.device
    return torch.device("cpu")


def apply_lora(model: nn.Module, lora: LoRA, scale: float = 1.0, *, mode: str = "auto",
               keep_original: bool = True) -> Applied:
    """Add `scale` x the LoRA to `model` (an expert DiT); returns the handle that removes it.

    mode "merge" writes every delta into the weights (float layers only); "runtime" runs the low-rank and
    full-weight deltas of the Linears the model calls through `forward` as hooks (the fp32 modules of the
    numerics policy call their weights directly, so they, biases, norms and convolutions are merged); "auto"
    merges float layers and runs int8 ones beside. keep_original=False frees the original tensors (then only
    reloading the model removes the LoRA).
    """
    from wanmoe.memory.quantize import QuantLinear
    from wanmoe.numerics import fp32_predicate

    if mode not in MODES:
        raise ValueError(f"unknown LoRA mode {mode!r}; choose one of {MODES}")
    if not math.isfinite(scale):
        raise ValueError(f"LoRA scale must be finite, got {scale}")
    targets = model_targets(model)
    missing = sorted(set(lora.deltas) - set(targets))
    if missing:
        raise ValueError(f"{lora.source}: {len(missing)} target(s) are not in this model: {_few(missing)}")
    _validate(lora.deltas, targets, lora.source)
    fp32 = fp32_predicate(model)
    applied = Applied()
    with torch.no_grad():
        for path, d in lora.deltas.items():
            t = targets[path]
            mod = model.get_submodule(path) if t.weight == f"{path}.weight" else None
            quant = isinstance(mod, QuantLinear)
            beside = quant or (mode == "runtime" and isinstance(mod, nn.Linear) and not fp32(path))
            if quant and mode == "merge":
                raise ValueError(f"{path} is {mod.mode}: its LoRA runs beside it (mode 'auto' or 'runtime'), "
                                 "not merged")
            if beside and (d.down is not None or d.diff is not None):
                _runtime_hook(mod, d, scale, applied)  # type: ignore[arg-type]
            elif not beside:
                dw = d.weight_delta(t.shape, _device(model))
                if dw is not None:
                    _merge(model.get_parameter(t.weight), dw, scale, keep_original, applied)
            db = d.bias_delta(_device(model))
            if db is not None:
                _merge(model.get_parameter(t.bias), db, scale, keep_original, applied)  # type: ignore[arg-type]
    return applied


def save_lora(path: str | os.PathLike, factors: Mapping[str, tuple[Tensor, Tensor]], *, alpha: float | None = None,
              metadata: Mapping[str, str] | None = None) -> Path:
    """Write {official path: (down (r, I), up (O, r))} in the ComfyUI/kohya layout Wan users share:
    `diffusion_model.<path>.lora_down.weight`, `.lora_up.weight` and `.alpha` (alpha None: the rank, factor 1)."""
    from safetensors.torch import save_file

    sd: dict[str, Tensor] = {}
    for p, (down, up) in factors.items():
        key = f"diffusion_model.{p}"
        sd[f"{key}.lora_down.weight"] = down.detach().float().contiguous().cpu()
        sd[f"{key}.lora_up.weight"] = up.detach().float().contiguous().cpu()
        sd[f"{key}.alpha"] = torch.tensor(float(down.shape[0] if alpha is None else alpha))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp), metadata=dict(metadata or {}))
    os.replace(tmp, path)
    return path
