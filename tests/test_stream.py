"""Block streaming (`wanmoe.memory.stream`, ExpertPool policy 'stream'): identical outputs, at most K blocks' bytes
on the device (counted, not guessed), int8 and LoRA composition, plain model after removal, one batched transformer
call per step in the pipeline."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from wanmoe.memory.offload import POLICIES, ExpertPool
from wanmoe.memory.quantize import QuantLinear, quantize_
from wanmoe.memory.stream import ResidentBytes, block_bytes, stream_
from wanmoe.models.dit import DIT_PRESETS, DiT, S2VInputs

LAYERS = 6


def tiny_dit(preset: str, seed: int = 0, layers: int = LAYERS) -> DiT:
    torch.manual_seed(seed)
    m = DiT(dataclasses.replace(DIT_PRESETS[preset], num_layers=layers)).eval().requires_grad_(False)
    with torch.no_grad():  # the zero-initialised head would hide every block behind a zero output
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return m


def inputs(model: DiT, batch: int = 2) -> tuple[tuple, dict]:
    cfg, g = model.cfg, torch.Generator().manual_seed(1)
    x = torch.randn(batch, 16, 2, 8, 8, generator=g)
    t = torch.tensor([700.0, 300.0][:batch])
    ctx = torch.randn(batch, 4, cfg.text_dim, generator=g)
    kw = {}
    if cfg.s2v is not None:
        s = cfg.s2v
        kw["s2v"] = S2VInputs(torch.randn(batch, s.num_audio_layers, s.audio_dim, 8, generator=g),
                              torch.randn(batch, 16, 1, 8, 8, generator=g),
                              torch.randn(batch, 16, 19, 8, 8, generator=g))
    return (x, t, ctx), kw


@pytest.mark.parametrize("preset", ["t2v-a14b-tiny", "s2v-14b-tiny"])
@pytest.mark.parametrize("ahead", [1, 2, 3])
def test_stream_equals_resident_and_counts_k_blocks(preset, ahead):
    model = tiny_dit(preset)
    args, kw = inputs(model)
    with torch.no_grad():
        ref = model(*args, **kw)
    host = [t.data_ptr() for t in (*model.blocks.parameters(), *model.blocks.buffers())]
    biggest = max(block_bytes(b) for b in model.blocks)
    tracker = ResidentBytes()
    handle = stream_(model, "cpu", ahead=ahead, tracker=tracker)
    with torch.no_grad():
        outs = [model(*args, **kw) for _ in range(2)]
    assert all(torch.equal(o, ref) for o in outs)
    assert tracker.copies == 2 * LAYERS  # every block crossed once per forward
    assert tracker.copied == 2 * sum(block_bytes(b) for b in model.blocks)
    assert tracker.live == 0  # nothing left on the "device" between forwards
    assert tracker.peak <= ahead * biggest
    assert tracker.peak == ahead * block_bytes(model.blocks[0])  # equal-sized blocks: K copies were really alive
    handle.remove()
    assert [t.data_ptr() for t in (*model.blocks.parameters(), *model.blocks.buffers())] == host
    assert all(not b._forward_pre_hooks and not b._forward_hooks for b in model.blocks)
    with torch.no_grad():
        assert torch.equal(model(*args, **kw), ref)


@pytest.mark.parametrize(("preset", "staging"), [("t2v-a14b-tiny", 1), ("s2v-14b-tiny", 2), ("t2v-a14b-tiny", 3)])
def test_staging_ring_equals_resident_and_leaves_host_tensors_alone(preset, staging):
    """Blocks copied through N staging buffers: the same output, the same K-block bound, N buffers of the largest
    block (64-byte aligned tensors), the host tensors neither pinned nor replaced nor written."""
    model = tiny_dit(preset)
    args, kw = inputs(model)
    with torch.no_grad():
        ref = model(*args, **kw)
    host = {n: (t.data_ptr(), t.clone()) for n, t in model.blocks.state_dict(keep_vars=True).items()}
    tracker = ResidentBytes()
    handle = stream_(model, "cpu", ahead=2, tracker=tracker, staging=staging)
    aligned = max(sum(-(-t.numel() * t.element_size() // 64) * 64 for t in b.state_dict().values())
                  for b in model.blocks)
    assert handle.staging_bytes == staging * aligned
    with torch.no_grad():
        outs = [model(*args, **kw) for _ in range(2)]
    assert all(torch.equal(o, ref) for o in outs)
    assert tracker.copies == 2 * LAYERS and tracker.live == 0 and tracker.peak == 2 * block_bytes(model.blocks[0])
    # The ring was used: the buffer written last holds the last block's tensors, back to back.
    last = handle._stages[(handle._next_stage - 1) % staging].buf
    first = next(iter(model.blocks[-1].state_dict().values()))
    assert torch.equal(last[: first.numel() * first.element_size()].view(first.dtype).view(first.shape), first)
    for name, t in model.blocks.state_dict(keep_vars=True).items():
        assert t.data_ptr() == host[name][0] and torch.equal(t, host[name][1]) and not t.is_pinned()
    handle.remove()
    assert handle.staging_bytes == 0
    with pytest.raises(ValueError, match="staging"):
        stream_(model, "cpu", staging=-1)
    with pytest.raises(ValueError, match="stream_staging"):
        ExpertPool({"a": lambda: model}, "cpu", "stream", stream_staging=True)


def test_blocks_hold_device_copies_only_in_their_window():
    """While block i runs it reads fresh copies (not the host tensors); blocks outside [i, i+K) hold host ones."""
    model, ahead = tiny_dit("t2v-a14b-tiny"), 2
    args, kw = inputs(model)
    host = [b.self_attn.q.weight.data_ptr() for b in model.blocks]
    tracker = ResidentBytes()
    handle = stream_(model, "cpu", ahead=ahead, tracker=tracker)
    seen = []

    def probe(i: int):  # registered after the streamer's hooks, so it runs after block i was swapped in
        def hook(module: nn.Module, a: tuple) -> None:
            on_copy = [j for j, b in enumerate(model.blocks) if b.self_attn.q.weight.data_ptr() != host[j]]
            seen.append((i, on_copy, tracker.live))
        return hook

    probes = [b.register_forward_pre_hook(probe(i)) for i, b in enumerate(model.blocks)]
    with torch.no_grad():
        model(*args, **kw)
    for p in probes:
        p.remove()
    handle.remove()
    bb = block_bytes(model.blocks[0])
    assert [i for i, _, _ in seen] == list(range(LAYERS))
    for i, on_copy, live in seen:
        assert on_copy == [i]  # only the running block reads a device copy; the one ahead waits in the side buffer
        assert live == min(ahead, LAYERS - i) * bb


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_8bit_blocks_stream_their_buffers(mode):
    model = quantize_(tiny_dit("s2v-14b-tiny"), mode)
    args, kw = inputs(model)
    with torch.no_grad():
        ref = model(*args, **kw)
    q = model.blocks[2].ffn[0]
    assert isinstance(q, QuantLinear) and q.mode == mode
    host = q.qweight.data_ptr()
    tracker = ResidentBytes()
    ptrs = []
    handle = stream_(model, "cpu", ahead=2, tracker=tracker)
    q.register_forward_pre_hook(lambda m, a: ptrs.append(m.qweight.data_ptr()))
    with torch.no_grad():
        out = model(*args, **kw)
    handle.remove()
    assert torch.equal(out, ref)  # same 8-bit values, same kernels: equal, not only within the 8-bit tolerance
    assert ptrs and ptrs[0] != host and q.qweight.data_ptr() == host
    assert tracker.copied == sum(block_bytes(b) for b in model.blocks)  # 8-bit bytes + scales, not float weights
    assert block_bytes(model.blocks[0]) < block_bytes(tiny_dit("s2v-14b-tiny").blocks[0]) / 2


def test_validation():
    model = tiny_dit("t2v-a14b-tiny", layers=2)
    with pytest.raises(ValueError, match="ahead"):
        stream_(model, "cpu", ahead=0)
    with pytest.raises(ValueError, match="no submodule 'layers'"):
        stream_(model, "cpu", blocks="layers")
    with pytest.raises(ValueError, match="ModuleList"):
        stream_(model, "cpu", blocks="head")
    handle = stream_(model, "cpu")
    with pytest.raises(ValueError, match="streamed already"):
        stream_(model, "cpu")
    args, kw = inputs(model)
    model.blocks[1].requires_grad_(True)
    with pytest.raises(RuntimeError, match="torch.no_grad"):
        model(*args, **kw)
    model.blocks[1].requires_grad_(False)
    with torch.no_grad():
        model(*args, **kw)  # the failed forward's leftover copies were dropped on the way
    assert handle.tracker.live == 0
    handle.remove()
    stream_(model, "cpu").remove()  # a removed streamer can be replaced
    with torch.device("meta"):
        meta = DiT(DIT_PRESETS["t2v-a14b-tiny"])
    with pytest.raises(ValueError, match="meta"):
        stream_(meta, "cpu")
    with pytest.raises(ValueError, match="stream_ahead"):
        ExpertPool({"a": lambda: model}, "cpu", "stream", stream_ahead=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_stream_equals_resident_within_k_blocks():
    model, ahead = tiny_dit("t2v-a14b-tiny"), 2
    args, kw = inputs(model)
    with torch.no_grad():
        ref = model.cuda()(*(a.cuda() for a in args), **kw).cpu()
    handle = stream_(model, "cuda", ahead=ahead)
    assert all(t.is_pinned() for t in model.blocks.parameters()) and model.head.head.weight.is_cuda
    with torch.no_grad():
        outs = [model(*(a.cuda() for a in args), **kw).cpu() for _ in range(3)]
    handle.remove()
    assert all(torch.equal(o, ref) for o in outs)
    assert handle.tracker.copies == 3 * LAYERS and handle.tracker.live == 0
    assert handle.tracker.peak == ahead * block_bytes(model.blocks[0])
    assert all(not t.is_cuda for t in model.blocks.parameters())
    # Through a staging ring of two pinned buffers: blocks stay pageable, the output is the same.
    model = tiny_dit("t2v-a14b-tiny")
    handle = stream_(model, "cuda", ahead=ahead, staging=2)
    assert not any(t.is_pinned() for t in model.blocks.parameters()) and all(s.buf.is_pinned() for s in handle._stages)
    with torch.no_grad():
        outs = [model(*(a.cuda() for a in args), **kw).cpu() for _ in range(3)]
    handle.remove()
    assert all(torch.equal(o, ref) for o in outs)


# ------------------------------------------------------------------------------------------- expert pool


@pytest.fixture
def expert_files(tmp_path):
    from wanmoe.checkpoint import save_dit

    cfg = dataclasses.replace(DIT_PRESETS["t2v-a14b-tiny"], num_layers=4, text_dim=4096)  # config.json's text_dim
    for i, name in enumerate(("high", "low")):
        torch.manual_seed(10 + i)
        m = DiT(cfg)
        nn.init.normal_(m.head.head.weight, std=0.02)
        save_dit(m, tmp_path / name, max_shard_size=None)
    return tmp_path, cfg


def denoise(pool: ExpertPool, cfg) -> torch.Tensor:  # noqa: ANN001
    x = torch.randn(1, 16, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(1, 4, cfg.text_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for i, name in enumerate(("high", "high", "low", "low")):
            if i == 1:
                pool.prefetch("low")
            x = x - 0.25 * pool.get(name)(x, torch.tensor([900.0 - 200 * i]), ctx)
    return x


@pytest.mark.parametrize(("quant", "staging"), [(None, 0), ("int8", 0), ("int8", 2), ("fp8", 2)])
def test_pool_stream_switches_experts_like_resident(expert_files, quant, staging):
    from wanmoe.checkpoint import load_dit

    root, cfg = expert_files
    loaders = {n: (lambda n=n: quantize_(load_dit(root / n), quant) if quant else load_dit(root / n))
               for n in ("high", "low")}
    with ExpertPool(loaders, "cpu", "resident") as pool:
        ref = denoise(pool, cfg)
    assert "stream" in POLICIES
    with ExpertPool(loaders, "cpu", "stream", stream_ahead=2, stream_staging=staging) as pool:
        assert torch.equal(denoise(pool, cfg), ref)
        assert all(bool(h._stages) == bool(staging) for h in pool._streams.values())
        assert pool.loads == {"high": 1, "low": 1}
        assert pool.stream_bytes.copies == 4 * cfg.num_layers
        high, low = pool._modules["high"], pool._modules["low"]
        bb = block_bytes(low.blocks[0])
        assert pool.stream_bytes.peak == 2 * bb and pool.stream_bytes.live == 0
        # Only the running expert streams: the idle one has no hooks left and lives in host memory.
        assert all(not b._forward_pre_hooks for b in high.blocks) and all(b._forward_pre_hooks for b in low.blocks)
        pool.offload_all()
        assert all(not b._forward_pre_hooks for b in low.blocks)
        assert pool.get("high") is high and all(b._forward_pre_hooks for b in high.blocks)
        pool.release()
        assert pool.loaded() == [] and all(not b._forward_pre_hooks for b in high.blocks)


def test_pool_stream_composes_with_lora_transform(expert_files, tmp_path):
    """A runtime LoRA beside int8 layers adds buffers to the blocks' Linears: they stream with the block."""
    from wanmoe import lora as lo
    from wanmoe.checkpoint import load_dit

    root, cfg = expert_files
    g = torch.Generator().manual_seed(3)
    d = cfg.dim
    factors = {"blocks.1.self_attn.q": (torch.randn(4, d, generator=g), torch.randn(d, 4, generator=g) * 0.1),
               "blocks.3.ffn.0": (torch.randn(4, d, generator=g), torch.randn(cfg.ffn_dim, 4, generator=g) * 0.1)}
    path = lo.save_lora(tmp_path / "l.safetensors", factors)
    loaders = {n: (lambda n=n: quantize_(load_dit(root / n))) for n in ("high", "low")}

    def run(policy: str, with_lora: bool) -> torch.Tensor:
        with ExpertPool(loaders, "cpu", policy) as pool:
            if with_lora:
                pool.transform = lambda name, m: (lo.apply_lora(m, lo.read_lora(path, m)), m)[1]
            return denoise(pool, cfg)

    ref = run("resident", True)
    assert not torch.equal(ref, run("resident", False))  # the LoRA matters
    assert torch.equal(run("stream", True), ref)


