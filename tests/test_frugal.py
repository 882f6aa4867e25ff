"""Frugal activations (issue 13 part 3): the DiT's token chunks, the per-segment S2V modulation, the VAE's spatial
tiles, and `frugal_` that switches them on. Tiny random models on CPU; full-size peaks on the meta device."""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_dit import FakeSP, randomize_, rel_err, text  # noqa: E402

from wanmoe import numerics  # noqa: E402
from wanmoe.memory.plan import activation_peak  # noqa: E402
from wanmoe.models.dit import DIT_PRESETS, DiT  # noqa: E402
from wanmoe.models.frugal import DEFAULT_TILING, DEFAULT_TOKEN_CHUNK, frugal_  # noqa: E402
from wanmoe.models.s2v import S2VInputs  # noqa: E402
from wanmoe.models.vae import VAE_TINY, VAEConfig, WanVAE  # noqa: E402
from wanmoe.models.vae_tiling import Tiling, ramp, tile_spans  # noqa: E402

MINI_VAE = Path(__file__).resolve().parents[1] / "src/wanmoe/assets/s2v-mini/vae.safetensors"
# Chunked vs unchunked DiT: only the matmul shapes differ. Measured max |diff| 2.4e-7 on outputs of magnitude ~1.5
# (norm-relative 1e-7 .. 2e-7) over t2v / i2v / ti2v / s2v, with and without sequence parallel.
CHUNK_TOL = 1e-6


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _dit(name: str) -> DiT:
    torch.manual_seed(0)
    m = DiT(DIT_PRESETS[name]).eval()
    randomize_(m)
    return m


def _run(m: DiT, chunk: int | None, *args, sp=None, **kw) -> torch.Tensor:
    m.token_chunk, m.seq_parallel = chunk, sp
    try:
        with torch.no_grad():
            return m(*args, **kw)
    finally:
        m.token_chunk, m.seq_parallel = None, None


def _s2v_args(m: DiT, g: torch.Generator, batch: int = 2, fhw=(3, 8, 16)):
    s = m.cfg.s2v
    f, h, w = fhw
    inp = S2VInputs(
        audio=torch.randn(batch, s.num_audio_layers, s.audio_dim, 4 * f, generator=g),
        ref_latents=torch.randn(batch, 16, 1, h, w, generator=g),
        motion_latents=torch.randn(batch, 16, 19, h, w, generator=g),
        pose_latents=torch.randn(batch, s.cond_dim, f, h, w, generator=g),
    )
    _, ctx = text(m.cfg, [5, 2][:batch], g)
    x = torch.randn(batch, 16, f, h, w, generator=g)
    return (x, torch.tensor([913.0, 42.0][:batch]), ctx), {"s2v": inp}


