"""Every bad input is refused before any work: one line on stderr naming the input, exit 2, nothing written.

One table drives the command line (`wanmoe generate`, in-process); each row asserts the message, the exit code,
that stderr holds no traceback, and that the output folder stays empty. A second table feeds the same kind of
inputs to the Python API, which must raise ValueError (never AssertionError) with the keyword name.
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from wanmoe.cli import main
from wanmoe.configs import PRESETS
from wanmoe.request import InputError, make_request

T2V = ["--task", "t2v-tiny", "--ckpt_dir", "{t2v}"]
I2V = ["--task", "i2v-tiny", "--ckpt_dir", "{i2v}"]
S2V = ["--task", "s2v-tiny", "--ckpt_dir", "{s2v}", "--infer_frames", "8", "--image", "{media}/ref.png",
       "--audio", "{media}/speech.wav"]


def _png_header_only(path: Path, w: int, h: int) -> None:
    """A PNG whose header claims w x h (a decompression bomb) with a tiny compressed body."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                     + chunk(b"IEND", b""))


def _float_wav(path: Path, samples: np.ndarray, sr: int = 16000) -> None:
    """IEEE-float mono WAV (format 3): a file can hold samples far outside [-1, 1], or NaN."""
    data = samples.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, sr, sr * 4, 4, 32)
    path.write_bytes(b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(data)) + b"WAVE"
                     + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data)


@pytest.fixture(scope="module")
def bad_media(media_dir, tmp_path_factory):
    from conftest import speech_like, write_wav

    from wanmoe import media

    d = tmp_path_factory.mktemp("bad")
    for name in ("ref.png", "speech.wav", "silent.wav", "empty.wav", "corrupt.wav", "corrupt.png"):
        shutil.copy(media_dir / name, d / name)
    media.save_png(d / "tiny.png", torch.zeros(3, 8, 8))
    _png_header_only(d / "bomb.png", 60000, 60000)  # past Pillow's own bomb limit
    _png_header_only(d / "big.png", 9000, 9000)  # under Pillow's limit, over ours
    (d / "text.png").write_text("hello")
    _float_wav(d / "loud.wav", speech_like(1.0) * 1000)
    nan = speech_like(1.0)
    nan[100] = np.nan
    _float_wav(d / "nan.wav", nan)
    write_wav(d / "blip.wav", speech_like(0.03))
    (d / "folder.wav").mkdir()
    return d


