"""Per-block torch.compile: each block compiles once and is reused (all blocks share one graph)."""

from __future__ import annotations

from torch import nn


def apply_compile(model: nn.Module) -> None:
    # nn.Module.compile() compiles in place, so parameter names stay the same (no `_orig_mod.` prefix)
    for block in model.blocks.values():
        block.compile()
