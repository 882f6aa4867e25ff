"""LoRAs onto noise experts (wanmoe.lora): every key format against a hand-applied weight delta, refusals, exact
merge/unmerge, int8 run-time path, pipeline per-expert loading that survives reloads, and the --lora flag.

The reference in each test is written here by hand (W += scale * alpha / r * B @ A on a copy of the model), not
through the module under test; diffusers' own converters and model are a second, independent oracle for the
diffusers names.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from wanmoe import lora as lo
from wanmoe import lora_stack
from wanmoe.models.dit import DIT_PRESETS, DiT
from wanmoe.request import InputError

RANK = 4
# Official path -> diffusers WanTransformer3DModel name, written out by hand (independent of lora.DIFFUSERS_NAMES).
DIFFUSERS = {
    "blocks.0.self_attn.q": "blocks.0.attn1.to_q", "blocks.0.self_attn.o": "blocks.0.attn1.to_out.0",
    "blocks.1.self_attn.v": "blocks.1.attn1.to_v", "blocks.1.cross_attn.k": "blocks.1.attn2.to_k",
    "blocks.0.cross_attn.o": "blocks.0.attn2.to_out.0", "blocks.0.ffn.0": "blocks.0.ffn.net.0.proj",
    "blocks.1.ffn.2": "blocks.1.ffn.net.2", "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj", "head.head": "proj_out", "patch_embedding": "patch_embedding",
}
PATHS = list(DIFFUSERS)


def _model(preset: str = "t2v-a14b-tiny", seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    m = DiT(DIT_PRESETS[preset]).eval().requires_grad_(False)
    with torch.no_grad():
        for p in m.parameters():  # the zero-initialised head would hide every change
            p.copy_(torch.randn_like(p) * 0.05)
    return m


def _inputs(cfg, seed: int = 1) -> tuple:  # noqa: ANN001
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg.out_dim, 2, 4, 4, generator=g)  # i2v adds its 20 condition channels as y
    ctx = torch.randn(1, 5, cfg.text_dim, generator=g)
    return x, torch.tensor([700.0]), ctx


def _out(m: DiT, seed: int = 1) -> torch.Tensor:
    with torch.no_grad():
        return m(*_inputs(m.cfg, seed))


def _factors(m: DiT, paths, seed: int = 2) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """path -> (down (r, *in), up (O, r, *1)): conv kernels keep their axes, as kohya writes them."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for p in paths:
        w = m.get_parameter(p + ".weight")
        down = torch.randn(RANK, *w.shape[1:], generator=g) * 0.2
        up = torch.randn(w.shape[0], RANK, *(1,) * (w.dim() - 2), generator=g) * 0.2
        out[p] = (down, up)
    return out


