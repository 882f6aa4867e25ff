"""Checksum lists in a checkpoint folder: `md5sum.txt`, `*.md5`, `sha256sum.txt`, `*.sha256`.

Lines are `<hex>  <relative path>` (GNU `md5sum`/`sha256sum`), `MD5 (path) = <hex>` (BSD tags), or a lone digest
in `<file>.md5`. Every listed file is hashed in full, streamed in chunks; a file listed twice is hashed once.
Paths that leave the folder are refused. Problems and checked lines go to the caller's sink (`wanmoe.verify`).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Protocol

__all__ = ["Sink", "check_checksums", "walk_files"]

CHUNK = 8 << 20  # bytes hashed per read


class Sink(Protocol):
    """Where findings go: the folder checked, paths shown relative to it, problem lines and checked lines."""

    root: Path
    checked: list[str]

    def rel(self, path: Path) -> str: ...

    def problem(self, path: Path, msg: str) -> None: ...


def walk_files(root: Path) -> Iterator[Path]:
    """Files under root, sorted, not descending into hidden folders (`.cache/`) or symlinked folders."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            yield Path(dirpath) / name


def _list_algo(path: Path) -> str | None:
    n = path.name.lower()
    if n in ("md5sum.txt", "md5sums.txt") or n.endswith(".md5"):
        return "md5"
    if n in ("sha256sum.txt", "sha256sums.txt") or n.endswith(".sha256"):
        return "sha256"
    return None


_GNU = re.compile(r"^([0-9a-fA-F]+) [ *](.+)$")  # `md5sum` / `sha256sum` output
_BSD = re.compile(r"^(MD5|SHA256) ?\((.+)\) ?= ?([0-9a-fA-F]+)$", re.IGNORECASE)  # `md5 -r` / `shasum --tag`
_HEX_LEN = {"md5": 32, "sha256": 64}


def _parse_list(c: Sink, lst: Path, algo: str) -> list[tuple[str, str]]:
    """(hex digest, path relative to the list's folder) per line; malformed lines become problems."""
    try:
        lines = lst.read_bytes().decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        c.problem(lst, f"cannot read the checksum list ({e})")
        return []
    out = []
    for i, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m, b = _GNU.match(line), _BSD.match(line)
        if m:
            digest, name = m.group(1), m.group(2)
        elif b:
            digest, name = b.group(3), b.group(2)
        elif re.fullmatch(r"[0-9a-fA-F]+", line) and lst.suffix.lower() in (".md5", ".sha256"):
            digest, name = line, lst.stem  # `model.safetensors.md5` holding only the digest
        else:
            c.problem(lst, f"line {i} is not `<{algo} hex>  <relative path>`: {line[:60]!r}")
            continue
        if len(digest) != _HEX_LEN[algo]:
            c.problem(lst, f"line {i}: an {algo} digest has {_HEX_LEN[algo]} hex digits, got {len(digest)}")
            continue
        out.append((digest.lower(), name))
    return out


def _digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo, usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_checksums(c: Sink, cheap: bool) -> None:
    lists = [(p, a) for p in walk_files(c.root) if (a := _list_algo(p))]
    if not lists:
        c.checked.append("no checksum list (md5sum.txt, *.md5, sha256sum.txt, *.sha256) in the folder")
        return
    if cheap:
        c.checked.append("checksum lists not verified (cheap): " + ", ".join(c.rel(p) for p, _ in lists))
        return
    done: dict[tuple[str, Path], str] = {}
    for lst, algo in lists:
        entries, good = _parse_list(c, lst, algo), 0
        for want, name in entries:
            rel = PurePosixPath(name.replace("\\", "/"))
            if rel.is_absolute() or ".." in rel.parts:
                c.problem(lst, f"lists {name}, a path outside the checkpoint folder (refused)")
                continue
            target = lst.parent / rel
            if not target.is_file():
                c.problem(target, f"listed in {c.rel(lst)} but missing")
                continue
            try:
                got = done.get((algo, target)) or done.setdefault((algo, target), _digest(target, algo))
            except OSError as e:
                c.problem(target, f"cannot read to hash it: {e.strerror or e}")
                continue
            if got != want:
                c.problem(target, f"{algo} {got} differs from {want} in {c.rel(lst)}: corrupt or incomplete download")
            else:
                good += 1
        c.checked.append(f"{c.rel(lst)}: {good} of {len(entries)} files match their {algo}")
