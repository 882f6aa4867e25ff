"""Build the pipeline's components for a task from a checkpoint folder (official layout) or the embedded assets.

Layouts (see docs/api.md):
- official: `high_noise_model/` + `low_noise_model/` (or one root DiT), `Wan2.1_VAE.pth`,
  `models_t5_umt5-xxl-enc-bf16.pth` + `google/umt5-xxl/`, and for S2V `wav2vec2-large-xlsr-53-english/`;
- small models (the embedded one, and the tiny test models): the same DiT folders, plus
  `vae.safetensors` (config with the latent statistics in its metadata) and `byte_text_encoder.safetensors`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from wanmoe import checkpoint as ck
from wanmoe import layouts, numerics
from wanmoe.configs import ASSETS, PRESETS, PipelineConfig
from wanmoe.distributed.env import ParallelState
from wanmoe.memory.offload import ExpertPool, policy_from_flags
from wanmoe.memory.plan_policy import STREAM_AHEAD
from wanmoe.models.dit import DiTConfig
from wanmoe.models.vae import WanVAE
from wanmoe.pipeline import Components
from wanmoe.request import InputError, LoadOptions
from wanmoe.sampling.cache import CALIBRATION_FILE, Calibration
from wanmoe.verify import cheap_check

log = logging.getLogger(__name__)

VAE_SAFETENSORS = "vae.safetensors"
BYTE_TEXT = "byte_text_encoder.safetensors"


def ckpt_root(cfg: PipelineConfig, ckpt_dir: str | None) -> Path:
    if ckpt_dir:
        root = Path(ckpt_dir)
        if not root.is_dir():
            raise InputError("ckpt_dir", f"{root} is not a folder")
        return root
    if cfg.embedded:
        root = ASSETS / cfg.task
        if not (root / VAE_SAFETENSORS).is_file():
            raise ValueError(f"the embedded model's weights are missing from {root}; reinstall wanmoe or retrain "
                             "with `wanmoe train`")
        return root
    raise InputError("ckpt_dir", f"is needed by task {cfg.task} (a folder with the official Wan2.2 weights)")


def expert_folders(cfg: PipelineConfig, root: Path) -> dict[str, Path]:
    """Task expert name -> DiT folder; a single-DiT checkpoint serves a one-expert task."""
    found = layouts.find_experts(root)
    if list(found) == [layouts.SINGLE_EXPERT]:
        if len(cfg.experts) != 1:
            raise ValueError(f"{root} holds a single DiT but {cfg.task} needs experts {cfg.experts} "
                             f"(folders high_noise_model/ and low_noise_model/)")
        return {cfg.experts[0]: found[layouts.SINGLE_EXPERT]}
    if tuple(found) != tuple(cfg.experts):
        raise ValueError(f"{root} holds experts {tuple(found)} but {cfg.task} needs {cfg.experts}")
    return found


def check_small_layout(cfg: PipelineConfig, root: Path) -> None:
    """A wanmoe small model: every file `load_components` will read is there, checked before any weights load.

    The experts load lazily (on first use), so a missing weight file would otherwise surface mid-generation.
    """
    dits = [""] if len(cfg.experts) == 1 else [dict(layouts.EXPERT_FOLDERS)[n] for n in cfg.experts]
    expected = [f"{d + '/' if d else ''}{ck.CONFIG_NAME} + {ck.WEIGHTS_NAME} (or shards + {ck.INDEX_NAME})"
                for d in dits] + [f"{VAE_SAFETENSORS} (VAE)", f"{BYTE_TEXT} (text encoder)"]
    problems = []
    for d in dits:
        folder = root / d
        if not (folder / ck.CONFIG_NAME).is_file():
            problems.append(str(folder / ck.CONFIG_NAME))
            continue
        try:
            ck.find_weight_files(folder)
        except ValueError as e:
            problems.append(f"{folder}: {e}")
    problems += [str(root / f) for f in (VAE_SAFETENSORS, BYTE_TEXT) if not (root / f).is_file()]
    if problems:
        raise ValueError(f"checkpoint folder {root} is incomplete for task {cfg.task}.\n  expected:\n    "
                         + "\n    ".join(expected) + "\n  missing or invalid:\n    " + "\n    ".join(problems))


def fit_to_folder(cfg: PipelineConfig, root: Path | None) -> PipelineConfig:
    """`layouts.fit_small` (a small model's latent width from its VAE file: a retrained s2v-mini on a 32-channel
    latent loads like the shipped one), its refusals as InputError('ckpt_dir')."""
    try:
        return layouts.fit_small(cfg, root)
    except ValueError as e:
        raise InputError("ckpt_dir", f"{root}: {e}") from None


def load_small_vae(path: Path, device: torch.device) -> WanVAE:
    """A VAE saved by wanmoe (safetensors with its VAEConfig, latent statistics included, in the metadata)."""
    cfg = layouts.small_vae_config(path)
    with torch.device("meta"):
        vae = WanVAE(cfg)
    return ck.load_into_meta_model(vae, load_file(str(path), device=str(device)), source=str(path)).eval()


def load_vae_for(cfg: PipelineConfig, root: Path, device: torch.device) -> WanVAE:
    if (root / VAE_SAFETENSORS).is_file():
        return load_small_vae(root / VAE_SAFETENSORS, device)
    path = root / "Wan2.1_VAE.pth"
    if not path.is_file():
        raise ValueError(f"no VAE in {root}: expected Wan2.1_VAE.pth (official) or {VAE_SAFETENSORS}")
    return ck.load_vae(path, cfg.vae, device=device).eval()


def load_text_encoder(cfg: PipelineConfig, root: Path, device: torch.device, t5_cpu: bool):
    if cfg.text_encoder == "byte":
        from wanmoe.encoders.text import ByteTextEncoder

        path = root / BYTE_TEXT
        if not path.is_file():
            raise ValueError(f"missing {path} (the byte-level text encoder of {cfg.task})")
        with torch.device("meta"):
            enc = ByteTextEncoder(cfg.byte_text)
        return ck.load_into_meta_model(enc, load_file(str(path), device=str(device)), source=str(path)).eval()
    from wanmoe.encoders.text import T5TextEncoder

    return T5TextEncoder.from_checkpoint(root, device="cpu" if t5_cpu else device)


def load_audio_encoder(cfg: PipelineConfig, root: Path):
    if cfg.audio_encoder is None:
        return None
    if cfg.audio_encoder == "mel":
        from wanmoe.encoders.audio import MelAudioEncoder

        return MelAudioEncoder(cfg.mel)
    from wanmoe.encoders.audio import Wav2Vec2AudioEncoder

    folder = root / "wav2vec2-large-xlsr-53-english"
    if not folder.is_dir():
        raise ValueError(f"missing {folder}/ (the wav2vec2 audio encoder of {cfg.task})")
    return Wav2Vec2AudioEncoder(folder)


def expert_loader(folder: Path, device: torch.device, dtype: torch.dtype | None, quant: str | None, cfg=None,  # noqa: ANN001
                  compile: bool = False, frugal: bool = False, int8_activations: bool = False):
    """Zero-argument loader for the residency manager: meta build + memory-mapped safetensors, optional 8-bit
    weights (quant "int8" or "fp8"), optional token chunks (`frugal`), optional torch.compile (the module compiles
    on its first forward; a reloaded expert compiles again)."""

    def load() -> torch.nn.Module:
        model = ck.load_dit(folder, dtype=dtype, device="cpu", cfg=cfg).eval()
        if quant is not None:
            from wanmoe.memory.quantize import quantize_, set_int8_activations

            quantize_(model, quant)
            set_int8_activations(model, int8_activations)
        if frugal:
            enable_frugal(dit=model)
        model = model.to(device)
        if compile:
            model.compile(dynamic=False)
        return model

    return load


def enable_frugal(dit: torch.nn.Module | None = None, vae: WanVAE | None = None) -> None:
    """Switch on the memory knobs: the DiT's token chunks and the VAE's spatial tiles, at the defaults the planner
    assumes (`wanmoe.models.frugal`)."""
    from wanmoe.models.frugal import frugal_

    frugal_(dit, vae)


class VisitingEncoder:
    """umT5 kept in host memory that visits `device` for each call (official --offload_model behaviour)."""

    def __init__(self, encoder, device: torch.device) -> None:  # noqa: ANN001 (a T5TextEncoder)
        self.encoder, self.device = encoder, device
        encoder.device = device  # token ids go to the device; the weights follow them there for the call

    @property
    def model(self) -> torch.nn.Module:
        return self.encoder.model

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        self.encoder.model.to(self.device)
        try:
            return self.encoder(prompts)
        finally:
            self.encoder.model.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


def parallel_loader(load, state: ParallelState):  # noqa: ANN001, ANN201 (Loader -> Loader)
    """Wrap an expert loader so each expert, once its full weights are loaded, gets Ulysses and/or FSDP."""
    from wanmoe.distributed.fsdp import apply_fsdp
    from wanmoe.distributed.ulysses import apply_ulysses

    def wrapped() -> torch.nn.Module:
        model = apply_ulysses(load(), state)
        if state.dit_fsdp:
            apply_fsdp(model, state)  # each expert is its own set of FSDP units
        return model

    return wrapped


def _shape_key(d: DiTConfig, latent: bool = True) -> tuple:
    """What config.json always records (the official files and wanmoe's small models alike); latent=False leaves
    out the channels that follow the VAE's latent width (a small model may be retrained on another VAE)."""
    io = (d.in_dim, d.out_dim) if latent else ()
    return (d.model_type, *io, d.dim, d.ffn_dim, d.num_heads, d.num_layers, tuple(d.patch_size))


def detect_task(root: Path) -> PipelineConfig:
    """The task a checkpoint folder holds, from its layout and DiT config(s); ValueError when ambiguous.

    A single-DiT folder of a two-expert task's model (the embedded model's `single_expert/` baseline) is that
    task served by one expert (`PipelineConfig.single_expert`).
    """
    if not root.is_dir():
        raise InputError("ckpt_dir", f"{root} is not a folder")
    try:
        folders = layouts.find_experts(root)
        dit = ck.read_dit_config(next(iter(folders.values())))
    except ValueError as e:
        raise InputError("ckpt_dir", f"{root} holds no readable DiT: {e}") from None
    small = (root / VAE_SAFETENSORS).is_file()
    # A small model's latent width is its VAE file's (layouts.fit_small); the file is read once, not per preset.
    try:
        vae = layouts.small_vae_config(root / VAE_SAFETENSORS) if small else None
    except ValueError as e:
        raise InputError("ckpt_dir", f"{root}: {e}") from None
    found = []
    for cfg in PRESETS.values():
        if (cfg.layout == "small") != small:
            continue
        if _shape_key(dit, latent=not small) != _shape_key(cfg.dit, latent=not small):
            continue
        if vae is not None:
            try:
                cfg = cfg.with_vae(vae)
            except ValueError:  # this preset's latent width cannot change: not this task
                continue
            if _shape_key(dit) != _shape_key(cfg.dit):
                continue
        if list(folders) == [layouts.SINGLE_EXPERT]:
            found.append(cfg.single_expert())
        elif tuple(folders) == cfg.experts:
            found.append(cfg)
    if len(found) != 1:
        what = "no task" if not found else f"several tasks ({', '.join(c.task for c in found)})"
        raise InputError("ckpt_dir", f"{root} matches {what}; name the task (task=... / --task)")
    return found[0]


def load_components(cfg: PipelineConfig, opts: LoadOptions, parallel: ParallelState | None = None) -> Components:
    """The pipeline's components for `cfg` under `opts`; `parallel` (from init_parallel) shards them over ranks.

    Every file is checked before any weights load (layout, config, headers); the experts then load lazily.
    """
    parallel = parallel or ParallelState()
    device = torch.device(opts.device)
    root = ckpt_root(cfg, opts.ckpt_dir)
    if cfg.layout == "small":
        check_small_layout(cfg, root)
    else:
        layouts.check_layout(root, cfg.layout)
    # The cheap part of `wanmoe verify`: every header, index, config field and tensor shape the task reads, so a
    # malformed or truncated file is found now, not when a lazily loaded expert is first used mid-sampling.
    problems = cheap_check(root, cfg)
    if problems:
        raise ValueError(f"checkpoint folder {root} cannot serve task {cfg.task}:\n  " + "\n  ".join(problems)
                         + f"\n(`wanmoe verify --ckpt_dir {root}` checks the whole folder)")
    folders = expert_folders(cfg, root)
    small = cfg.layout == "small"  # wanmoe's own small models: the preset defines the sizes
    for name, folder in folders.items():  # fail before any weights load: config.json must match the task
        got = ck.read_dit_config(folder)
        if not small and dataclasses.replace(got, text_len=cfg.dit.text_len) != cfg.dit:
            raise ValueError(f"{folder}/config.json describes a different model than task {cfg.task} "
                             f"(expert {name}): {got} vs {cfg.dit}")
    # One numerics policy (wanmoe.numerics): storage dtype of the weights and compute dtype per device.
    compute = numerics.compute_dtype(device, opts.convert_model_dtype)
    weights = numerics.weight_dtype(device, opts.convert_model_dtype)
    # The residency policy: chosen by vram_gb (request.plan_options) or official offload_model; "stream+int8" is the
    # pool's "stream" with 8-bit experts (opts.quant says which). Streamed experts load into host memory: the pool
    # moves their non-block parts and streams their blocks.
    policy = (opts.policy or policy_from_flags(opts.offload_model)).split("+")[0]
    # The memory knobs (DiT token chunks, VAE tiles) the planner assumes for every policy on CUDA.
    frugal = device.type == "cuda" or policy == "stream"
    home = torch.device("cpu") if policy == "stream" else device
    loaders = {n: expert_loader(f, home, weights, opts.expert_quant(n), cfg.dit if small else None, opts.compile,
                                frugal, opts.int8_activations)
               for n, f in folders.items()}
    if parallel.world > 1:
        loaders = {n: parallel_loader(f, parallel) for n, f in loaders.items()}
        if parallel.dit_fsdp and policy != "resident":
            # Moving or dropping a sharded expert would break its FSDP state: FSDP experts stay resident.
            log.info("dit_fsdp: experts stay resident (offload_model ignored)")
            policy = "resident"
    if opts.stream_staging and policy != "stream":
        log.info("stream_staging %d not used: the %s policy keeps each expert whole", opts.stream_staging, policy)
    pool = ExpertPool(loaders, device, policy, stream_ahead=STREAM_AHEAD,
                      stream_staging=opts.stream_staging if policy == "stream" else 0)
    if parallel.dit_fsdp:
        # Shard every expert now, on the main thread and in the same order on every rank (a prefetch thread
        # would run the loaders at rank-dependent times).
        for n in pool.names:
            pool.get(n)
    # umT5 visits the device only while it encodes unless every model stays resident (official --offload_model:
    # `text_encoder.model.cpu()` after encoding); the planner assumes it is gone during sampling.
    visiting = (device.type == "cuda" and not opts.t5_cpu and policy != "resident" and not parallel.t5_fsdp
                and cfg.text_encoder == "umt5-xxl")
    text = load_text_encoder(cfg, root, torch.device("cpu") if visiting else device, opts.t5_cpu)
    if visiting:
        text = VisitingEncoder(text, device)
    if parallel.t5_fsdp:
        from wanmoe.distributed.fsdp import apply_fsdp

        # The official wrapper shards the umT5 inside it; the byte-level encoder is itself the module.
        apply_fsdp(getattr(text, "model", text), parallel)
    cal_file = root / CALIBRATION_FILE
    vae = load_vae_for(cfg, root, device)
    if frugal:
        enable_frugal(vae=vae)
    return Components(
        cfg=cfg, text_encoder=text, vae=vae, experts=pool,
        audio_encoder=load_audio_encoder(cfg, root), device=device, dtype=compute, parallel=parallel,
        cache_calibration=Calibration.load(cal_file) if cal_file.is_file() else None,
    )


def save_small_model(root: Path, cfg: PipelineConfig, experts: dict[str, torch.nn.Module], vae: WanVAE,
                     text_encoder: torch.nn.Module | None, *, dit_dtype: torch.dtype | None = None) -> None:
    """Write a wanmoe small model in the layout `load_components` reads (official DiT folders + small files)."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    single = len(cfg.experts) == 1
    for name, model in experts.items():
        folder = root if single else root / dict(layouts.EXPERT_FOLDERS)[name]
        if dit_dtype is not None:
            model = _cast_copy(model, dit_dtype)
        ck.save_dit(model, folder, max_shard_size=None, overwrite=True)
    vae_meta = {"config": json.dumps(dataclasses.asdict(vae.cfg))}
    save_file({k: v.detach().contiguous() for k, v in vae.state_dict().items()}, str(root / VAE_SAFETENSORS),
              metadata=vae_meta)
    if text_encoder is not None:
        save_file({k: v.detach().contiguous() for k, v in text_encoder.state_dict().items()}, str(root / BYTE_TEXT))


def _cast_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).to(dtype)
