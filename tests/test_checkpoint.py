"""Official-layout checkpoint loading: config.json, shards + index, failure messages, VAE .pth, task trees.

The official WanModel / WanModel_S2V (diffusers ModelMixin) are the oracle for the layout: what they write we
must read, and what we write they must read, tensor for tensor.
"""

from __future__ import annotations

import dataclasses
import importlib.machinery
import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from wanmoe import checkpoint as ck
from wanmoe import layouts
from wanmoe.models.dit import DiT, DiTConfig
from wanmoe.models.s2v import S2VConfig
from wanmoe.models.vae import VAE_TINY, WanVAE

WAN = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages" / "wan"
TINY = dict(in_dim=4, out_dim=4, dim=32, ffn_dim=64, freq_dim=16, num_heads=2, num_layers=2)


def _official_modules() -> tuple[types.ModuleType, types.ModuleType]:
    """Load wan/modules/model.py and s2v/model_s2v.py without the CUDA-touching package __init__."""
    if "wan.modules.s2v.model_s2v" in sys.modules:
        return sys.modules["wan.modules.model"], sys.modules["wan.modules.s2v.model_s2v"]
    for name, sub in (("wan", ""), ("wan.modules", "modules"), ("wan.modules.s2v", "modules/s2v"),
                      ("wan.distributed", "distributed")):
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(WAN / sub)]
            # A real spec, so importlib.util.find_spec("wan") keeps working for the other oracles in this process.
            pkg.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
            pkg.__spec__.submodule_search_locations = [str(WAN / sub)]
            sys.modules[name] = pkg
    att = types.ModuleType("wan.modules.attention")

    def flash_attention(*args, **kwargs):  # layout tests never run a forward pass
        raise NotImplementedError

    att.flash_attention = att.attention = flash_attention
    sys.modules["wan.modules.attention"] = att
    out = []
    for name, rel in (("wan.modules.model", "modules/model.py"),
                      ("wan.modules.s2v.model_s2v", "modules/s2v/model_s2v.py")):
        spec = importlib.util.spec_from_file_location(name, WAN / rel)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        out.append(mod)
    return out[0], out[1]


@pytest.fixture
def tiny_cfg() -> DiTConfig:
    return DiTConfig(model_type="t2v", **TINY)


@pytest.fixture
def tiny_model(tiny_cfg: DiTConfig) -> DiT:
    torch.manual_seed(0)
    model = DiT(tiny_cfg)
    with torch.no_grad():  # zero-initialised heads would make "every tensor equal" a weak check
        for p in model.parameters():
            p.normal_()
    return model


def _save_sharded(model: DiT, folder: Path) -> list[Path]:
    files = ck.save_dit(model, folder, max_shard_size=150_000)
    shards = sorted(folder.glob("diffusion_pytorch_model-*-of-*.safetensors"))
    assert len(shards) >= 3, shards
    return files


def _assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


# ------------------------------------------------------------------------------------------ round trips


def test_sharded_round_trip_every_tensor_equal(tmp_path: Path, tiny_model: DiT) -> None:
    _save_sharded(tiny_model, tmp_path)
    index = json.loads((tmp_path / ck.INDEX_NAME).read_text())
    n = len(list(tmp_path.glob("diffusion_pytorch_model-*")))
    assert set(index["weight_map"].values()) == {f"diffusion_pytorch_model-{i:05d}-of-{n:05d}.safetensors"
                                                 for i in range(1, n + 1)}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in tiny_model.state_dict().values())
    loaded = ck.load_dit(tmp_path)
    assert loaded.cfg == tiny_model.cfg
    _assert_same(loaded, tiny_model)
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])


