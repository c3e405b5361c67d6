"""Tensor + sequence parallelism through DTensor `parallelize_module`, with the model's own plan."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import parallelize_module


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, *, loss_parallel: bool) -> None:
    """Split every block and the root modules over `tp_mesh` as `model.tp_plan()` says.

    Communication per block (forward): an all-gather of the sequence before attention and before the MLP,
    a reduce-scatter after each row-parallel output projection; the same in reverse in backward.
    """
    root_plan, block_plan = model.tp_plan(loss_parallel=loss_parallel)
    if root_plan:
        parallelize_module(model, tp_mesh, root_plan)
    for block in model.blocks.values():
        parallelize_module(block, tp_mesh, block_plan)


def keep_grads_sharded_like_params(model: nn.Module) -> None:
    """DTensor's embedding backward returns a *replicated* gradient for the vocab-sharded table: every
    TP rank would hold the full vocab x dim gradient (2 GB per rank for a 128k-vocab 8B model). Slice it
    back to the parameter's own placement as it is produced (Replicate -> Shard is a local slice).
    Call it on allocated parameters: `to_empty()` replaces the parameter objects and their hooks."""
    for p in model.parameters():
        if hasattr(p, "placements") and any(pl.is_shard() for pl in p.placements):
            placements = p.placements
            p.register_hook(
                lambda g, placements=placements: (
                    g if g.placements == placements else g.redistribute(placements=placements)
                )
            )
