"""The output projection and the cross-entropy in one, over sequence chunks: the (tokens x vocab) fp32 logits are
never held whole (training.loss_chunks; docs/memory.md).

Forward computes each chunk's logits in fp32, keeps only their log-sum-exp (4 bytes per token) and the target's
logit, and drops them; backward recomputes each chunk's logits, turns them in place into the softmax minus the
one-hot target, and accumulates the gradients of the hidden states and of the weight chunk by chunk. At the peak
one chunk's logits exist (fp32) with their 16-bit copy, instead of the whole sequence's logits, log-softmax and
its gradient.

Under tensor parallelism the weight is split over the vocabulary (Shard(0) of a DTensor): each rank computes
its slice of every chunk's logits, the max, the sum of exponentials and the target logit are all-reduced over
the TP group (the numerics of torch's loss_parallel), and the hidden states' gradient is summed over it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

IGNORE_INDEX = -100  # targets with this id (padding) carry no loss
# a token of a batch with this bit set is an input like any other but no target the loss trains on (a chat prompt's
# tokens, padding: trainer/chat.py); token ids stay below it
UNTRAINED = 1 << 32
# data.pack: a token's packed document (0, 1, ... within its sequence) in the bits from here up (trainer/data.py
# `document_ids`); a target in another document than its input's carries no loss, and the model attends within
# each document only (models/llama.py `document_mask`). Unpacked batches hold 0 there: one document per sequence.
DOCUMENT_SHIFT = 40
TOKEN_BITS = UNTRAINED - 1


def _trained(tokens: torch.Tensor) -> torch.Tensor:
    """(..., T) bool of a (..., T + 1) batch: target t carries loss (not flagged, not negative, and in the document
    of input t)."""
    nxt = tokens[..., 1:]
    same_document = (nxt >> DOCUMENT_SHIFT) == (tokens[..., :-1] >> DOCUMENT_SHIFT)
    return (nxt >= 0) & ((nxt & ((1 << DOCUMENT_SHIFT) - 1)) < UNTRAINED) & same_document


def inputs_and_targets(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., T + 1) batch tokens -> (..., T) input ids and (..., T) targets, IGNORE_INDEX where a target is flagged
    UNTRAINED (or already IGNORE_INDEX) or lies in another packed document than its input."""
    ids = tokens & TOKEN_BITS
    targets = torch.where(_trained(tokens), ids[..., 1:], torch.full_like(ids[..., 1:], IGNORE_INDEX))
    return ids[..., :-1], targets


def documents_of(tokens: torch.Tensor) -> torch.Tensor:
    """(..., T) the packed document of each input of a (..., T + 1) batch (all 0 unpacked)."""
    return tokens[..., :-1] >> DOCUMENT_SHIFT


def trained_targets(tokens: torch.Tensor) -> torch.Tensor:
    """How many targets of a (..., T + 1) batch carry loss."""
    return _trained(tokens).sum()


def _lse_and_target(
    logits: torch.Tensor, targets: torch.Tensor, start: int, group
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the log-sum-exp over the whole vocabulary and the target's logit (0 where the target is on
    another TP rank's slice or ignored); `logits` are this rank's columns [start, start + width), overwritten
    (the exponentials are taken in place: no second chunk-sized tensor)."""
    width = logits.shape[1]
    local = (targets >= start) & (targets < start + width)
    picked = logits.gather(1, (targets - start).clamp(0, width - 1)[:, None])[:, 0] * local
    m = logits.max(dim=1).values
    if group is not None:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(picked, group=group)
    s = logits.sub_(m[:, None]).exp_().sum(dim=1)
    if group is not None:
        dist.all_reduce(s, group=group)
    return m + s.log(), picked


def _bounds(n: int, chunks: int) -> list[tuple[int, int]]:
    """Row ranges of `chunks` nearly equal slices (host arithmetic: no device sync)."""
    cuts = [n * i // chunks for i in range(chunks + 1)]
    return [(lo, hi) for lo, hi in zip(cuts, cuts[1:]) if hi > lo]


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunks: int, ignore_index: int, start: int, group, dtype):
        w = weight.to(dtype)  # (autocast would make the same copy for the linear)
        lse = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        valid = targets != ignore_index
        for lo, hi in _bounds(h.shape[0], chunks):
            logits = (h[lo:hi].to(dtype) @ w.t()).float()
            lse[lo:hi], picked = _lse_and_target(logits, targets[lo:hi], start, group)
            del logits
            total += ((lse[lo:hi] - picked) * valid[lo:hi]).sum()
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.chunks, ctx.ignore_index, ctx.start, ctx.group, ctx.dtype = chunks, ignore_index, start, group, dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        h, weight, targets, lse = ctx.saved_tensors
        start, dtype = ctx.start, ctx.dtype
        w = weight.to(dtype)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        )
        scale = (targets != ctx.ignore_index).float() * grad_total
        for lo, hi in _bounds(h.shape[0], ctx.chunks):
            hc = h[lo:hi].to(dtype)
            g = (hc @ w.t()).float()  # the chunk's logits again
            g.sub_(lse[lo:hi, None]).exp_()  # their softmax, in place
            t = targets[lo:hi]
            width = g.shape[1]
            local = ((t >= start) & (t < start + width)).to(g.dtype)  # (no nonzero(): no host sync per chunk)
            g.scatter_add_(1, (t - start).clamp(0, width - 1)[:, None], -local[:, None])  # minus the one-hot target
            g.mul_(scale[lo:hi, None])
            g = g.to(dtype)
            if grad_h is not None:
                grad_h[lo:hi] = g @ w
            if grad_w is not None:
                if dtype == torch.float32:
                    grad_w.addmm_(g.t(), hc)
                else:  # accumulated over the chunks in fp32
                    grad_w += g.t() @ hc
            del g, hc
        if grad_h is not None and ctx.group is not None:
            dist.all_reduce(grad_h, group=ctx.group)  # each rank holds its vocabulary slice's share
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        return grad_h, grad_w, None, None, None, None, None, None


def chunked_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, chunks: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """The summed fp32 cross-entropy of `h @ weight.T` (h: (..., D), weight: (V, D) or its vocabulary shard as
    a DTensor, targets: (...)) computed over `chunks` slices of the rows. Under autocast the matmuls run in
    autocast's dtype, as nn.Linear's would."""
    from torch.distributed.tensor import DTensor, Replicate

    start, group = 0, None
    if isinstance(h, DTensor):
        h = h.redistribute(placements=[Replicate()] * h.device_mesh.ndim).to_local()
    if isinstance(weight, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        mesh = weight.device_mesh
        _, offset = compute_local_shape_and_global_offset(weight.shape, mesh, weight.placements)
        start, group = int(offset[0]), mesh.get_group()
        weight = weight.to_local()
    kind = h.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else h.dtype
    with torch.autocast(kind, enabled=False):
        return _ChunkedLinearCrossEntropy.apply(
            h.flatten(0, -2), weight, targets.flatten(), int(chunks), int(ignore_index), start, group, dtype
        )