def test_single_file_round_trip_and_bf16_cast(tmp_path: Path, tiny_model: DiT) -> None:
    ck.save_dit(tiny_model, tmp_path, max_shard_size=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ck.CONFIG_NAME, ck.WEIGHTS_NAME]
    _assert_same(ck.load_dit(tmp_path), tiny_model)
    half = ck.load_dit(tmp_path, dtype=torch.bfloat16)
    ref = tiny_model.state_dict()
    keep = ck._fp32_predicate(half)
    for k, t in half.state_dict().items():
        want = ref[k].dtype if keep and keep(k) else torch.bfloat16
        assert t.dtype == want, k
        assert torch.equal(t, ref[k].to(t.dtype)), k


def test_save_refuses_to_overwrite(tmp_path: Path, tiny_model: DiT) -> None:
    ck.save_dit(tiny_model, tmp_path, max_shard_size=None)
    with pytest.raises(ValueError, match="overwrite=True"):
        ck.save_dit(tiny_model, tmp_path)
    _save_sharded(tiny_model, tmp_path / "x")
    ck.save_dit(tiny_model, tmp_path / "x", max_shard_size=None, overwrite=True)  # stale shards removed
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == [ck.CONFIG_NAME, ck.WEIGHTS_NAME]


def test_official_writer_to_our_loader(tmp_path: Path) -> None:
    model_mod, _ = _official_modules()
    torch.manual_seed(1)
    official = model_mod.WanModel(model_type="t2v", **TINY)
    official.save_pretrained(tmp_path, max_shard_size="200KB")
    assert len(list(tmp_path.glob("diffusion_pytorch_model-*"))) >= 2
    ours = ck.load_dit(tmp_path)
    assert ours.cfg == DiTConfig(model_type="t2v", **TINY)
    _assert_same(ours, official)


def test_our_writer_to_official_loader(tmp_path: Path, tiny_model: DiT) -> None:
    model_mod, _ = _official_modules()
    _save_sharded(tiny_model, tmp_path)
    official = model_mod.WanModel.from_pretrained(str(tmp_path))
    _assert_same(official, tiny_model)


def test_s2v_round_trip_both_ways(tmp_path: Path) -> None:
    _, s2v_mod = _official_modules()
    s2v = S2VConfig(cond_dim=4, audio_dim=8, audio_inject_layers=(0, 1))
    cfg = DiTConfig(model_type="s2v", s2v=s2v, **{**TINY, "in_dim": 16, "out_dim": 16})  # official packer: 16 in
    torch.manual_seed(2)
    ours = DiT(cfg)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_()
    _save_sharded(ours, tmp_path / "ours")
    _assert_same(s2v_mod.WanModel_S2V.from_pretrained(str(tmp_path / "ours")), ours)
    _assert_same(ck.load_dit(tmp_path / "ours"), ours)
    official = s2v_mod.WanModel_S2V.from_pretrained(str(tmp_path / "ours"))
    official.save_pretrained(str(tmp_path / "official"), max_shard_size="100KB")
    back = ck.load_dit(tmp_path / "official")
    assert back.cfg == cfg
    _assert_same(back, official)


# ------------------------------------------------------------------------------------------ failures