# ------------------------------------------------------------------------------------------- pipeline


def test_pipeline_batches_guidance_under_stream(tiny_ckpt):
    """Under 'stream' the conditional and unconditional passes share one transformer call (one block transfer)."""
    import wanmoe

    pipe = wanmoe.load(tiny_ckpt("t2v-tiny"))
    old = pipe.components.experts
    calls: list[int] = []

    def pool(policy: str) -> ExpertPool:
        p = ExpertPool(old.loaders, "cpu", policy)
        p.transform = lambda name, m: (m.register_forward_pre_hook(lambda *_: calls.append(1)), m)[1]
        return p

    kw = {"seed": 4, "steps": 3, "guide_scale": 3.0, "prompt": "a cat"}
    pipe.components.experts = pool("offload")
    plain = pipe(**kw)
    assert len(calls) == 2 * 3  # the official order: two transformer calls per step
    calls.clear()
    batched = pipe(batch_cfg=True, **kw)
    pipe.components.experts = pool("stream")
    calls.clear()
    streamed = pipe(**kw)
    assert len(calls) == 3  # one batched call per step, without asking for batch_cfg
    assert torch.equal(streamed.frames, batched.frames)
    torch.testing.assert_close(streamed.frames, plain.frames, atol=1e-4, rtol=0)
    pipe.components.experts.close()
    old.close()


