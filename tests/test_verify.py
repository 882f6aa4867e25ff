"""`wanmoe verify` and `cheap_check`: a good folder passes; each way of breaking it is a problem line naming the file.

Every case copies a tiny t2v-tiny checkpoint (one expert sharded, one single-file), breaks one thing and checks
the report; the shipped s2v-mini folder is the known-good real one (read only, never modified).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import wanmoe
from wanmoe import checkpoint as ck
from wanmoe.configs import PRESETS
from wanmoe.st_header import read_safetensors_header
from wanmoe.verify import cheap_check, main, verify_checkpoint

MINI = Path(wanmoe.__file__).parent / "assets" / "s2v-mini"
TASK = "t2v-tiny"
HIGH, LOW = "high_noise_model", "low_noise_model"


@pytest.fixture(scope="module")
def base(tiny_ckpt: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A good t2v-tiny checkpoint: high_noise_model/ as shards + index, low_noise_model/ as one file."""
    root = tmp_path_factory.mktemp("verify") / "ckpt"
    shutil.copytree(tiny_ckpt(TASK), root)
    model = ck.load_dit(root / HIGH, cfg=PRESETS[TASK].dit)
    ck.save_dit(model, root / HIGH, max_shard_size=150_000, overwrite=True)
    assert len(_shards(root)) >= 3
    return root


@pytest.fixture
def ckpt(base: Path, tmp_path: Path) -> Path:
    root = tmp_path / "ckpt"
    shutil.copytree(base, root)
    return root


def _shards(root: Path) -> list[Path]:
    return sorted((root / HIGH).glob("diffusion_pytorch_model-*-of-*.safetensors"))


def _index(root: Path) -> Path:
    return root / HIGH / ck.INDEX_NAME


def _edit_json(path: Path, fn: Callable[[dict], None]) -> None:
    raw = json.loads(path.read_text())
    fn(raw)
    path.write_text(json.dumps(raw))