def _cases():
    """(model, args, kwargs) for every token layout: one t, per-token t, channel-concat y, the S2V segments."""
    g = torch.Generator().manual_seed(1)
    t2v = _dit("t2v-a14b-tiny")
    x = torch.randn(2, 16, 3, 8, 12, generator=g)
    _, ctx = text(t2v.cfg, [5, 3], g)
    n = 3 * 8 * 12 // 4
    t_tok = torch.full((2, n), 640.0)
    t_tok[0, : n // 3], t_tok[1, : n // 2] = 0.0, 10.0
    yield "t2v", t2v, (x, torch.tensor([999.0, 137.0]), ctx), {}
    yield "per-token t", t2v, (x, t_tok, ctx), {}
    i2v = _dit("i2v-a14b-tiny")
    yield "i2v", i2v, (x, torch.tensor([500.0, 20.0]), ctx), {"y": torch.randn(2, 20, 3, 8, 12, generator=g)}
    s2v = _dit("s2v-14b-tiny")
    args, kw = _s2v_args(s2v, g)
    yield "s2v", s2v, args, kw


@pytest.mark.parametrize("sp", [False, True], ids=["plain", "seq-parallel"])
def test_token_chunks_match_unchunked(sp):
    """Every chunk size gives the unchunked output within fp32 rounding (chunks of 1, ragged ones, one chunk
    per S2V frame group), also on sequence-parallel shards; a chunk covering the stream is bit-identical."""
    for name, m, args, kw in _cases():
        want = _run(m, None, *args, **kw)
        for chunk in (1, 7, 40):
            got = _run(m, chunk, *args, sp=FakeSP() if sp else None, **kw)
            assert rel_err(got, want) <= CHUNK_TOL, (name, chunk)
        if not sp:
            assert torch.equal(_run(m, 10_000, *args, **kw), want), name


def _block_before(block, x, e0, rope, ctx, seg):
    """The block as it was before token chunks, written out: per-token (B, L, D) modulation via torch.where."""
    pick = (lambda m: m) if seg is None else (lambda m: torch.where(seg, m[:, 0:1], m[:, 1:2]))
    wd = block.modulation.dtype
    mod = block.modulation.float() + e0
    shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (pick(m) for m in mod.unbind(2))
    y = block.self_attn((block.norm1(x) * (1 + scale_sa) + shift_sa).to(wd), rope=rope)
    x = x + y.float() * gate_sa
    x = x + block.cross_attn(block.norm3(x).to(wd), ctx).float()
    y = block.ffn((block.norm2(x) * (1 + scale_ff) + shift_ff).to(wd))
    return x + y.float() * gate_ff


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segment_and_gathered_modulation_equal_the_per_token_tensors(dtype):
    """The S2V t / t=0 segments applied by slicing, and per-token t gathered from the distinct rows, are
    torch.equal to the former (B, L, 6, D) per-token tensors (in fp32 and with bf16 weights)."""
    m = _dit("s2v-14b-tiny").to(dtype)
    block, d = m.blocks[0], m.cfg.dim
    g = torch.Generator().manual_seed(2)
    b, n, split = 2, 37, 23
    x = torch.randn(b, n, d, generator=g)
    e0 = torch.randn(b, 2, 6, d, generator=g)
    rope = torch.randn(1, n, m.cfg.head_dim // 2, 2, generator=g)
    ctx = torch.randn(b, 5, d, generator=g).to(dtype)
    seg = (torch.arange(n) < split)[None, :, None]
    inv = torch.randint(0, 3, (b, n), generator=g)
    rows3 = torch.randn(1, 3, 6, d, generator=g)
    with torch.no_grad():
        assert torch.equal(block(x, e0, rope, ctx, rows=split), _block_before(block, x, e0, rope, ctx, seg))
        want = _block_before(block, x, rows3[0][inv], rope, ctx, None)
        assert torch.equal(block(x, rows3, rope, ctx, rows=inv), want)


def test_token_chunks_backward():
    """Training through chunks: the same gradients as unchunked, within rounding."""
    m = _dit("s2v-14b-tiny")
    args, kw = _s2v_args(m, torch.Generator().manual_seed(3), batch=1)
    grads = []
    for chunk in (None, 13):
        m.zero_grad()
        m.token_chunk = chunk
        m(*args, **kw).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    m.token_chunk = None
    assert grads[0].shape == grads[1].shape and rel_err(grads[1], grads[0]) <= 1e-5


def test_token_chunk_validated():
    m = _dit("t2v-a14b-tiny")
    x, t, ctx = torch.randn(1, 16, 1, 4, 4), torch.tensor([5.0]), torch.randn(1, 3, 32)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="token_chunk"):
            _run(m, bad, x, t, ctx)


def test_dit_meta_peak_drops_with_token_chunks():
    """A14B in bf16 at 1280*720 x 81 frames (75600 tokens; one block: the peak repeats per block): the chunked
    forward's activation peak is well under half the unchunked one (measured 9.37 -> 3.60 GB)."""
    cfg = replace(DIT_PRESETS["t2v-a14b"], num_layers=1)
    with torch.device("meta"):
        m = numerics.cast_(DiT(cfg), torch.bfloat16)

    def forward() -> torch.Tensor:
        x, t = torch.empty(1, 16, 21, 90, 160, device="meta"), torch.empty(1, device="meta")
        return m(x, t, torch.empty(1, 512, 4096, device="meta"))

    full = activation_peak(forward)
    m.token_chunk = DEFAULT_TOKEN_CHUNK
    chunked = activation_peak(forward)
    # The floor: the fp32 residual stream and the bf16 keys and values, all full length.
    floor = 75600 * 5120 * (4 + 2 * 2)
    assert chunked < 0.45 * full and chunked < 1.25 * floor, (full / 1e9, chunked / 1e9)


# ---------------------------------------------------------------- VAE tiles


def test_tile_spans_and_ramps():
    """Tiles of one length <= tile cover the axis, neighbours share >= overlap cells, every weight is > 0 inside
    its tile; where no tile reaches past its neighbour the ramps sum to exactly 1 (else the blend's division by
    the weight sum does)."""
    for n, tile, ov, unity in ((90, 32, 8, True), (160, 32, 8, True), (33, 32, 8, True), (32, 32, 8, True),
                               (100, 16, 0, True), (57, 32, 8, True), (7, 4, 3, False)):
        spans = tile_spans(n, tile, ov)
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert len({b - a for a, b in spans}) == 1 and spans[0][1] <= tile
        assert all(b0 - a1 >= ov for (_, b0), (a1, _) in zip(spans, spans[1:]))  # neighbours share >= ov
        total = torch.zeros(n * 8)
        for i, (a, b) in enumerate(spans):
            w = ramp(spans, i, 8)
            assert w.min() > 0 and w.max() <= 1
            total[a * 8 : b * 8] += w
        assert total.min() > 0
        assert torch.allclose(total, torch.ones_like(total), atol=1e-6) == unity, (n, tile, ov)
    assert len(tile_spans(90, 32, 8)) == 4 and len(tile_spans(160, 32, 8)) == 7  # 1280*720: 28 tiles of 29 x 30


def test_tiling_off_or_one_tile_is_untiled():
    torch.manual_seed(0)
    vae = WanVAE(VAE_TINY).eval()
    z = torch.randn(1, 16, 2, 6, 8)
    with torch.no_grad():
        want = vae.decode(z)
        vae.tiling = Tiling(8, 2)  # the 6 x 8 grid fits one tile
        assert torch.equal(vae.decode(z), want)
    for bad in (Tiling(1, 0), Tiling(8, 8), Tiling(8, -1)):
        vae.tiling = bad
        with pytest.raises(ValueError, match="Tiling"):
            vae.decode(z)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(4.0 / (a.double() - b.double()).pow(2).mean().item())  # [-1, 1] video: peak 2


def test_tiled_decode_and_encode_close_on_trained_vae():
    """The shipped (trained) small VAE on a rendered avatar clip at 192 px with Tiling(16, 4): 2 x 2 tiles of
    112 px overlapping by 32 px. Tiled vs untiled decode 46.3 dB on this clip (46.3-50.8 over 3 clips); tiled
    encode then untiled decode 46.9 dB (46.9-54.4); docs/vae.md."""
    from wanmoe.data.avatar import make_sample
    from wanmoe.loading import load_small_vae

    vae = load_small_vae(MINI_VAE, torch.device("cpu"))
    video = make_sample(1_000_003, size=192, frames=5).video[None]  # (1, 3, 5, 192, 192) in [-1, 1]
    with torch.no_grad():
        z = vae.encode(video)
        want = vae.decode(z)
        vae.tiling = Tiling(16, 4)
        dec, zt = vae.decode(z), vae.encode(video)
        vae.tiling = None
        enc = vae.decode(zt)
    assert dec.shape == want.shape and zt.shape == z.shape
    assert _psnr(dec, want) > 44 and _psnr(enc, want) > 44, (_psnr(dec, want), _psnr(enc, want))


def test_tiled_autograd():
    torch.manual_seed(0)
    vae = WanVAE(VAE_TINY)
    vae.tiling = Tiling(4, 2)
    z = torch.randn(1, 16, 2, 6, 6, requires_grad=True)
    vae.decode(z, clamp=False).square().mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_vae_meta_peak_drops_with_tiles():
    """Full-size VAE on meta at 832*480 (latent 60 x 104, 2 latent frames): the default tiles' decode and encode
    peaks are a small fraction of the untiled ones (measured at 1280*720 x 81 frames: decode 18.1 -> 2.2 GB,
    encode 14.6 -> 1.9 GB)."""
    with torch.device("meta"):
        vae = WanVAE(VAEConfig())

    def decode() -> torch.Tensor:
        return vae.decode(torch.empty(1, 16, 2, 60, 104, device="meta"))

    def encode() -> torch.Tensor:
        return vae.encode(torch.empty(1, 3, 5, 480, 832, device="meta"))

    full_dec, full_enc = activation_peak(decode), activation_peak(encode)
    vae.tiling = DEFAULT_TILING
    tiled_dec, tiled_enc = activation_peak(decode), activation_peak(encode)
    assert tiled_dec < full_dec / 3 and tiled_enc < full_enc / 3, [v / 1e9 for v in (full_dec, tiled_dec, full_enc,
                                                                                         tiled_enc)]


def test_frugal_sets_and_clears_the_knobs():
    torch.manual_seed(0)
    dit, vae = DiT(DIT_PRESETS["t2v-a14b-tiny"]), WanVAE(VAE_TINY)
    holder = torch.nn.ModuleDict({"expert": dit})
    assert frugal_(holder, None, vae) == 2
    assert dit.token_chunk == DEFAULT_TOKEN_CHUNK == 4096 and vae.tiling == DEFAULT_TILING == Tiling(32, 8)
    assert frugal_(dit, vae, token_chunk=None, tiling=None) == 2 and dit.token_chunk is None and vae.tiling is None
    with pytest.raises(ValueError):
        frugal_(dit, token_chunk=0)
    with pytest.raises(TypeError):
        frugal_(vae, tiling=(32, 8))
