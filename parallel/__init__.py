"""Parallel strategies. `parallelize(model, cfg, world)` applies them in one fixed order.

Today: one process (`parallel.data=none`) and DDP (`parallel.data=ddp`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from parallel.mesh import World


@dataclass
class Parallelized:
    model: nn.Module  # what the training step calls
    module: nn.Module  # the bare model (parameters, state dicts)
    # the gradient of the global-mean loss is the SUM of every rank's gradient; DDP averages instead,
    # so the loss is multiplied by this factor before backward
    grad_reduction_scale: float
    no_sync: Callable[[], contextlib.AbstractContextManager]  # skip gradient sync on non-final micro-batches


def parallelize(model: nn.Module, cfg, world: World) -> Parallelized:
    """Wrap a model whose parameters are already allocated and initialized on `world.device`."""
    data = str(cfg.parallel.data)
    if data == "none":
        return Parallelized(model, model, 1.0, contextlib.nullcontext)
    if data == "ddp":
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[world.device.index] if world.device.type == "cuda" else None)
        return Parallelized(ddp, model, float(world.world_size), ddp.no_sync)
    raise ValueError(f"parallel.data={data}: unknown strategy")


__all__ = ["Parallelized", "parallelize", "World"]
