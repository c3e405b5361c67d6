"""SDPA's CUDA kernels named one by one, float8 on Hopper, and context parallelism's CUDA attention calls."""

from __future__ import annotations

import pytest
import torch
from gpu_runs import BOUND, follows, graded  # noqa: F401  (graded: the fixture)

CUDA_ONLY = pytest.mark.cuda_only


@pytest.mark.parametrize("kernel", ["flash", *(pytest.param(k, marks=CUDA_ONLY) for k in ("cudnn", "efficient"))])
def test_each_named_sdpa_kernel_runs_and_agrees(kernel, graded):
    """model.attention names SDPA's kernel (cudnn and efficient with the kv heads expanded): every block gradient
    of each within 0.05 of SDPA's own choice, bf16."""
    follows(graded("bf16"), graded(kernel), BOUND["kernel"], graded("bf16_broken_blocks"))


@CUDA_ONLY
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_on_the_gpu_follows_bf16(recipe, graded):
    """torchao's float8 matmuls (not emulated): every block gradient within tests/distributed/test_float8.py's
    bound of bf16's, and not equal to it (the float8 rounding is there)."""
    from gpu_runs import worst

    got = graded(f"float8_{recipe}")
    follows(graded("bf16"), got, BOUND["float8"], graded("bf16_broken_blocks"))
    assert worst(graded("bf16"), got)[1] > 0, "float8 changed nothing: is it applied?"


def test_context_parallel_attention_on_cuda():
    """parallel/context.py's `_Attention` on a one-rank group (NCCL; gloo where SHARDWISE_GPU_TESTS_ON=cpu): its two
    chunks, passed to the CUDA kernels as strided views of q, k and v, and the log-sum-exp sliced per chunk (the
    memory-efficient kernel pads its rows to a multiple of 32: a 100-token chunk is not one), give SDPA's own
    attention over the whole sequence and its gradients, grouped kv heads included."""
    import torch.distributed as dist
    from gpu_runs import DEVICE

    from parallel.context import CPGroup, context_parallel_attention

    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        cp = CPGroup(dist.group.WORLD, rank=0, size=1, rotate="allgather")
        g = torch.Generator(device=DEVICE).manual_seed(0)
        # (gradients: the norm of the difference relative to the reference's; one element of a bf16 k gradient,
        # a sum over the query heads and chunks, may be a rounding step away from SDPA's own order of summing)
        for dtype, tol, grad_tol in ((torch.float32, 1e-4, 1e-5), (torch.bfloat16, 2e-2, 1e-2)):
            q = torch.randn(2, 8, 200, 64, device=DEVICE, dtype=dtype, generator=g)
            k = torch.randn(2, 2, 200, 64, device=DEVICE, dtype=dtype, generator=g)
            v = torch.randn(2, 2, 200, 64, device=DEVICE, dtype=dtype, generator=g)
            dout = torch.randn_like(q)
            ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
            ref = torch.nn.functional.scaled_dot_product_attention(*ref_in, is_causal=True, enable_gqa=True)
            ref.backward(dout)
            got_in = [t.clone().requires_grad_() for t in (q, k, v)]
            out = context_parallel_attention(*got_in, cp)
            out.backward(dout)
            torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
            for name, got, want in zip("qkv", got_in, ref_in):
                error = ((got.grad.float() - want.grad.float()).norm() / want.grad.float().norm()).item()
                assert error <= grad_tol, f"{dtype} d{name}: {error:.2e} > {grad_tol}"
            # the check can fail: the keys of the second chunk shifted by one token
            wrong = context_parallel_attention(q, torch.roll(k, 1, dims=2), v, cp)
            assert not torch.allclose(wrong, ref, rtol=tol, atol=tol)
    finally:
        dist.destroy_process_group()


def test_packed_documents_through_flex_attention_agree_with_the_dense_mask():
    """data.pack on CUDA: FlexAttention over the documents' block mask (models/llama.py `flex_attend`, compiled)
    against the dense additive mask through SDPA, on the same packed sequences: the logits and every parameter's
    gradient agree (fp32 1e-4 and 1e-3 relative; bf16 autocast 2e-2 and 5e-2), and the fp32 logits differ from a run
    whose documents see each other. Rehearsed on the CPU (SHARDWISE_GPU_TESTS_ON=cpu): the forward only, eager (torch
    has no FlexAttention backward on the CPU)."""
    from gpu_runs import DEVICE

    from models.llama import ModelArgs, build_model

    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, max_seq_len=512)
    model = build_model(args, device="meta").to_empty(device=DEVICE)
    model.init_weights(seed=0)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    tokens = torch.randint(0, 256, (2, 384), device=DEVICE, generator=g)
    lengths = [[100, 37, 200, 47], [384]]
    documents = torch.stack([torch.repeat_interleave(torch.arange(len(n)), torch.tensor(n)) for n in lengths])
    documents = documents.to(DEVICE)
    backward = DEVICE == "cuda"

    def run(kind: str, docs: torch.Tensor, dtype) -> tuple[torch.Tensor, dict]:
        model.zero_grad()
        model.packed_attention = kind
        with torch.autocast(DEVICE, dtype=dtype, enabled=dtype != torch.float32), torch.set_grad_enabled(backward):
            logits = model(tokens, documents=docs).float()
        if backward:
            logits.square().mean().backward()
        return logits.detach(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}

    def rel(a, b) -> float:
        return ((a - b).norm() / b.norm()).item()

    for dtype, tol, grad_tol in ((torch.float32, 1e-4, 1e-3), (torch.bfloat16, 2e-2, 5e-2)):
        (dense, dense_grads), (flex, flex_grads) = run("dense", documents, dtype), run("flex", documents, dtype)
        assert rel(flex, dense) < tol, (dtype, rel(flex, dense))
        for name, want in dense_grads.items():
            assert rel(flex_grads[name], want) < grad_tol, (dtype, name, rel(flex_grads[name], want))
        if dtype == torch.float32:  # (the seed's small attention weights: cross-talk moves the logits ~0.5%)
            crosstalk = run("flex", torch.zeros_like(documents), dtype)[0]
            assert rel(crosstalk[0], dense[0]) > 10 * tol, "the block mask ignored the documents"
    model.packed_attention = None
