"""S2V parity with the official WanModel_S2V (tiny sizes, fp32, CPU): audio, ref image, motion frames, pose."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from oracle import load_wan_module  # noqa: E402
from test_dit import TOL, FakeSP, official_kwargs, randomize_, rel_err, text  # noqa: E402

from wanmoe.models.dit import DIT_PRESETS, DiT, DiTConfig  # noqa: E402
from wanmoe.models.layers import stretched_positions  # noqa: E402
from wanmoe.models.s2v import S2VInputs  # noqa: E402


def official_s2v(cfg: DiTConfig):
    s = cfg.s2v
    ms = load_wan_module("modules/s2v/model_s2v.py")
    kw = official_kwargs(cfg)
    ref = ms.WanModel_S2V(
        cond_dim=s.cond_dim,
        audio_dim=s.audio_dim,
        num_audio_token=s.num_audio_token,
        enable_adain=True,
        adain_mode="attn_norm",
        audio_inject_layers=list(s.audio_inject_layers),
        zero_init=True,
        zero_timestep=s.zero_timestep,
        enable_motioner=False,
        add_last_motion=True,
        enable_tsm=False,
        trainable_token_pos_emb=False,
        enable_framepack=True,
        framepack_drop_mode="padd",
        **kw,
    ).eval()
    # The official audio encoder hard-codes 25 wav2vec2 layers; shrink its fusion weights to the tiny config.
    ref.casual_audio_encoder.weights = torch.nn.Parameter(torch.full((1, s.num_audio_layers, 1, 1), 0.01))
    return ref


@pytest.fixture(scope="module")
def s2v_pair():
    cfg = DIT_PRESETS["s2v-14b-tiny"]
    torch.manual_seed(0)
    ref = official_s2v(cfg)
    randomize_(ref)
    ours = DiT(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def run_pair(ours, ref, fhw, fm, *, drop, pose, batch=1, seed=0):
    cfg = ours.cfg
    s = cfg.s2v
    g = torch.Generator().manual_seed(seed)
    f, h, w = fhw
    x = torch.randn(batch, 16, f, h, w, generator=g)
    t = torch.tensor([913.0, 42.0][:batch])
    audio = torch.randn(batch, s.num_audio_layers, s.audio_dim, 4 * f, generator=g)
    ref_lat = torch.randn(batch, 16, 1, h, w, generator=g)
    motion = torch.randn(batch, 16, fm, h, w, generator=g)
    pose_lat = torch.randn(batch, s.cond_dim, f, h, w, generator=g) if pose else None
    ctx_list, ctx = text(cfg, [5, 2][:batch], g)
    inp = S2VInputs(
        audio=audio, ref_latents=ref_lat, motion_latents=motion, pose_latents=pose_lat, drop_motion_frames=drop
    )
    cond = pose_lat if pose else torch.zeros(batch, s.cond_dim, f, h, w)  # the pipeline passes zeros
    with torch.no_grad():
        want = ref(
            list(x),
            t,
            ctx_list,
            math.prod(fhw) // 4,
            ref_latents=list(ref_lat),
            motion_latents=list(motion),
            cond_states=list(cond),
            audio_input=audio,
            motion_frames=[s.motion_frames, s.lat_motion_frames],
            drop_motion_frames=drop,
        )
        got = ours(x, t, ctx, s2v=inp)
    return got, torch.stack(want)


@pytest.mark.parametrize(
    "fhw,fm,drop,pose",
    [
        ((2, 8, 8), 19, False, False),  # exactly the framepack window
        ((2, 8, 8), 19, True, False),  # first clip: motion tokens dropped
        ((3, 8, 16), 5, False, True),  # non-square, short motion buffer (zero-filled oldest slots), with pose
        ((3, 8, 16), 23, True, True),  # longer buffer (cropped to the newest 19), drop, pose
        ((1, 16, 8), 19, False, True),  # one latent frame, tall latent (2x/4x groups have 2x1 / 1x... grids)
    ],
)
def test_s2v_parity(s2v_pair, fhw, fm, drop, pose):
    got, want = run_pair(*s2v_pair, fhw, fm, drop=drop, pose=pose)
    assert got.shape == want.shape
    assert rel_err(got, want) <= TOL


def test_s2v_parity_batch2(s2v_pair):
    got, want = run_pair(*s2v_pair, (2, 8, 16), 19, drop=False, pose=True, batch=2, seed=3)
    assert rel_err(got, want) <= TOL


def test_s2v_conditioning_matters(s2v_pair):
    """Each conditioning path changes the output (so parity above is not vacuous)."""
    ours, _ = s2v_pair
    s = ours.cfg.s2v
    g = torch.Generator().manual_seed(7)
    f, h, w = 2, 8, 8
    base = dict(
        audio=torch.randn(1, s.num_audio_layers, s.audio_dim, 8, generator=g),
        ref_latents=torch.randn(1, 16, 1, h, w, generator=g),
        motion_latents=torch.randn(1, 16, 19, h, w, generator=g),
        pose_latents=None,
        drop_motion_frames=False,
    )
    x, t, ctx = torch.randn(1, 16, f, h, w, generator=g), torch.tensor([500.0]), torch.randn(1, 3, 32, generator=g)
    with torch.no_grad():
        out = ours(x, t, ctx, s2v=S2VInputs(**base))
        for key, val in (
            ("audio", base["audio"] * 0),
            ("ref_latents", base["ref_latents"] + 1),
            ("motion_latents", base["motion_latents"] + 1),
            ("drop_motion_frames", True),
            ("pose_latents", torch.randn(1, 16, f, h, w, generator=g)),
        ):
            alt = ours(x, t, ctx, s2v=S2VInputs(**{**base, key: val}))
            assert rel_err(alt, out) > 1e-4, key


def test_s2v_full_size_keys_match_official_on_meta():
    cfg = DIT_PRESETS["s2v-14b"]
    with torch.device("meta"):
        ours = DiT(cfg)
        ref = official_s2v(cfg)
        ref.casual_audio_encoder.weights = torch.nn.Parameter(torch.empty(1, 25, 1, 1))
    sd, rsd = ours.state_dict(), ref.state_dict()
    assert len(sd) == 1260
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in rsd.items()}
    n = sum(p.numel() for p in ours.parameters())
    assert 16.0e9 < n < 16.6e9, n


def test_s2v_input_validation(s2v_pair):
    ours, _ = s2v_pair
    s = ours.cfg.s2v
    x, t, ctx = torch.randn(1, 16, 2, 8, 8), torch.tensor([1.0]), torch.randn(1, 2, 32)
    good = S2VInputs(
        torch.randn(1, s.num_audio_layers, s.audio_dim, 8), torch.randn(1, 16, 1, 8, 8), torch.randn(1, 16, 3, 8, 8)
    )
    with pytest.raises(ValueError, match="latent frames"):
        ours(x, t, ctx, s2v=S2VInputs(good.audio[..., :5], good.ref_latents, good.motion_latents))
    with pytest.raises(ValueError, match="ref_latents"):
        ours(x, t, ctx, s2v=S2VInputs(good.audio, good.ref_latents[..., :4], good.motion_latents))
    with pytest.raises(ValueError, match="s2v inputs"):
        ours(x, t, ctx)


def test_stretched_positions_matches_numpy_linspace():
    np = pytest.importorskip("numpy")
    for start, stop, n in [(0, 7, 4), (0, 29, 15), (0, 51, 13), (19, 4, 4), (3, 2, 1), (0, 9, 7), (0, 2, 7)]:
        want = np.linspace(start, stop, n).astype(int).tolist()
        assert stretched_positions(start, stop, n).tolist() == want


def test_s2v_seq_parallel_seam(s2v_pair):
    """176 tokens padded to 177 by shard(): the padding must not leak through the split modulation
    or the gather/shard around each audio injection."""
    ours, _ = s2v_pair
    got_plain, _ = run_pair(*s2v_pair, (3, 8, 16), 19, drop=False, pose=True, seed=5)
    sp = FakeSP()
    ours.seq_parallel = sp
    try:
        got_sp, _ = run_pair(*s2v_pair, (3, 8, 16), 19, drop=False, pose=True, seed=5)
    finally:
        ours.seq_parallel = None
    assert rel_err(got_sp, got_plain) <= 1e-6
    assert sum(c[0] == "gather" for c in sp.calls) == len(ours.cfg.s2v.audio_inject_layers) + 1
