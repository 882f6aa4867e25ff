"""`wanmoe plan`: predicted peak GPU memory and weight bytes per task, size and flag set, before any download.

Everything is computed on the meta device from the presets: weight bytes are parameter counts times the dtype
each component runs in; activation peaks come from running the real forward passes (DiT, VAE decode) on meta
tensors under a dispatch mode that tracks live storage bytes (allocated when an op returns a tensor, released
when its last tensor dies), so the prediction follows the code, not a formula. Attention is replaced by its
fused-kernel footprint (output only; flash/SDPA-efficient kernels never materialise the L x L scores).

Phases on one GPU, after the official generate.py:
  encode : text encoder on the GPU unless --t5_cpu (S2V: plus the audio encoder);
  denoise: one expert (--offload_model, experts swap at the boundary) or all experts, plus one DiT forward;
  decode : the VAE decode; experts (and the text encoder) stay on the GPU only without --offload_model.
The VAE is resident throughout (as official). Predictions are tensor bytes (torch.cuda.max_memory_allocated);
the official table reports the process peak, which adds the CUDA context and allocator slack (~1-3 GB).

Axis legend: B batch, C channels, F latent frames, H/W latent height/width, L tokens, S text tokens, T frames.
"""

from __future__ import annotations

import argparse
import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from wanmoe import numerics
from wanmoe.memory.offload import OffloadFlags

__all__ = ["LiveBytes", "MemoryPlan", "plan_memory", "official_peak_gb", "OFFICIAL_1GPU_GB", "main"]

GB = 1e9
# Official single-GPU peaks (GB), --offload_model True --convert_model_dtype, H100, as the Wan2.2 project publishes
# them in its computational-efficiency table. S2V has no published figure ("at least 80GB").
OFFICIAL_1GPU_GB: dict[tuple[str, str], float] = {
    ("t2v-A14B", "1280*720"): 59.8, ("t2v-A14B", "832*480"): 41.3,
    ("i2v-A14B", "1280*720"): 59.7, ("i2v-A14B", "832*480"): 41.0,
}


def official_peak_gb(task: str, size: str, flags: OffloadFlags) -> float | None:
    """The official measurement for this row, if one exists (sizes compare as an unordered pair)."""
    if not (flags.offload_model and flags.convert_model_dtype and not flags.t5_cpu):
        return None
    w, h = size.split("*")
    for (t, s), v in OFFICIAL_1GPU_GB.items():
        if t.lower() == task.lower() and sorted(s.split("*")) == sorted((w, h)):
            return v
    return None


