"""The docs speak of this repository alone: every file they point at is in it.

Scans README.md and docs/**/*.md for relative markdown links and for path-like words (inline code and prose):
anything with a `/` or ending in a repository file extension. A markdown link must resolve from the page's
folder, as a renderer resolves it. Any other path must name a file or folder of the repository: from the root,
from the page's folder, or as the tail of a repository path (`models/s2v.py` is `src/wanmoe/models/s2v.py`); a
bare file name must be the name of some repository file. User paths in command examples (`./Wan2.2-T2V-A14B`,
`~/...`, `$VAR/...`, absolute paths, `<placeholder>/...`, globs) are not repository files and are skipped.
"""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])

# Extensions that mark a word as a repository file name.
EXTENSIONS = (".md", ".py", ".sh", ".json", ".png", ".safetensors", ".toml", ".txt", ".yaml", ".yml")
# Folders that are not part of the repository (.gitignore): build outputs, caches, the virtual environment.
IGNORED_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "build", "runs", "out"}

# Names the docs use for files that live in a user's checkpoint folder or machine, never in this repository.
ALLOWED = {
    # official checkpoint layout (docs/api.md, wanmoe.layouts.TASK_LAYOUTS): the index of a sharded DiT,
    # the shard-name pattern, the checksum lists of a download and the Hugging Face cache folder.
    "diffusion_pytorch_model.safetensors.index.json": "index file of a sharded official DiT checkpoint",
    "diffusion_pytorch_model-0000i-of-0000n.safetensors": "shard-name pattern of an official DiT checkpoint",
    "md5sum.txt": "checksum list shipped with a downloaded checkpoint (wanmoe verify)",
    "sha256sum.txt": "checksum list shipped with a downloaded checkpoint (wanmoe verify)",
    "blobs/": "Hugging Face cache folder that checkpoint files may link into",
    # built by scripts/setup.sh, not committed
    ".venv/bin/python": "the interpreter of the virtual environment scripts/setup.sh creates",
    # written by the command it appears in
    "r1.safetensors": "the file `git show ... > r1.safetensors` writes (docs/results.md)",
}
# Folders of outputs that commands in the docs write (ignored by git): runs/ holds training and evaluation runs.
ALLOWED_PREFIXES = ("runs/",)

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_CODE = re.compile(r"`([^`\n]+)`")
_WORD = re.compile(r"[\w.{},*<>~$/-]+")
_PATH = re.compile(r"^[\w.{},*<>~$@+-]+(?:/[\w.{},*<>~$@+-]+)*/?$")


def repo_paths(root: Path) -> set[str]:
    """Every file and folder of the working tree (relative POSIX paths; folders end in '/')."""
    out: set[str] = set()
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in IGNORED_DIRS and not x.endswith(".egg-info")]
        rel = Path(d).relative_to(root).as_posix()
        prefix = "" if rel == "." else rel + "/"
        out.update(prefix + x + "/" for x in dirs)
        out.update(prefix + f for f in files)
    return out


def _expand_braces(word: str) -> list[str]:
    """`tests/test_{a,b}.py` -> ["tests/test_a.py", "tests/test_b.py"] (shell brace expansion, flat)."""
    parts = re.split(r"\{([^{}]*)\}", word)
    if len(parts) == 1:
        return [word]
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def _is_user_path(word: str) -> bool:
    return (word.startswith(("~", "$", "/", "<", "./Wan2", "http:", "https:")) or "://" in word
            or "*" in word or "<" in word or word.startswith("-"))


def _looks_like_file(word: str) -> bool:
    return "/" in word or word.endswith(EXTENSIONS)


def path_words(text: str) -> list[str]:
    """Path-like words outside markdown links: in inline code (every whitespace-separated word) and in prose."""
    text = _LINK.sub(" ", _FENCE.sub(" ", text))
    words = [w for span in _CODE.findall(text) for w in span.split()]
    # prose: only words with a file extension (`s/frame` and `H/W` are not paths)
    words += [w for w in _WORD.findall(_CODE.sub(" ", text)) if w.rstrip(".,:;)]'\"").endswith(EXTENSIONS)]
    out = []
    for w in words:
        w = w.lstrip("([\"'").rstrip(".,:;)]'\"")
        w = re.sub(r"^[0-9a-f]{7,40}:", "", w)  # `git show a1578b9:src/...`: a path of this repository's history
        if (not _PATH.match(w) or _is_user_path(w) or not _looks_like_file(w) or w in ALLOWED
                or w.startswith(ALLOWED_PREFIXES) or re.fullmatch(r"\.\w+", w)):  # `.json`: an extension, no file
            continue
        if w.startswith("./"):
            w = w[2:]
        out.extend(_expand_braces(w))
    return out


