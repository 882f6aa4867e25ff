"""`wanmoe plan`: predicted peak GPU memory per phase, task, size and residency policy, before any download.

Everything is computed on the meta device from the presets: weight bytes are the state-dict bytes of the models
built as the loader builds them (bf16 cast with the fp32 modules kept, int8 quantized by `quantize_`); activation
peaks come from running the real forward passes (DiT, VAE encode and decode, umT5) on meta tensors under a
dispatch mode that tracks live storage bytes (allocated when an op returns a tensor, released when its last
tensor dies), so the prediction follows the code, not a formula. Attention is replaced by its fused-kernel
footprint (output only; flash/SDPA-efficient kernels never materialise the L x L scores). The same trace counts
the forward's FLOPs (`torch.utils.flop_counter` for matmuls and convolutions, attention counted at its 4 L^2 D).
A DiT block, S2V audio-injector layer or VAE tile called again with inputs of the same shapes is counted from its
first trace, not rerun.

Phases on one GPU, as this engine runs them (pipeline.generate, loading.load_components):
  text   : the VAE (loaded first, resident throughout) plus umT5 and its forward, unless the text encoder runs on
           the CPU (t5_cpu, always under the stream policies); the S2V audio encoder always runs on the CPU;
  vae_encode (i2v): the conditioning clip's VAE encode;
  denoise:<expert>: the experts on the device (resident: every expert loaded so far; offload: the running one;
           stream: its non-block weights plus K blocks) plus one DiT forward (batched guidance passes under
           stream, so each block crosses the bus once per step);
  decode : the VAE decode. The experts leave the device before the last clip's decode (official order) except
           under 'resident'; an S2V clip before the last is decoded with its expert still on the device and
           re-encodes the next clip's motion frames while the clip is held (planned as the S2V worst case).
umT5 stays on the device after encoding only under 'resident' (the loader moves it back to the host otherwise).
Predictions are tensor bytes (torch.cuda.max_memory_allocated); a process peak adds the CUDA context and the
allocator's cache (~1-3 GB). GB = 1e9 bytes. Policies, the streaming cost and `--vram_gb`: `plan_policy`.

Axis legend: B batch, C channels, F latent frames, H/W latent height/width, L tokens, S text tokens, T frames.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from wanmoe import numerics
from wanmoe.memory.offload import OffloadFlags

__all__ = ["GB", "LiveBytes", "Trace", "trace", "activation_peak", "Residency", "MemoryPlan", "plan_memory",
           "denoise_peak"]

GB = 1e9


class LiveBytes(TorchDispatchMode):
    """Tracks the bytes of live tensor storages created inside the mode; `peak` is the high-water mark.

    Storages are keyed by their C++ address (meta tensors have no data pointer) and counted once however many
    views share them; a weakref finalizer on every returned tensor releases the storage with its last view. A
    storage that an op returns and one of its inputs already holds, without the mode having seen it allocated, was
    there before (a view of a weight, `linear`'s transpose): it is not counted.
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
        inputs = None
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                st = t.untyped_storage()
                key = st._cdata
                if key not in self._refs:
                    if inputs is None:
                        inputs = {a.untyped_storage()._cdata for a in tree_flatten((args, kwargs))[0]
                                  if isinstance(a, Tensor)}
                    if key in inputs:
                        continue  # a view of (or in-place write to) a storage made before the mode
                    self._refs[key] = 0
                    self._size[key] = st.nbytes()
                    self.live += self._size[key]
                self._refs[key] += 1
                weakref.finalize(t, self._drop, key)
        self.peak = max(self.peak, self.live)
        return out


@contextlib.contextmanager
def _fused_attention(flops: list[int] | None = None) -> Iterator[None]:
    """Within planning only: SDPA returns an empty output (its fused-kernel footprint) instead of the math path,
    and adds its FLOPs to flops[0]: QK^T and PV, 2 per multiply-add (torch.utils.flop_counter's sdpa count)."""
    original = F.scaled_dot_product_attention

    def sdpa(q: Tensor, k: Tensor, v: Tensor, *args: object, **kwargs: object) -> Tensor:
        if flops is not None:
            *batch, lq, d = q.shape  # (B, N, Lq, D)
            flops[0] += 2 * math.prod(batch) * lq * k.shape[-2] * (d + v.shape[-1])
        return q.new_empty((*q.shape[:-1], v.shape[-1]))  # (B, N, Lq, D)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@dataclass(frozen=True)
class Trace:
    peak: int  # bytes: high-water mark of the tensors created during the call
    flops: int  # matmul, convolution and attention FLOPs of the call
    shape: tuple[int, ...]  # of its output


def _signature(v: object) -> object:
    if isinstance(v, Tensor):
        return ("T", tuple(v.shape), tuple(v.stride()), v.dtype)
    if isinstance(v, (tuple, list)):
        return tuple(_signature(x) for x in v)
    return v if isinstance(v, (int, float, str, bool, type(None), torch.dtype)) else ("id", id(v))


@contextlib.contextmanager
def _repeats(tracker: LiveBytes, flops: Callable[[], int], extra: list[int],
             methods: Sequence[tuple[object, str]]) -> Iterator[None]:
    """Within a trace, a call of one of these methods (`_dit_repeats`, the VAE's per-tile decode and encode) with
    inputs of a signature seen before is not run again: on meta tensors it would allocate and count exactly what
    the first call did. Its outputs are allocated with the recorded shapes (or are the input they aliased), the
    peak rises by the recorded high-water mark above the call's entry, and extra[0] gets its FLOPs."""
    seen: dict[tuple, tuple[int, int, bool, list]] = {}

    def wrap(owner: object, fn: Callable) -> Callable:
        state = getattr(owner, "state_dict", dict)()
        sig = type(owner), tuple((k, tuple(t.shape), t.dtype) for k, t in state.items())

        def call(*args: object, **kwargs: object) -> object:
            flat = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, Tensor)]
            key = (sig, _signature(args), _signature(sorted(kwargs.items())))
            if key in seen:
                rise, nflops, single, outs = seen[key]
                tracker.peak = max(tracker.peak, tracker.live + rise)
                extra[0] += nflops
                made = [flat[src].as_strided(shape, stride, offset) if src is not None else
                        torch.empty_strided(shape, stride, dtype=dtype, device="meta")
                        for src, shape, stride, offset, dtype in outs]
                return made[0] if single else tuple(made)
            entry, before, f0 = tracker.live, tracker.peak, flops()
            tracker.peak = entry  # the call's own high-water mark, above what was live when it started
            out = fn(*args, **kwargs)
            rise = tracker.peak - entry
            tracker.peak = max(before, tracker.peak)
            single = isinstance(out, Tensor)
            stores = [a.untyped_storage()._cdata for a in flat]
            outs = []
            for o in [out] if single else out:
                k = o.untyped_storage()._cdata
                src = stores.index(k) if k in stores else None  # an input returned (or a view of one)
                outs.append((src, tuple(o.shape), tuple(o.stride()), o.storage_offset(), o.dtype))
            seen[key] = (rise, flops() - f0, single, outs)
            return out

        return call

    patched = []
    for owner, name in methods:
        if hasattr(owner, name):
            patched.append((owner, name, owner.__dict__.get(name)))
            setattr(owner, name, wrap(owner, getattr(owner, name)))
    try:
        yield
    finally:
        for owner, name, before in patched:
            if before is None:
                delattr(owner, name)
            else:
                setattr(owner, name, before)


