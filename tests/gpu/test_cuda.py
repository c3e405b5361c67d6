"""The CUDA paths of shardwise on one GPU: precisions, fused AdamW on FSDP shards, compile, SDPA's kernels,
float8, activation and FSDP offload, DeepSpeed, checkpoints, the memory snapshot, NVTX, and the planner against
the allocator. Each training run is launched once (module cache) and read back from its run directory."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch

from conftest import TINY
from helpers import metric_rows, read_jsonl, run_train

# name -> (processes, overrides); fsdp and DeepSpeed on one GPU run under torchrun (NCCL, world size 1)
RUNS = {
    "cpu_fp32": (1, ["training.device=cpu"]),
    "fp32": (1, []),
    "bf16": (1, ["training.precision=bf16"]),
    "fp16": (1, ["training.precision=fp16"]),
    "compile_fp32": (1, ["parallel.compile=true"]),
    "compile_bf16": (1, ["training.precision=bf16", "parallel.compile=true"]),
    "fsdp_fused": (1, ["parallel.data=fsdp"]),  # optim.fused=null: fused on CUDA
    "fsdp_foreach": (1, ["parallel.data=fsdp", "optim.fused=false"]),
    "fsdp_offload": (1, ["parallel.data=fsdp", "parallel.offload=cpu"]),
    "activation_offload": (1, ["parallel.activation_offload=true", "logging.memory_breakdown=true",
                               "logging.memory_breakdown_step=3"]),
    "no_offload_tracked": (1, ["logging.memory_breakdown=true", "logging.memory_breakdown_step=3"]),
    "zero2": (1, ["parallel.data=zero2", "training.precision=bf16"]),
    "flash": (1, ["training.precision=bf16", "model.attention=flash"]),
    "cudnn": (1, ["training.precision=bf16", "model.attention=cudnn"]),
    "efficient": (1, ["training.precision=bf16", "model.attention=efficient"]),
    "float8_tensorwise": (1, ["training.precision=bf16", "training.float8=tensorwise", "parallel.compile=true"]),
    "float8_rowwise": (1, ["training.precision=bf16", "training.float8=rowwise", "parallel.compile=true"]),
    "profiled": (1, ["training.precision=bf16", "profile.steps=[2,3]", "profile.memory_snapshot=true",
                     "profile.nvtx=true"]),
    "checkpointed": (1, ["checkpoint.every=2", "checkpoint.keep=5"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache = {}

    def run(name: str):
        if name not in cache:
            nproc, overrides = RUNS[name]
            run_dir = tmp_path_factory.mktemp(name) / "run"
            proc = run_train([*TINY, *overrides, f"run_dir={run_dir}"], nproc=nproc, timeout=600)
            losses = [r["train/loss"] for r in metric_rows(run_dir / "metrics.jsonl") if "train/loss" in r]
            cache[name] = proc, losses, run_dir
        return cache[name]

    return run


def losses(runs, name):
    return runs(name)[1]


def close(a, b, rel):
    return len(a) == len(b) and all(abs(x - y) <= rel * abs(y) for x, y in zip(a, b))


def test_cuda_fp32_matches_the_cpu(runs):
    """The same fp32 run on CUDA and on the CPU: the same losses to 1e-4 (TF32 is off: torch's default for matmuls)."""
    assert close(losses(runs, "fp32"), losses(runs, "cpu_fp32"), 1e-4), (losses(runs, "fp32"), losses(runs, "cpu_fp32"))


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_16_bit_steps_learn(name, runs):
    got = losses(runs, name)
    assert len(got) == 4 and all(x == x for x in got) and got[-1] < got[0]
    assert close(got, losses(runs, "fp32"), 0.02), (got, losses(runs, "fp32"))


def test_fused_adamw_on_fsdp_shards_equals_foreach(runs):
    assert close(losses(runs, "fsdp_fused"), losses(runs, "fsdp_foreach"), 1e-5)
    assert close(losses(runs, "fsdp_fused"), losses(runs, "fp32"), 1e-4)


@pytest.mark.parametrize("precision, tol", [("fp32", 1e-4), ("bf16", 2e-2)])
def test_compile_matches_eager(precision, tol, runs):
    eager = losses(runs, "fp32" if precision == "fp32" else "bf16")
    assert close(losses(runs, f"compile_{precision}"), eager, tol)


@pytest.mark.parametrize("kernel", ["flash", "cudnn", "efficient"])
def test_each_named_sdpa_kernel_runs_and_agrees(kernel, runs):
    """model.attention names SDPA's kernel (cudnn and efficient with the kv heads expanded): the bf16 losses of
    each agree with SDPA's own choice."""
    assert close(losses(runs, kernel), losses(runs, "bf16"), 1e-2)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_on_the_gpu_trains_like_bf16(recipe, runs):
    proc, got, _ = runs(f"float8_{recipe}")
    assert "linear layers in float8 (torchao)" in proc.stdout
    assert close(got, losses(runs, "bf16"), 0.02)


def test_fsdp_cpu_offload_matches(runs):
    assert close(losses(runs, "fsdp_offload"), losses(runs, "fsdp_foreach"), 1e-5)


def test_activation_offload_is_exact_and_moves_memory_to_the_host(runs):
    """Pinned host buffers and the side stream: the same losses bitwise, a lower tracked device peak and the
    offloaded bytes on the host."""
    assert losses(runs, "activation_offload") == losses(runs, "no_offload_tracked")
    rec = {}
    for name in ("activation_offload", "no_offload_tracked"):
        rows = read_jsonl(runs(name)[2] / "metrics.jsonl")
        rec[name] = next(r for r in rows if r.get("event") == "memory_breakdown")["ranks"][0]
    assert rec["activation_offload"]["peak"] < rec["no_offload_tracked"]["peak"]
    assert rec["activation_offload"].get("offloaded_activations", 0) > 0


def test_deepspeed_zero2_on_one_gpu(runs):
    got = losses(runs, "zero2")
    assert len(got) == 4 and got[-1] < got[0]
    assert close(got, losses(runs, "bf16"), 0.02)


def test_checkpoint_resumes_bitwise_on_cuda(runs, tmp_path):
    _, want, straight = runs("checkpointed")
    moved = tmp_path / "moved"
    shutil.copytree(straight / "checkpoints" / "step-2", moved / "checkpoints" / "step-2")
    (moved / "checkpoints" / "latest").write_text("step-2")
    proc = run_train([*TINY, *RUNS["checkpointed"][1], f"run_dir={moved}"], timeout=600)
    assert "at step 2" in proc.stdout
    got = {r["step"]: r["train/loss"] for r in metric_rows(moved / "metrics.jsonl") if "train/loss" in r}
    assert got == {3: want[2], 4: want[3]}


def test_profiled_run_writes_a_memory_snapshot_and_a_cuda_trace(runs):
    from trainer.profiling import phase_split

    _, _, run_dir = runs("profiled")
    snap = pickle.loads((run_dir / "profile" / "memory-rank0-steps2-3.pickle").read_bytes())
    assert snap["segments"] and snap["device_traces"]
    events = json.loads((run_dir / "profile" / "trace-rank0-steps2-3.json").read_text())["traceEvents"]
    assert any(e.get("cat") == "kernel" for e in events)
    split = phase_split(events, 2)
    assert split["timeline"].startswith("GPU kernels") and split["device"]["compute"] > 0
    assert split["phases"]["forward"] > 0 and split["phases"]["backward"] > 0


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


@pytest.mark.parametrize("ac", ["none", "full"])
def test_planner_predicts_the_allocator(ac, tmp_path):
    """launch/bench.py on CUDA, bf16 autocast: the planner's peak against the tracker's (10%) and the caching
    allocator's max_memory_allocated (15%: the allocator rounds blocks and holds cuBLAS workspaces)."""
    run_dir = tmp_path / "bench"
    run_train([*TINY, "training.precision=bf16", f"parallel.ac={ac}", "steps=2", "warmup=1", "profile_steps=1",
               f"run_dir={run_dir}"], script="bench.py", timeout=600)
    r = json.loads((run_dir / "bench.json").read_text())
    allocated = r["memory"]["mem/peak_allocated_gib"] * 2**30
    assert abs(r["predicted_peak_bytes"] - r["tracked_peak_bytes"]) <= 0.10 * r["tracked_peak_bytes"], r
    assert abs(r["predicted_peak_bytes"] - allocated) <= 0.15 * allocated, r
    assert r["split"]["timeline"].startswith("GPU kernels")
    assert r["vendor_peak_tflops"] is None or r["mfu_vs_vendor"] > 0
