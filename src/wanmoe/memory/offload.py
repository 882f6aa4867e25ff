"""Residency manager: which expert lives on the compute device, applied from outside the networks.

The networks never move themselves. An `ExpertPool` holds one loader per expert (a zero-argument callable
that returns the module, typically built on meta and filled from memory-mapped safetensors) and decides,
each time an expert is asked for, what happens to the idle ones:

- 'resident': every expert that was loaded stays on the compute device (fastest, most memory);
- 'offload' : the idle expert moves to host memory, the active one to the device (official
  `--offload_model True`: `_prepare_model_for_timestep` moves the unneeded expert to the CPU first, then
  the needed one to the GPU, so at most one expert is on the GPU at a time);
- 'free'    : the idle expert is dropped and reloaded lazily from disk on its next use (lowest host and
  device memory; on a CPU-only machine this is the policy that keeps the process at one expert);
- 'stream'  : the active expert's non-block parts are on the device and its transformer blocks stream from host
  memory, at most `stream_ahead` (K) blocks on the device at once (`wanmoe.memory.stream`); the idle expert is
  un-streamed and kept in host memory, as under 'offload'. Device memory: the small parts + K blocks.

`prefetch(name)` runs the loader in a background thread (disk -> host memory, pinned on CUDA) while the
current expert computes; on CUDA, `prefetch(name, to_device=True)` also starts the host->device copy on a
side stream (only sensible when the device has room for both experts; ignored under 'stream').

`transform(name, module) -> module`, when set, runs on every expert right after its loader (each reload under
'free' included): what must survive a reload, such as LoRAs (`wanmoe.lora_stack.LoraStack`), is applied there.

The module is expert-agnostic: it works on any `nn.Module` and never imports the models. No tensor axes
are manipulated here (no axis legend needed).
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn

from wanmoe.memory.stream import BlockStream, ResidentBytes, check_staging, stream_
from wanmoe.numerics import cast_

__all__ = ["POLICIES", "ExpertPool", "OffloadFlags", "policy_from_flags", "with_dtype", "apply_precision"]

logger = logging.getLogger(__name__)

POLICIES = ("resident", "offload", "free", "stream")
Loader = Callable[[], nn.Module]


@dataclass(frozen=True)
class OffloadFlags:
    """The official memory flags (the official Wan2.2 generate.py's), in one place.

    offload_model: keep idle models off the compute device (experts swap at the boundary, the text
        encoder and the experts leave the device after use). Official default: True on one process.
    t5_cpu: the text encoder runs on the CPU and only its output moves to the device.
    convert_model_dtype: cast the DiT weights to the param dtype (bf16) instead of keeping the stored fp32
        (what that casts and what it leaves in fp32: `wanmoe.numerics`).
    """

    offload_model: bool = True
    t5_cpu: bool = False
    convert_model_dtype: bool = False

    @property
    def expert_policy(self) -> str:
        return policy_from_flags(self.offload_model)

    @property
    def text_encoder_device(self) -> str:
        return "cpu" if self.t5_cpu else "compute"


def policy_from_flags(offload_model: bool | None, *, world_size: int = 1, free: bool = False) -> str:
    """Map `--offload_model` to an ExpertPool policy; None means the official default (True on one process)."""
    if offload_model is None:
        offload_model = world_size == 1
    if not offload_model:
        return "resident"
    return "free" if free else "offload"


def with_dtype(loader: Loader, dtype: torch.dtype | None) -> Loader:
    """A loader that casts what `loader` returns to dtype by `numerics.cast_` (None: keep the stored dtype)."""
    if dtype is None:
        return loader

    def load() -> nn.Module:
        return cast_(loader(), dtype)

    return load


def apply_precision(loaders: Mapping[str, Loader], dtypes: Mapping[str, torch.dtype | None]) -> dict[str, Loader]:
    """Per-expert precision by name, e.g. {"high": torch.bfloat16, "low": torch.float32} (numerics.cast_ each)."""
    unknown = sorted(set(dtypes) - set(loaders))
    if unknown:
        raise ValueError(f"precision given for unknown experts {unknown}; experts: {sorted(loaders)}")
    return {name: with_dtype(loader, dtypes.get(name)) for name, loader in loaders.items()}


def _module_device(m: nn.Module) -> torch.device | None:
    for t in m.parameters():
        return t.device
    for t in m.buffers():
        return t.device
    return None


def _pin(m: nn.Module) -> nn.Module:
    """Page-lock host tensors so host->device copies can run asynchronously (CUDA only)."""
    for mod in m.modules():
        for p in mod._parameters.values():
            if p is not None and p.device.type == "cpu" and not p.is_pinned():
                p.data = p.data.pin_memory()
        for k, b in mod._buffers.items():
            if b is not None and b.device.type == "cpu" and not b.is_pinned():
                mod._buffers[k] = b.pin_memory()
    return m


class ExpertPool:
    """Lazily loaded experts with a residency policy; see the module docstring.

    get(name) returns the expert on the compute device after applying the policy to the others;
    prefetch(name) starts loading it in the background; release() drops everything.
    Under 'stream', `stream_ahead` is K (blocks on the device at once) and `stream_bytes` counts the block copies;
    `stream_staging=N` copies blocks through N pinned staging buffers instead of pinning the experts (stream.py).
    """

    def __init__(self, loaders: Mapping[str, Loader], device: str | torch.device = "cpu",
                 policy: str = "offload", *, pin_memory: bool | None = None, stream_ahead: int = 2,
                 stream_staging: int = 0) -> None:
        if not loaders:
            raise ValueError("ExpertPool needs at least one loader")
        if policy not in POLICIES:
            raise ValueError(f"unknown residency policy {policy!r}; choose one of {POLICIES}")
        if not isinstance(stream_ahead, int) or isinstance(stream_ahead, bool) or stream_ahead < 1:
            raise ValueError(f"stream_ahead must be an integer >= 1 (blocks on the device at once), "
                             f"got {stream_ahead!r}")
        self.loaders = dict(loaders)
        self.device = torch.device(device)
        self.policy = policy
        check_staging(stream_staging, "stream_staging")  # checked now: the streamer is only made by get()
        # Pinned host copies only pay off when there is an accelerator to copy to; a staging ring replaces them.
        staged = policy == "stream" and stream_staging > 0
        self.pin_memory = (self.device.type == "cuda" and not staged) if pin_memory is None else pin_memory
        self.stream_staging = stream_staging if policy == "stream" else 0
        self._modules: dict[str, nn.Module] = {}
        self._pending: dict[str, Future[nn.Module]] = {}
        self._events: dict[str, torch.cuda.Event] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="expert-prefetch")
        self._lock = threading.Lock()
        self.loads = {name: 0 for name in self.loaders}  # how often each loader ran (for tests and logs)
        self.transform: Callable[[str, nn.Module], nn.Module] | None = None  # applied after every load
        self.stream_ahead = stream_ahead
        self.stream_bytes = ResidentBytes()  # block copies of every streamed expert (policy 'stream')
        self._streams: dict[str, BlockStream] = {}

    # ------------------------------------------------------------------ public API

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.loaders)

    def on_device(self) -> list[str]:
        """Names of the experts currently materialised on the compute device."""
        return [n for n, m in self._modules.items() if _module_device(m) == self._dev()]

    def loaded(self) -> list[str]:
        """Names of the experts currently held in memory (device or host)."""
        return list(self._modules)

    def get(self, name: str) -> nn.Module:
        """The expert `name` on the compute device; idle experts are treated per the policy *first*,
        so the device never holds two experts under 'offload' or 'free'."""
        self._check(name)
        self._evict_others(name)
        m = self._take(name)
        if self.policy == "stream":
            if name not in self._streams:
                self._streams[name] = stream_(m, self.device, ahead=self.stream_ahead, tracker=self.stream_bytes,
                                              pin=self.pin_memory, staging=self.stream_staging)
            self._modules[name] = m
            return m
        if name in self._events:
            # The side-stream copy of a to_device prefetch must finish before compute reads the weights.
            torch.cuda.current_stream(self.device).wait_event(self._events.pop(name))
        if _module_device(m) != self._dev():
            m.to(self.device, non_blocking=self.pin_memory)
        self._modules[name] = m
        return m

    def prefetch(self, name: str, *, to_device: bool = False) -> None:
        """Start loading `name` from disk to host memory in a background thread (no-op if already held).

        With to_device on CUDA the host->device copy is also issued on a side stream; use it only when the
        device has room for the current and the next expert at once.
        """
        self._check(name)
        with self._lock:
            if name in self._modules or name in self._pending:
                return
            self._pending[name] = self._pool.submit(self._load_host, name, to_device)

    def release(self, name: str | None = None) -> None:
        """Drop one expert (or all of them) from memory; a later get() reloads it from its loader."""
        names = [name] if name is not None else [*self._modules, *self._pending]
        for n in names:
            fut = self._pending.pop(n, None)
            if fut is not None:
                fut.result()  # finish the background load before dropping it: never leave a thread writing
            self._events.pop(n, None)
            self._unstream(n)
            self._modules.pop(n, None)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def offload_all(self) -> None:
        """Move every held expert to host memory (official: both experts go to the CPU after the loop)."""
        if self.policy == "free":
            self.release()
            return
        for n, m in self._modules.items():
            self._unstream(n)
            m.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def close(self) -> None:
        self.release()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> ExpertPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _dev(self) -> torch.device:
        # torch.device("cuda") and a parameter's device("cuda", 0) must compare equal.
        if self.device.type == "cuda" and self.device.index is None:
            return torch.device("cuda", torch.cuda.current_device())
        return self.device

    def _check(self, name: str) -> None:
        if name not in self.loaders:
            raise ValueError(f"unknown expert {name!r}; experts: {sorted(self.loaders)}")

    def _load_host(self, name: str, to_device: bool) -> nn.Module:
        m = self.loaders[name]()
        self.loads[name] += 1
        if self.transform is not None:
            m = self.transform(name, m)
        m.eval().requires_grad_(False)
        if self.pin_memory and _module_device(m) == torch.device("cpu"):
            _pin(m)
        if to_device and self.device.type == "cuda" and self.policy != "stream":
            stream = torch.cuda.Stream(self.device)
            with torch.cuda.stream(stream):
                m.to(self.device, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(stream)
            self._events[name] = ev
        return m

    def _take(self, name: str) -> nn.Module:
        with self._lock:
            fut = self._pending.pop(name, None)
        if fut is not None:
            return fut.result()
        if name in self._modules:
            return self._modules[name]
        logger.debug("loading expert %s", name)
        return self._load_host(name, False)

    def _evict_others(self, keep: str) -> None:
        if self.policy == "resident":
            return
        dropped = False
        for n in [n for n in self._modules if n != keep]:
            if self.policy in ("offload", "stream"):
                self._unstream(n)
                self._modules[n].to("cpu")
            else:  # free: the loader can rebuild it from disk
                del self._modules[n]
                dropped = True
        if dropped:
            # Reference cycles inside modules (hooks, closures) would otherwise keep the weights alive
            # until the next automatic collection, i.e. while the next expert loads.
            gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _unstream(self, name: str) -> None:
        """Undo the streaming of `name` (hooks and device copies go; its blocks keep their host tensors)."""
        handle = self._streams.pop(name, None)
        if handle is not None:
            handle.remove()
