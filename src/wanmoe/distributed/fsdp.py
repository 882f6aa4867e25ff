"""FSDP2 sharding of a DiT expert or the text encoder: one `fully_shard` unit per block, plus the root.

Each block's parameters live as 1/world shards (DTensors) and are all-gathered just before the block
runs, then freed again (reshard_after_forward), so at most about one block is materialised at a time.
The root unit holds the rest (embeddings, head). Call `apply_fsdp` once per expert: each expert is its
own set of units, so the idle expert costs only its shard. Works with NCCL on GPU and gloo on CPU
(checked in tests/test_distributed.py). Every rank must run the same forward calls, in the same
order, because each unit's all-gather is a collective.

Axis legend: none (walks modules; no tensor shapes here).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from wanmoe.distributed.env import ParallelState


def _mesh(mesh: DeviceMesh | dist.ProcessGroup | ParallelState | None, device_type: str) -> DeviceMesh:
    if isinstance(mesh, DeviceMesh):
        return mesh
    if isinstance(mesh, dist.ProcessGroup):
        return DeviceMesh.from_group(mesh, device_type)
    # None or a ParallelState: shard over every rank of the default group.
    return init_device_mesh(device_type, (dist.get_world_size(),))


def _blocks(model: nn.Module, block_attr: str) -> nn.ModuleList:
    try:
        blocks = model.get_submodule(block_attr)  # dotted paths allowed, e.g. "encoder.blocks"
    except AttributeError:
        blocks = None
    if not isinstance(blocks, nn.ModuleList):
        lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
        raise ValueError(
            f"{type(model).__name__}.{block_attr} is not an nn.ModuleList; "
            f"pass block_attr= one of {lists or '(none found)'}"
        )
    return blocks


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh | dist.ProcessGroup | ParallelState | None = None,
    *,
    block_attr: str = "blocks",
    param_dtype: torch.dtype | None = None,
    reshard_after_forward: bool = True,
    forward_methods: tuple[str, ...] = (),
) -> nn.Module:
    """Shard `model` in place with FSDP2: each module of `model.<block_attr>` is one unit, then the root.

    mesh: a 1-D DeviceMesh, a ProcessGroup, or None/ParallelState for all ranks. The mesh device type
    follows the model's parameters (cpu with gloo, cuda with NCCL); move the model first.
    param_dtype: compute dtype of the gathered weights (e.g. bf16, as the official FSDP MixedPrecision);
    None keeps the stored dtype, which is what makes FSDP outputs equal to unsharded ones.
    forward_methods: root methods called instead of forward (e.g. a text encoder's `encode_ids`); FSDP
    gathers the root's parameters only around hooked calls, so such entry points must be registered.
    """
    if not dist.is_initialized():
        raise ValueError("apply_fsdp needs an initialised process group (launch with torchrun, call init_parallel)")
    params = list(model.parameters())
    if not params:
        raise ValueError(f"{type(model).__name__} has no parameters to shard")
    device_type = params[0].device.type
    if device_type == "meta":
        raise ValueError(
            "apply_fsdp got a model on the meta device; load the weights first (every rank loads them, "
            "then shards, as the official sync_module_states path does)"
        )
    dmesh = _mesh(mesh, device_type)
    # Reduce in fp32 (like the official reduce_dtype) only matters for training; forward uses param_dtype.
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for block in _blocks(model, block_attr):
        fully_shard(block, mesh=dmesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=dmesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    for name in forward_methods:
        if not callable(getattr(model, name, None)):
            raise ValueError(f"{type(model).__name__} has no method {name!r} to register as an FSDP forward")
        register_fsdp_forward_method(model, name)
    return model
