"""Block streaming: a model's transformer blocks stay in host memory and visit the device a few at a time.

`stream_(model, device, ahead=K)` moves everything of `model` except its blocks (the `nn.ModuleList` named
`blocks`) to `device` and leaves each block's parameters and buffers in host memory: pinned on CUDA (so copies run
asynchronously), otherwise as they are (a memory-mapped safetensors tensor stays mapped; nothing is copied on the
host). Hooks then give every block a device copy of its tensors just for its own forward:

- the forward pre-hook of block i makes sure block i's copy exists (the compute stream waits on the event of
  the side-stream copy an earlier hook issued, or the copy is issued now), swaps it into the block's parameters
  and buffers, then issues the copies of blocks i+1, i+2, ... on a side CUDA stream, as long as no more than K
  block copies are alive: while block i computes, blocks i..i+K-1 can be on the device, never more;
- the forward hook of block i swaps the host tensors back. On CUDA its copy is freed only once the compute stream
  has passed block i (an event, waited on by the host only when a new copy needs the room), so neither the
  allocator nor a later copy can reuse memory a queued kernel still reads, and the device never holds more than
  K blocks' copies, however far the host runs ahead of the GPU.

The host tensors are never written: a block reads bit-identical values, so a streamed model's output is
`torch.equal` to the resident model's. On a CPU "device" the copy is a real fresh allocation (a clone), so the code
path and the byte accounting are the same as on CUDA and can be tested without a GPU. Int8 layers stream like any
other (their int8 weights and scales are buffers; parameters and buffers both stream).

Assumptions, checked where cheap: blocks run in index order, once per forward (the copies ahead are issued for
i+1, i+2, ...; a block that runs out of order is still correct, only not prefetched); inference only (under
`torch.no_grad()` or `torch.inference_mode()`: swapping `.data` would corrupt autograd, so a forward with grad
enabled through a block whose parameters require grad raises); no one changes the block tensors while the
streamer is installed (merge LoRAs before streaming). `handle.remove()` drops the hooks and every device copy and
leaves the blocks' own host tensors in place (the non-block parts stay on the device).

**Staging ring** (`staging=N`): instead of pinning every block (on CUDA, PyTorch's pinned allocator rounds each
block up to a power of two and keeps freed pinned memory cached: about 1.45x the experts' bytes measured on an
H200 host, and pinning 28 GB took 18 s), the blocks stay as they are (pageable, or memory-mapped from the
safetensors file, so the host need not hold both experts either) and each copy goes through one of N pinned
buffers the size of the largest block: the host copies the block into the next buffer (after the device has
finished reading that buffer's previous contents, an event), then the side stream copies the buffer to the
device. The host copy runs on the calling thread, so it competes with kernel launches: at a block's worth of
compute per host copy it hides; on short steps it shows. Pinned host memory: N x the largest block.

A `ResidentBytes` tracker counts the bytes of block device copies alive at each moment (`live`), the most
ever alive at once (`peak`), how many block copies were made (`copies`) and their total bytes (`copied`): exact
counts of what this module allocated, which the tests compare with K x the block size.

This module works on any `nn.Module` and imports only torch. No tensor axes are manipulated (no axis legend).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["ResidentBytes", "BlockStream", "stream_", "check_staging", "block_bytes"]

_MARK = "_wanmoe_block_stream"  # the model's attribute naming its installed streamer (one at a time)


class ResidentBytes:
    """Exact accounting of block device copies: bytes alive now, at most, and the copies made."""

    def __init__(self) -> None:
        self.live = 0  # bytes of block device copies alive now
        self.peak = 0  # the most bytes alive at once since creation (or reset())
        self.copies = 0  # block copies made (one per block per forward when streaming)
        self.copied = 0  # bytes copied host -> device in all

    def add(self, nbytes: int) -> None:
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        self.copies += 1
        self.copied += nbytes

    def drop(self, nbytes: int) -> None:
        self.live -= nbytes
        assert self.live >= 0, "freed more block bytes than were copied"

    def reset(self) -> None:
        """Zero the counters except `live` (copies still alive stay counted)."""
        self.peak, self.copies, self.copied = self.live, 0, 0

    def __repr__(self) -> str:
        return f"ResidentBytes(live={self.live}, peak={self.peak}, copies={self.copies}, copied={self.copied})"


def _tensors(block: nn.Module) -> Iterable[tuple[nn.Module, str, str, Tensor]]:
    """(owner module, 'p' | 'b', attribute name, tensor) for every parameter and buffer of a block."""
    for mod in block.modules():
        for k, p in mod._parameters.items():
            if p is not None:
                yield mod, "p", k, p
        for k, b in mod._buffers.items():
            if b is not None:
                yield mod, "b", k, b


def block_bytes(block: nn.Module) -> int:
    """Bytes of one block's distinct parameters and buffers: what one device copy of it costs."""
    seen: dict[int, Tensor] = {id(t): t for _, _, _, t in _tensors(block)}
    return sum(t.numel() * t.element_size() for t in seen.values())