# (argv, substrings the one-line message must contain)
CASES = [
    # numbers that are not finite or out of any sane range
    ([*T2V, "--sample_shift", "nan"], ["--sample_shift", "finite"]),
    ([*T2V, "--sample_shift", "inf"], ["--sample_shift", "finite"]),
    ([*T2V, "--sample_shift=-1"], ["--sample_shift", "(0, 100]"]),
    ([*T2V, "--sample_shift", "0"], ["--sample_shift", "(0, 100]"]),
    ([*T2V, "--sample_shift", "1e9"], ["--sample_shift"]),
    ([*T2V, "--sample_guide_scale", "nan"], ["--guidance_scale/--sample_guide_scale", "finite"]),
    ([*T2V, "--sample_guide_scale=-1"], ["--guidance_scale/--sample_guide_scale"]),
    ([*T2V, "--sample_guide_scale", "1e6"], ["--guidance_scale/--sample_guide_scale"]),
    ([*T2V, "--guidance_scale", "high=nan,low=3"], ["--guidance_scale", "finite"]),
    ([*T2V, "--guidance_scale", "high=4,mid=3"], ["--guidance_scale", "mid"]),
    ([*T2V, "--guidance_scale", "high=,low=3"], ["--guidance_scale"]),
    ([*T2V, "--base_seed=-2"], ["--base_seed", "-1 (random)"]),
    ([*T2V, "--base_seed", str(2**64)], ["--base_seed"]),
    ([*T2V, "--size", "64x64"], ["--size", "W*H"]),
    ([*T2V, "--size=-64*64"], ["--size", "W*H"]),
    ([*T2V, "--size", "0*64"], ["--size", "multiples of 16"]),
    ([*T2V, "--size", "72*64"], ["--size", "multiples of 16"]),
    ([*T2V, "--size", "100000*64"], ["--size", "4096"]),
    (["--task", "t2v-A14B", "--size", "640*640"], ["--size", "not supported by t2v-A14B"]),
    ([*T2V, "--frame_num", "0"], ["--frame_num"]),
    ([*T2V, "--frame_num", "6"], ["--frame_num", "4n+1"]),
    ([*T2V, "--frame_num", "100001"], ["--frame_num", "1001"]),
    ([*T2V, "--sample_steps", "0"], ["--sample_steps", "[1, 1000]"]),
    ([*T2V, "--sample_steps", "100000"], ["--sample_steps", "[1, 1000]"]),
    ([*S2V, "--infer_frames", "0"], ["--infer_frames"]),
    ([*S2V, "--infer_frames", "6"], ["--infer_frames", "multiple of 4"]),
    ([*S2V, "--infer_frames", "100000"], ["--infer_frames"]),
    ([*S2V, "--num_clip", "0"], ["--num_clip"]),
    ([*S2V, "--motion_scale", "nan"], ["--motion_scale", "finite"]),
    ([*S2V, "--motion_scale=-1"], ["--motion_scale"]),
    ([*T2V, "--expert_blend=-1"], ["--expert_blend"]),
    ([*T2V, "--expert_blend", "nan"], ["--expert_blend", "finite"]),
    ([*T2V, "--boundary", "0"], ["--boundary"]),
    ([*T2V, "--boundary", "1"], ["--boundary", "(0, 1)"]),
    ([*T2V, "--boundary", "nan"], ["--boundary", "finite"]),
    ([*T2V, "--expert_threshold", "nan"], ["--expert_threshold", "finite"]),
    ([*T2V, "--expert_blend", "1e9"], ["--expert_blend", "[0, 50]"]),
    ([*T2V, "--device", "tpu"], ["--device", "cpu, cuda"]),
    ([*T2V, "--device", "cuda:x"], ["--device"]),
    ([*T2V, "--ulysses_size", "2"], ["--ulysses_size", "torchrun"]),
    ([*T2V, "--dit_fsdp"], ["--dit_fsdp", "torchrun"]),
    ([*T2V, "--prompt", ""], ["--prompt", "empty"]),
    ([*T2V, "--prompt", "   "], ["--prompt", "empty"]),
    # flags that do not apply to the task
    ([*T2V, "--audio", "{media}/speech.wav"], ["--audio", "only applies to s2v"]),
    ([*T2V, "--num_clip", "2"], ["--num_clip", "only applies to s2v"]),
    ([*T2V, "--image", "{media}/ref.png"], ["--image", "does not apply"]),
    ([*S2V, "--frame_num", "9"], ["--frame_num", "does not apply"]),
    ([*S2V, "--boundary", "0.5"], ["--boundary", "single expert"]),
    (["--task", "i2v-tiny", "--ckpt_dir", "{i2v}"], ["--image", "is needed"]),
    (["--task", "t2v-999B"], ["--task", "invalid choice"]),
    # audio
    ([*S2V, "--audio", "{media}/absent.wav"], ["--audio", "file not found", "absent.wav"]),
    ([*S2V, "--audio", "{media}/corrupt.wav"], ["--audio", "corrupt.wav"]),
    ([*S2V, "--audio", "{media}/empty.wav"], ["--audio", "empty.wav"]),
    ([*S2V, "--audio", "{media}/silent.wav"], ["--audio", "silent"]),
    ([*S2V, "--audio", "{media}/blip.wav"], ["--audio", "at least 0.1 s"]),
    ([*S2V, "--audio", "{media}/loud.wav"], ["--audio", "[-1, 1]"]),
    ([*S2V, "--audio", "{media}/nan.wav"], ["--audio", "non-finite"]),
    ([*S2V, "--audio", "{media}/folder.wav"], ["--audio", "folder.wav"]),
    # images
    ([*S2V, "--image", "{media}/absent.png"], ["--image", "file not found"]),
    ([*S2V, "--image", "{media}/corrupt.png"], ["--image", "corrupt.png"]),
    ([*S2V, "--image", "{media}/text.png"], ["--image", "text.png"]),
    ([*S2V, "--image", "{media}/tiny.png"], ["--image", "8x8", "at least 32x32"]),
    ([*S2V, "--image", "{media}/bomb.png"], ["--image", "bomb.png", "too large", "at most"]),
    ([*S2V, "--image", "{media}/big.png"], ["--image", "9000x9000", "at most 67 MP"]),
    # checkpoints
    (["--task", "t2v-tiny", "--ckpt_dir", "{media}/absent"], ["--ckpt_dir", "is not a folder"]),
    (["--task", "t2v-A14B", "--size", "832*480"], ["--ckpt_dir", "is needed"]),
    (["--task", "t2v-A14B", "--size", "832*480", "--ckpt_dir", "{media}"], ["incomplete", "low_noise_model"]),
    (["--task", "t2v-tiny", "--ckpt_dir", "{bad_ckpt}/config_type"], ["config.json", "dim"]),
    (["--task", "t2v-tiny", "--ckpt_dir", "{bad_ckpt}/shapes"], ["low_noise_model", "shape"]),
    (["--task", "t2v-tiny", "--ckpt_dir", "{bad_ckpt}/truncated"], ["high_noise_model", "diffusion_pytorch_model"]),
    (["--task", "t2v-tiny", "--ckpt_dir", "{bad_ckpt}/outside"], ["index", "evil"]),
    ([*S2V, "--ckpt_dir", "{t2v}"], ["{t2v}", "s2v-tiny"]),
    # outputs
    ([*T2V, "--save_file", "{out}/video.avi"], ["--save_file", ".mp4"]),
    ([*T2V, "--save_file", "{media}/text.png/out.mp4"], ["--save_file", "cannot write"]),
    ([*T2V, "--save_file", "{media}/folder.mp4"], ["--save_file"]),
]