def _edit_header(path: Path, fn: Callable[[dict], None]) -> None:
    """Rewrite a safetensors header in place; offsets are relative to the data section, so the data stays valid."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    fn(header)
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n :])


def _rewrite_tensors(path: Path, fn: Callable[[dict], dict]) -> None:
    with safe_open(str(path), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    save_file(fn(sd), str(path), metadata={"format": "pt"})


def _first_key(path: Path) -> str:
    return next(iter(read_safetensors_header(path).tensors))


def _write_md5(root: Path, rels: list[str]) -> Path:
    lines = [f"{hashlib.md5((root / r).read_bytes()).hexdigest()}  {r}" for r in rels]
    (root / "md5sum.txt").write_text("\n".join(lines) + "\n")
    return root / "md5sum.txt"


# ------------------------------------------------------------------------------------------ the corruptions
# Each returns (file the problem must name, relative to the root, and a pattern the problem line must match).


def truncated_shard(root: Path) -> tuple[str, str]:
    shard = _shards(root)[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    return f"{HIGH}/{shard.name}", "truncated"


def garbage_header(root: Path) -> tuple[str, str]:
    shard = _shards(root)[0]
    data = bytearray(shard.read_bytes())
    data[8:40] = b"\xff" * 32  # the start of the JSON header overwritten
    shard.write_bytes(bytes(data))
    return f"{HIGH}/{shard.name}", "header is not UTF-8 text"


def header_length_past_end(root: Path) -> tuple[str, str]:
    path = root / LOW / ck.WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes((len(data) * 2).to_bytes(8, "little") + data[8:])
    return f"{LOW}/{ck.WEIGHTS_NAME}", "header length .* runs past the end of the file"


def wrong_dtype(root: Path) -> tuple[str, str]:
    path = root / LOW / ck.WEIGHTS_NAME
    key = _first_key(path)
    _edit_header(path, lambda h: h[key].update(dtype="F33"))
    return f"{LOW}/{ck.WEIGHTS_NAME}", f"tensor {re.escape(key)}: unknown dtype \"F33\""


def index_names_missing_shard(root: Path) -> tuple[str, str]:
    shard = _shards(root)[1]
    shard.unlink()
    return f"{HIGH}/{ck.INDEX_NAME}", f"names shard {shard.name}, which is missing"


def index_names_parent_path(root: Path) -> tuple[str, str]:
    shutil.copy(_shards(root)[0], root.parent / "evil.safetensors")  # a real file there: only the name is wrong
    _edit_json(_index(root), lambda raw: raw["weight_map"].update(
        {k: "../evil.safetensors" for k in list(raw["weight_map"])[:1]}))
    return f"{HIGH}/{ck.INDEX_NAME}", "'../evil.safetensors' is not a plain file name"


def index_key_missing_from_shard(root: Path) -> tuple[str, str]:
    shard = _shards(root)[0]
    key = _first_key(shard)
    _rewrite_tensors(shard, lambda sd: {k: v for k, v in sd.items() if k != key})
    return f"{HIGH}/{shard.name}", f"lacks 1 tensor the index assigns to it: {re.escape(key)}"


def shard_key_missing_from_index(root: Path) -> tuple[str, str]:
    shard = _shards(root)[0]
    key = _first_key(shard)
    _edit_json(_index(root), lambda raw: raw["weight_map"].pop(key))
    return f"{HIGH}/{shard.name}", f"holds 1 tensor the index does not assign to it: {re.escape(key)}"


def config_field_string(root: Path) -> tuple[str, str]:
    _edit_json(root / LOW / ck.CONFIG_NAME, lambda raw: raw.update(dim="96"))
    return f"{LOW}/{ck.CONFIG_NAME}", 'dim must be an integer, got "96" \\(string\\)'


def shape_mismatch(root: Path) -> tuple[str, str]:
    path = root / LOW / ck.WEIGHTS_NAME
    _rewrite_tensors(path, lambda sd: {**sd, "head.head.bias": torch.zeros(3)})
    return f"{LOW}/{ck.WEIGHTS_NAME}", r"match the model task t2v-tiny describes: wrong shapes \(1\): head\.head\.bias"


def md5_mismatch(root: Path) -> tuple[str, str]:
    _write_md5(root, ["vae.safetensors", f"{LOW}/{ck.WEIGHTS_NAME}"])
    path = root / "vae.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit of tensor data: every header check still passes
    path.write_bytes(bytes(data))
    return "vae.safetensors", "md5 [0-9a-f]{32} differs from [0-9a-f]{32} in md5sum.txt"


def md5_lists_missing_file(root: Path) -> tuple[str, str]:
    md5 = _write_md5(root, ["vae.safetensors"])
    md5.write_text(md5.read_text() + f"{'0' * 32}  {HIGH}/gone.safetensors\n")
    return f"{HIGH}/gone.safetensors", "listed in md5sum.txt but missing"


def total_size_wrong(root: Path) -> tuple[str, str]:
    _edit_json(_index(root), lambda raw: raw["metadata"].update(total_size=raw["metadata"]["total_size"] + 4))
    return f"{HIGH}/{ck.INDEX_NAME}", "metadata.total_size .* differs from"


def index_not_json(root: Path) -> tuple[str, str]:
    _index(root).write_bytes(b'{"weight_map": {"a": ')
    return f"{HIGH}/{ck.INDEX_NAME}", "not valid JSON"


def symlink_outside(root: Path) -> tuple[str, str]:
    shard = _shards(root)[0]
    outside = root.parent / "elsewhere.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)
    return f"{HIGH}/{ck.INDEX_NAME}", f"shard {shard.name} is a symlink to .*, outside"


def missing_vae(root: Path) -> tuple[str, str]:
    (root / "vae.safetensors").unlink()
    return "vae.safetensors", "missing \\(VAE"


def overlapping_offsets(root: Path) -> tuple[str, str]:
    path = root / LOW / ck.WEIGHTS_NAME
    def shift(h: dict) -> None:
        entries = sorted((v["data_offsets"], k) for k, v in h.items() if k != "__metadata__")
        (b0, _), _ = entries[0]
        (b1, e1), k1 = entries[1]
        h[k1]["data_offsets"] = [b0, b0 + (e1 - b1)]  # the second tensor now starts where the first does
    _edit_header(path, shift)
    return f"{LOW}/{ck.WEIGHTS_NAME}", "overlaps tensor"


CASES = [truncated_shard, garbage_header, header_length_past_end, wrong_dtype, index_names_missing_shard,
         index_names_parent_path, index_key_missing_from_shard, shard_key_missing_from_index, config_field_string,
         shape_mismatch, md5_mismatch, md5_lists_missing_file, total_size_wrong, index_not_json, symlink_outside,
         missing_vae, overlapping_offsets]
CHECKSUM_CASES = {md5_mismatch, md5_lists_missing_file}


def _has(problems: list[str], file: str, pattern: str) -> bool:
    return any(p.startswith(f"{file}: ") and re.search(pattern, p) for p in problems)


@pytest.mark.parametrize("corrupt", CASES, ids=lambda f: f.__name__)
def test_each_corruption_is_one_named_problem(ckpt: Path, corrupt, capsys: pytest.CaptureFixture) -> None:
    file, pattern = corrupt(ckpt)
    report = verify_checkpoint(ckpt, TASK)
    assert not report.ok
    assert _has(report.problems, file, pattern), report.problems
    assert main(["--ckpt_dir", str(ckpt), "--task", TASK]) == 1
    out = capsys.readouterr().out
    assert f"PROBLEM  {file}: " in out and "Traceback" not in out
    if corrupt in CHECKSUM_CASES:  # only the hashes are wrong: the cheap checks pass and skip the lists
        assert verify_checkpoint(ckpt, TASK, cheap=True).ok
        assert cheap_check(ckpt, PRESETS[TASK]) == []
    else:
        assert _has(cheap_check(ckpt, PRESETS[TASK]), file, pattern)


def test_all_problems_reported_together(ckpt: Path) -> None:
    cases = [truncated_shard, index_names_parent_path, config_field_string, wrong_dtype, md5_lists_missing_file]
    expected = [c(ckpt) for c in cases]
    report = verify_checkpoint(ckpt, TASK)
    for file, pattern in expected:
        assert _has(report.problems, file, pattern), (file, report.problems)


def test_good_folder_is_ok(base: Path, capsys: pytest.CaptureFixture) -> None:
    _write_md5(base, ["vae.safetensors", f"{LOW}/{ck.WEIGHTS_NAME}"])
    try:
        report = verify_checkpoint(base)  # task inferred
        assert report.ok, report.problems
        assert report.task == TASK
        assert any("md5sum.txt: 2 of 2 files match their md5" in c for c in report.checked)
        assert any(f"{HIGH}/{ck.INDEX_NAME}:" in c and "match the model" in c for c in report.checked)
        assert main(["--ckpt_dir", str(base)]) == 0
        assert "OK for task t2v-tiny" in capsys.readouterr().out
    finally:
        (base / "md5sum.txt").unlink()


def test_sha256_list_and_digest_only_md5_file(ckpt: Path) -> None:
    vae = ckpt / "vae.safetensors"
    (ckpt / "sha256sum.txt").write_text(f"{hashlib.sha256(vae.read_bytes()).hexdigest()} *vae.safetensors\n")
    (ckpt / "vae.safetensors.md5").write_text(hashlib.md5(vae.read_bytes()).hexdigest() + "\n")
    assert verify_checkpoint(ckpt, TASK).ok
    (ckpt / "sha256sum.txt").write_text("abc  vae.safetensors\nnot a line\n" + f"{'0' * 64}  ../outside.bin\n")
    problems = verify_checkpoint(ckpt, TASK).problems
    for pattern in ("line 1: an sha256 digest has 64 hex digits", "line 2 is not", "outside the checkpoint"):
        assert _has(problems, "sha256sum.txt", pattern), problems


def test_shipped_model_is_ok() -> None:
    report = verify_checkpoint(MINI, cheap=True)
    assert report.ok, report.problems
    assert report.task == "s2v-mini"
    assert cheap_check(MINI, PRESETS["s2v-mini"]) == []
    single = verify_checkpoint(MINI / "single_expert", "s2v-mini")  # the dense baseline: s2v-mini on one DiT
    assert single.ok, single.problems


def test_task_must_fit(ckpt: Path) -> None:
    problems = verify_checkpoint(ckpt, "i2v-tiny").problems  # i2v's DiT takes 36 input channels
    want = r"different model than task i2v-tiny: model_type 't2v' \(task: 'i2v'\); in_dim 16 \(task: 36\)"
    assert _has(problems, f"{LOW}/{ck.CONFIG_NAME}", want)
    assert _has(problems, f"{LOW}/{ck.WEIGHTS_NAME}", r"wrong shapes")
    shutil.rmtree(ckpt / LOW)
    (ckpt / HIGH / ck.CONFIG_NAME).write_text("{")
    # t2v-tiny, i2v-tiny and s2v-mini share this layout and no readable config.json tells them apart
    report = verify_checkpoint(ckpt)
    assert report.task is None and any("fits no task's layout; pass --task" in p for p in report.problems)


def test_official_layout(tmp_path: Path) -> None:
    root = tmp_path / "Wan2.2-S2V-14B"
    model = torch.nn.Linear(2, 2)
    ck.write_dit_config(PRESETS["t2v-tiny"].dit, root)
    save_file({"w": torch.zeros(2)}, str(root / ck.WEIGHTS_NAME))
    torch.save(model.state_dict(), root / "models_t5_umt5-xxl-enc-bf16.pth")
    data = (root / "models_t5_umt5-xxl-enc-bf16.pth").read_bytes()
    (root / "Wan2.1_VAE.pth").write_bytes(data[: len(data) // 2])  # a truncated torch.save zip
    (root / "google" / "umt5-xxl").mkdir(parents=True)
    assert zipfile.is_zipfile(root / "models_t5_umt5-xxl-enc-bf16.pth")
    report = verify_checkpoint(root, "s2v-14b")
    for file, pattern in [("Wan2.1_VAE.pth", "truncated or corrupt"), ("google/umt5-xxl", "holds none of"),
                          ("wav2vec2-large-xlsr-53-english", "missing folder"),
                          (ck.CONFIG_NAME, "describes a different model than task s2v-14B: model_type 't2v'"),
                          (ck.WEIGHTS_NAME, "unexpected keys \\(1\\): w")]:
        assert _has(report.problems, file, pattern), (file, report.problems)
    assert not any(p.startswith("models_t5") for p in report.problems)
    assert verify_checkpoint(root).task is None  # a tiny DiT is no official task


def test_main_usage_and_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--ckpt_dir", str(tmp_path), "--task", "x2v"])
    assert e.value.code == 2 and "unknown task 'x2v'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    assert main(["--ckpt_dir", str(tmp_path / "nope")]) == 1
    assert "not a folder" in capsys.readouterr().out


@pytest.mark.parametrize("content", [b"", b"\x01", (2**63).to_bytes(8, "little"), b"\x02\x00\x00\x00\x00\x00\x00\x00[]",
                                     b"\x05\x00\x00\x00\x00\x00\x00\x00" + "{\"é".encode()[:5]])
def test_header_parser_never_raises(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    h = read_safetensors_header(path)
    assert h.problems and not h.parsed
