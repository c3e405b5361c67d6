"""Per-block torch.compile: each block compiles once and is reused (all blocks share one graph)."""

from __future__ import annotations

from torch import nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor


def _materialize_async_output(module: nn.Module, args: tuple, output):
    # Under TP the embedding's reduce-scatter returns a lazily-waited AsyncCollectiveTensor, which a
    # compiled block cannot take as input (its input gradient comes out wrong). Clone it into a plain
    # tensor *outside* the compiled blocks: a hook on the block itself would run inside its graph.
    # (clone, not wait(): wait() returns the inner tensor, cut off from autograd)
    return output.clone() if isinstance(output, AsyncCollectiveTensor) else output


def apply_compile(model: nn.Module) -> None:
    blocks = model.blocks
    for child in model.children():
        if child is not blocks:
            child.register_forward_hook(_materialize_async_output)
    # nn.Module.compile() compiles in place, so parameter names stay the same (no `_orig_mod.` prefix)
    for block in blocks.values():
        block.compile()
