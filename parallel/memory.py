"""What one rank actually holds: bytes of parameters, gradients and optimizer state in its local shards."""

from __future__ import annotations

import torch


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def model_state_bytes(parts, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """{'params', 'grads', 'optim'} bytes this rank stores (DTensors count their local shard only;
    a tied parameter counts once; the optimizer's scalar step counters are left out)."""
    params = {id(p): p for part in parts for p in part.parameters()}.values()
    out = {"params": sum(_local(p).numel() * _local(p).element_size() for p in params),
           "grads": sum(_local(p.grad).numel() * _local(p.grad).element_size() for p in params if p.grad is not None),
           "optim": 0}
    if optimizer is not None:
        for state in optimizer.state.values():
            for key, v in state.items():
                if torch.is_tensor(v) and key != "step":
                    out["optim"] += _local(v).numel() * _local(v).element_size()
    return out