class LiveBytes(TorchDispatchMode):
    """Tracks the bytes of live tensor storages created inside the mode; `peak` is the high-water mark.

    Storages are keyed by their C++ address (meta tensors have no data pointer) and counted once however many
    views share them; a weakref finalizer on every returned tensor releases the storage with its last view.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, int] = {}
        self._size: dict[int, int] = {}

    def _drop(self, key: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.live -= self._size.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                st = t.untyped_storage()
                key = st._cdata
                if key not in self._refs:
                    self._refs[key] = 0
                    self._size[key] = st.nbytes()
                    self.live += self._size[key]
                self._refs[key] += 1
                weakref.finalize(t, self._drop, key)
        self.peak = max(self.peak, self.live)
        return out


@contextlib.contextmanager
def _fused_attention() -> Iterator[None]:
    """Within planning only: SDPA returns an empty output (its fused-kernel footprint) instead of the math path."""
    original = F.scaled_dot_product_attention

    def sdpa(q: Tensor, k: Tensor, v: Tensor, *args: object, **kwargs: object) -> Tensor:
        return q.new_empty((*q.shape[:-1], v.shape[-1]))  # (B, N, Lq, D)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def activation_peak(fn: Callable[[], object]) -> int:
    """Peak bytes of tensors created while fn runs on meta tensors (its inputs must be created inside fn)."""
    with torch.no_grad(), _fused_attention(), LiveBytes() as tracker:
        out = fn()
        del out
    return tracker.peak


def _bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@dataclass(frozen=True)
class MemoryPlan:
    task: str
    size: str
    frames: int
    flags: OffloadFlags
    weights: dict[str, int]  # component -> bytes in the dtype it runs in
    phases: dict[str, int]  # phase -> predicted peak tensor bytes on the GPU
    tokens: int  # DiT sequence length of one forward

    @property
    def peak(self) -> int:
        return max(self.phases.values())


def latent_frames(cfg, frames: int) -> int:  # noqa: ANN001 (PipelineConfig)
    """Latent frames the DiT samples: one clip of `frames` pixel frames (S2V: `frames` = infer_frames, after the
    motion context, as the pipeline's S2V clips are laid out)."""
    st = cfg.vae_stride[0]
    if cfg.dit.s2v is not None:
        s = cfg.dit.s2v
        return -(-(frames + s.motion_frames) // st) - s.lat_motion_frames
    return (frames - 1) // st + 1


def _dit_inputs(cfg, frames: int, w: int, h: int) -> Callable[[nn.Module], Tensor]:  # noqa: ANN001
    dit = cfg.dit
    _, sh, sw = cfg.vae_stride
    f, lh, lw = latent_frames(cfg, frames), h // sh, w // sw

    def run(model: nn.Module) -> Tensor:
        x = torch.empty(1, 16 if dit.in_dim != 48 else 48, f, lh, lw, device="meta")  # (B, C, F, H, W)
        t = torch.empty(1, device="meta")
        ctx = torch.empty(1, dit.text_len, dit.text_dim, device="meta")  # (B, S, text_dim), worst case S
        kw: dict[str, object] = {}
        if dit.in_dim - x.shape[1] > 0:
            kw["y"] = torch.empty(1, dit.in_dim - x.shape[1], f, lh, lw, device="meta")
        if dit.s2v is not None:
            from wanmoe.models.s2v import S2VInputs

            s = dit.s2v
            kw["s2v"] = S2VInputs(
                audio=torch.empty(1, s.num_audio_layers, s.audio_dim, frames, device="meta"),  # (B, K, Da, A)
                ref_latents=torch.empty(1, 16, 1, lh, lw, device="meta"),
                motion_latents=torch.empty(1, 16, s.lat_motion_frames, lh, lw, device="meta"),
            )
        return model(x, t, ctx, **kw)

    return run


def plan_memory(cfg, size: str, flags: OffloadFlags, *, frames: int | None = None,  # noqa: ANN001
                cache: dict | None = None) -> MemoryPlan:
    """Predict weights and per-phase GPU peaks for PipelineConfig cfg at size 'W*H' with the given flags.

    cache (optional, caller-owned) reuses activation peaks across flag sets that share task, size and dtype.
    """
    from wanmoe.models.dit import DiT
    from wanmoe.models.vae import WanVAE

    w, h = (int(v) for v in size.split("*"))
    if frames is None:
        frames = cfg.infer_frames if cfg.modality == "s2v" else cfg.frame_num
    # The loader's dtype for a GPU (numerics.weight_dtype); None keeps the stored dtype: official shards are fp32.
    dit_dtype = numerics.weight_dtype("cuda", flags.convert_model_dtype) or torch.float32
    with torch.device("meta"):
        dit = numerics.cast_(DiT(cfg.dit), dit_dtype)  # the fp32 modules stay fp32, as the loader keeps them
        vae = WanVAE(cfg.vae)  # fp32, as official
        text = _text_encoder(cfg)
    weights = {f"expert:{n}": _bytes(dit) for n in cfg.experts}
    weights["vae"] = _bytes(vae)
    weights["text_encoder"] = _bytes(text) if text is not None else 0
    if cfg.audio_encoder == "wav2vec2":
        weights["audio_encoder"] = 315_438_720 * 4  # wav2vec2-large-xlsr-53 encoder, fp32 (HF checkpoint count)

    runner = _dit_inputs(cfg, frames, w, h)
    tokens = [0]

    def dit_forward() -> Tensor:
        out = runner(dit)
        tokens[0] = out.shape[2] * out.shape[3] * out.shape[4] // 4
        return out

    # The decode: T2V/I2V one clip; S2V the motion context's latents followed by the clip's.
    lat_f = latent_frames(cfg, frames) + (cfg.dit.s2v.lat_motion_frames if cfg.dit.s2v is not None else 0)
    lat = torch.Size((1, cfg.vae.z_dim, lat_f, h // cfg.vae_stride[1], w // cfg.vae_stride[2]))
    key = (cfg.task, size, frames, dit_dtype)
    if cache is not None and key in cache:
        dit_act, vae_act, tokens[0] = cache[key]
    else:
        dit_act = activation_peak(dit_forward)
        vae_act = activation_peak(lambda: vae.decode(torch.empty(lat, device="meta")))
        if cache is not None:
            cache[key] = (dit_act, vae_act, tokens[0])

    experts_all = sum(v for k, v in weights.items() if k.startswith("expert:"))
    one_expert = max(v for k, v in weights.items() if k.startswith("expert:"))
    enc = weights["text_encoder"] + weights.get("audio_encoder", 0)
    t5_gpu = 0 if flags.t5_cpu else weights["text_encoder"]
    # Without --offload_model the encoders stay on the GPU after encoding and the experts stay after the loop.
    stay = 0 if flags.offload_model else t5_gpu + weights.get("audio_encoder", 0)
    phases = {
        "encode": weights["vae"] + (enc if not flags.t5_cpu else weights.get("audio_encoder", 0)),
        "denoise": weights["vae"] + stay + (one_expert if flags.offload_model else experts_all) + dit_act,
        "decode": weights["vae"] + stay + (0 if flags.offload_model else experts_all) + vae_act,
    }
    return MemoryPlan(cfg.task, size, frames, flags, weights, phases, tokens[0])


def _text_encoder(cfg) -> nn.Module | None:  # noqa: ANN001
    from wanmoe.encoders import text as text_mod

    if cfg.text_encoder == "umt5-xxl":
        return text_mod.UMT5Encoder(text_mod.T5_PRESETS["umt5-xxl"]).to(torch.bfloat16)  # official t5_dtype bf16
    cls = getattr(text_mod, "ByteTextEncoder", None)
    conf = getattr(text_mod, "ByteTextConfig", None)
    return cls(conf()) if cls is not None and conf is not None else None


FLAG_SETS: dict[str, OffloadFlags] = {
    "offload+bf16": OffloadFlags(offload_model=True, convert_model_dtype=True),
    "offload+bf16+t5_cpu": OffloadFlags(offload_model=True, convert_model_dtype=True, t5_cpu=True),
    "offload": OffloadFlags(offload_model=True),
    "resident+bf16": OffloadFlags(offload_model=False, convert_model_dtype=True),
}


def format_rows(plans: Sequence[MemoryPlan]) -> str:
    head = (f"{'task':10s} {'size':9s} {'frames':>6s} {'flags':20s} {'tokens':>7s} {'weights GB':>10s} "
            f"{'encode':>7s} {'denoise':>8s} {'decode':>7s} {'peak GB':>8s} {'official GB':>11s}")
    lines = [head, "-" * len(head)]
    for p in plans:
        name = next((k for k, v in FLAG_SETS.items() if v == p.flags), str(p.flags))
        off = official_peak_gb(p.task, p.size, p.flags)
        lines.append(
            f"{p.task:10s} {p.size:9s} {p.frames:6d} {name:20s} {p.tokens:7d} {sum(p.weights.values()) / GB:10.1f} "
            f"{p.phases['encode'] / GB:7.1f} {p.phases['denoise'] / GB:8.1f} {p.phases['decode'] / GB:7.1f} "
            f"{p.peak / GB:8.1f} {'' if off is None else f'{off:.1f}':>11s}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from wanmoe.configs import PRESETS, get_preset

    official = [k for k in PRESETS if k.lower() in ("t2v-a14b", "i2v-a14b", "s2v-14b")]
    p = argparse.ArgumentParser(prog="wanmoe plan", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", action="append", choices=sorted(PRESETS), help="task(s) (default: the official ones)")
    p.add_argument("--size", action="append", help="W*H size(s) (default: 1280*720 and 832*480)")
    p.add_argument("--flags", action="append", choices=sorted(FLAG_SETS), help="flag set(s) (default: all)")
    p.add_argument("--frames", type=int, default=None, help="pixel frames (default: the task's)")
    args = p.parse_args(argv)
    plans, cache, skipped = [], {}, []
    for task in args.task or official:
        cfg = get_preset(task)
        for size in args.size or ["1280*720", "832*480"]:
            for flag_name in args.flags or list(FLAG_SETS):
                try:
                    plans.append(plan_memory(cfg, size, FLAG_SETS[flag_name], frames=args.frames, cache=cache))
                except NotImplementedError as e:
                    # A forward that reads tensor values (e.g. .cpu() on positions) cannot run on meta tensors.
                    skipped.append(f"{task} {size} {flag_name}: forward not meta-traceable ({e})")
                    break
    print(format_rows(plans))
    for line in skipped:
        print(f"skipped: {line}")
    print("predicted = tensor bytes at the peak phase (max_memory_allocated); official = measured process peak, "
          "H100, --offload_model True --convert_model_dtype (the Wan2.2 computational-efficiency table)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