def test_load_options_carry_the_staging_ring(tiny_ckpt):
    """stream_staging reaches the expert pool when the policy streams, and is refused without vram_gb (the only way
    to a stream policy), from the API and the command line alike."""
    import dataclasses as dc

    import wanmoe
    from wanmoe import loading
    from wanmoe.cli import main
    from wanmoe.configs import get_preset
    from wanmoe.request import InputError, LoadOptions

    cfg, root = get_preset("t2v-tiny"), str(tiny_ckpt("t2v-tiny"))
    kw = {"seed": 4, "steps": 2, "guide_scale": 3.0, "prompt": "a cat"}
    frames = {}
    for staging in (0, 2):
        opts = LoadOptions(ckpt_dir=root, device="cpu", policy="stream", offload_model=True, stream_staging=staging)
        pipe = wanmoe.api.Pipeline(cfg, loading.load_components(cfg, opts), opts)
        assert pipe.components.experts.stream_staging == staging
        frames[staging] = pipe(**kw).frames
        pipe.components.experts.close()
    assert torch.equal(frames[0], frames[2])
    opts = dc.replace(opts, policy="offload")  # a policy that keeps experts whole: the ring is not used
    assert loading.load_components(cfg, opts).experts.stream_staging == 0
    with pytest.raises(InputError, match="stream_staging.*vram_gb"):
        wanmoe.load(root, stream_staging=2)
    assert main(["generate", "--task", "t2v-tiny", "--ckpt_dir", root, "--stream_staging", "2"]) == 2