def _mutate_shard(path: Path, fn) -> None:
    with safe_open(str(path), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    save_file(fn(sd), str(path), metadata={"format": "pt"})


def _shard_of(folder: Path, key: str) -> Path:
    return folder / json.loads((folder / ck.INDEX_NAME).read_text())["weight_map"][key]


def test_missing_shard(tmp_path: Path, tiny_model: DiT) -> None:
    _save_sharded(tiny_model, tmp_path)
    victim = sorted(tmp_path.glob("diffusion_pytorch_model-*"))[1]
    victim.unlink()
    with pytest.raises(ValueError, match=f"missing shard.*{victim.name}") as e:
        ck.load_dit(tmp_path)
    assert ck.INDEX_NAME in str(e.value) and "expected in" in str(e.value)


def test_wrong_shape(tmp_path: Path, tiny_model: DiT) -> None:
    _save_sharded(tiny_model, tmp_path)
    key = "blocks.1.ffn.0.weight"
    _mutate_shard(_shard_of(tmp_path, key), lambda sd: {**sd, key: torch.zeros(65, 32)})
    with pytest.raises(ValueError, match=r"wrong shapes \(1\): blocks\.1\.ffn\.0\.weight: file \(65, 32\) vs model "
                                         r"\(64, 32\)") as e:
        ck.load_dit(tmp_path)
    assert ck.WEIGHTS_NAME in str(e.value)  # names the expected layout


def test_missing_and_unexpected_keys_are_counted(tmp_path: Path, tiny_model: DiT) -> None:
    ck.save_dit(tiny_model, tmp_path, max_shard_size=None)
    path = tmp_path / ck.WEIGHTS_NAME
    _mutate_shard(path, lambda sd: {(k.replace("blocks.1.", "blocks.7.")): v for k, v in sd.items()})
    n_block = sum(k.startswith("blocks.1.") for k in tiny_model.state_dict())
    msg = f"(?s)missing keys \\({n_block}\\): blocks\\.1\\..*unexpected keys \\({n_block}\\): blocks\\.7\\."
    with pytest.raises(ValueError, match=msg):
        ck.load_dit(tmp_path)


def test_shard_disagrees_with_index(tmp_path: Path, tiny_model: DiT) -> None:
    _save_sharded(tiny_model, tmp_path)
    key = "head.modulation"
    _mutate_shard(_shard_of(tmp_path, key), lambda sd: {k: v for k, v in sd.items() if k != key})
    with pytest.raises(ValueError, match="in the index but not the file \\[head.modulation\\]"):
        ck.load_dit(tmp_path)


@pytest.mark.parametrize("cut", ["header", "data"])
def test_truncated_safetensors(tmp_path: Path, tiny_model: DiT, cut: str) -> None:
    _save_sharded(tiny_model, tmp_path)
    victim = sorted(tmp_path.glob("diffusion_pytorch_model-*"))[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[:20] if cut == "header" else data[:-100])
    with pytest.raises(ValueError, match=f"cannot read .*{victim.name}: truncated or corrupt"):
        ck.load_dit(tmp_path)


def test_failed_load_leaves_model_untouched(tiny_cfg: DiTConfig, tiny_model: DiT) -> None:
    sd = dict(tiny_model.state_dict())
    sd["head.head.bias"] = torch.zeros(3)
    with torch.device("meta"):
        model = DiT(tiny_cfg)
    with pytest.raises(ValueError, match="head.head.bias"):
        ck.load_into_meta_model(model, sd, source="test")
    assert all(p.is_meta for p in model.parameters())  # validated before any tensor was assigned


class _Evil:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):  # unpickling would create a folder: proof that code ran
        return (os.mkdir, (self.target,))


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    pth = tmp_path / "Wan2.1_VAE.pth"
    torch.save({"encoder.conv1.weight": torch.zeros(2), "x": _Evil(str(marker))}, pth)
    with pytest.raises(ValueError, match="Wan2.1_VAE.pth contains pickled Python objects"):
        ck.load_vae(pth, VAE_TINY)
    assert not marker.exists()  # the payload never ran


def test_vae_round_trip_and_mismatch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vae = WanVAE(VAE_TINY)
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_()
    torch.save(vae.state_dict(), tmp_path / "Wan2.1_VAE.pth")
    loaded = ck.load_vae(tmp_path / "Wan2.1_VAE.pth", VAE_TINY)
    _assert_same(loaded, vae)
    with pytest.raises(ValueError, match="does not match the VAE config"):
        ck.load_vae(tmp_path / "Wan2.1_VAE.pth", dataclasses.replace(VAE_TINY, dim=16))


# ------------------------------------------------------------------------------------------ config.json


def _write_json(folder: Path, raw: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ck.CONFIG_NAME).write_text(json.dumps(raw))
    return folder