def _hand_applied(m: DiT, factors, scale: float, alpha: float | None, diffs=None) -> DiT:
    ref = copy.deepcopy(m)
    with torch.no_grad():
        for p, (down, up) in factors.items():
            w = ref.get_parameter(p + ".weight")
            k = 1.0 if alpha is None else alpha / RANK
            w += (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * k * scale
        for name, d in (diffs or {}).items():
            ref.get_parameter(name).add_(d * scale)
    return ref


def _write(path, fmt: str, factors, alpha: float | None, diffs=None) -> None:
    """One synthetic LoRA file in a user format. diffs: parameter name -> full delta (LightX2V diff / diff_b)."""
    sd = {}
    for p, (down, up) in factors.items():
        if fmt == "diffusers":
            key, a, b = "transformer." + DIFFUSERS[p], "lora_A.weight", "lora_B.weight"
        elif fmt == "peft_bare":
            key, a, b = DIFFUSERS[p], "lora_A.weight", "lora_B.weight"
        elif fmt == "kohya":
            key, a, b = "lora_unet_" + p.replace(".", "_"), "lora_down.weight", "lora_up.weight"
        elif fmt in ("comfy", "lightx2v"):
            key, a, b = "diffusion_model." + p, "lora_down.weight", "lora_up.weight"
        elif fmt == "comfy_peft":
            key, a, b = "diffusion_model." + p, "lora_A.weight", "lora_B.weight"
        sd[f"{key}.{a}"], sd[f"{key}.{b}"] = down.clone(), up.clone()
        if alpha is not None:
            sd[f"{key}.alpha"] = torch.tensor(alpha)
    for name, d in (diffs or {}).items():
        stem, _, leaf = name.rpartition(".")
        if leaf == "weight":
            sd[f"diffusion_model.{stem}.diff"] = d.clone()
        elif leaf == "bias":
            sd[f"diffusion_model.{stem}.diff_b"] = d.clone()
        else:  # a bare parameter such as blocks.0.modulation
            sd[f"diffusion_model.{name}.diff"] = d.clone()
    save_file(sd, str(path))


def _lightx2v_diffs(m: DiT, seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    names = ["blocks.0.norm3.weight", "blocks.0.norm3.bias", "blocks.1.self_attn.norm_q.weight",
             "blocks.0.modulation", "head.modulation", "head.head.bias", "blocks.1.ffn.2.weight",
             "blocks.0.cross_attn.q.bias"]
    return {n: torch.randn(m.get_parameter(n).shape, generator=g) * 0.05 for n in names}


FORMATS = [("diffusers", None), ("peft_bare", None), ("kohya", 8.0), ("comfy", 2.0), ("comfy_peft", None),
           ("lightx2v", 4.0)]


@pytest.mark.parametrize("fmt, alpha", FORMATS)
@pytest.mark.parametrize("scale", [1.0, 0.125])
def test_each_format_equals_the_hand_applied_delta(fmt, alpha, scale, tmp_path):
    m = _model()
    factors = _factors(m, PATHS)
    diffs = _lightx2v_diffs(m) if fmt == "lightx2v" else None
    f = tmp_path / f"{fmt}.safetensors"
    _write(f, fmt, factors, alpha, diffs)
    ref = _out(_hand_applied(m, factors, scale, alpha, diffs))
    base = _out(m)
    lora = lo.read_lora(f, m)
    assert sorted(lora.deltas) == sorted(set(PATHS) | {n.rsplit(".", 1)[0] if n.endswith((".weight", ".bias"))
                                                        else n for n in diffs or {}})
    handle = lo.apply_lora(m, lora, scale)
    got = _out(m)
    assert (got - base).abs().max() > 1e-3  # the LoRA does something
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    handle.remove()
    assert torch.equal(_out(m), base)


def test_s2v_modules_and_kohya_underscores(tmp_path):
    m = _model("s2v-14b-tiny")
    paths = ["audio_injector.injector.1.q", "audio_injector.injector_adain_layers.0.linear", "blocks.1.cross_attn.v",
             "frame_packer.proj_2x", "cond_encoder"]
    factors = _factors(m, paths)
    f = tmp_path / "s2v.safetensors"
    _write(f, "kohya", factors, alpha=2.0)
    lo.apply_lora(m2 := copy.deepcopy(m), lo.read_lora(f, m), 0.5)
    ref = _hand_applied(m, factors, 0.5, 2.0)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(m2.get_parameter(name), p, rtol=0, atol=1e-7, msg=name)


def test_the_alias_table_is_diffusers_own_naming():
    """Every parameter of a tiny diffusers WanTransformer3DModel resolves to the official tensor of the same shape."""
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.WanTransformer3DModel(num_attention_heads=2, attention_head_dim=32, in_channels=16,
                                             out_channels=16, text_dim=32, freq_dim=32, ffn_dim=128, num_layers=2)
    ours = _model()
    targets = lo.model_targets(ours)
    aliases = lo.alias_table(targets)
    for name, p in theirs.named_parameters():
        stem, _, leaf = name.rpartition(".")
        key = {"weight": f"transformer.{stem}.diff", "bias": f"transformer.{stem}.diff_b"}.get(leaf,
                                                                                           f"transformer.{name}.diff")
        hit = lo.resolve_key(key, aliases)
        assert hit is not None, name
        t = targets[hit[0]]
        assert (t.bias_shape if leaf == "bias" else t.shape) == tuple(p.shape), name
    assert not any("." in u for u in aliases["_"])  # no dotted name leaks into the kohya table


@pytest.mark.parametrize("converter, fmt", [("_convert_non_diffusers_wan_lora_to_diffusers", "comfy"),
                                            ("_convert_musubi_wan_lora_to_diffusers", "kohya")])
def test_diffusers_converters_agree(converter, fmt, tmp_path):
    """diffusers' converter turns a ComfyUI / musubi file into its own names; both files must load the same."""
    conv = pytest.importorskip("diffusers.loaders.lora_conversion_utils")
    m = _model()
    # musubi's converter expects every attention and FFN layer of every block
    paths = [f"blocks.{i}.{a}.{x}" for i in range(2) for a in ("self_attn", "cross_attn") for x in "qkvo"]
    paths += [f"blocks.{i}.ffn.{j}" for i in range(2) for j in (0, 2)]
    factors = _factors(m, paths)
    src = tmp_path / "src.safetensors"
    _write(src, fmt, factors, alpha=2.0)
    from safetensors.torch import load_file

    converted = getattr(conv, converter)(load_file(str(src)))
    dst = tmp_path / "diffusers.safetensors"
    save_file({k: v.contiguous() for k, v in converted.items()}, str(dst))
    a, b = copy.deepcopy(m), copy.deepcopy(m)
    lo.apply_lora(a, lo.read_lora(src, m), 0.7)
    lo.apply_lora(b, lo.read_lora(dst, m), 0.7)
    for name, p in a.named_parameters():
        torch.testing.assert_close(b.get_parameter(name), p, rtol=1e-6, atol=1e-7, msg=name)


def test_keys_that_map_to_nothing_are_refused_with_their_list(tmp_path):
    m = _model()
    f = tmp_path / "bad.safetensors"
    sd = {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(RANK, 64),
          "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(64, RANK),
          "diffusion_model.blocks.7.self_attn.q.lora_down.weight": torch.zeros(RANK, 64),  # no block 7
          "lora_unet_blocks_0_self_attn_qq.lora_down.weight": torch.zeros(RANK, 64),
          "diffusion_model.blocks.0.ffn.0.hada_w1_a": torch.zeros(RANK, 64),  # LoHa: not a LoRA
          "text_encoder.layers.0.q.lora_A.weight": torch.zeros(RANK, 64)}
    save_file(sd, str(f))
    for call in (lambda: lo.read_lora(f, m), lambda: lo.check_lora_file(f, m.cfg)):
        with pytest.raises(ValueError) as e:
            call()
        msg = str(e.value)
        assert "4 key(s) map to no parameter" in msg
        for k in list(sd)[2:]:
            assert k in msg


def test_shapes_and_incomplete_pairs_are_refused(tmp_path):
    """A Wan2.1 1.3B LoRA (width 1536) onto a wider expert, a lone lora_up, a bias diff on a bias-free tensor."""
    m = _model()
    f = tmp_path / "shapes.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(RANK, 48),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(48, RANK),
               "diffusion_model.blocks.1.ffn.0.lora_up.weight": torch.zeros(128, RANK),
               "diffusion_model.blocks.0.modulation.diff_b": torch.zeros(64),
               "diffusion_model.blocks.0.self_attn.norm_q.lora_down.weight": torch.zeros(RANK, 1),
               "diffusion_model.blocks.0.self_attn.norm_q.lora_up.weight": torch.zeros(64, RANK)}, str(f))
    with pytest.raises(ValueError) as e:
        lo.check_lora_file(f, m.cfg)
    msg = str(e.value)
    assert "4 problem(s)" in msg
    for needle in ("blocks.0.self_attn.q: lora_up [48, 4] @ lora_down [4, 48]", "blocks.1.ffn.0: has lora_up/lora_B",
                   "blocks.0.modulation: diff_b", "norm_q: a low-rank pair on a parameter of shape [64]"):
        assert needle in msg


