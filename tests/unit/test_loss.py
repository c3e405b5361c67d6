"""models/loss.py: the chunked output projection + cross-entropy equals nn.Linear + F.cross_entropy (loss and
gradients within 1e-6 in fp32), for any chunk count, with ignored targets and under autocast; and it never holds
the whole logits (the peak of the loss's forward and backward, measured with torch's MemTracker)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.loss import chunked_cross_entropy


def _data(n=96, d=32, v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).requires_grad_()
    w = (0.1 * torch.randn(v, d, generator=g)).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    t[[3, 40, 41]] = -100  # padding: no loss, no gradient
    return h, w, t


def _grads(loss, *xs):
    return torch.autograd.grad(loss, xs)


@pytest.mark.parametrize("chunks", [1, 3, 7, 96])
def test_equals_the_whole_logits_loss_and_gradients(chunks):
    h, w, t = _data()
    ref = F.cross_entropy(F.linear(h, w), t, reduction="sum", ignore_index=-100)
    got = chunked_cross_entropy(h, w, t, chunks=chunks)
    assert got.dtype == torch.float32
    assert abs(got.item() - ref.item()) <= 1e-6 * abs(ref.item())
    for a, b in zip(_grads(got, h, w), _grads(ref, h, w)):
        assert ((a - b).norm() / b.norm()).item() <= 1e-6


def test_batched_inputs_and_autocast_follow_nn_linear():
    h, w, t = _data()
    h3, t3 = h.detach().reshape(4, 24, 32).requires_grad_(), t.reshape(4, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(h3, w).float().flatten(0, 1), t3.flatten(), reduction="sum")
        got = chunked_cross_entropy(h3, w, t3, chunks=5)
    # the same bf16 matmul, the softmax in fp32: equal up to the order of the fp32 sums
    assert abs(got.item() - ref.item()) <= 1e-5 * abs(ref.item())
    (gh, gw), (rh, rw) = _grads(got, h3, w), _grads(ref, h3, w)
    assert gh.dtype == h3.dtype and gw.dtype == w.dtype
    assert ((gh - rh).norm() / rh.norm()).item() < 2e-2 and ((gw - rw).norm() / rw.norm()).item() < 2e-2


def _peak_bytes(fn) -> int:
    """The peak of live tensor bytes while `fn` runs (torch's MemTracker over a module-less function)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    with tracker:
        fn()
    return max(v["Total"] for v in tracker.get_tracker_snapshot("peak").values())


def test_the_whole_logits_are_never_held():
    n, d, v = 512, 16, 2048  # logits (n x v fp32) = 4 MiB, far above the inputs (32 KiB)
    h, w, t = _data(n, d, v)

    def plain():
        F.cross_entropy(F.linear(h, w), t, reduction="sum").backward()

    def chunked():
        chunked_cross_entropy(h, w, t, chunks=8).backward()

    logits = n * v * 4
    whole, parts = _peak_bytes(plain), _peak_bytes(chunked)
    assert whole >= 2 * logits  # the logits and their log-softmax (or its gradient) at once
    # one chunk's fp32 logits (in place: their softmax and gradient too), the weight's gradient and, on a CPU, the
    # copy torch's matmul makes of the transposed weight, the inputs and their gradient, the per-token log-sum-exp
    assert parts <= logits / 8 + 3 * 4 * v * d + 8 * n * d + 16 * n, (whole, parts)
