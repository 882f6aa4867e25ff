"""The import graph of the package, read with `ast` (imports inside functions included): no cycle anywhere, and
the layers the architecture asks for (the pipeline imports neither the CLI nor the loader; nothing below the CLI parses
arguments)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "wanmoe"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PKG.rglob("*.py")}


def _resolve(target: str) -> str | None:
    """The module a dotted import names: itself if it is one of ours, else its nearest package of ours."""
    while target:
        if target in MODULES:
            return target
        target = target.rpartition(".")[0]
    return None


def imports_of(name: str) -> set[str]:
    path = MODULES[name]
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            # `from pkg import mod` imports the module pkg.mod when there is one.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for t in targets:
            r = _resolve(t) if t.startswith("wanmoe") else None
            if r is not None and r != name:
                out.add(r)
    return out


GRAPH = {m: imports_of(m) for m in MODULES}


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for m in sorted(GRAPH):
        if m not in index:
            visit(m)
    return out


def test_graph_is_read():
    assert len(MODULES) > 30
    assert "wanmoe.pipeline" in GRAPH["wanmoe.api"] and "wanmoe.loading" in GRAPH["wanmoe.api"]
    assert "wanmoe.api" in GRAPH["wanmoe.cli"]


def test_no_import_cycle():
    assert _cycles() == []


def test_a_cycle_would_be_found():
    GRAPH["wanmoe.configs"].add("wanmoe.cli")  # cli -> ... -> configs; this edge closes a loop
    try:
        assert _cycles()
    finally:
        GRAPH["wanmoe.configs"].discard("wanmoe.cli")


def test_layers():
    assert not GRAPH["wanmoe.pipeline"] & {"wanmoe.cli", "wanmoe.loading", "wanmoe.api", "wanmoe.media"}
    for m in ("wanmoe.models.dit", "wanmoe.models.s2v", "wanmoe.models.vae", "wanmoe.sampling.solvers"):
        assert not {d for d in GRAPH[m] if d.startswith(("wanmoe.memory", "wanmoe.distributed", "wanmoe.cli"))}, m
    for m in ("wanmoe.api", "wanmoe.pipeline", "wanmoe.request", "wanmoe.inputs", "wanmoe.loading",
              "wanmoe.configs", "wanmoe.experts"):
        tree = ast.parse(MODULES[m].read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert "argparse" not in names, f"{m} imports argparse: only command-line modules parse arguments"
