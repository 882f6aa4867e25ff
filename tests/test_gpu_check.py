"""benchmarks/gpu_check.py in its reduced mode (CPU, tiny models): the GPU check's code path cannot rot."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_reduced_mode_prints_a_finite_row_per_task_and_policy(tmp_path, capsys):
    gpu_check = _load()
    out_json = tmp_path / "rows.json"
    rc = gpu_check.main(["--reduced", "--size", "64*64", "--json", str(out_json)])
    text = capsys.readouterr().out
    assert rc == 0
    rows = json.loads(out_json.read_text())["rows"]
    policies = ("resident", "offload", "stream", "stream+int8")
    assert {(r["task"], r["policy"]) for r in rows} == {(t, p) for t in ("s2v-tiny", "t2v-tiny") for p in policies}
    for r in rows:
        assert r["status"] == "ok", r
        for key in ("s_per_step", "switch_s", "peak_gb", "plan_gb", "tflops"):
            assert math.isfinite(r[key]) and r[key] >= 0, (key, r)
        assert r["peak_gb"] > 0 and r["plan_gb"] > 0 and len(r["steps_s"]) == 2
        line = next(ln for ln in text.splitlines() if ln.startswith(r["task"]) and f" {r['policy']} " in ln)
        assert line.endswith(" ok")
    # The measured peak sees the block copies: int8 blocks are half the bytes of bf16 ones.
    by = {(r["task"], r["policy"]): r for r in rows}
    assert by[("t2v-tiny", "stream+int8")]["peak_gb"] < by[("t2v-tiny", "stream")]["peak_gb"]
    assert text.strip().splitlines()[-1].startswith("SUMMARY gpu_check: 8 rows, 8 ok, 0 OOM")


def test_reduced_mode_streams_through_a_staging_ring(tmp_path):
    gpu_check = _load()
    out_json = tmp_path / "rows.json"
    rc = gpu_check.main(["--reduced", "--task", "t2v-tiny", "--size", "64*64", "--policy", "stream", "--policy",
                         "offload", "--policy", "stream+int8", "--int8_activations", "--staging", "2", "--json",
                         str(out_json)])
    rows = json.loads(out_json.read_text())["rows"]
    assert rc == 0 and all(r["status"] == "ok" for r in rows)
    assert {r["policy"]: r["staging"] for r in rows} == {"offload": 0, "stream": 2, "stream+int8": 2}


def test_reduced_mode_fp8_rows(tmp_path, capsys):
    gpu_check = _load()
    out_json = tmp_path / "rows.json"
    rc = gpu_check.main(["--reduced", "--task", "t2v-tiny", "--size", "64*64", "--policy", "stream+int8", "--fp8",
                         "--json", str(out_json)])
    rows = json.loads(out_json.read_text())["rows"]
    assert rc == 0 and [r["status"] for r in rows] == ["ok"]
    assert "+int8 rows in fp8 (e4m3)" in capsys.readouterr().out
