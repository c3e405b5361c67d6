"""Data parallelism: FSDP2 (`fully_shard`, also HSDP on a 2-D mesh) and DDP."""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import Shard

from parallel.expert import expert_modules


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype | None,
    reshard_after_forward: bool,
    offload: bool,
    before_block=None,
    experts_mesh: DeviceMesh | None = None,
    experts_divide: float = 1.0,
) -> None:
    """Shard the embedding, each block, the output projection, then the root (the final norm), over `mesh`.

    A 1-D mesh is FSDP (ZeRO-3): every rank holds 1/N of each parameter, gradient and optimizer state,
    all-gathers a unit's parameters just before using it and reduce-scatters its gradients right after.
    A 2-D (replicate, shard) mesh is HSDP: sharded within a group, gradients also all-reduced across groups.
    Sharded parameters stay fp32 (the master weights); with `param_dtype` they are cast for compute when
    gathered, and gradients are reduced in fp32.

    The embedding and the output are units of their own rather than part of the root: FSDP never reshards
    the root's parameters after forward, so an embedding left there stays gathered from its first use to the
    end of backward (2 V x D bytes for nothing). The output unit is used last in forward and first in
    backward: it is kept gathered in between (resharding it would only gather it again at once).

    Under expert parallelism (`experts_mesh`) each block's experts, already split by expert over the ep ranks, are a
    unit of their own sharded on dim 1 over `experts_mesh` (the ranks holding the same experts), their gradients
    divided by `experts_divide` (the data-parallel degree, as every other gradient is in effect).
    """
    # FSDP warns when a unit returns a view (the embedding's lookup can be one) because an in-place op on it would
    # skip the unit's backward hook; no module here writes into its input in place (the residual adds are
    # out of place), so the warning would only alarm
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPEmbedding\) returned a view tensor")
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    # pinned host memory needs a GPU; on GPU, offload keeps shards in host RAM and the optimizer steps there
    policy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload else OffloadPolicy()
    kw = dict(mesh=mesh, mp_policy=mp, offload_policy=policy)
    if model.tok_embeddings is not None and not model.args.tie_embeddings:
        fully_shard(model.tok_embeddings, reshard_after_forward=reshard_after_forward, **kw)
    # a block's floating-point inputs are the hidden state, already in the compute dtype (the embedding's and the
    # blocks' outputs), and the RoPE tables, which stay fp32: FSDP's cast would round them to 16 bits (positions
    # lose precision) and make each block save its own 16-bit copy of both tables for its backward
    block_kw = {
        **kw,
        "mp_policy": MixedPrecisionPolicy(
            param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False
        ),
    }
    for name, block in model.blocks.items():
        if before_block is not None:  # (QLoRA: the block's base quantized whole, just before FSDP splits it)
            before_block(name, block)
        for experts in expert_modules(block) if experts_mesh is not None else ():
            fully_shard(
                experts,
                reshard_after_forward=reshard_after_forward,
                shard_placement_fn=lambda p: Shard(1),
                **{**block_kw, "mesh": experts_mesh},
            )
            experts.set_gradient_divide_factor(experts_divide)
            # gloo has no PREMUL_SUM (the reduce-scatter's divide): sum, then divide. Not over one rank: torch 2.13
            # then divides once in place of the reduce-scatter and once more after it (measured: half the gradient)
            if experts_mesh.device_type == "cpu" and experts_mesh.size(experts_mesh.ndim - 1) > 1:
                experts.set_force_sum_reduction_for_comms(True)
        fully_shard(block, reshard_after_forward=reshard_after_forward, **block_kw)
    if model.output is not None and not model.args.tie_embeddings:
        # (a unit of one module: torch's FSDPMemTracker mishandles a unit made of a module list)
        fully_shard(model.output, reshard_after_forward=False, **kw)
    fully_shard(model, reshard_after_forward=False, **kw)  # whatever is left: the final norm (or a tied table)


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
    # gradient_as_bucket_view: the .grad tensors are views into DDP's all-reduce buckets; without it DDP keeps
    # a second, bucketed copy of every gradient (4 bytes x parameters more per rank). The step zeroes them in place
    # (Parallelized.zero_grads_in_place), so they stay the buckets' views from step to step
    return nn.parallel.DistributedDataParallel(
        model,
        process_group=mesh.get_group(),
        gradient_as_bucket_view=True,
        device_ids=[device.index] if device.type == "cuda" else None,
        # the buffers are the same on every rank by construction (RoPE tables; an MoE router's bias, moved by
        # all-reduced counts), and an MoE block's routing counts are each rank's own until models/moe.py `balance`
        # sums them: DDP's broadcast of rank 0's buffers before every forward would overwrite them
        broadcast_buffers=False,
    )