@dataclass
class _Slot:
    """One attribute of a block that streams: where it lives and its host tensor (never modified)."""

    owner: nn.Module
    kind: str  # "p" parameter (swapped through .data, so the Parameter object stays the same) or "b" buffer
    name: str
    key: int  # index of the distinct tensor it holds (tied attributes share one copy)
    host: Tensor


@dataclass
class _Stage:
    """One pinned staging buffer of the ring and the event after which its contents may be overwritten."""

    buf: Tensor  # (nbytes,) uint8, pinned on CUDA
    free: torch.cuda.Event | None = None  # recorded on the side stream after the last copy out of it (CUDA)


STAGE_ALIGN = 64  # byte alignment of each tensor inside a staging buffer


@dataclass
class _Copy:
    """The device copy of one block."""

    tensors: list[Tensor]
    nbytes: int
    ready: torch.cuda.Event | None = None  # recorded on the side stream after the copies (CUDA)
    done: torch.cuda.Event | None = None  # recorded on the compute stream after the block's forward (CUDA)
    swapped: bool = False  # its tensors are in the block's attributes now
    waited: bool = False  # the compute stream waits on `ready` already (set when swapped in)


class BlockStream:
    """The handle `stream_` returns: hooks on every block, the copies alive, `remove()` to undo it."""

    def __init__(self, model: nn.Module, device: torch.device, blocks: str, ahead: int,
                 tracker: ResidentBytes | None, pin: bool | None, staging: int = 0) -> None:
        self.model, self.device, self.ahead = model, device, ahead
        self.tracker = tracker if tracker is not None else ResidentBytes()
        self.blocks_name = blocks
        self.blocks: nn.ModuleList = model.get_submodule(blocks)  # type: ignore[assignment]
        cuda = device.type == "cuda"
        self._side = torch.cuda.Stream(device) if cuda else None
        pin = (cuda and not staging) if pin is None else pin
        self.blocks.to("cpu")  # no-op for host tensors (a memory-mapped tensor stays mapped)
        if pin:
            _pin_(self.blocks)
        _to_device_except(model, blocks, device)
        self._slots: list[list[_Slot]] = []
        self._hosts: list[list[Tensor]] = []  # distinct host tensors per block, in copy order
        for block in self.blocks:
            keys: dict[int, int] = {}
            slots, hosts = [], []
            for owner, kind, name, t in _tensors(block):
                if id(t) not in keys:
                    keys[id(t)] = len(hosts)
                    hosts.append(t.detach())
                slots.append(_Slot(owner, kind, name, keys[id(t)], hosts[keys[id(t)]]))
            self._slots.append(slots)
            self._hosts.append(hosts)
        # The staging ring: byte offsets of each block's host tensors inside a buffer, and the buffers.
        self._offsets: list[list[int]] = []
        size = 0
        for hosts in self._hosts if staging else ():
            offs, end = [], 0
            for t in hosts:
                offs.append(end)
                end += -(-t.numel() * t.element_size() // STAGE_ALIGN) * STAGE_ALIGN
            self._offsets.append(offs)
            size = max(size, end)
        self._stages = [_Stage(torch.empty(size, dtype=torch.uint8, pin_memory=cuda)) for _ in range(staging)]
        self._next_stage = 0
        self.staging_bytes = size * staging  # pinned host bytes of the ring (0 without one)
        self._copies: dict[int, _Copy] = {}  # block index -> its copy, issued or in use
        self._retiring: deque[_Copy] = deque()  # used copies waiting for their compute to finish (CUDA)
        self._handles = []
        for i, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(self._pre_hook(i)))
            self._handles.append(block.register_forward_hook(self._post_hook(i)))
        model.__dict__[_MARK] = self

    # ------------------------------------------------------------------ public

    @property
    def alive(self) -> int:
        """Block copies alive now: issued, in use, or waiting for their compute to finish."""
        return len(self._copies) + len(self._retiring)

    def remove(self) -> None:
        """Drop the hooks and every device copy; the blocks keep their own host tensors."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for i in list(self._copies):
            self._retire(i)
        if self._side is not None:
            torch.cuda.current_stream(self.device).synchronize()
            self._side.synchronize()
        while self._retiring:
            self._free(self._retiring.popleft(), sync=False)
        self._stages = []  # the ring's pinned buffers (PyTorch caches them for the next streamer of the same size)
        self.staging_bytes = 0
        if self.model.__dict__.get(_MARK) is self:
            del self.model.__dict__[_MARK]

    # ------------------------------------------------------------------ hooks

    def _pre_hook(self, i: int):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple) -> None:
            if torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()):
                raise RuntimeError(f"{self.blocks_name}.{i} is streamed (wanmoe.memory.stream) and its parameters "
                                   "require grad: streaming is for inference; run under torch.no_grad() or "
                                   "call requires_grad_(False)")
            # Copies outside this forward's window (a forward that raised, a block that was skipped) go first.
            for j in [j for j in self._copies if not i <= j < i + self.ahead]:
                self._retire(j)
            self._issue(i)
            self._swap_in(i)
            for j in range(i + 1, min(i + self.ahead, len(self.blocks))):
                if not self._issue(j, optional=True):
                    break
        return hook

    def _post_hook(self, i: int):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple, out: object) -> None:
            self._retire(i)
        return hook

    # ------------------------------------------------------------------ copies

    def _issue(self, i: int, optional: bool = False) -> bool:
        """Start block i's host -> device copy unless it exists; False if optional and K copies are alive."""
        if i in self._copies:
            return True
        while self.alive >= self.ahead:
            if not self._retiring:
                # Every live copy is for a block still to run: no room for an optional copy ahead; a needed one
                # cannot happen (the pre-hook retired everything outside the window).
                assert optional, "no room for the running block's copy"
                return False
            self._free(self._retiring.popleft(), sync=True)
        hosts = self._hosts[i]
        nbytes = sum(t.numel() * t.element_size() for t in hosts)
        if self._stages:
            hosts, stage = self._stage(i)
        if self._side is None:
            # CPU (or another synchronous device): a fresh allocation, so the accounting is the same as on CUDA.
            tensors = [t.to(self.device, copy=True) for t in hosts]
            copy = _Copy(tensors, nbytes)
        else:
            # The side stream copies while the compute stream runs earlier blocks; `ready` orders block i after it.
            with torch.cuda.stream(self._side):
                tensors = [t.to(self.device, non_blocking=True) for t in hosts]
                ready = torch.cuda.Event()
                ready.record(self._side)
            if self._stages:
                stage.free = ready  # the buffer may be rewritten once these copies have run
            copy = _Copy(tensors, nbytes, ready=ready)
        self._copies[i] = copy
        self.tracker.add(nbytes)
        return True

    def _stage(self, i: int) -> tuple[list[Tensor], _Stage]:
        """Copy block i's host tensors into the next staging buffer (once the device has read its previous
        contents); views of the buffer in the tensors' dtypes and shapes, and the buffer."""
        stage = self._stages[self._next_stage]
        self._next_stage = (self._next_stage + 1) % len(self._stages)
        if stage.free is not None:
            stage.free.synchronize()
            stage.free = None
        views = []
        for t, off in zip(self._hosts[i], self._offsets[i], strict=True):
            n = t.numel() * t.element_size()
            v = stage.buf[off : off + n].view(t.dtype).view(t.shape)
            v.copy_(t)
            views.append(v)
        return views, stage

    def _swap_in(self, i: int) -> None:
        copy = self._copies[i]
        if copy.ready is not None and not copy.waited:
            torch.cuda.current_stream(self.device).wait_event(copy.ready)
            copy.waited = True
        for s in self._slots[i]:
            _assign(s, copy.tensors[s.key])
        copy.swapped = True

    def _retire(self, i: int) -> None:
        """Put block i's host tensors back and let its copy go once the compute that reads it has finished."""
        copy = self._copies.pop(i)
        if copy.swapped:
            for s in self._slots[i]:
                _assign(s, s.host)
            copy.swapped = False
        if self._side is None:
            self._free(copy, sync=False)
            return
        if copy.waited:  # the compute stream may still read it: free only after this point of that stream
            copy.done = torch.cuda.Event()
            copy.done.record(torch.cuda.current_stream(self.device))
        self._retiring.append(copy)

    def _free(self, copy: _Copy, *, sync: bool) -> None:
        # Waiting on the host here (not record_stream) bounds the device to K copies even when the host runs
        # many blocks ahead of the GPU; the memory is safe to reuse on any stream once the event has passed.
        if sync and copy.done is not None:
            copy.done.synchronize()
        copy.tensors.clear()
        self.tracker.drop(copy.nbytes)


