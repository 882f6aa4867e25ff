"""The `generate` command line (issue 4): help texts, bad input, flags without machinery, the console script.

Bad input must give a clear message on stderr, a non-zero exit and write nothing (no mp4, no sidecar, no temp
file): each test runs the CLI into an empty folder and checks that the folder stays empty.
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


def test_missing_audio(capsys, tiny_ckpt, media_dir, tmp_path):
    err = _run_bad(capsys, tmp_path / "o", *_s2v(tiny_ckpt, media_dir, audio="nope.wav"))
    assert "file not found" in err and "nope.wav" in err


def test_corrupt_audio(capsys, tiny_ckpt, media_dir, tmp_path):
    err = _run_bad(capsys, tmp_path / "o", *_s2v(tiny_ckpt, media_dir, audio="corrupt.wav"))
    assert "corrupt.wav" in err and ("cannot decode audio" in err or "no audio stream" in err)


def test_empty_audio(capsys, tiny_ckpt, media_dir, tmp_path):
    err = _run_bad(capsys, tmp_path / "o", *_s2v(tiny_ckpt, media_dir, audio="empty.wav"))
    assert "empty.wav" in err and ("no samples" in err or "no audio stream" in err or "cannot decode" in err)


def test_silent_audio(capsys, tiny_ckpt, media_dir, tmp_path):
    err = _run_bad(capsys, tmp_path / "o", *_s2v(tiny_ckpt, media_dir, audio="silent.wav"))
    assert "silent.wav" in err and "silent" in err


def test_s2v_without_audio(capsys, tiny_ckpt, media_dir, tmp_path):
    err = _run_bad(capsys, tmp_path / "o", "--task", "s2v-tiny", "--ckpt_dir", str(tiny_ckpt("s2v-tiny")),
                   "--image", str(media_dir / "ref.png"))
    assert "needs --audio" in err


def test_unreadable_image(capsys, tiny_ckpt, media_dir, tmp_path):
    err = _run_bad(capsys, tmp_path / "o", *_s2v(tiny_ckpt, media_dir, image="corrupt.png"))
    assert "cannot read image" in err and "corrupt.png" in err


def test_missing_image_i2v(capsys, tiny_ckpt, media_dir, tmp_path):
    err = _run_bad(capsys, tmp_path / "o", "--task", "i2v-tiny", "--ckpt_dir", str(tiny_ckpt("i2v-tiny")),
                   "--image", str(media_dir / "absent.png"))
    assert "file not found" in err and "absent.png" in err


@pytest.mark.parametrize("size", ["64x64", "64*", "64*64*64", "-64*64", "0*64"])
def test_size_not_w_times_h(capsys, tiny_ckpt, tmp_path, size):
    err = _run_bad(capsys, tmp_path / "o", "--task", "t2v-tiny", "--ckpt_dir", str(tiny_ckpt("t2v-tiny")),
                   f"--size={size}")  # `=`: argparse would read "-64*64" as an option
    assert "--size must look like W*H" in err or "positive multiples" in err


def test_size_not_divisible(capsys, tiny_ckpt, tmp_path):
    # VAE stride 8 x patch size 2 = 16: 72 is a multiple of 8 but not of 16.
    err = _run_bad(capsys, tmp_path / "o", "--task", "t2v-tiny", "--ckpt_dir", str(tiny_ckpt("t2v-tiny")),
                   "--size", "72*64")
    assert "multiples of 16" in err


def test_size_not_offered_by_official_task(capsys, tmp_path):
    err = _run_bad(capsys, tmp_path / "o", "--task", "t2v-A14B", "--size", "640*640")
    assert "not supported by t2v-A14B" in err


@pytest.mark.parametrize("frames", ["6", "0", "8", "-3"])
def test_frame_num_not_4n_plus_1(capsys, tiny_ckpt, tmp_path, frames):
    err = _run_bad(capsys, tmp_path / "o", "--task", "t2v-tiny", "--ckpt_dir", str(tiny_ckpt("t2v-tiny")),
                   f"--frame_num={frames}")
    assert "--frame_num must be 4n+1" in err


def test_unknown_task(capsys, tmp_path):
    err = _run_bad(capsys, tmp_path / "o", "--task", "t2v-999B")
    assert "--task" in err and "invalid choice" in err and "t2v-tiny" in err  # argparse lists the valid tasks


def test_bad_save_file_suffix(capsys, tiny_ckpt, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    rc = main(["generate", "--task", "t2v-tiny", "--ckpt_dir", str(tiny_ckpt("t2v-tiny")), "--quiet",
               "--save_file", str(out / "video.avi")])
    assert rc != 0 and "must end in .mp4" in capsys.readouterr().err
    assert list(out.iterdir()) == []


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


def test_ckpt_dir_not_a_folder(capsys, tmp_path):
    err = _run_bad(capsys, tmp_path / "o", "--task", "t2v-tiny", "--ckpt_dir", str(tmp_path / "absent"))
    assert "is not a folder" in err


@pytest.mark.parametrize(("flag", "message"), [("--sample_steps=0", "--sample_steps must be >= 1"),
                                                ("--sample_shift=0", "--sample_shift must be > 0")])
def test_zero_is_an_error_not_the_default(capsys, tiny_ckpt, tmp_path, flag, message):
    err = _run_bad(capsys, tmp_path / "o", "--task", "t2v-tiny", "--ckpt_dir", str(tiny_ckpt("t2v-tiny")), flag)
    assert message in err


# ------------------------------------------------------------------------------------- unsupported flags


@pytest.mark.parametrize("flag", [["--dit_fsdp"], ["--t5_fsdp"], ["--ulysses_size", "2"]])
def test_parallel_flags_in_one_process_are_not_yet_supported(capsys, tiny_ckpt, tmp_path, flag, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    err = _run_bad(capsys, tmp_path / "o", "--task", "t2v-tiny", "--ckpt_dir", str(tiny_ckpt("t2v-tiny")), *flag)
    assert "not yet supported" in err and flag[0] in err


@pytest.mark.parametrize("flag", [["--audio", "x.wav"], ["--motion_scale", "2"], ["--num_clip", "2"],
                                  ["--infer_frames", "8"], ["--start_from_ref"]])
def test_s2v_flags_on_t2v_are_refused_not_ignored(capsys, tiny_ckpt, tmp_path, flag):
    err = _run_bad(capsys, tmp_path / "o", "--task", "t2v-tiny", "--ckpt_dir", str(tiny_ckpt("t2v-tiny")), *flag)
    assert "only apply to s2v" in err and flag[0] in err


def test_expert_flags_on_single_expert_task_are_refused(capsys, tiny_ckpt, media_dir, tmp_path):
    err = _run_bad(capsys, tmp_path / "o", *_s2v(tiny_ckpt, media_dir), "--boundary", "0.5")
    assert "single expert" in err


def test_flags_that_do_not_apply_are_refused(capsys, tiny_ckpt, media_dir, tmp_path):
    err = _run_bad(capsys, tmp_path / "a", "--task", "t2v-tiny", "--ckpt_dir", str(tiny_ckpt("t2v-tiny")),
                   "--image", str(media_dir / "ref.png"))
    assert "--image does not apply" in err
    err = _run_bad(capsys, tmp_path / "b", *_s2v(tiny_ckpt, media_dir), "--frame_num", "9")
    assert "--frame_num does not apply" in err


def test_cuda_device_without_cuda(capsys, tiny_ckpt, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    err = _run_bad(capsys, tmp_path / "o", "--task", "t2v-tiny", "--ckpt_dir", str(tiny_ckpt("t2v-tiny")),
                   "--device", "cuda")
    assert "no CUDA device" in err