def test_wan21_i2v_lora_onto_a_wan22_expert(tmp_path):
    """Wan2.1 I2V LoRAs also adapt the CLIP image branch Wan2.2 lacks: refused by name, or skipped on request."""
    m = _model("i2v-a14b-tiny")
    factors = _factors(m, ["blocks.0.self_attn.q", "blocks.1.cross_attn.k", "patch_embedding"])
    f = tmp_path / "wan21_i2v.safetensors"
    _write(f, "comfy", factors, alpha=4.0)
    from safetensors.torch import load_file

    sd = load_file(str(f))
    for i in range(2):
        for name in ("k_img", "v_img"):
            sd[f"diffusion_model.blocks.{i}.cross_attn.{name}.lora_down.weight"] = torch.zeros(RANK, 64)
            sd[f"diffusion_model.blocks.{i}.cross_attn.{name}.lora_up.weight"] = torch.zeros(64, RANK)
    sd["diffusion_model.img_emb.proj.1.lora_down.weight"] = torch.zeros(RANK, 1280)
    save_file(sd, str(f))
    with pytest.raises(ValueError, match=r"9 key\(s\) adapt Wan2.1's image cross-attention.*skip_wan21_image"):
        lo.read_lora(f, m)
    lora = lo.read_lora(f, m, skip_wan21_image=True)
    assert len(lora.skipped) == 9 and sorted(lora.deltas) == sorted(factors)
    lo.apply_lora(m2 := copy.deepcopy(m), lora, 1.0)
    x, t, ctx = _inputs(m.cfg)
    y = torch.randn(1, 20, 2, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(m2(x, t, ctx, y=y), _hand_applied(m, factors, 1.0, 4.0)(x, t, ctx, y=y),
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_then_remove_restores_the_weights_bit_for_bit(dtype, tmp_path):
    m = _model().to(dtype)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    factors = _factors(m, PATHS)
    f = tmp_path / "l.safetensors"
    _write(f, "lightx2v", factors, 4.0, _lightx2v_diffs(m))
    lora = lo.read_lora(f, m)
    h1 = lo.apply_lora(m, lora, 0.3)
    h2 = lo.apply_lora(m, lora, -1.7)  # a stack of two on the same weights
    w = m.get_parameter("blocks.0.self_attn.q.weight")
    assert w.dtype == dtype
    h2.remove()
    h1.remove()
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # bf16: one rounding of the fp32 sum, nothing more
    h = lo.apply_lora(m, lora, 1.0)
    down, up = factors["blocks.0.self_attn.q"]
    expect = (before["blocks.0.self_attn.q.weight"].float() + (up @ down) * 4.0 / RANK).to(dtype)
    assert torch.equal(m.get_parameter("blocks.0.self_attn.q.weight"), expect)
    h.remove()
    with pytest.raises(ValueError, match="reverse order"):
        h1, h2 = lo.apply_lora(m, lora), lo.apply_lora(m, lora)
        h1.remove()


def test_runtime_paths_float_and_int8(tmp_path):
    from wanmoe.memory.quantize import Int8Linear, quantize_

    m = _model()
    factors = _factors(m, PATHS)
    f = tmp_path / "l.safetensors"
    _write(f, "comfy", factors, 2.0)
    lora = lo.read_lora(f, m)
    merged = copy.deepcopy(m)
    lo.apply_lora(merged, lora, 0.8, mode="merge")
    # float, run beside the layers: the same function as the merge up to float rounding
    rt = copy.deepcopy(m)
    h = lo.apply_lora(rt, lora, 0.8, mode="runtime")
    assert torch.equal(rt.get_parameter("blocks.0.self_attn.q.weight"), m.get_parameter("blocks.0.self_attn.q.weight"))
    torch.testing.assert_close(_out(rt), _out(merged), rtol=0, atol=1e-6)
    h.remove()
    assert torch.equal(_out(rt), _out(m))
    # int8: auto runs the LoRA beside the int8 layers; the error is that of int8 alone
    q, q_lora = quantize_(copy.deepcopy(m), "int8"), quantize_(copy.deepcopy(m), "int8")
    assert isinstance(q_lora.blocks[0].self_attn.q, Int8Linear)
    lo.apply_lora(q_lora, lo.read_lora(f, q_lora), 0.8)
    int8_err = (_out(q) - _out(m)).abs().max()
    err = (_out(q_lora) - _out(merged)).abs().max()
    assert err <= 1.5 * int8_err + 1e-6, (err, int8_err)
    lora_effect = (_out(merged) - _out(m)).abs().max()
    assert lora_effect > 20 * int8_err  # the comparison above is not vacuous
    with pytest.raises(ValueError, match="int8"):
        lo.apply_lora(q, lora, 1.0, mode="merge")


def test_save_lora_round_trip(tmp_path):
    m = _model()
    factors = {p: (d.flatten(1), u.flatten(1)) for p, (d, u) in _factors(m, PATHS[:6]).items()}
    f = lo.save_lora(tmp_path / "mine.safetensors", factors, alpha=2.0)
    got = lo.read_lora(f, m)
    for p, (d, u) in factors.items():
        assert torch.equal(got.deltas[p].down, d) and torch.equal(got.deltas[p].up, u) and got.deltas[p].alpha == 2.0


def test_only_safetensors(tmp_path):
    f = tmp_path / "x.pt"
    torch.save({"a": torch.zeros(1)}, f)
    with pytest.raises(ValueError, match="safetensors files only"):
        lo.read_lora(f, _model().cfg)


# ------------------------------------------------------------------------------------------------ pipeline


@pytest.fixture
def t2v_pipe(tiny_ckpt):
    import wanmoe

    return wanmoe.load("t2v-tiny", ckpt_dir=tiny_ckpt("t2v-tiny"), device="cpu", offload_model=True)


def test_per_expert_loading_survives_reloads_and_unloads_exactly(t2v_pipe, tmp_path):
    from wanmoe import checkpoint as ck

    pipe = t2v_pipe
    pool = pipe.components.experts
    pool.policy = "free"  # the idle expert is dropped and reloaded from disk on its next use
    root = pipe.options.ckpt_dir
    folders = {"high": "high_noise_model", "low": "low_noise_model"}
    base = {n: ck.load_dit(f"{root}/{d}", cfg=pipe.cfg.dit).eval() for n, d in folders.items()}
    factors = _factors(base["high"], PATHS)
    f = tmp_path / "style.safetensors"
    _write(f, "kohya", factors, 2.0)
    pipe.load_lora(f, scale={"high": 0.5}, experts=["high"])
    g = tmp_path / "both.safetensors"
    _write(g, "diffusers", _factors(base["high"], PATHS[:3], seed=9), None)
    pipe.load_lora(g, scale=0.25)  # a Wan2.1-style single file into both experts
    want_high = _hand_applied(_hand_applied(base["high"], factors, 0.5, 2.0), _factors(base["high"], PATHS[:3], 9),
                              0.25, None)
    want_low = _hand_applied(base["low"], _factors(base["high"], PATHS[:3], 9), 0.25, None)
    for _ in range(2):  # high, low, high, low: each get() under "free" drops the other expert and reloads this one
        for name, want in (("high", want_high), ("low", want_low)):
            torch.testing.assert_close(_out(pool.get(name)), _out(want), rtol=0, atol=1e-6)
    assert pool.loads["high"] >= 2 and pool.loaded() == ["low"]
    assert pipe.loras == [{"path": str(f), "scale": {"high": 0.5}, "mode": "auto"},
                          {"path": str(g), "scale": {"high": 0.25, "low": 0.25}, "mode": "auto"}]
    pipe.unload_lora(f)
    torch.testing.assert_close(_out(pool.get("high")), _out(_hand_applied(base["high"], _factors(
        base["high"], PATHS[:3], 9), 0.25, None)), rtol=0, atol=1e-6)
    pipe.unload_lora()
    for name in ("high", "low"):
        assert all(torch.equal(a, b) for a, b in zip(pool.get(name).state_dict().values(),
                                                     base[name].state_dict().values()))
    with pytest.raises(InputError, match="not loaded"):
        pipe.unload_lora(f)
    with pytest.raises(InputError, match="choose among high, low"):
        pipe.load_lora(f, experts="mid")


def test_generation_with_a_lora_and_after_unloading(t2v_pipe, tmp_path):
    pipe = t2v_pipe
    base = pipe(seed=3, steps=4).frames  # 4 steps: the last one is the low-noise expert's
    m = pipe.components.experts.get("low")
    f = tmp_path / "low.safetensors"
    _write(f, "comfy", _factors(m, PATHS), 4.0)
    pipe.load_lora(f, experts="low")
    video = pipe(seed=3, steps=4)
    assert video.expert_steps["low"] == 1 and (video.frames - base).abs().max() > 1e-3
    assert video.sidecar()["loras"] == [{"path": str(f), "scale": {"low": 1.0}, "mode": "auto"}]
    pipe.unload_lora()
    assert torch.equal(pipe(seed=3, steps=4).frames, base)


# ------------------------------------------------------------------------------------------------ CLI


@pytest.mark.parametrize("spec, want", [
    ("{f}", ("{f}", 1.0, None)),
    ("{f}:0.125", ("{f}", 0.125, None)),
    ("{f}@high", ("{f}", 1.0, ("high",))),
    ("{f}:-1.5@high,low", ("{f}", -1.5, ("high", "low"))),
    ("{d}/a:b@c/x.safetensors:2", ("{d}/a:b@c/x.safetensors", 2.0, None)),  # ':' and '@' inside the path
])
def test_lora_spec_parses(spec, want, tmp_path):
    (tmp_path / "a:b@c").mkdir()
    f = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(1)}, str(f))
    save_file({"a": torch.zeros(1)}, str(tmp_path / "a:b@c" / "x.safetensors"))
    fill = {"f": str(f), "d": str(tmp_path)}
    got = lora_stack.parse_spec(spec.format(**fill), ("high", "low"))
    assert (got.path, got.scale, got.experts) == (want[0].format(**fill), want[1], want[2])