def test_config_round_trip(tmp_path: Path, tiny_cfg: DiTConfig) -> None:
    for cfg in (tiny_cfg, dataclasses.replace(tiny_cfg, model_type="i2v", in_dim=36, out_dim=16, eps=1e-5,
                                              text_len=256)):
        ck.write_dit_config(cfg, tmp_path)
        assert ck.read_dit_config(tmp_path) == cfg


def test_ignored_fields_are_not_read(tmp_path: Path) -> None:
    raw = {"model_type": "t2v", **TINY, "patch_size": [1, 4, 4], "text_dim": 777, "qk_norm": False}
    cfg = ck.read_dit_config(_write_json(tmp_path, raw))
    assert tuple(cfg.patch_size) == (1, 2, 2) and cfg.text_dim == 4096


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"model_type": "flf2v"}, "unsupported model_type 'flf2v'"),
        ({"window_size": [128, 128]}, "window_size"),
        ({"_class_name": "WanTransformer3DModel"}, "diffusers"),
        ({"num_layer": 3}, "unknown keys \\['num_layer'\\]"),
        ({"num_heads": 3}, "config.json: dim 32 / num_heads 3"),
    ],
)
def test_config_rejections(tmp_path: Path, extra: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ck.read_dit_config(_write_json(tmp_path, {"model_type": "t2v", **TINY, **extra}))


def test_config_missing_size_key(tmp_path: Path) -> None:
    raw = {"model_type": "t2v", **TINY}
    del raw["num_layers"]
    with pytest.raises(ValueError, match="missing required keys \\['num_layers'\\]"):
        ck.read_dit_config(_write_json(tmp_path, raw))


def _official_s2v_config(tmp_path: Path, **overrides) -> Path:
    _, s2v_mod = _official_modules()
    kw = dict(cond_dim=4, audio_dim=8, num_audio_token=4, enable_adain=True, audio_inject_layers=[0, 1],
              zero_init=True, zero_timestep=True, enable_motioner=False, enable_framepack=True,
              framepack_drop_mode="padd", **TINY)
    kw.update(overrides)
    # The oracle writes the config.json; building the model is cheap at this size.
    s2v_mod.WanModel_S2V(**kw).save_config(str(tmp_path))
    return tmp_path


def test_s2v_config_from_official_writer(tmp_path: Path) -> None:
    cfg = ck.read_dit_config(_official_s2v_config(tmp_path))
    assert cfg.model_type == "s2v" and cfg.s2v is not None
    assert tuple(cfg.s2v.audio_inject_layers) == (0, 1)
    assert cfg.s2v.audio_dim == 8 and cfg.s2v.cond_dim == 4 and cfg.s2v.num_audio_token == 4
    ck.write_dit_config(cfg, tmp_path / "again")
    assert ck.read_dit_config(tmp_path / "again") == cfg


def test_s2v_unsupported_switches(tmp_path: Path) -> None:
    raw = json.loads((_official_s2v_config(tmp_path) / ck.CONFIG_NAME).read_text())
    with pytest.raises(ValueError, match="enable_motioner=true .* not supported"):
        ck.read_dit_config(_write_json(tmp_path / "a", {**raw, "enable_motioner": True, "enable_framepack": False}))
    del raw["enable_framepack"], raw["enable_motioner"]  # absent keys take the official defaults (motioner on)
    with pytest.raises(ValueError, match="enable_motioner"):
        ck.read_dit_config(_write_json(tmp_path / "b", raw))


# ------------------------------------------------------------------------------------------ layouts


def _touch(root: Path, *rels: str) -> None:
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")


def _tiny_dit_folder(folder: Path, cfg: DiTConfig) -> None:
    ck.write_dit_config(cfg, folder)
    save_file({"w": torch.zeros(1)}, str(folder / ck.WEIGHTS_NAME))


def test_find_experts(tmp_path: Path, tiny_cfg: DiTConfig) -> None:
    for sub in ("low_noise_model", "high_noise_model"):
        ck.write_dit_config(tiny_cfg, tmp_path / "a14b" / sub)
    experts = layouts.find_experts(tmp_path / "a14b")
    assert list(experts.items()) == [("high", tmp_path / "a14b" / "high_noise_model"),
                                     ("low", tmp_path / "a14b" / "low_noise_model")]
    ck.write_dit_config(tiny_cfg, tmp_path / "s2v")
    assert layouts.find_experts(tmp_path / "s2v") == {layouts.SINGLE_EXPERT: tmp_path / "s2v"}
    ck.write_dit_config(tiny_cfg, tmp_path / "half" / "high_noise_model")
    with pytest.raises(ValueError, match="missing low_noise_model"):
        layouts.find_experts(tmp_path / "half")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no DiT found .*high_noise_model/"):
        layouts.find_experts(tmp_path / "empty")


def test_check_layout(tmp_path: Path, tiny_cfg: DiTConfig) -> None:
    root = tmp_path / "Wan2.2-S2V-14B"
    _tiny_dit_folder(root, tiny_cfg)
    _touch(root, "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl/tokenizer.json", "Wan2.1_VAE.pth")
    with pytest.raises(ValueError) as e:
        layouts.check_layout(root, "s2v-14B")
    msg = str(e.value)
    assert "incomplete for task 's2v-14b'" in msg and "expected:" in msg
    assert "wav2vec2-large-xlsr-53-english/ (folder)" in msg.split("missing or invalid:")[1]
    assert "Wan2.1_VAE.pth" not in msg.split("missing or invalid:")[1]
    _touch(root, "wav2vec2-large-xlsr-53-english/config.json")
    paths = layouts.check_layout(root, "s2v-14b")
    assert paths["wav2vec"] == root / "wav2vec2-large-xlsr-53-english" and paths[layouts.SINGLE_EXPERT] == root

    a14b = tmp_path / "Wan2.2-T2V-A14B"
    _tiny_dit_folder(a14b / "high_noise_model", tiny_cfg)
    with pytest.raises(ValueError) as e:
        layouts.check_layout(a14b, "t2v-A14B")
    missing = str(e.value).split("missing or invalid:")[1]
    for need in ("low_noise_model/config.json", "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl/ (folder)",
                 "Wan2.1_VAE.pth"):
        assert need in missing
    assert "high_noise_model" not in missing
    with pytest.raises(ValueError, match="unknown task 'x2v'; known: t2v-a14b"):
        layouts.check_layout(a14b, "x2v")


# ------------------------------------------------------------------------------------------ malformed files


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"dim": "32"}, 'dim must be an integer, got "32" \\(string\\)'),
        ({"dim": 32.0}, "dim must be an integer, got 32.0 \\(number\\)"),
        ({"num_layers": True}, "num_layers must be an integer, got true \\(boolean\\)"),
        ({"num_layers": 10**9}, "num_layers must be in \\[1, 4096\\]"),
        ({"ffn_dim": -64}, "ffn_dim must be in"),
        ({"eps": "1e-6"}, "eps must be a finite number"),
        ({"enable_adain": "yes"}, "enable_adain must be true or false"),
    ],
)
def test_config_field_types(tmp_path: Path, extra: dict, match: str) -> None:
    with pytest.raises(ValueError, match=f"config.json: .*{match}"):
        ck.read_dit_config(_write_json(tmp_path, {"model_type": "t2v", **TINY, **extra}))


