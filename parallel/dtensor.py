"""Helpers that treat plain tensors and DTensors (FSDP2 / TP shards) alike."""

from __future__ import annotations

import torch


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered (or reduced, for a partial DTensor) from every rank; a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def nbytes(t: torch.Tensor | None) -> int:
    """Bytes this rank stores for `t` (its local shard); 0 for None."""
    if t is None:
        return 0
    t = local(t)
    return t.numel() * t.element_size()