@pytest.fixture
def lora_files(tmp_path):
    m = DiT(DIT_PRESETS["t2v-a14b-tiny"])
    good = tmp_path / "good.safetensors"
    _write(good, "comfy", _factors(m, PATHS[:2]), 1.0)
    unknown = tmp_path / "unknown.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.qq.lora_down.weight": torch.zeros(RANK, 64)}, str(unknown))
    torch.save({}, tmp_path / "pickled.pt")
    return tmp_path


BAD_SPECS = [
    ("{d}/good.safetensors:abc", "scale 'abc' is not a number"),
    ("{d}/good.safetensors:nan", "finite"),
    ("{d}/good.safetensors@mid", "expert mid is not one of this task's experts (high, low)"),
    ("{d}/missing.safetensors", "no such file"),
    ("{d}/pickled.pt", "safetensors files only"),
    ("{d}/unknown.safetensors", "blocks.0.self_attn.qq.lora_down.weight"),
]


@pytest.mark.parametrize("spec, needle", BAD_SPECS)
def test_cli_refuses_bad_lora_before_loading_anything(spec, needle, lora_files, tiny_ckpt, tmp_path, capsys,
                                                      monkeypatch):
    from wanmoe import cli

    def no_load(*a, **k):  # noqa: ANN002, ANN003
        raise AssertionError("models loaded before the --lora check")

    monkeypatch.setattr(cli, "load_components", no_load)
    out = tmp_path / "out"
    code = cli.main(["generate", "--task", "t2v-tiny", "--ckpt_dir", str(tiny_ckpt("t2v-tiny")), "--quiet",
                     "--save_file", str(out / "v.mp4"), "--lora", spec.format(d=lora_files)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: --lora ") and needle in err and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


def test_cli_generates_with_loras(lora_files, tiny_ckpt, tmp_path):
    from wanmoe.cli import main

    out = tmp_path / "v.mp4"
    code = main(["generate", "--task", "t2v-tiny", "--ckpt_dir", str(tiny_ckpt("t2v-tiny")), "--quiet",
                 "--save_file", str(out), "--base_seed", "0", "--lora", f"{lora_files}/good.safetensors:0.5@high",
                 "--lora", f"{lora_files}/good.safetensors"])
    assert code == 0
    side = json.loads(out.with_suffix(".json").read_text())
    good = str(lora_files / "good.safetensors")
    assert side["loras"] == [{"path": good, "scale": {"high": 0.5}, "mode": "auto"},
                             {"path": good, "scale": {"high": 1.0, "low": 1.0}, "mode": "auto"}]


# ------------------------------------------------------------------------------------------------ training


def test_train_lora_smoke_writes_a_lora_the_pipeline_loads(tmp_path):
    """`wanmoe train lora --smoke`: attribute clips, latents, three steps; the file loads onto the shipped model."""
    from safetensors import safe_open

    import wanmoe
    from wanmoe.train.cli import main

    assert main(["lora", "--smoke", "--quiet", "--out", str(tmp_path)]) == 0
    f = tmp_path / "green_high.safetensors"
    with safe_open(str(f), "pt") as h:
        assert h.metadata()["expert"] == "high" and h.metadata()["steps"] == "3"
    assert main(["lora", "--smoke", "--quiet", "--out", str(tmp_path), "--steps", "4"]) == 0  # resumes at step 3
    assert json.loads((tmp_path / "green_high_loss.jsonl").read_text().splitlines()[-1])["step"] == 4
    pipe = wanmoe.load("s2v-mini")
    pipe.load_lora(f, experts="high")
    assert pipe.loras[0]["scale"] == {"high": 1.0}


def test_attribute_scores_see_the_colour_and_the_rest():
    from wanmoe.train.lora_train import attribute_scores

    own = torch.full((3, 2, 16, 16), -0.5)
    attr = own.clone()
    color = (0.9, 0.2, 0.8)
    attr[:, :, 4:12, 4:12] = torch.tensor(color).view(3, 1, 1, 1) * 2 - 1  # the face, in the attribute colour
    s_attr, s_own = attribute_scores(attr, own, attr, color), attribute_scores(own, own, attr, color)
    assert s_attr["face_attr_fraction"] == 1.0 and s_own["face_attr_fraction"] == 0.0
    assert s_attr["face_rgb_dist_attr"] < 1e-6 and s_attr["psnr_rest"] == s_own["psnr_rest"]


def test_the_shipped_lora_fits_the_embedded_model():
    from wanmoe.configs import ASSETS, PRESETS

    f = ASSETS / "loras" / "s2v-mini_green_high.safetensors"
    assert lo.check_lora_file(f, PRESETS["s2v-mini"].dit) == []
    assert lora_stack.parse_spec(f"{f}@high", PRESETS["s2v-mini"].experts).experts == ("high",)