def _assign(s: _Slot, t: Tensor) -> None:
    if s.kind == "p":
        s.owner._parameters[s.name].data = t  # type: ignore[union-attr]
    else:
        s.owner._buffers[s.name] = t


def _pin_(m: nn.Module) -> None:
    """Page-lock host tensors (a pinned copy replaces each pageable one) so copies can run asynchronously."""
    for mod in m.modules():
        for p in mod._parameters.values():
            if p is not None and not p.is_pinned():
                p.data = p.data.pin_memory()
        for k, b in mod._buffers.items():
            if b is not None and not b.is_pinned():
                mod._buffers[k] = b.pin_memory()


def _to_device_except(model: nn.Module, blocks: str, device: torch.device) -> None:
    """model.to(device) for everything but the blocks (through `.to`, so modules' own `_apply` rules hold)."""
    parent_name, _, child = blocks.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    held = parent._modules[child]
    parent._modules[child] = nn.ModuleList()
    try:
        model.to(device)
    finally:
        parent._modules[child] = held


def check_staging(staging: object, name: str = "staging") -> int:
    """The number of pinned staging buffers, checked: an integer >= 0 (0: no ring, the blocks are pinned)."""
    if not isinstance(staging, int) or isinstance(staging, bool) or staging < 0:
        raise ValueError(f"{name} (pinned staging buffers of the ring; 0: pin the blocks instead) must be an integer "
                         f">= 0, got {staging!r}")
    return staging


