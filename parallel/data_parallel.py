"""Data parallelism: FSDP2 (`fully_shard`, also HSDP on a 2-D mesh) and DDP."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, *, param_dtype: torch.dtype | None, reshard_after_forward: bool,
               offload: bool) -> None:
    """Shard each block, then the root (embedding, final norm, output) over `mesh`.

    A 1-D mesh is FSDP (ZeRO-3): every rank holds 1/N of each parameter, gradient and optimizer state,
    all-gathers a block's parameters just before using it and reduce-scatters its gradients right after.
    A 2-D (replicate, shard) mesh is HSDP: sharded within a group, gradients also all-reduced across groups.
    Sharded parameters stay fp32 (the master weights); with `param_dtype` they are cast for compute when
    gathered, and gradients are reduced in fp32.
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    # pinned host memory needs a GPU; on GPU, offload keeps shards in host RAM and the optimizer steps there
    policy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload else OffloadPolicy()
    for block in model.blocks.values():
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward, offload_policy=policy)
    # the root's parameters are used last in forward and first in backward: keep them gathered in between
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False, offload_policy=policy)


def fsdp_no_sync(model: nn.Module):
    """Accumulate gradients locally (no reduce-scatter) for the non-final micro-batches."""

    @contextlib.contextmanager
    def ctx():
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    return ctx


def apply_ddp(model: nn.Module, mesh: DeviceMesh, device: torch.device) -> nn.parallel.DistributedDataParallel:
    return nn.parallel.DistributedDataParallel(model, process_group=mesh.get_group(),
                                               device_ids=[device.index] if device.type == "cuda" else None)
