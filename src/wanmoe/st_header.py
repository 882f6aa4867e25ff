"""A safetensors header read and checked without the tensor data: the 8-byte little-endian length, the JSON after
it, every entry's dtype, shape and data offsets, and that the tensors tile the data section exactly. Problems are
listed (at most MAX_LISTED_PROBLEMS per file, then a count), never raised: `wanmoe verify` reports them all.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DTYPE_BITS", "TensorEntry", "Header", "read_safetensors_header", "is_int", "plural", "short_json"]

# Bits per element of every dtype the safetensors format names (F4 and the F6 types are packed sub-byte types).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
    "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own bound on the JSON header
MAX_LISTED_PROBLEMS = 8  # per file: a header with 1000 bad entries gets 8 lines and a count



@dataclass(frozen=True)
class TensorEntry:
    dtype: object  # the header's value, a DTYPE_BITS key when valid
    shape: tuple[int, ...] | None  # None when the header's shape is malformed
    offsets: tuple[int, int] | None  # (begin, end) in the data section; None when malformed

    @property
    def nbytes(self) -> int:
        return self.offsets[1] - self.offsets[0] if self.offsets else 0


@dataclass
class Header:
    """One parsed safetensors header. `parsed`: the JSON was read, so `tensors` names every key of the file."""

    tensors: dict[str, TensorEntry] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    parsed: bool = False

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def short_json(v: object, n: int = 60) -> str:
    s = json.dumps(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def read_safetensors_header(path: Path) -> Header:
    """Parse and check a safetensors header without reading tensor data; problems are listed, never raised."""
    h = Header()
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                h.problems.append(f"truncated: {size} bytes, shorter than the 8-byte header length")
                return h
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_BYTES:
                h.problems.append(f"header length {n} exceeds {MAX_HEADER_BYTES} bytes: not a safetensors file")
                return h
            if 8 + n > size:
                h.problems.append(f"header length {n} runs past the end of the file ({size} bytes): truncated or "
                                  "not a safetensors file")
                return h
            text = f.read(n)
    except OSError as e:
        h.problems.append(f"cannot read: {e.strerror or e}")
        return h
    try:
        raw = json.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        h.problems.append("header is not UTF-8 text: not a safetensors file, or a corrupt one")
        return h
    except (json.JSONDecodeError, RecursionError) as e:
        h.problems.append(f"header is not valid JSON ({str(e)[:80]}): corrupt file")
        return h
    if not isinstance(raw, dict):
        h.problems.append(f"header must be a JSON object, got {type(raw).__name__}")
        return h
    meta = raw.pop("__metadata__", {})
    if isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values()):
        h.metadata = meta
    else:
        h.problems.append("__metadata__ must map strings to strings")
    h.parsed = True
    bad = []
    for name, info in raw.items():
        entry, why = _tensor_entry(info)
        h.tensors[name] = entry
        if why:
            bad.append(f"tensor {name}: {why}")
    _check_offsets(h, size - 8 - n, bad)
    h.problems += bad[:MAX_LISTED_PROBLEMS]
    if len(bad) > MAX_LISTED_PROBLEMS:
        h.problems.append(f"... and {len(bad) - MAX_LISTED_PROBLEMS} more malformed header entries")
    return h


def _tensor_entry(info: object) -> tuple[TensorEntry, str | None]:
    if not isinstance(info, dict):
        return TensorEntry(None, None, None), "entry must be an object with dtype, shape and data_offsets"
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    shape_ok = isinstance(shape, list) and all(is_int(d) and d >= 0 for d in shape)
    offsets_ok = (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) and o >= 0 for o in offsets)
                  and offsets[0] <= offsets[1])
    entry = TensorEntry(dtype, tuple(shape) if shape_ok else None, tuple(offsets) if offsets_ok else None)
    if dtype not in DTYPE_BITS:
        return entry, f"unknown dtype {short_json(dtype)} (known: {', '.join(DTYPE_BITS)})"
    if not shape_ok:
        return entry, f"shape {short_json(shape)} is not a list of non-negative integers"
    if not offsets_ok:
        return entry, f"data_offsets {short_json(offsets)} is not a [begin, end] pair of integers with begin <= end"
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits != 8 * entry.nbytes:
        return entry, f"data_offsets span {entry.nbytes} bytes but {dtype} {list(shape)} needs {bits / 8:g}"
    return entry, None


def _check_offsets(h: Header, data_len: int, bad: list[str]) -> None:
    """Tensors must tile the data section exactly, as the safetensors library requires."""
    spans = sorted((e.offsets, k) for k, e in h.tensors.items() if e.offsets is not None)
    need = max((end for (_, end), _ in spans), default=0)
    if need > data_len:
        h.problems.append(f"truncated: the header describes {need} bytes of tensor data, the file holds {data_len}")
        return  # every later offset check would only repeat this
    if need < data_len:
        h.problems.append(f"{data_len - need} bytes after the last tensor (the safetensors library refuses this)")
    prev_end, prev = 0, None
    for (begin, end), name in spans:
        if begin < prev_end:
            bad.append(f"tensor {name}: data overlaps tensor {prev}")
        elif begin > prev_end:
            bad.append(f"tensor {name}: {begin - prev_end} bytes of gap before it (tensors must be contiguous)")
        if end >= prev_end:
            prev_end, prev = end, name
