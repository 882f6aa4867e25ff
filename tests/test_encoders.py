"""Tests for wanmoe.encoders: byte/umT5 text encoders and mel/wav2vec2 audio encoders.

Parity is measured against the official Wan2.2 files (wan/modules/t5.py, wan/modules/s2v/audio_encoder.py),
loaded directly with importlib because importing the `wan` package needs CUDA.
"""

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from wanmoe.encoders.audio import (
    MelAudioEncoder,
    MelConfig,
    audio_clips,
    bucket_to_video_frames,
    official_num_clips,
    resample_linear,
)
from wanmoe.encoders.text import (
    T5_PRESETS,
    ByteTextConfig,
    ByteTextEncoder,
    T5TextEncoder,
    UMT5Encoder,
    clean_prompt,
)

SR = 16000


def _tone(seconds: float, amp: float = 0.3, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(round(seconds * SR))) / SR
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


# ------------------------------------------------------------------------------------------- oracle
def _wan_dir() -> Path:
    spec = importlib.util.find_spec("wan")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("official wan package (wan22) not installed")
    return Path(list(spec.submodule_search_locations)[0])


def _load_oracle(rel: str, name: str, monkeypatch) -> types.ModuleType:
    """Load one official module file under a private package name, without running wan/__init__.py."""
    pkg_name = "_wan_oracle_" + rel.replace("/", "_")
    pkg = types.ModuleType(pkg_name)
    pkg.__path__ = [str(_wan_dir() / rel)]
    monkeypatch.setitem(sys.modules, pkg_name, pkg)
    # t5.py evaluates torch.cuda.current_device() as a default argument at import time; audio_encoder.py
    # imports librosa at module level but the functions under test never call it.
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    stub = name == "audio_encoder" and "librosa" not in sys.modules
    if stub:
        import transformers  # resolve these before the stub exists (transformers probes for librosa)

        _ = transformers.Wav2Vec2ForCTC, transformers.Wav2Vec2Processor
        sys.modules["librosa"] = types.ModuleType("librosa")
    try:
        mod = importlib.import_module(f"{pkg_name}.{name}")
    finally:
        if stub:  # a spec-less stub left in sys.modules would confuse transformers' availability checks
            del sys.modules["librosa"]
    monkeypatch.delitem(sys.modules, f"{pkg_name}.{name}")
    return mod


# ---------------------------------------------------------------------------------------------- byte
def test_byte_text_encoder_shapes_padding_and_grad():
    torch.manual_seed(0)
    enc = ByteTextEncoder(ByteTextConfig(text_dim=64, text_len=32, num_layers=2, num_heads=4))
    ctx, lens = enc.encode(["a red ball", "  two   spaces ", "x" * 100])
    assert ctx.shape == (3, 32, 64) and ctx.dtype == torch.float32
    assert lens.tolist() == [11, 11, 32]  # bytes + end token; whitespace collapsed; truncated to text_len
    for b, n in enumerate(lens.tolist()):
        assert torch.all(ctx[b, n:] == 0) and torch.all(ctx[b, :n].abs().sum(-1) > 0)
    assert torch.equal(enc(["a red ball"])[0], ctx[0])  # batch independence (padding masked out)
    assert not torch.allclose(ctx[0, :5], ctx[1, :5])  # different prompts, different states
    ctx.sum().backward()
    assert enc.token_embedding.weight.grad is not None and enc.token_embedding.weight.grad.abs().sum() > 0
    with pytest.raises(TypeError):
        enc("a str, not a list")
    with pytest.raises(ValueError):
        ByteTextConfig(text_dim=30, num_heads=4).validate()


def test_byte_text_encoder_utf8_tokens():
    enc = ByteTextEncoder(ByteTextConfig(text_dim=16, text_len=8, num_heads=2))
    ids, lens = enc.tokenize(["é"])
    assert ids[0, :3].tolist() == [0xC3 + 1, 0xA9 + 1, ByteTextConfig.EOS] and lens.tolist() == [3]