def stream_(model: nn.Module, device: str | torch.device, *, blocks: str = "blocks", ahead: int = 2,
            tracker: ResidentBytes | None = None, pin: bool | None = None, staging: int = 0) -> BlockStream:
    """Stream `model`'s blocks (the ModuleList at `blocks`) to `device`, at most `ahead` (K) blocks at a time.

    Everything else of the model moves to `device`; the blocks' tensors stay in host memory (pinned when `pin`,
    by default on CUDA only and never with a staging ring). `staging=N` copies each block through one of N pinned
    buffers instead of pinning the blocks (module docstring). Inference only: see the module docstring. Returns
    the handle; `handle.remove()` undoes the streaming (the blocks keep their host tensors).
    """
    check_staging(staging)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if not isinstance(ahead, int) or isinstance(ahead, bool) or ahead < 1:
        raise ValueError(f"ahead (K, blocks resident at once) must be an integer >= 1, got {ahead!r}")
    try:
        seq = model.get_submodule(blocks)
    except AttributeError:
        raise ValueError(f"{type(model).__name__} has no submodule {blocks!r} to stream") from None
    if not isinstance(seq, nn.ModuleList) or len(seq) == 0:
        raise ValueError(f"{type(model).__name__}.{blocks} must be a non-empty nn.ModuleList, got "
                         f"{type(seq).__name__}")
    meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if meta:
        raise ValueError(f"cannot stream {type(model).__name__}: {meta[0]} (and {len(meta) - 1} more) on the meta "
                         "device; load the weights first")
    if isinstance(model.__dict__.get(_MARK), BlockStream):
        raise ValueError(f"{type(model).__name__} is streamed already; remove() the first streamer")
    return BlockStream(model, device, blocks, ahead, tracker, pin, staging)