@pytest.mark.parametrize("text", [b"\xff\xfe{}", b'{"model_type": ', b"[1, 2]", b'{"eps": NaN}'])
def test_config_unreadable(tmp_path: Path, text: bytes) -> None:
    (tmp_path / ck.CONFIG_NAME).write_bytes(text.replace(b'{"eps"', b'{"model_type": "t2v", "eps"'))
    with pytest.raises(ValueError, match="config.json"):
        ck.read_dit_config(tmp_path)


@pytest.mark.parametrize("name", ["../evil.safetensors", "/etc/evil.safetensors", "sub/x.safetensors", "..", 7, ""])
def test_shard_names_must_stay_in_the_folder(tmp_path: Path, tiny_model: DiT, name: object) -> None:
    folder = tmp_path / "dit"
    _save_sharded(tiny_model, folder)
    # A real safetensors file where "../evil.safetensors" leads: only the name is wrong.
    (tmp_path / "evil.safetensors").write_bytes(sorted(folder.glob("diffusion_pytorch_model-*"))[0].read_bytes())
    index = folder / ck.INDEX_NAME
    raw = json.loads(index.read_text())
    raw["weight_map"][next(iter(raw["weight_map"]))] = name
    index.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=f"{ck.INDEX_NAME}: shard name .* (is not a plain file name|not a file name)"):
        ck.load_dit(folder)