# ------------------------------------------------------------------------------------------------ mel
def test_mel_encoder_shape_and_loudness():
    enc = MelAudioEncoder(MelConfig(n_mels=32))
    loud, quiet = enc(_tone(1.0, 0.5), SR, 16), enc(_tone(1.0, 0.05), SR, 16)
    assert loud.shape == (1, 32, 16) and enc.num_layers == 1 and enc.dim == 32
    # a 20 dB quieter tone is 2 decades lower in power: 2 / log_scale = 0.8 lower in the peak band, every frame
    diff = loud[0].max(0).values - quiet[0].max(0).values  # (T,)
    assert torch.allclose(diff[1:-1], torch.full_like(diff[1:-1], 0.8), atol=0.02), diff
    assert loud.mean() > quiet.mean()
    silent = enc(np.zeros(SR, np.float32), SR, 16)
    assert torch.allclose(silent, torch.full_like(silent, -1.0))  # silence maps to the floor
    # a 440 Hz tone: the most energetic band is a low one, and it is the same in every frame
    band = loud[0, :, 2:-2].argmax(0)
    assert torch.all(band == band[0]) and band[0] < 16
    # T = ceil(len * fps / sr) for other fps and odd lengths; non-integer hop is resampled to the grid
    assert enc(_tone(0.5), SR, 25).shape == (1, 32, 13)
    assert enc(_tone(1.0)[:1234], SR, 24).shape == (1, 32, 2)
    # energy is local in time: a tone in the second half only lights up the second half
    half = np.concatenate([np.zeros(SR // 2, np.float32), _tone(0.5, 0.5)])
    f = enc(half, SR, 16)[0].mean(0)
    assert f[:6].max() < f[10:].min()


def test_audio_clips_layout():
    feats = torch.arange(2 * 3 * 10, dtype=torch.float32).reshape(2, 3, 10)  # (Ly, Dm, T)
    clips = audio_clips(feats, infer_frames=4)
    assert clips.shape == (3, 2, 3, 4)
    assert torch.equal(clips[1], feats[..., 4:8]) and torch.equal(clips[2, ..., :2], feats[..., 8:])
    assert torch.all(clips[2, ..., 2:] == 0)
    assert audio_clips(feats, 4, num_clip=1).shape == (1, 2, 3, 4)
    assert audio_clips(feats, 5).shape[0] == 2
    with pytest.raises(ValueError):
        audio_clips(feats[0], 4)


def test_bucketing_matches_official(monkeypatch):
    oracle = _load_oracle("modules/s2v", "audio_encoder", monkeypatch)
    ae = object.__new__(oracle.AudioEncoder)  # skip __init__ (it downloads a model); only video_rate is used
    ae.video_rate = 30
    torch.manual_seed(0)
    for t50, infer_frames in [(50, 8), (74, 8), (75, 8), (124, 16), (49, 80)]:
        hs = torch.randn(3, t50, 5)  # (Ly, A, Dm) fake hidden states at 50 Hz
        ref30 = oracle.linear_interpolation(hs, input_fps=50, output_fps=30)  # (Ly, N30, Dm)
        mine30 = resample_linear(hs, 50, 30)
        assert torch.equal(ref30, mine30)
        ref, ref_n = ae.get_audio_embed_bucket_fps(ref30, fps=16, batch_frames=infer_frames, m=0)
        ref = ref.permute(1, 2, 0)  # (T, Ly, Dm) -> (Ly, Dm, T)
        n = official_num_clips(mine30.shape[1], 30, 16, infer_frames)
        assert n == ref_n
        mine = bucket_to_video_frames(mine30, 30, 16, n * infer_frames)
        assert torch.equal(mine, ref), (t50, infer_frames)
        # the open-ended variant covers exactly the frames that carry audio; clipping it reproduces official
        free = bucket_to_video_frames(mine30, 30, 16)
        assert free.shape[-1] <= n * infer_frames and torch.all(ref[..., free.shape[-1] :] == 0)
        assert torch.all(free[..., -1].abs().sum() > 0)
        clips = audio_clips(free, infer_frames, num_clip=n)
        assert torch.equal(clips.permute(1, 2, 0, 3).flatten(2), ref)


# ---------------------------------------------------------------------------------------------- umT5
def test_umt5_key_set_full_size_on_meta(monkeypatch):
    with torch.device("meta"):
        model = UMT5Encoder(T5_PRESETS["umt5-xxl"])
    sd = model.state_dict()
    assert len(sd) == 242
    assert sd["token_embedding.weight"].shape == (256384, 4096)
    assert sd["blocks.23.ffn.gate.0.weight"].shape == (10240, 4096)
    assert sd["blocks.0.ffn.fc2.weight"].shape == (4096, 10240)
    assert sd["blocks.5.pos_embedding.embedding.weight"].shape == (32, 64)
    assert sd["norm.weight"].shape == (4096,)
    oracle = _load_oracle("modules", "t5", monkeypatch)
    with torch.device("meta"):
        ref = oracle.umt5_xxl(encoder_only=True, return_tokenizer=False, device="meta")
    ref_sd = ref.state_dict()
    assert set(sd) == set(ref_sd)
    assert all(sd[k].shape == ref_sd[k].shape for k in sd)


def _tiny_pair(monkeypatch):
    oracle = _load_oracle("modules", "t5", monkeypatch)
    cfg = T5_PRESETS["tiny"]
    torch.manual_seed(0)
    ref = oracle.T5Encoder(
        vocab=cfg.vocab,
        dim=cfg.dim,
        dim_attn=cfg.dim_attn,
        dim_ffn=cfg.dim_ffn,
        num_heads=cfg.num_heads,
        num_layers=cfg.num_layers,
        num_buckets=cfg.num_buckets,
        shared_pos=False,
        dropout=0.0,
    ).eval()
    mine = UMT5Encoder(cfg).eval()
    mine.load_state_dict(ref.state_dict(), strict=True)
    return ref, mine, cfg


def test_umt5_parity_fp32(monkeypatch):
    ref, mine, cfg = _tiny_pair(monkeypatch)
    g = torch.Generator().manual_seed(1)
    s = 200  # long enough to reach the log-spaced and clamped relative-position buckets (max_dist 128)
    ids = torch.randint(0, cfg.vocab, (3, s), generator=g)
    mask = torch.ones(3, s, dtype=torch.long)
    mask[1, 50:] = 0
    mask[2, 7:] = 0
    with torch.no_grad():
        a, b = ref(ids, mask), mine(ids, mask)
    rel = ((a - b).norm() / a.norm()).item()
    assert rel <= 1e-5, rel
    for i, n in enumerate([s, 50, 7]):  # per-prompt error on the valid tokens as well
        r = ((a[i, :n] - b[i, :n]).norm() / a[i, :n].norm()).item()
        assert r <= 1e-5, (i, r)
    # the relative bias is really used: shuffling the bucket table changes the output
    with torch.no_grad():
        mine.blocks[0].pos_embedding.embedding.weight.mul_(3.0)
        assert ((mine(ids, mask) - a).norm() / a.norm()).item() > 1e-3


def test_umt5_parity_bf16(monkeypatch):
    ref, mine, cfg = _tiny_pair(monkeypatch)
    ref, mine = ref.to(torch.bfloat16), mine.to(torch.bfloat16)
    ids = torch.randint(0, cfg.vocab, (2, 40), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 13:] = 0
    with torch.no_grad():
        a, b = ref(ids, mask).float(), mine(ids, mask).float()
    assert a.dtype == b.dtype and ((a - b).norm() / a.norm()).item() < 1e-2


class _CharTokenizer:
    """Stand-in for the HF tokenizer: same call contract (padding/truncation/max_length/special tokens)."""

    def __call__(self, texts, padding, truncation, max_length, add_special_tokens, return_tensors):
        assert padding == "max_length" and truncation and add_special_tokens and return_tensors == "pt"
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, t in enumerate(texts):
            toks = ([3 + (ord(c) % 200) for c in t])[: max_length - 1] + [1]  # </s> = 1
            ids[b, : len(toks)], mask[b, : len(toks)] = torch.tensor(toks), 1
        return types.SimpleNamespace(input_ids=ids, attention_mask=mask)


def test_t5_text_encoder_trims_and_pads(monkeypatch):
    ref, mine, cfg = _tiny_pair(monkeypatch)
    enc = T5TextEncoder(mine, _CharTokenizer())
    ctx, lens = enc.encode(["a  cat &amp; dog", "hi"])
    assert ctx.shape == (2, cfg.text_len, cfg.dim) and lens.tolist() == [12, 3]  # "a cat & dog" = 11 chars + </s>
    ids, mask = enc.tokenize(["a  cat &amp; dog", "hi"])
    with torch.no_grad():
        full = ref(ids, mask)
    for b, n in enumerate(lens.tolist()):
        assert torch.allclose(ctx[b, :n], full[b, :n], rtol=1e-5, atol=1e-6)
        assert torch.all(ctx[b, n:] == 0)
    assert torch.equal(enc(["hi"])[0], ctx[1])


def test_clean_prompt_matches_official(monkeypatch):
    tok = _load_oracle("modules", "tokenizers", monkeypatch)
    for text in ["  A  cat &amp;amp; a\n\tdog ", "naÃ¯ve café", "x"]:
        assert clean_prompt(text) == tok.whitespace_clean(tok.basic_clean(text))


def test_t5_from_checkpoint_rejects_missing_files(tmp_path):
    with pytest.raises(ValueError, match="missing umT5 file"):
        T5TextEncoder.from_checkpoint(tmp_path)


def test_t5_from_checkpoint_loads_pth(tmp_path, monkeypatch):
    # A tiny .pth in the official file name + the official layout, loaded strictly with weights_only/mmap.
    _, mine, cfg = _tiny_pair(monkeypatch)
    torch.save(
        {k: v.to(torch.bfloat16) for k, v in mine.state_dict().items()}, tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    )
    (tmp_path / "google" / "umt5-xxl").mkdir(parents=True)
    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: _CharTokenizer())
    enc = T5TextEncoder.from_checkpoint(tmp_path, cfg=cfg, dtype=torch.float32)
    for k, v in mine.state_dict().items():
        assert torch.equal(enc.model.state_dict()[k], v.to(torch.bfloat16).float()), k
    bad = dict(mine.state_dict())
    bad.pop("norm.weight")
    torch.save(bad, tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    with pytest.raises(RuntimeError, match="norm.weight"):
        T5TextEncoder.from_checkpoint(tmp_path, cfg=cfg)


# ------------------------------------------------------------------------------------------ wav2vec2
@pytest.fixture(scope="module")
def tiny_wav2vec2(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("w2v")
    cfg = transformers.Wav2Vec2Config(
        vocab_size=32,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16, 16, 16, 16, 16, 16, 16),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        architectures=["Wav2Vec2ForCTC"],
    )
    torch.manual_seed(0)
    transformers.Wav2Vec2ForCTC(cfg).save_pretrained(folder)
    transformers.Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=SR, padding_value=0.0, do_normalize=True, return_attention_mask=True
    ).save_pretrained(folder)
    return folder


def test_wav2vec2_encoder_matches_official(tiny_wav2vec2, monkeypatch):
    import transformers

    from wanmoe.encoders.audio import Wav2Vec2AudioEncoder

    oracle = _load_oracle("modules/s2v", "audio_encoder", monkeypatch)
    enc = Wav2Vec2AudioEncoder(tiny_wav2vec2)
    assert enc.num_layers == 3 and enc.dim == 32
    # official path: processor(feature extractor) -> Wav2Vec2ForCTC(output_hidden_states) -> cat -> 30 fps
    ae = object.__new__(oracle.AudioEncoder)
    ae.video_rate = 30
    ae.model = transformers.Wav2Vec2ForCTC.from_pretrained(tiny_wav2vec2).eval()
    fe = transformers.Wav2Vec2FeatureExtractor.from_pretrained(tiny_wav2vec2)
    rng = np.random.default_rng(0)
    infer_frames = 8
    # 16080 samples -> 50 wav2vec2 frames -> 30 frames at 30 fps = exactly 2 clips of 8 frames (8 * 30/16 = 15):
    # the official count then appends a third, all-zero clip; audio_clips does not.
    for n_samples, extra in ((11200, 0), (16080, 1)):
        audio = (_tone(n_samples / SR) + 0.05 * rng.standard_normal(n_samples)).astype(np.float32)
        with torch.no_grad():
            res = ae.model(fe(audio, sampling_rate=SR, return_tensors="pt").input_values, output_hidden_states=True)
        feat = oracle.linear_interpolation(torch.cat(res.hidden_states), input_fps=50, output_fps=30)
        ref, ref_n = ae.get_audio_embed_bucket_fps(feat, fps=16, batch_frames=infer_frames, m=0)
        ref = ref.permute(1, 2, 0)  # (Ly, Dm, n * infer_frames)
        mine, n = enc.encode_clips(audio, SR, 16, infer_frames)
        assert n == ref_n and mine.shape == ref.shape == (3, 32, n * infer_frames)
        err = ((mine - ref).norm() / ref.norm()).item()
        assert err <= 1e-6, err
        free = enc(audio, SR, 16)  # protocol output: (Ly, Dm, T) frames with audio
        assert free.shape[:2] == (3, 32) and torch.allclose(free, ref[..., : free.shape[-1]], atol=1e-6)
        assert audio_clips(free, infer_frames).shape[0] == n - extra
        if extra:
            assert torch.all(ref[..., -infer_frames:] == 0)
    with pytest.raises(ValueError, match="16000"):
        enc(_tone(0.5), 22050, 16)
    with pytest.raises(ValueError, match="config.json"):
        Wav2Vec2AudioEncoder(tiny_wav2vec2 / "nope")