def trace(fn: Callable[[], Tensor], *, flops: bool = True, repeats: Sequence[tuple[object, str]] = ()) -> Trace:
    """Run fn on meta tensors (its inputs must be created inside fn): activation peak, FLOPs (0 unless `flops`:
    the counter doubles the cost of a trace), output shape. `repeats`: (object, method name) pairs whose calls
    with a signature seen before are not run again (`_repeats`)."""
    from torch.utils.flop_counter import FlopCounterMode

    attn, extra = [0], [0]
    counter = FlopCounterMode(display=False) if flops else None
    count = (lambda: counter.get_total_flops() + attn[0]) if counter is not None else (lambda: 0)
    with torch.no_grad(), _fused_attention(attn), LiveBytes() as tracker, counter or contextlib.nullcontext():
        with _repeats(tracker, count, extra, repeats):
            out = fn()
        shape = tuple(out.shape)
        del out
    return Trace(tracker.peak, count() + extra[0] if flops else 0, shape)


def activation_peak(fn: Callable[[], object]) -> int:
    """Peak bytes of tensors created while fn runs on meta tensors (its inputs must be created inside fn)."""
    with torch.no_grad(), _fused_attention(), LiveBytes() as tracker:
        out = fn()
        del out
    return tracker.peak


def _bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@dataclass(frozen=True)
class Residency:
    """What a plan assumes: where the experts live, their precision, where umT5 runs, the memory knobs.

    experts: an ExpertPool policy (resident | offload | stream); bf16: DiT weights cast to bf16
    (convert_model_dtype) rather than kept as stored (fp32); int8: weight-only int8 Linears (`quantize_`);
    frugal: the DiT's token chunks and the VAE's spatial tiles on; batch_cfg: a step's `passes` guidance passes
    run as one batch (always under stream: a block then crosses the bus once per step); stream_ahead: K.
    """

    experts: str = "offload"
    bf16: bool = True
    int8: bool = False
    t5_cpu: bool = False
    frugal: bool = True
    batch_cfg: bool = False
    passes: int = 2  # conditional + unconditional (S2V with motion_scale != 1 adds an audio-free pass)
    stream_ahead: int = 2

    @classmethod
    def from_flags(cls, flags: OffloadFlags) -> Residency:
        """The official flag sets as this engine ran them before the memory knobs (for the official table)."""
        return cls(experts=flags.expert_policy, bf16=flags.convert_model_dtype, t5_cpu=flags.t5_cpu, frugal=False)