def test_symlinked_shards(tmp_path: Path, tiny_model: DiT) -> None:
    # A Hugging Face cache snapshot: every file a symlink into the repo's blobs/ folder, which is accepted.
    repo = tmp_path / "models--Wan-AI--x"
    folder = repo / "snapshots" / "abc123" / "high_noise_model"
    _save_sharded(tiny_model, folder)
    (repo / "blobs").mkdir()
    for i, shard in enumerate(sorted(folder.glob("diffusion_pytorch_model-*"))):
        blob = repo / "blobs" / f"blob{i}"
        shard.rename(blob)
        shard.symlink_to(Path("../../../blobs") / blob.name)
    _assert_same(ck.load_dit(folder), tiny_model)
    # A symlink anywhere else outside the folder is refused.
    victim = sorted(folder.glob("diffusion_pytorch_model-*"))[0]
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(victim.read_bytes())
    victim.unlink()
    victim.symlink_to(outside)
    with pytest.raises(ValueError, match=f"shard {victim.name} is a symlink to .*outside"):
        ck.find_weight_files(folder)


@pytest.mark.parametrize("index_text", [b"\xff\xfe", b'{"weight_map": [1]}', b'{"weight_map": {"a": ["x"]}}'])
def test_malformed_index(tmp_path: Path, tiny_model: DiT, index_text: bytes) -> None:
    _save_sharded(tiny_model, tmp_path)
    (tmp_path / ck.INDEX_NAME).write_bytes(index_text)
    with pytest.raises(ValueError, match=ck.INDEX_NAME):
        ck.load_dit(tmp_path)


def test_garbage_header_and_bad_total_size(tmp_path: Path, tiny_model: DiT) -> None:
    _save_sharded(tiny_model, tmp_path)
    index = tmp_path / ck.INDEX_NAME
    raw = json.loads(index.read_text())
    index.write_text(json.dumps({**raw, "metadata": ["not", "an", "object"]}))
    _assert_same(ck.load_dit(tmp_path), tiny_model)  # a malformed size field is only a warning, as a stale one is
    victim = sorted(tmp_path.glob("diffusion_pytorch_model-*"))[0]
    data = bytearray(victim.read_bytes())
    data[8:24] = b"\xff" * 16
    victim.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"cannot read .*{victim.name}: truncated or corrupt"):
        ck.load_dit(tmp_path)


def test_layout_needs() -> None:
    small = layouts.layout_needs(layouts.SMALL_LAYOUT, ("high", "low"))
    want = ["high_noise_model", "low_noise_model", layouts.SMALL_VAE_NAME, layouts.BYTE_TEXT_NAME]
    assert [n.path for n in small] == want
    assert [n.path for n in layouts.layout_needs(layouts.SMALL_LAYOUT, ("low",))][0] == ""
    assert layouts.layout_needs("S2V-14B") is layouts.TASK_LAYOUTS["s2v-14b"]
    with pytest.raises(ValueError, match="unknown checkpoint layout 'ti2v-5b'"):
        layouts.layout_needs("ti2v-5b")
