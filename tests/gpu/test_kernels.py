"""SDPA's CUDA kernels named one by one, float8 on Hopper, and context parallelism's CUDA attention calls."""

from __future__ import annotations

import pytest
import torch
from gpu_runs import close, runs  # noqa: F401  (runs: the fixture)


@pytest.mark.parametrize("kernel", ["flash", "cudnn", "efficient"])
def test_each_named_sdpa_kernel_runs_and_agrees(kernel, runs):
    """model.attention names SDPA's kernel (cudnn and efficient with the kv heads expanded): the bf16 losses of
    each agree with SDPA's own choice."""
    assert close(runs(kernel)[1], runs("bf16")[1], 1e-2)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_on_the_gpu_trains_like_bf16(recipe, runs):
    proc, got, _ = runs(f"float8_{recipe}")
    assert "linear layers in float8 (torchao)" in proc.stdout
    assert close(got, runs("bf16")[1], 0.02)


def test_context_parallel_kernels_on_cuda():
    """parallel/context.py's CUDA calls (the memory-efficient kernel and its backward, log-sum-exp unpadded) give
    SDPA's own attention and gradients, grouped kv heads included."""
    from parallel.context import _backward, _forward

    g = torch.Generator(device="cuda").manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        q = torch.randn(2, 8, 200, 64, device="cuda", dtype=dtype, generator=g)
        k = torch.randn(2, 2, 200, 64, device="cuda", dtype=dtype, generator=g)
        v = torch.randn(2, 2, 200, 64, device="cuda", dtype=dtype, generator=g)
        dout = torch.randn_like(q)
        ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = torch.nn.functional.scaled_dot_product_attention(*ref_in, is_causal=True, enable_gqa=True)
        ref.backward(dout)
        out, lse = _forward(q, k, v, True)
        assert lse.shape == (2, 8, 200)
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
        for got, want in zip(_backward(dout, q, k, v, out, lse, True), ref_in):
            torch.testing.assert_close(got, want.grad, rtol=tol, atol=tol)
