"""LoRAs on a pipeline's experts: the `--lora PATH[:SCALE][@EXPERT]` spec (`parse_spec`, `check_spec`) and the
`LoraStack` the expert pool re-applies after every (re)load. Reading, mapping and applying one LoRA file is
`wanmoe.lora`; docs/lora.md has the whole picture.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from wanmoe.lora import MODES, LoRA, apply_lora, check_lora_file, check_path, read_lora, structure_of

__all__ = ["LoraSpec", "parse_spec", "check_spec", "LoraStack"]


@dataclass(frozen=True)
class LoraSpec:
    """One `--lora PATH[:SCALE][@EXPERT[,EXPERT]]`: experts None means all of them."""

    path: str
    scale: float = 1.0
    experts: tuple[str, ...] | None = None


def parse_spec(spec: str, experts: Sequence[str]) -> LoraSpec:
    """`PATH[:SCALE][@EXPERT]` -> LoraSpec, the file checked to exist; ValueError says what is wrong.

    `@` and `:` are read from the right, and only when what follows them is an expert list / a number, so a path
    with either character in it still works (`C:/loras/x.safetensors`)."""
    from wanmoe.request import InputError

    rest, names = spec, None
    head, at, tail = spec.rpartition("@")
    if at and head and tail and not re.search(r"[/\\]|\.safetensors$", tail):
        rest, names = head, tuple(n.strip() for n in tail.split(","))
        bad = [n for n in names if n not in experts]
        if bad:
            raise InputError("lora", f"{spec!r}: expert {', '.join(bad)} is not one of this task's experts "
                                     f"({', '.join(experts)})")
    scale = 1.0
    head, colon, tail = rest.rpartition(":")
    if colon and head and not re.search(r"[/\\]|\.safetensors$", tail):
        try:
            scale = float(tail)
        except ValueError:
            raise InputError("lora", f"{spec!r}: scale {tail!r} is not a number (PATH[:SCALE][@EXPERT])") from None
        rest = head
    if not math.isfinite(scale) or abs(scale) > 100:
        raise InputError("lora", f"{spec!r}: scale must be a finite number in [-100, 100], got {scale}")
    try:
        check_path(rest)
    except ValueError as e:
        raise InputError("lora", str(e)) from None
    return LoraSpec(rest, scale, names)


@dataclass
class _Entry:
    lora: LoRA
    scales: dict[str, float]
    mode: str


class LoraStack:
    """The LoRAs of a pipeline's experts, applied by the `ExpertPool` to each expert after every (re)load.

    Install with `pool.transform = stack`; `load`/`unload` drop the experts they change from the pool (waiting for
    a background load), so the next use reloads them from their files with the current LoRAs applied.
    """

    def __init__(self, pool: object, structure: nn.Module | object) -> None:
        self.pool, self.structure = pool, structure_of(structure)
        self.entries: list[_Entry] = []

    def __call__(self, name: str, model: nn.Module) -> nn.Module:
        for e in self.entries:
            if name in e.scales:
                apply_lora(model, e.lora, e.scales[name], mode=e.mode, keep_original=False)
        return model

    def load(self, path: str | os.PathLike, scale: float | Mapping[str, float] = 1.0,
             experts: str | Sequence[str] | None = None, *, mode: str = "auto", skip_wan21_image: bool = False) -> None:
        from wanmoe.request import InputError

        names: tuple[str, ...] = tuple(self.pool.names)  # type: ignore[attr-defined]
        chosen = names if experts is None else (experts,) if isinstance(experts, str) else tuple(experts)
        bad = [n for n in chosen if n not in names]
        if bad or not chosen:
            raise InputError("lora", f"experts {list(chosen)}: choose among {', '.join(names)} (None: all)")
        scales = {n: float(scale[n] if isinstance(scale, Mapping) else scale) for n in chosen
                  if not isinstance(scale, Mapping) or n in scale}
        if isinstance(scale, Mapping) and set(scale) - set(chosen):
            raise InputError("lora", f"scale given for {sorted(set(scale) - set(chosen))}, not among {list(chosen)}")
        if any(not math.isfinite(s) for s in scales.values()):
            raise InputError("lora", f"scale must be finite, got {scales}")
        if mode not in MODES:
            raise InputError("lora", f"mode {mode!r}: choose one of {MODES}")
        try:
            lora = read_lora(path, self.structure, skip_wan21_image=skip_wan21_image)
        except ValueError as e:
            raise InputError("lora", str(e)) from None
        self.entries.append(_Entry(lora, scales, mode))
        self._reload(scales)

    def unload(self, path: str | os.PathLike | None = None) -> None:
        """Remove one LoRA (every entry of that file) or all of them; the experts they touched reload exactly."""
        from wanmoe.request import InputError

        gone = [e for e in self.entries if path is None or Path(e.lora.source).resolve() == Path(path).resolve()]
        if path is not None and not gone:
            raise InputError("lora", f"{path} is not loaded; loaded: {[e.lora.source for e in self.entries]}")
        self.entries = [e for e in self.entries if e not in gone]
        self._reload({n for e in gone for n in e.scales})

    def _reload(self, names: Iterable[str]) -> None:
        for n in set(names):
            self.pool.release(n)  # type: ignore[attr-defined]

    def describe(self) -> list[dict]:
        """For the sidecar: each LoRA's file, per-expert scale and mode, in the order applied."""
        return [{"path": e.lora.source, "scale": dict(e.scales), "mode": e.mode} for e in self.entries]



def check_spec(spec: str, experts: Sequence[str], dit_cfg: object) -> LoraSpec:
    """`parse_spec`, then the file's keys and shapes against the task's DiT (header only): what the command line
    checks before any weights load. Raises InputError("lora", ...)."""
    from wanmoe.request import InputError

    s = parse_spec(spec, experts)
    try:
        check_lora_file(s.path, dit_cfg)
    except ValueError as e:
        raise InputError("lora", str(e)) from None
    return s