def links(text: str) -> list[str]:
    """Relative targets of markdown links and images (anchors dropped); web and mail links are skipped."""
    out = []
    for target in _LINK.findall(_FENCE.sub(" ", text)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        out.append(target.split("#", 1)[0])
    return out


def in_repo(word: str, page_dir: str, paths: set[str]) -> bool:
    """Whether a path-like word names a file or folder of the repository (see the module docstring)."""
    if "/" not in word:
        return any(p.rstrip("/").rsplit("/", 1)[-1] == word for p in paths)
    cands = [word]
    last = word.rstrip("/").rsplit("/", 1)[-1]
    if "." in last and not word.endswith(EXTENSIONS):  # `memory/offload.with_dtype`: a module and an attribute
        cands.append(word[: len(word) - len(last)] + last.split(".", 1)[0] + ".py")
    for c in cands:
        for p in (c, c.rstrip("/") + "/", os.path.normpath(f"{page_dir}/{c}").lstrip("./") + ("/" * c.endswith("/"))):
            if p in paths or any(q.endswith("/" + p) for q in paths):
                return True
    return False


def problems(page: str, text: str, paths: set[str]) -> list[str]:
    """One line per reference in `text` (the page at repository path `page`) to a file the repository lacks."""
    page_dir = os.path.dirname(page)
    bad = []
    for target in links(text):
        p = os.path.normpath(os.path.join(page_dir, target))
        if p not in paths and p + "/" not in paths:
            bad.append(f"{page}: link ({target}) -> {p} is not in the repository")
    for word in path_words(text):
        if not in_repo(word, page_dir, paths):
            bad.append(f"{page}: `{word}` is not a file of this repository")
    return bad


@pytest.fixture(scope="module")
def paths() -> set[str]:
    return repo_paths(ROOT)


def test_docs_reference_only_repository_files(paths: set[str]) -> None:
    bad = [line for f in DOC_FILES for line in problems(f.relative_to(ROOT).as_posix(), f.read_text(), paths)]
    assert not bad, "references to files this repository does not contain:\n" + "\n".join(bad)


def test_checker_catches_planted_references(paths: set[str]) -> None:
    """The checker must fail on what the rule forbids, and accept what the docs legitimately say."""
    planted = {
        "[spec](../shared/reference/wan22-spec.md)": "link",
        "[res](results/nope.md)": "link",
        "parity against `wan/modules/t5.py`": "wan/modules/t5.py",
        "see `tests/test_nothing_here.py`": "tests/test_nothing_here.py",
        "the numbers (peers.md 1.1)": "peers.md",
        "follows STYLE.md 12": "STYLE.md",
        "`python wan/text2video.py --x`": "wan/text2video.py",
        "`tests/test_{schedules,nothing}.py`": "tests/test_nothing.py",
    }
    for text, needle in planted.items():
        found = problems("docs/page.md", text, paths)
        assert len(found) == 1 and needle in found[0], (text, found)
    fine = ("[r](results/report.md) [a](api.md#loading) [w](https://example.com/x.md) `src/wanmoe/experts.py` "
            "`models/s2v.py` `memory/offload.with_dtype` `tests/test_{schedules,solvers}.py` `generate.py` "
            "`python benchmarks/embedded.py --threads 2` `./Wan2.2-T2V-A14B` `~/wanmoe-outputs/x.mp4` "
            "`$WANMOE_OUTPUT_DIR/out.json` `/tmp/membench` `<ckpt>/google/umt5-xxl` `*.sha256` `md5sum.txt` "
            "out.mp4 ref.jpg e.g. wanmoe.checkpoint 1024*704")
    assert problems("docs/page.md", fine, paths) == []
