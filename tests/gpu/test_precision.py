"""CUDA against the CPU, the 16-bit precisions, and compile (tests/gpu/conftest.py: the runs)."""

from __future__ import annotations

import pytest
from gpu_runs import close, runs  # noqa: F401  (runs: the fixture)


def test_cuda_fp32_matches_the_cpu(runs):
    """The same fp32 run on CUDA and on the CPU: the same losses to 1e-4 (TF32 is off: torch's default for matmuls)."""
    cuda, cpu = runs("fp32")[1], runs("cpu_fp32")[1]
    assert close(cuda, cpu, 1e-4), (cuda, cpu)


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_16_bit_steps_learn(name, runs):
    got = runs(name)[1]
    assert len(got) == 4 and all(x == x for x in got) and got[-1] < got[0]
    assert close(got, runs("fp32")[1], 0.02), (got, runs("fp32")[1])


def test_compile_matches_eager(runs):
    """parallel.compile (Triton kernels from inductor) against eager, bf16."""
    assert close(runs("compile_bf16")[1], runs("bf16")[1], 2e-2)
