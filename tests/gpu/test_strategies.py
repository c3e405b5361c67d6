"""FSDP2 and DeepSpeed on one GPU: fused AdamW on DTensor shards, FSDP's CPU offload, ZeRO-2."""

from __future__ import annotations

from gpu_runs import close, runs  # noqa: F401  (runs: the fixture)


def test_fused_adamw_on_fsdp_shards_equals_foreach(runs):
    assert close(runs("fsdp_fused")[1], runs("fsdp_foreach")[1], 1e-5)


def test_fsdp_cpu_offload_matches(runs):
    """parallel.offload=cpu: the shards, gradients and AdamW state in pinned host memory, stepped there."""
    assert close(runs("fsdp_offload")[1], runs("fsdp_foreach")[1], 1e-5)


def test_deepspeed_zero2_on_one_gpu(runs):
    got = runs("zero2")[1]
    assert len(got) == 4 and got[-1] < got[0]
    assert close(got, runs("bf16")[1], 0.02)
