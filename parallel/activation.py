"""Activation checkpointing of transformer blocks: full, every-k, or selective by op."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts


def _matmuls() -> tuple:
    """The ops a block's linear layers run as: `mm`, and float8's `_scaled_mm` (torchao's Float8Linear dispatches
    `mm` on its float8 tensors, which the policy sees; a compiled or hand-written float8 path calls `_scaled_mm`
    itself, as torchtitan's save list expects)."""
    aten = torch.ops.aten
    return (aten.mm.default, *((aten._scaled_mm.default,) if hasattr(aten, "_scaled_mm") else ()))


def _ops_to_save() -> set:
    """Outputs worth keeping: the matmuls and attention (expensive to recompute) and the TP
    reduce-scatter (recomputing it would repeat communication). Everything else (norms, SiLU, RoPE,
    casts, views) is recomputed in backward."""
    aten = torch.ops.aten
    ops = {*_MATMULS, aten.addmm.default, aten.bmm.default}
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    ):
        if hasattr(aten, name):
            ops.add(getattr(aten, name).default)
    if hasattr(torch.ops, "_c10d_functional"):
        ops.add(torch.ops._c10d_functional.reduce_scatter_tensor.default)
    return ops


_MATMULS = _matmuls()


def _selective_policy(
    save: set, partial_width: int | None, counts: dict | None, ctx, op, *args, **kwargs
) -> CheckpointPolicy:
    if op not in save:
        return CheckpointPolicy.PREFER_RECOMPUTE
    if counts is not None and op in _MATMULS:
        # parallel.sac_matmuls=every_second: of the block's matmuls in order (wq, wk, wv, wo, w1, w3, w2) the
        # even-numbered ones are recomputed; the forward and its recomputation count apart, so both agree
        key = "recompute" if ctx.is_recompute else "forward"
        counts[key] += 1
        if counts[key] % 2 == 0:
            return CheckpointPolicy.PREFER_RECOMPUTE
    if partial_width is not None and op in _MATMULS and args[1].shape[-1] == partial_width:
        # under TP a row-parallel projection (wo, w2) multiplies into the full model width over the full sequence:
        # its output is a partial sum about to be reduce-scattered, t times the size of what is kept after the
        # reduce-scatter (which is saved); recomputing the matmul costs one matmul in backward, saving it
        # 2 x model width bytes per token per projection (a column-parallel projection whose local width happened
        # to equal the model width would be recomputed too: compute, not correctness)
        return CheckpointPolicy.PREFER_RECOMPUTE
    return CheckpointPolicy.MUST_SAVE


def selective_context(partial_width: int | None = None, every_second: bool = False):
    """A block's checkpoint contexts (called once per checkpointed forward: the matmul counts start afresh)."""
    counts = {"forward": 0, "recompute": 0} if every_second else None
    return create_selective_checkpoint_contexts(partial(_selective_policy, _ops_to_save(), partial_width, counts))


def apply_ac(model: nn.Module, mode: str, *, every: int = 1, tp: int = 1, sac_matmuls: str = "all") -> None:
    """Wrap the model's blocks in place. `full`: keep only the block input and recompute the block in
    backward, on every `every`-th block; `selective`: keep matmul and attention outputs, recompute the rest
    (under TP the row-parallel matmuls' pre-reduce-scatter outputs are recomputed too: `_selective_policy`)."""
    if mode == "none":
        return
    for i, (name, block) in enumerate(list(model.blocks.named_children())):
        if mode == "full":
            if i % every:
                continue
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        elif mode == "selective":
            context = partial(selective_context, model.args.dim if tp > 1 else None, sac_matmuls == "every_second")
            wrapped = checkpoint_wrapper(block, context_fn=context, preserve_rng_state=False)
        else:
            raise ValueError(f"parallel.ac={mode}: unknown; known: none, full, selective")
        model.blocks.register_module(name, wrapped)
