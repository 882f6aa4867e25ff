"""Multi-process generation (issue 7): every parallel mode equals the single-process result within 1e-5 (fp32).

One 2-process launch of tests/_dist_worker.py (torchrun's environment, gloo on CPU) runs Ulysses, CFG
parallel, FSDP and Ulysses+FSDP on tiny random-weight DiTs (t2v with two experts, s2v) and saves its outputs;
the references are computed here, in this single process with no process group, from the same builders.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from wanmoe.distributed.env import ParallelState, broadcast_seed, cfg_parallel, init_parallel, validate_parallel_flags
from wanmoe.models.attention import sdpa_attention
from wanmoe.sampling.guidance import cfg

TOL = 1e-5
ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("_dist_worker", ROOT / "tests" / "_dist_worker.py")
W = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(W)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[dict[str, torch.Tensor], dict]:
    """Two worker processes with exactly the environment torchrun gives its children (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR/PORT). Launched directly rather than through the torchrun agent to save its
    start-up (~10 s on this 2-core box); benchmarks/parallel.py goes through torchrun itself."""
    out = tmp_path_factory.mktemp("dist")
    base = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE="2",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    procs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "_dist_worker.py"), str(out)],
            env=dict(base, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=900)[0])  # generous: the test box is shared and niced
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert all(p.returncode == 0 for p in procs), "worker failed:\n" + "\n".join(x[-5000:] for x in logs)
    return load_file(str(out / "outputs.safetensors")), json.loads((out / "checks.json").read_text())


def _close(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert ref.abs().max() > 1e-3, "reference is trivially small: the comparison would prove nothing"
    err = (got - ref).abs().max().item()
    assert err <= TOL, f"max abs error {err:.3g} > {TOL}"
    print(f"max abs error {err:.2e} (reference max {ref.abs().max().item():.3g})")  # shown with pytest -s
    return err


# ---------------------------------------------------------------- single process (no process group)


def test_validate_flags_rules() -> None:
    validate_parallel_flags(1)
    validate_parallel_flags(2, ulysses_size=2, num_heads=40)
    validate_parallel_flags(4, ulysses_size=2, cfg_parallel=True, num_heads=40)
    validate_parallel_flags(8, dit_fsdp=True, t5_fsdp=True)  # FSDP alone shards over any world size
    bad = [
        (dict(world=1, dit_fsdp=True), "need several processes"),
        (dict(world=1, ulysses_size=2), "need several processes"),
        (dict(world=2), "no parallel mode"),
        (dict(world=4, ulysses_size=2), "must equal ulysses_size"),
        (dict(world=2, ulysses_size=2, cfg_parallel=True), "must equal ulysses_size"),
        (dict(world=3, ulysses_size=3, num_heads=40), "divisible by ulysses_size"),
        (dict(world=2, ulysses_size=0), ">= 1"),
    ]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            validate_parallel_flags(**kw)


def test_single_process_state(monkeypatch) -> None:
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    st = init_parallel("gloo")
    assert (st.world, st.rank, st.is_main, st.sp_group, st.cfg_group) == (1, 0, True, None, None)
    with pytest.raises(ValueError, match="need several processes"):
        init_parallel("gloo", dit_fsdp=True)
    assert broadcast_seed(123, st) == 123
    assert broadcast_seed(-1, st) >= 0


def test_cfg_parallel_without_group_is_cfg() -> None:
    d_c, d_u = W.toy_denoisers()
    x, s = W.toy_input(), torch.tensor(0.5)
    with torch.no_grad():
        assert torch.equal(cfg_parallel(d_c, d_u, 3.5, ParallelState())(x, s), cfg(d_c, d_u, 3.5)(x, s))
    assert cfg_parallel(d_c, d_u, 1.0, ParallelState()) is d_c  # scale 1 skips the unconditional pass, as cfg does


# ---------------------------------------------------------------- two processes (gloo)


def test_seed_broadcast_and_collectives(run) -> None:
    _, checks = run
    for r in ("rank0", "rank1"):
        c = checks[r]
        assert c["seeds"] == [1000, 1000]  # rank 1 asked for 1001 and got rank 0's seed
        assert c["random_seed_agrees"]
        assert c["a2a_shape"] == [2, 12, 2, 3] and c["a2a_roundtrip_exact"]
        assert c["shard_len"] == 4 and c["shard_gather_exact"]  # 7 tokens -> 4 + 4 with one padding token
    assert [checks[r]["cfg_rank"] for r in ("rank0", "rank1")] == [0, 1]


def test_flag_errors_on_two_processes(run) -> None:
    c = run[1]["rank0"]
    assert "must equal ulysses_size (4)" in c["err_ulysses4"]
    assert "num_heads (3) must be divisible by ulysses_size (2)" in c["err_heads"]
    assert "no parallel mode" in c["err_noflag"]
    assert "num_heads (3) divisible" in c["odd_heads_error"]


def test_ulysses_attention_matches_full(run) -> None:
    outs, _ = run
    q, k, v, k_lens = W.attn_inputs()
    _close(outs["attn_klens"], sdpa_attention(q, k, v, k_lens=k_lens))
    _close(outs["attn_nolens"], sdpa_attention(q, k, v))  # the padding token is masked, not attended


def test_fsdp_toy(run) -> None:
    outs, checks = run
    assert checks["rank0"]["fsdp_dtensor"] and checks["rank0"]["fsdp_local_rows"] == 32  # 64 rows / 2 ranks
    with torch.no_grad():
        ref = W.toy_model()(W.toy_input())
    _close(outs["fsdp_toy"], ref)
    _close(outs["fsdp_toy_again"], ref)


def test_text_encoder_fsdp(run) -> None:
    umt5, byte, ids, mask, prompts = W.text_encoders()
    with torch.inference_mode():
        _close(run[0]["t5_fsdp"], umt5(ids, mask))
        _close(run[0]["byte_fsdp"], byte.encode(prompts)[0])


def test_cfg_parallel_toy_loop(run) -> None:
    d_c, d_u = W.toy_denoisers()
    with torch.no_grad():
        ref = W.euler(cfg(d_c, d_u, W.CFG_SCALE), W.toy_input(), W.SIGMAS)
    _close(run[0]["cfg_loop"], ref)


@pytest.fixture(scope="module")
def t2v_ref() -> torch.Tensor:
    with torch.inference_mode():
        return W.t2v_loop(W.t2v_experts(), W.sequential_cfg)


@pytest.fixture(scope="module")
def s2v_ref() -> torch.Tensor:
    with torch.inference_mode():
        return W.s2v_loop(W.dit("s2v-14b", 51), W.sequential_cfg)


def test_t2v_forward_ulysses(run) -> None:
    x, ctx, _ = W.t2v_inputs()
    with torch.inference_mode():
        ref = W.t2v_experts()["high"](x, torch.tensor([900.0, 500.0]), ctx)
    _close(run[0]["t2v_forward_ulysses"], ref)


@pytest.mark.parametrize("mode", list(W.MODES))
def test_t2v_two_experts_loop(run, t2v_ref, mode: str) -> None:
    _close(run[0][f"t2v_loop_{mode}"], t2v_ref)


def test_s2v_forward_ulysses(run) -> None:
    x, ctx, _, inp, _ = W.s2v_inputs()
    model = W.dit("s2v-14b", 51)
    with torch.inference_mode():
        ref = model(x, torch.tensor([900.0, 500.0]), ctx, s2v=inp)
        ref_nomotion = model(x, torch.tensor([900.0, 500.0]), ctx, s2v=W.s2v_inputs(drop_motion=True)[3])
    _close(run[0]["s2v_forward_ulysses"], ref)
    _close(run[0]["s2v_forward_ulysses_nomotion"], ref_nomotion)


@pytest.mark.parametrize("mode", ["ulysses", "cfgpar", "ulysses_fsdp"])
def test_s2v_loop(run, s2v_ref, mode: str) -> None:
    _close(run[0][f"s2v_loop_{mode}"], s2v_ref)


@pytest.mark.parametrize("task", ["t2v-tiny", "s2v-tiny"])
def test_pipeline_generate(run, task: str) -> None:
    """pipeline.generate() end to end (text encoder, experts, solver, VAE; s2v: 2 clips with motion carry-over)."""
    from wanmoe import pipeline as P

    comp, req, inp = W.pipeline_parts(task)
    ref = P.generate(comp, req, inp).video
    for mode in ("ulysses", "fsdp", "ulysses_fsdp"):
        _close(run[0][f"pipe_{task}_{mode}"], ref)


def test_pipeline_wired_cfg_parallel(run) -> None:
    """Components.parallel as the CLI sets it: --cfg_parallel in pipeline.sample, and Ulysses + FSDP experts."""
    from wanmoe import pipeline as P

    outs, checks = run
    for task in ("t2v-tiny", "s2v-tiny"):
        comp, req, inp = W.pipeline_parts(task)
        ref = P.generate(comp, req, inp).video
        for mode in ("cfgpar", "ulysses_fsdp"):
            _close(outs[f"wired_{task}_{mode}"], ref)
            assert checks["rank0"][f"wired_{task}_{mode}_frames"] == ref.shape[1]
            # t2v: only rank 0 decodes (it alone writes); s2v: every rank decodes (frames feed the next clip).
            assert checks["rank1"][f"wired_{task}_{mode}_frames"] == (0 if task == "t2v-tiny" else ref.shape[1])


# ---------------------------------------------------------------- the real command line under torchrun


def _args(**kw) -> list[str]:
    return [x for k, v in kw.items() for x in ((f"--{k}",) if v is True else (f"--{k}", str(v)))]


@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory) -> Path:
    """Tiny random-weight checkpoints in the layout load_components reads, plus a reference image and a wav."""
    import wave

    import numpy as np

    from wanmoe import media
    from wanmoe.configs import PRESETS
    from wanmoe.encoders.text import ByteTextEncoder
    from wanmoe.loading import save_small_model
    from wanmoe.models.dit import DiT
    from wanmoe.models.vae import WanVAE

    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(80)
    for task in ("t2v-tiny", "s2v-tiny"):
        cfg = PRESETS[task]
        experts = {}
        for n in cfg.experts:
            experts[n] = DiT(cfg.dit)
            with torch.no_grad():
                for p in experts[n].parameters():
                    p.copy_(torch.randn_like(p) * 0.05)
        save_small_model(root / task, cfg, experts, WanVAE(cfg.vae), ByteTextEncoder(cfg.byte_text))
    t = np.arange(16000) / 16000
    a = 0.3 * np.sin(2 * np.pi * 220 * t) * (t < 0.8)
    with wave.open(str(root / "a.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((a * 32767).astype(np.int16).tobytes())
    media.save_png(root / "ref.png", torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(81)) * 2 - 1)
    return root


def _cli_args(task: str, root: Path) -> list[str]:
    args = _args(task=task, ckpt_dir=root / task, base_seed=5, device="cpu", quiet=True)
    if task == "s2v-tiny":
        args += _args(audio=root / "a.wav", image=root / "ref.png", infer_frames=4, num_clip=2)
    return args


@pytest.mark.parametrize("task", ["t2v-tiny", "s2v-tiny"])
def test_cli_torchrun_matches_single_process(tiny_ckpts: Path, tmp_path: Path, monkeypatch, task: str) -> None:
    """`torchrun --nproc_per_node=2 generate.py ... --ulysses_size 2 --dit_fsdp --t5_fsdp` (gloo) writes one
    mp4 + sidecar, from rank 0 only, whose decoded frames equal a plain single-process run's.

    Both runs go through the real command line with `Video.save` also writing the frames it muxes
    (tests/_cli_capture.py), so the comparison is on tensors, not on re-encoded H.264."""
    from safetensors.torch import load_file

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    single = tmp_path / "single"
    single.mkdir()
    capture = str(ROOT / "tests" / "_cli_capture.py")
    p = subprocess.run([sys.executable, capture, *_cli_args(task, tiny_ckpts), "--save_file", str(single / "v.mp4")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-5000:]
    out = tmp_path / "multi"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", capture,
           *_cli_args(task, tiny_ckpts), "--save_file", str(out / "v.mp4"), "--ulysses_size", "2", "--dit_fsdp",
           "--t5_fsdp"]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    assert sorted(x.name for x in out.iterdir()) == ["v.json", "v.mp4", "v.mp4.frames.safetensors"]
    assert p.stdout.count(str(out / "v.mp4")) == 1, p.stdout  # each writer prints the path: one writer, rank 0
    side = json.loads((out / "v.json").read_text())
    ref_side = json.loads((single / "v.json").read_text())
    assert side["world_size"] == 2 and ref_side["world_size"] == 1
    ld = side["load"]
    assert (ld["ulysses_size"], ld["dit_fsdp"], ld["t5_fsdp"]) == (2, True, True)
    assert side["seed"] == ref_side["seed"] == 5 and side["frames"] == ref_side["frames"]
    got = load_file(str(out / "v.mp4.frames.safetensors"))["frames"]  # (3, T, Hp, Wp) in [-1, 1]
    ref = load_file(str(single / "v.mp4.frames.safetensors"))["frames"]
    assert got.shape == ref.shape
    assert ref.std() > 0.05, "reference video is flat: the comparison would prove nothing"
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_cli_parallel_flags_single_process(tiny_ckpts: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """One process keeps rejecting the parallel flags (as the official generate.py); under torchrun a world size
    that disagrees with the flags is a clean error before any process group or weights."""
    from wanmoe.cli import generate_main

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    base = [*_cli_args("t2v-tiny", tiny_ckpts), "--save_file", str(tmp_path / "v.mp4")]
    for flags, msg in ((["--dit_fsdp"], "--dit_fsdp is not supported in a single process"),
                       (["--cfg_parallel"], "--cfg_parallel is not supported"),
                       (["--ulysses_size", "2"], "--ulysses_size 2 is not supported")):
        assert generate_main([*base, *flags]) == 2
        assert msg in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    for flags, msg in ((["--ulysses_size", "4"], "world size 2 must equal ulysses_size (4)"),
                       (["--ulysses_size", "2", "--cfg_parallel"], "must equal ulysses_size (2) x 2"),
                       ([], "no parallel mode"),
                       (["--t5_fsdp", "--t5_cpu"], "--t5_fsdp cannot be combined with t5_cpu")):
        assert generate_main([*base, *flags]) == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "v.mp4").exists()
    import torch.distributed as dist

    assert not dist.is_initialized()
