"""Wan 2.1 VAE: parity with the official wan/modules/vae2_1.py (oracle, loaded by file path), key layout, loader
errors, gradient flow and per-call streaming state."""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import threading

import pytest
import torch
from safetensors.torch import save_file

from wanmoe.models.vae import VAE21, VAE_TINY, VAEConfig, WanVAE, load_wan21_vae

ORACLE_FILE = pathlib.Path(__file__).resolve().parents[1] / ".venv/lib/python3.11/site-packages/wan/modules/vae2_1.py"
TOL = 1e-5


def _oracle_module():
    if not ORACLE_FILE.is_file():
        pytest.fail(f"official oracle missing: {ORACLE_FILE}")
    spec = importlib.util.spec_from_file_location("wan_vae2_1_oracle", ORACLE_FILE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # needs only torch + einops (torch.cuda.amp imports fine on CPU builds)
    return mod


def _oracle_model(mod, cfg: VAEConfig):
    return mod.WanVAE_(
        dim=cfg.dim,
        z_dim=cfg.z_dim,
        dim_mult=list(cfg.dim_mult),
        num_res_blocks=cfg.num_res_blocks,
        attn_scales=list(cfg.attn_scales),
        temperal_downsample=list(cfg.temporal_downsample),
        dropout=cfg.dropout,
    )


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial weights everywhere (incl. gamma and the zero-initialised attention proj), fan-in scaled."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.2 * r)
            elif p.ndim == 1:
                p.copy_(0.1 * r)
            else:
                p.copy_(r / p[0].numel() ** 0.5)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: the shared 2-core machine is oversubscribed, and spinning OpenMP workers only add
    contention for these tiny convs. Restored afterwards so other test files are unaffected."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pair():
    """(ours, official, cfg) with identical random weights; the official load is strict, so keys match too."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(
        VAE_TINY, mean=tuple(0.1 * i for i in range(16)), std=tuple(0.5 + 0.1 * i for i in range(16))
    )
    ours = WanVAE(cfg).eval()
    _randomize(ours, seed=1)
    ref = _oracle_model(_oracle_module(), cfg).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    scale = [torch.tensor(cfg.mean), 1.0 / torch.tensor(cfg.std)]  # the official wrapper's [mean, 1/std]
    return ours, ref, scale


SIZES = [(32, 32), (48, 32)]  # (Hp, Wp): square and non-square
FRAMES = [1, 5, 9]


@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("frames", FRAMES)
def test_encode_matches_official(pair, hw, frames):
    ours, ref, scale = pair
    g = torch.Generator().manual_seed(frames * 100 + hw[0])
    batch = 2 if hw[0] != hw[1] else 1  # batch > 1 on the non-square size
    video = torch.rand(batch, 3, frames, *hw, generator=g) * 2 - 1
    with torch.no_grad():
        want = ref.encode(video, scale)
        for chunked in (True, False):
            got = ours.encode(video, chunked=chunked)
            assert got.shape == (batch, 16, 1 + (frames - 1) // 4, hw[0] // 8, hw[1] // 8)
            assert _rel(got, want) <= TOL, chunked


@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("latent_frames", [1, 2, 3])
def test_decode_matches_official(pair, hw, latent_frames):
    ours, ref, scale = pair
    g = torch.Generator().manual_seed(latent_frames * 100 + hw[0])
    batch = 2 if hw[0] != hw[1] else 1
    z = torch.randn(batch, 16, latent_frames, hw[0] // 8, hw[1] // 8, generator=g)
    with torch.no_grad():
        want = ref.decode(z, scale)
        # Random weights overshoot [-1, 1] somewhere, so the clamp below is exercised, not vacuous.
        assert want.abs().max() > 1.0
        for chunked in (True, False):
            raw = ours.decode(z, clamp=False, chunked=chunked)
            assert raw.shape == (batch, 3, 1 + 4 * (latent_frames - 1), *hw)
            assert _rel(raw, want) <= TOL, chunked
        if latent_frames == 2:  # the clamped default path, once per size
            clamped = ours.decode(z)
            assert clamped.min() >= -1.0 and clamped.max() <= 1.0
            assert _rel(clamped, want.clamp(-1, 1)) <= TOL


def test_encode_logvar_is_the_normalised_posterior(pair):
    ours, ref, _ = pair
    video = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        mu_raw, lv_raw = ours.encode_moments(video)
        mu, lv = ours.encode(video, return_logvar=True)
        # Oracle moments: its encoder stack + conv1, chunked with its own cache (encode() discards log_var).
        ref.clear_cache()
        outs = []
        for sl in (slice(0, 1), slice(1, 5)):
            ref._enc_conv_idx = [0]
            outs.append(ref.encoder(video[:, :, sl], feat_cache=ref._enc_feat_map, feat_idx=ref._enc_conv_idx))
        want_mu, want_lv = ref.conv1(torch.cat(outs, 2)).chunk(2, dim=1)
    assert _rel(mu_raw, want_mu) <= TOL and _rel(lv_raw, want_lv) <= TOL
    std = torch.tensor(ours.cfg.std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(lv, lv_raw - 2 * std.log())
    torch.testing.assert_close(mu, (mu_raw - torch.tensor(ours.cfg.mean).view(1, -1, 1, 1, 1)) / std)


def test_vae21_meta_keys_and_shapes_match_official():
    with torch.device("meta"):
        ours = WanVAE(VAE21)
        ref = _oracle_model(_oracle_module(), VAE21)
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert got == want
    assert len(got) == 194 and sum(v.numel() for v in ours.state_dict().values()) == 126_892_531
    assert got["encoder.middle.1.norm.gamma"] == (384, 1, 1)
    assert got["decoder.upsamples.0.residual.0.gamma"] == (384, 1, 1, 1)


def test_no_state_left_on_module_and_thread_safe(pair):
    ours, _, _ = pair
    before = {k: set(m.__dict__) for k, m in ours.named_modules()}
    video = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        want_z = ours.encode(video)
        want_x = ours.decode(want_z)
        results: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def work(i: int) -> None:
            with torch.no_grad():
                z = ours.encode(video)
                results[i] = (z, ours.decode(z))

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    after = {k: set(m.__dict__) for k, m in ours.named_modules()}
    assert before == after
    for z, x in results.values():
        assert torch.equal(z, want_z) and torch.equal(x, want_x)


def test_gradients_flow_through_encode_and_decode():
    torch.manual_seed(0)
    vae = WanVAE(VAE_TINY)
    _randomize(vae, seed=5)  # default init zeroes attention proj, which would (correctly) block to_qkv grads
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    grads = {}
    for chunked in (True, False):
        vae.zero_grad(set_to_none=True)
        mu, lv = vae.encode(video, return_logvar=True, chunked=chunked)
        z = mu + (0.5 * lv).exp() * torch.randn(mu.shape, generator=torch.Generator().manual_seed(6))
        rec = vae.decode(z, clamp=False, chunked=chunked)
        loss = (rec - video).pow(2).mean() + 1e-3 * (mu.pow(2) + lv.exp() - lv).mean()
        loss.backward()
        zero = [n for n, p in vae.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert zero == [], f"no gradient reached: {zero}"
        grads[chunked] = {n: p.grad.clone() for n, p in vae.named_parameters()}
    # Chunked streaming and the one-pass path are the same function, so their gradients agree too.
    for n in grads[True]:
        assert _rel(grads[False][n], grads[True][n]) <= 1e-4, n


def test_input_validation():
    vae = WanVAE(VAE_TINY)
    with pytest.raises(ValueError, match="4n \\+ 1"):
        vae.encode(torch.zeros(1, 3, 4, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(torch.zeros(1, 3, 5, 20, 16))
    with pytest.raises(ValueError, match="B, 3, T"):
        vae.encode(torch.zeros(1, 4, 5, 16, 16))
    with pytest.raises(ValueError, match="B, 16, F"):
        vae.decode(torch.zeros(1, 8, 2, 2, 2))
    with pytest.raises(ValueError, match="z_dim = 8"):
        WanVAE(dataclasses.replace(VAE_TINY, z_dim=8))
    with pytest.raises(ValueError, match="temporal_downsample"):
        WanVAE(dataclasses.replace(VAE_TINY, temporal_downsample=(True,)))


# ---- loader ---------------------------------------------------------------------------------------------------


class _Payload:  # a non-tensor class inside a .pth: weights_only must refuse to unpickle it
    def __init__(self) -> None:
        self.x = 1


@pytest.fixture
def tiny_ckpt(tmp_path):
    torch.manual_seed(0)
    vae = WanVAE(VAE_TINY)
    _randomize(vae, seed=7)
    path = tmp_path / "vae.pth"
    torch.save(vae.state_dict(), path)
    return vae, path


def test_loader_roundtrip_pth_and_safetensors(tiny_ckpt, tmp_path):
    vae, path = tiny_ckpt
    st_path = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, st_path)
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        want = vae.decode(vae.encode(video))
    for p in (path, st_path):
        loaded = load_wan21_vae(p, VAE_TINY)
        assert not loaded.training and not any(q.requires_grad for q in loaded.parameters())
        assert all(q.device.type == "cpu" for q in loaded.parameters())
        with torch.no_grad():
            assert torch.equal(loaded.decode(loaded.encode(video)), want)


def _save(state, path):
    torch.save(state, path)
    return path


def test_loader_errors_are_clear_and_repeatable(tiny_ckpt, tmp_path):
    vae, good = tiny_ckpt
    sd = vae.state_dict()
    missing = _save({k: v for k, v in sd.items() if k != "decoder.head.2.weight"}, tmp_path / "missing.pth")
    extra = _save({**sd, "encoder.bogus": torch.zeros(1)}, tmp_path / "extra.pth")
    shaped = _save({**sd, "conv2.weight": torch.zeros(16, 16, 1, 1, 2)}, tmp_path / "shape.pth")
    code = _save({"model": _Payload(), **sd}, tmp_path / "code.pth")
    cases = [
        (missing, r"missing keys \(1\): decoder.head.2.weight"),
        (extra, r"unexpected keys \(1\): encoder.bogus"),
        (shaped, r"wrong shapes \(1\): conv2.weight: file \(16, 16, 1, 1, 2\) vs model \(16, 16, 1, 1, 1\)"),
        (code, "pickled Python objects"),
    ]
    for path, msg in cases:
        for _ in range(2):  # a fresh, identical error each time: nothing cached or half-loaded in between
            with pytest.raises(ValueError, match=msg):
                load_wan21_vae(path, VAE_TINY)
    # Wrong config for a valid file: all mismatches reported together.
    with pytest.raises(ValueError, match="wrong shapes"):
        load_wan21_vae(good, dataclasses.replace(VAE_TINY, dim=16))
    with pytest.raises(FileNotFoundError):
        load_wan21_vae(tmp_path / "nope.pth", VAE_TINY)
    # After all the failures a good file still loads fully.
    loaded = load_wan21_vae(good, VAE_TINY)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())