@pytest.fixture(scope="module")
def bad_ckpt(tiny_ckpt, tmp_path_factory):
    """Copies of the tiny t2v checkpoint, each broken one way that would otherwise surface mid-sampling."""
    from safetensors.torch import load_file, save_file

    src = tiny_ckpt("t2v-tiny")
    d = tmp_path_factory.mktemp("bad_ckpt")
    for name in ("config_type", "shapes", "truncated", "outside"):
        shutil.copytree(src, d / name)
    cfg = d / "config_type" / "low_noise_model" / "config.json"
    raw = json.loads(cfg.read_text())
    cfg.write_text(json.dumps({**raw, "dim": str(raw["dim"])}))  # "dim": "64": a string where an int belongs
    low = d / "shapes" / "low_noise_model" / "diffusion_pytorch_model.safetensors"
    sd = load_file(low)
    key = next(k for k, v in sd.items() if v.ndim == 2)
    sd[key] = sd[key][:, :-1].contiguous()  # one weight a column short: found before any step runs
    save_file(sd, low)
    shard = d / "truncated" / "high_noise_model" / "diffusion_pytorch_model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    folder = d / "outside" / "low_noise_model"
    weights = folder / "diffusion_pytorch_model.safetensors"
    keys = list(load_file(weights))
    weights.rename(d / "outside" / "evil.safetensors")
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": dict.fromkeys(keys, "../evil.safetensors")}))
    return d


def _fmt(argv: list[str], paths: dict[str, str]) -> list[str]:
    return [a.format(**paths) for a in argv]


@pytest.mark.parametrize(("argv", "needles"), CASES, ids=[" ".join(c[0][2:] if c[0][0] == "--task" else c[0])[:60]
                                                            for c in CASES])