@dataclass(frozen=True)
class MemoryPlan:
    task: str
    size: str
    frames: int
    flags: OffloadFlags | Residency  # what was planned, as given
    weights: dict[str, int]  # component -> bytes in the dtype it runs in (whole model, wherever it lives)
    phases: dict[str, int]  # phase -> predicted peak tensor bytes on the GPU
    tokens: int  # DiT sequence length of one forward (noisy tokens)
    residency: Residency = field(default_factory=Residency)
    expert_gpu: dict[str, int] = field(default_factory=dict)  # expert -> its bytes on the GPU while it runs
    step_flops: int = 0  # FLOPs of one sampling step (every guidance pass)
    bus_bytes: int = 0  # bytes copied host -> device per step (stream: the running expert's blocks)
    dit_activation: int = 0  # traced peak of one DiT forward (its inputs included)
    block_bytes: int = 0  # one transformer block (the largest)

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


def _dit_inputs(cfg, frames: int, w: int, h: int, batch: int = 1, *, device: str | torch.device = "meta",  # noqa: ANN001
                dtype: torch.dtype = torch.float32) -> Callable[[nn.Module], Tensor]:
    """run(model) -> one DiT forward of `batch` samples at this clip size, inputs made inside (random off meta)."""
    dit = cfg.dit
    _, sh, sw = cfg.vae_stride
    f, lh, lw = latent_frames(cfg, frames), h // sh, w // sw
    meta = torch.device(device).type == "meta"

    def new(*shape: int) -> Tensor:
        # No random op on meta: it would run PyTorch's Python reference kernels (and import the compiler stack).
        return torch.empty(shape, device=device, dtype=dtype) if meta else torch.randn(shape, device=device,
                                                                                         dtype=dtype)

    def run(model: nn.Module) -> Tensor:
        b = batch
        x = new(b, 16 if dit.in_dim != 48 else 48, f, lh, lw)  # (B, C, F, H, W)
        t = torch.full((b,), 500.0, device=device)  # (B,) fp32, as the pipeline passes it
        ctx = new(b, dit.text_len, dit.text_dim)  # (B, S, text_dim), worst case S
        kw: dict[str, object] = {}
        if dit.in_dim - x.shape[1] > 0:
            kw["y"] = new(b, dit.in_dim - x.shape[1], f, lh, lw)
        if dit.s2v is not None:
            from wanmoe.models.s2v import S2VInputs

            s = dit.s2v
            kw["s2v"] = S2VInputs(
                audio=new(b, s.num_audio_layers, s.audio_dim, frames),  # (B, K, Da, A)
                ref_latents=new(b, 16, 1, lh, lw),
                motion_latents=new(b, 16, s.lat_motion_frames, lh, lw),
            )
        return model(x, t, ctx, **kw)

    return run


