"""Small pieces the optimizers share."""

from __future__ import annotations

import torch


def evaluate_closure(closure):
    """An optimizer's `step(closure)` preamble: re-evaluate the loss with gradients enabled, if given."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