def test_cli_refuses_bad_input(argv, needles, tiny_ckpt, bad_media, bad_ckpt, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (bad_media / "folder.mp4").mkdir(exist_ok=True)
    monkeypatch.setenv("WANMOE_OUTPUT_DIR", str(out))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    paths = {"t2v": str(tiny_ckpt("t2v-tiny")), "i2v": str(tiny_ckpt("i2v-tiny")), "s2v": str(tiny_ckpt("s2v-tiny")),
             "media": str(bad_media), "out": str(out), "bad_ckpt": str(bad_ckpt)}
    args = _fmt(argv, paths)
    if "--save_file" not in args:
        args += ["--save_file", str(out / "video.mp4")]
    try:
        rc = main(["generate", "--quiet", "--base_seed", "0", *args])
    except SystemExit as e:  # argparse refuses malformed flags itself, with exit 2
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, (rc, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    if lines[0].startswith("usage:"):  # argparse refuses the flag's syntax itself: usage, then one error line
        assert lines[-1].startswith("wanmoe generate: error:"), err
    else:  # ours: one line (an incomplete checkpoint folder adds the expected layout below it)
        several = "incomplete" in lines[0] or "cannot serve" in lines[0]  # a checkpoint: every problem listed
        assert lines[0].startswith("error:") and (len(lines) == 1 or several), err
    for n in needles:
        assert n.format(**paths) in err, (n, err)
    assert list(out.iterdir()) == [], "bad input must write nothing"


def test_cuda_device_without_cuda(tiny_ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    rc = main(["generate", "--task", "t2v-tiny", "--ckpt_dir", str(tiny_ckpt("t2v-tiny")), "--device", "cuda",
               "--save_file", str(tmp_path / "v.mp4")])
    assert rc == 2 and "--device cuda: no CUDA device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ Python API

API_CASES = [
    ({"steps": 0}, "steps"), ({"steps": 2.5}, "steps"), ({"steps": True}, "steps"), ({"steps": "20"}, "steps"),
    ({"shift": float("nan")}, "shift"), ({"seed": -5}, "seed"), ({"seed": 1.5}, "seed"),
    ({"size": (64, 0)}, "size"), ({"size": "64*64*64"}, "size"), ({"guide_scale": {"high": 1.0}}, "guide_scale"),
    ({"guide_scale": float("inf")}, "guide_scale"), ({"solver": "ddim"}, "solver"),
    ({"noise_schedule": "karras"}, "noise_schedule"), ({"prompt": ""}, "prompt"), ({"prompt": 3}, "prompt"),
    ({"threshold": float("nan")}, "threshold"), ({"num_clip": 2}, "num_clip"),
]


@pytest.mark.parametrize(("kw", "field"), API_CASES, ids=[f"{next(iter(k))}={next(iter(k.values()))!r}"
                                                          for k, _ in API_CASES])
def test_make_request_raises_input_error_naming_the_keyword(kw, field):
    with pytest.raises(InputError) as e:
        make_request(PRESETS["t2v-tiny"], **kw)
    assert e.value.field == field and isinstance(e.value, ValueError)
    assert str(e.value).startswith(field)


@pytest.mark.parametrize("image", [torch.full((3, 64, 64), float("nan")), torch.zeros(3, 64), np.zeros((64, 64, 2)),
                                   np.full((64, 64, 3), 2.0), "no/such/file.png", 42])
def test_api_refuses_bad_images(image, tiny_ckpt, media_dir):
    from wanmoe.inputs import read_inputs

    with pytest.raises(InputError) as e:
        read_inputs(PRESETS["s2v-tiny"], image=image, audio=media_dir / "speech.wav")
    assert e.value.field == "image"


@pytest.mark.parametrize(("audio", "sr"), [(np.full(16000, np.nan, np.float32), None),
                                           (np.zeros((2, 16000), np.float32), None),
                                           (np.ones(16000, np.int16), None),
                                           (np.random.default_rng(0).normal(0, 3000, 16000).astype(np.float32), None),
                                           (np.random.default_rng(0).normal(0, .1, 800).astype(np.float32), None),
                                           (np.random.default_rng(0).normal(0, .1, 16000).astype(np.float32), 7)])
def test_api_refuses_bad_audio(audio, sr, media_dir):
    from wanmoe.inputs import read_inputs

    with pytest.raises(InputError) as e:
        read_inputs(PRESETS["s2v-tiny"], image=media_dir / "ref.png", audio=audio, sr=sr)
    assert e.value.field == "audio"


# ------------------------------------------------------------------------------------------------ outputs


def test_disk_full_while_writing_leaves_neither_file(tiny_ckpt, tmp_path, capsys, monkeypatch):
    import errno

    from wanmoe import media

    def full(*a, **k):  # noqa: ANN002, ANN003
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(media.json, "dump", full)  # the sidecar write fails after the mp4 was encoded
    rc = main(["generate", "--task", "t2v-tiny", "--ckpt_dir", str(tiny_ckpt("t2v-tiny")), "--quiet",
               "--save_file", str(tmp_path / "v.mp4")])
    err = capsys.readouterr().err
    assert rc == 1 and "No space left" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_default_names_are_unique_safe_and_outside_the_source_tree(monkeypatch, tmp_path):
    from wanmoe.cli import default_save_file

    monkeypatch.setenv("WANMOE_OUTPUT_DIR", str(tmp_path))
    names = {default_save_file("t2v-A14B", (1280, 720), 1, "a *cat*\n; rm -rf / $(x) `y`") for _ in range(50)}
    assert len(names) == 50
    for n in names:
        assert n.parent == tmp_path
        assert n.name.startswith("t2v-A14B_1280x720_1_a_cat_rm_-rf_x_y_") and n.suffix == ".mp4"
        assert all(ch.isalnum() or ch in "._-" for ch in n.name), n.name
    monkeypatch.delenv("WANMOE_OUTPUT_DIR")
    root = Path(__file__).resolve().parents[1]
    assert root not in default_save_file("s2v-mini", (128, 128), 1, "x").parents


def test_sidecar_reports_the_frames_in_the_file(tiny_ckpt, media_dir, tmp_path):
    from wanmoe import media

    out = tmp_path / "s.mp4"
    # 0.7 s of audio: 2 clips of 8 frames, 16 generated, 3 dropped (13); the audio starts 3 frames in and lasts
    # 0.51 s more, so the file is cut to 8 frames, and the sidecar says 8.
    assert main(["generate", "--task", "s2v-tiny", "--ckpt_dir", str(tiny_ckpt("s2v-tiny")), "--quiet",
                 "--infer_frames", "8", "--image", str(media_dir / "ref.png"), "--audio",
                 str(media_dir / "short.wav"), "--save_file", str(out)]) == 0
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["frames"] == media.probe_video(out)["frames"] == 8