def _dit_repeats(dit: nn.Module) -> list[tuple[object, str]]:
    """The DiT's calls a trace counts once per signature (`trace(repeats=...)`): its blocks and, for S2V, the audio
    injector's attention and AdaIN layers (called once per latent-frame group under token chunks)."""
    repeats: list[tuple[object, str]] = [(b, "forward") for b in dit.blocks]
    inj = getattr(dit, "audio_injector", None)
    if inj is not None:
        repeats += [(m, "forward") for m in (*inj.injector, *inj.injector_adain_layers)]
    return repeats


def _frugal_(dit: nn.Module, vae: nn.Module, on: bool) -> None:
    """The memory knobs (token chunks, VAE tiles) on, with the loader's function and defaults, or off."""
    from wanmoe.models.frugal import frugal_

    if on:
        frugal_(dit, vae)
    else:
        frugal_(dit, vae, token_chunk=None, tiling=None)


def _cached(cache: dict | None, key: tuple, make: Callable[[], object]):  # noqa: ANN202
    if cache is None:
        return make()
    if key not in cache:
        cache[key] = make()
    return cache[key]


def _models(cfg, dtype: torch.dtype, int8: bool, cache: dict | None) -> tuple[nn.Module, nn.Module, nn.Module | None]:  # noqa: ANN001
    """The DiT (as the loader casts and quantizes it), the VAE (fp32, as official) and the text encoder, on meta."""
    from wanmoe.models.dit import DiT
    from wanmoe.models.vae import WanVAE

    def dit() -> nn.Module:
        with torch.device("meta"):
            m = numerics.cast_(DiT(cfg.dit), dtype)  # the fp32 modules stay fp32, as the loader keeps them
        if int8:
            from wanmoe.memory.quantize import quantize_

            quantize_(m, "int8")
        return m

    def vae() -> nn.Module:
        with torch.device("meta"):
            return WanVAE(cfg.vae)

    def text() -> nn.Module | None:
        with torch.device("meta"):
            return _text_encoder(cfg)

    return (_cached(cache, ("model", "dit", cfg.task, str(dtype), int8), dit),
            _cached(cache, ("model", "vae", cfg.vae), vae), _cached(cache, ("model", "text", cfg.text_encoder), text))


