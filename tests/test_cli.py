"""The `generate` command line: help texts, the console script, incomplete checkpoint folders.

The table of bad inputs (message, exit code, nothing written) is tests/test_bad_inputs.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from wanmoe.cli import main

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL_FLAGS = ("task", "size", "frame_num", "ckpt_dir", "offload_model", "ulysses_size", "t5_fsdp", "t5_cpu",
                  "dit_fsdp", "save_file", "prompt", "base_seed", "image", "sample_solver", "sample_steps",
                  "sample_shift", "sample_guide_scale", "convert_model_dtype", "num_clip", "audio", "pose_video",
                  "start_from_ref", "infer_frames")
OUR_FLAGS = ("expert_threshold", "boundary", "expert_blend", "noise_schedule", "guidance_scale", "motion_scale")


def _subprocess(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _flag_blocks(help_text: str) -> dict[str, str]:
    """--flag -> its help entry (the flag line plus its wrapped continuation lines)."""
    blocks: dict[str, str] = {}
    current = None
    for line in help_text.splitlines():
        m = re.match(r"\s{2}(--[a-z0-9_]+)", line)
        if m:
            current = m.group(1)[2:]
            blocks[current] = line
        elif current and line.startswith(" " * 10):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return blocks


@pytest.mark.parametrize("cmd", [("generate.py", "--help"), ("-m", "wanmoe", "generate", "--help")])
def test_help_lists_every_flag_with_default(cmd):
    r = _subprocess(*cmd)
    assert r.returncode == 0, r.stderr
    blocks = _flag_blocks(r.stdout)
    for flag in OFFICIAL_FLAGS + OUR_FLAGS:
        assert flag in blocks, f"--{flag} missing from help"
        assert "default" in blocks[flag], f"--{flag} help shows no default: {blocks[flag]!r}"
    assert "(default: -1)" in blocks["base_seed"]
    assert "(default: unipc)" in blocks["sample_solver"]
    assert "(default: None)" in blocks["motion_scale"] and "s2v-mini: 2.0" in blocks["motion_scale"]


def test_console_script_target_imports():
    from importlib.metadata import entry_points

    import wanmoe.cli

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "wanmoe"]
    assert ep.value == "wanmoe.cli:main"
    assert ep.load() is wanmoe.cli.main


# ------------------------------------------------------------------------------------------------ bad input


def _run_bad(capsys, out_dir: Path, *argv: str) -> str:
    """Run the CLI expecting a failure; returns stderr after checking that nothing was written."""
    out_dir.mkdir(exist_ok=True)
    try:
        rc = main(["generate", "--save_file", str(out_dir / "out.mp4"), "--quiet", "--base_seed", "0", *argv])
    except SystemExit as e:  # argparse errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc not in (0, None), "bad input must exit non-zero"
    assert list(out_dir.iterdir()) == [], "bad input must write nothing"
    return err


def _s2v(tiny_ckpt, media_dir: Path, audio: str = "speech.wav", image: str = "ref.png") -> list[str]:  # noqa: ANN001
    return ["--task", "s2v-tiny", "--ckpt_dir", str(tiny_ckpt("s2v-tiny")), "--infer_frames", "8",
            "--image", str(media_dir / image), "--audio", str(media_dir / audio)]


# ---------------------------------------------------------------------------------------------- checkpoints


def _broken_copy(src: Path, dst: Path, remove: str) -> Path:
    shutil.copytree(src, dst)
    victim = dst / remove
    shutil.rmtree(victim) if victim.is_dir() else victim.unlink()
    return dst


@pytest.mark.parametrize("remove", ["low_noise_model", "vae.safetensors", "byte_text_encoder.safetensors",
                                    "high_noise_model/diffusion_pytorch_model.safetensors"])
def test_checkpoint_with_files_missing_lists_layout(capsys, tiny_ckpt, tmp_path, remove):
    ck = _broken_copy(tiny_ckpt("t2v-tiny"), tmp_path / "ck", remove)
    err = _run_bad(capsys, tmp_path / "o", "--task", "t2v-tiny", "--ckpt_dir", str(ck))
    assert Path(remove).name.split(".")[0] in err  # names what is missing
    for expected in ("high_noise_model", "low_noise_model", "vae.safetensors", "byte_text_encoder.safetensors"):
        assert expected in err, f"expected layout should list {expected}: {err}"


def test_official_checkpoint_folder_incomplete_lists_layout(capsys, tmp_path):
    ck = tmp_path / "ck"
    (ck / "high_noise_model").mkdir(parents=True)
    err = _run_bad(capsys, tmp_path / "o", "--task", "t2v-A14B", "--ckpt_dir", str(ck), "--size", "832*480")
    for expected in ("low_noise_model", "Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl"):
        assert expected in err
