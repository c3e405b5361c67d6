"""Activation checkpointing of transformer blocks: full, every-k, or selective by op."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts


def _ops_to_save() -> set:
    """Outputs worth keeping: the matmuls and attention (expensive to recompute) and the TP
    reduce-scatter (recomputing it would repeat communication). Everything else (norms, SiLU, RoPE,
    casts, views) is recomputed in backward."""
    aten = torch.ops.aten
    ops = {aten.mm.default, aten.addmm.default, aten.bmm.default}
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"):
        if hasattr(aten, name):
            ops.add(getattr(aten, name).default)
    if hasattr(torch.ops, "_c10d_functional"):
        ops.add(torch.ops._c10d_functional.reduce_scatter_tensor.default)
    return ops


def _selective_policy(save: set, ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE


def selective_context():
    return create_selective_checkpoint_contexts(partial(_selective_policy, _ops_to_save()))


def apply_ac(model: nn.Module, mode: str, *, every: int = 1) -> None:
    """Wrap the model's blocks in place. `full`: keep only the block input and recompute the block in
    backward, on every `every`-th block; `selective`: keep matmul and attention outputs, recompute the rest."""
    if mode == "none":
        return
    for i, (name, block) in enumerate(list(model.blocks.named_children())):
        if mode == "full":
            if i % every:
                continue
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        elif mode == "selective":
            wrapped = checkpoint_wrapper(block, context_fn=selective_context, preserve_rng_state=False)
        else:
            raise ValueError(f"parallel.ac={mode}: unknown; known: none, full, selective")
        model.blocks.register_module(name, wrapped)
