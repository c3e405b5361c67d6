"""Helpers that treat plain tensors and DTensors (FSDP2 / TP shards) alike. A leaf in the lowest layer (it imports
nothing of shardwise's), so that the optimizers, the strategies, the memory tracker and the trainer can all use it."""

from __future__ import annotations

import torch


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered (or reduced, for a partial DTensor) from every rank; a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def nbytes(t: torch.Tensor | None) -> int:
    """Bytes this rank stores for `t` (its local shard, what a tensor subclass really holds); 0 for None."""
    if t is None:
        return 0
    t = local(t)
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        # a tensor subclass (e.g. torchao's 8-bit optimizer state) reports the dtype it stands for; count
        # the tensors it actually stores (codes, scales, lookup table)
        names, _ = t.__tensor_flatten__()
        return sum(nbytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()
