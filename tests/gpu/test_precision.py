"""CUDA against the CPU, the 16-bit precisions, and compile, compared on every block parameter's step-1 gradient
(tests/gpu/gpu_runs.py: the runs, the bounds, and the broken blocks each check must fail on)."""

from __future__ import annotations

import math

import pytest
from gpu_runs import BOUND, follows, graded  # noqa: F401  (graded: the fixture)


def test_cuda_fp32_matches_the_cpu(graded):
    """The same fp32 run on CUDA and on the CPU: every parameter's step-1 gradient and every parameter after step 3
    within 1e-3 (relative; TF32 is off, torch's default for matmuls)."""
    cpu, cuda = graded("cpu_fp32"), graded("fp32")
    follows(cpu, cuda, BOUND["fp32"], graded("fp32_broken_blocks"))
    follows(cpu, cuda, BOUND["fp32"], graded("fp32_broken_blocks"), key="params")


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_16_bit_gradients_follow_fp32(name, graded):
    """Autocast in bf16 or fp16 (with the loss scaler, unscaled by the worker): every block gradient within 0.05 of
    fp32's, finite losses that fall."""
    got = graded(name)
    assert all(math.isfinite(x) for x in got["losses"]) and got["losses"][-1] < got["losses"][0], got["losses"]
    follows(graded("fp32"), got, BOUND["16-bit"], graded("fp32_broken_blocks"))


def test_compile_matches_eager(graded):
    """parallel.compile (Triton kernels from inductor) against eager, both bf16."""
    follows(graded("bf16"), graded("compile_bf16"), BOUND["kernel"], graded("bf16_broken_blocks"))
