"""What one rank actually holds: bytes of parameters, gradients and optimizer state in its local shards."""

from __future__ import annotations

import torch

from parallel.dtensor import nbytes


def model_state_bytes(parts, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """{'params', 'grads', 'optim'} bytes this rank stores (DTensors count their local shard only;
    a tied parameter counts once; the optimizer's scalar step counters are left out)."""
    params = {id(p): p for part in parts for p in part.parameters()}.values()
    out = {"params": sum(nbytes(p) for p in params), "grads": sum(nbytes(p.grad) for p in params), "optim": 0}
    if optimizer is not None:
        for state in optimizer.state.values():
            for key, v in state.items():
                if torch.is_tensor(v) and key != "step":
                    out["optim"] += nbytes(v)
    return out