def _vae_traces(cfg, vae: nn.Module, frames: int, w: int, h: int, key: tuple,  # noqa: ANN001
                cache: dict | None) -> tuple[Trace, Trace | None]:
    """(decode, encode) traces. T2V/I2V decode one clip; S2V decodes the motion context's latents followed by the
    clip's, then re-encodes the next clip's motion frames while the decoded clip is still held (pipeline order).
    The I2V encode is the conditioning clip (the image, zeros after it); others have none worth a phase."""
    _, sh, sw = cfg.vae_stride
    s2v = cfg.dit.s2v
    lat_f = latent_frames(cfg, frames) + (s2v.lat_motion_frames if s2v is not None else 0)
    lat = (1, cfg.vae.z_dim, lat_f, h // sh, w // sw)

    def decode() -> Tensor:
        out = vae.decode(torch.empty(lat, device="meta"))  # (1, 3, T, Hp, Wp)
        if s2v is None:
            return out
        return vae.encode(torch.empty(1, 3, s2v.motion_frames, h, w, device="meta"))  # with `out` alive

    tiles = [(vae, "_decode"), (vae, "_moments")]  # one tile's decode/encode (WanVAE with tiling)
    dec = _cached(cache, ("vae-decode", *key), lambda: trace(decode, flops=False, repeats=tiles))
    enc = None
    if cfg.modality == "i2v":
        enc = _cached(cache, ("vae-encode-i2v", *key),
                      lambda: trace(lambda: vae.encode(torch.empty(1, 3, frames, h, w, device="meta")), flops=False,
                                    repeats=tiles))
    return dec, enc


def plan_memory(cfg, size: str, flags: OffloadFlags | Residency, *, frames: int | None = None,  # noqa: ANN001
                cache: dict | None = None) -> MemoryPlan:
    """Predict weights and per-phase GPU peaks for PipelineConfig cfg at size 'W*H' under `flags`: an official
    flag set (OffloadFlags) or a `Residency`. cache (optional, caller-owned) reuses traces across calls."""
    res = flags if isinstance(flags, Residency) else Residency.from_flags(flags)
    w, h = (int(v) for v in size.split("*"))
    if frames is None:
        frames = cfg.infer_frames if cfg.modality == "s2v" else cfg.frame_num
    # The loader's dtype for a GPU (numerics.weight_dtype); None keeps the stored dtype: official shards are fp32.
    dit_dtype = numerics.weight_dtype("cuda", res.bf16) or torch.float32
    dit, vae, text = _models(cfg, dit_dtype, res.int8, cache)
    _frugal_(dit, vae, res.frugal)
    expert, blocks = _cached(cache, ("bytes", cfg.task, str(dit_dtype), res.int8),
                             lambda: (_bytes(dit), [_bytes(b) for b in dit.blocks]))
    ahead = min(res.stream_ahead, len(blocks))
    on_gpu = expert - sum(blocks) + ahead * max(blocks) if res.experts == "stream" else expert
    weights = {f"expert:{n}": expert for n in cfg.experts}
    weights["vae"] = _cached(cache, ("bytes", cfg.vae), lambda: _bytes(vae))
    weights["text_encoder"] = 0 if text is None else _cached(cache, ("bytes", cfg.text_encoder), lambda: _bytes(text))
    if cfg.audio_encoder == "wav2vec2":
        weights["audio_encoder"] = 315_438_720 * 4  # wav2vec2-large-xlsr-53 encoder, fp32, on the CPU (loading.py)

    batch = res.passes if res.batch_cfg else 1
    runner = _dit_inputs(cfg, frames, w, h, batch)
    dit_key = ("dit", cfg.task, size, frames, str(dit_dtype), res.int8, res.frugal, batch)
    dit_t = _cached(cache, dit_key, lambda: trace(lambda: runner(dit), repeats=_dit_repeats(dit)))
    # VAE traces depend on the VAE, the latent and the knobs only (T2V and I2V share their decode).
    dec_t, enc_t = _vae_traces(cfg, vae, frames, w, h, (cfg.vae, cfg.dit.s2v, size, frames, res.frugal), cache)
    t5_gpu = 0 if res.t5_cpu else weights["text_encoder"]
    t5_act = 0
    if t5_gpu and cfg.text_encoder == "umt5-xxl":
        t5_act = _cached(cache, ("t5", cfg.text_encoder), lambda: trace(_t5_forward(text), flops=False)).peak

    vae_w = weights["vae"]
    stay = t5_gpu if res.experts == "resident" else 0  # umT5 leaves the device after encoding except when resident
    phases = {"text": vae_w + t5_gpu + t5_act}
    if enc_t is not None:
        phases["vae_encode"] = vae_w + stay + enc_t.peak
    held = 0
    for n in cfg.experts:  # in sampling order: resident keeps every expert it has loaded
        held = held + on_gpu if res.experts == "resident" else on_gpu
        phases[f"denoise:{n}"] = vae_w + stay + held + dit_t.peak
    held_decode = held if res.experts == "resident" or cfg.dit.s2v is not None else 0
    phases["decode"] = vae_w + stay + held_decode + dec_t.peak
    per_step = 1 if res.batch_cfg else res.passes  # forwards per step
    patches = math.prod(cfg.dit.patch_size)
    return MemoryPlan(cfg.task, size, frames, flags, weights, phases, math.prod(dit_t.shape[2:]) // patches,
                      residency=res, expert_gpu={n: on_gpu for n in cfg.experts}, step_flops=dit_t.flops * per_step,
                      bus_bytes=sum(blocks) * per_step if res.experts == "stream" else 0,
                      dit_activation=dit_t.peak, block_bytes=max(blocks))


def _t5_forward(text: nn.Module) -> Callable[[], Tensor]:
    def run() -> Tensor:
        n = text.cfg.text_len
        ids = torch.zeros(1, n, dtype=torch.long, device="meta")  # (B, S)
        return text(ids, torch.ones(1, n, dtype=torch.long, device="meta"))  # (B, S, C)

    return run


def _text_encoder(cfg) -> nn.Module | None:  # noqa: ANN001
    from wanmoe.encoders import text as text_mod

    if cfg.text_encoder == "umt5-xxl":
        return text_mod.UMT5Encoder(text_mod.T5_PRESETS["umt5-xxl"]).to(torch.bfloat16)  # official t5_dtype bf16
    cls = getattr(text_mod, "ByteTextEncoder", None)
    conf = getattr(text_mod, "ByteTextConfig", None)
    return cls(conf()) if cls is not None and conf is not None else None


def denoise_peak(p: MemoryPlan) -> int:
    return max(v for k, v in p.phases.items() if k.startswith("denoise:"))

