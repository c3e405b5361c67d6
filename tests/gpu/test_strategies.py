"""FSDP2 and DeepSpeed on one GPU: fused AdamW on DTensor shards, FSDP's CPU offload, ZeRO-2; compared on every
block parameter after three optimizer steps (what the optimizer did) and on step 1's gradients."""

from __future__ import annotations

from gpu_runs import BOUND, follows, graded  # noqa: F401  (graded: the fixture)

# fused and foreach AdamW, or the step on the host, differ in the order of fp32 operations only
STEPPED = 1e-5


def test_fused_adamw_on_fsdp_shards_equals_foreach(graded):
    fused, foreach = graded("fsdp_fused"), graded("fsdp_foreach")
    follows(foreach, fused, STEPPED, graded("fp32_broken_blocks"), key="params")


def test_fsdp_cpu_offload_matches(graded):
    """parallel.offload=cpu: the shards, gradients and AdamW state in pinned host memory, stepped there."""
    offload, foreach = graded("fsdp_offload"), graded("fsdp_foreach")
    follows(foreach, offload, BOUND["fp32"], graded("fp32_broken_blocks"))
    follows(foreach, offload, STEPPED, graded("fp32_broken_blocks"), key="params")


def test_deepspeed_zero2_on_one_gpu(graded):
    """DeepSpeed's bf16 module (bf16 parameters, an fp32 master copy) against fp32: the 16-bit bound."""
    got = graded("zero2")
    assert got["losses"][-1] < got["losses"][0], got["losses"]
    follows(graded("fp32"), got, BOUND["16-bit"], graded("fp32_broken_blocks"))
