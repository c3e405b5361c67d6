"""Memory on the GPU: activation offloading's pinned buffers and side stream, checkpoints saved and resumed from
CUDA, the allocator snapshot and NVTX ranges, and the planner against the tracker and the caching allocator."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from gpu_runs import RUNS, TINY, graded, runs  # noqa: F401  (runs, graded: the fixtures)
from helpers import metric_rows, read_jsonl, run_train


def test_activation_offload_keeps_every_gradient_and_moves_memory_to_the_host(runs, graded):
    """Under torch's deterministic algorithms, the same step-1 gradient of every parameter bitwise with and without
    offloading (the check fails on blocks that compute something else); a lower tracked device peak and the
    offloaded bytes on the host."""
    plain, offload = graded("deterministic"), graded("activation_offload")
    assert plain["grads"].keys() == offload["grads"].keys()
    assert [k for k, g in plain["grads"].items() if not torch.equal(offload["grads"][k], g)] == []
    broken = graded("fp32_broken_blocks")["grads"]
    assert any(not torch.equal(broken[k], g) for k, g in plain["grads"].items() if k.startswith("layers."))
    rec = {}
    for name in ("activation_offload", "no_offload_tracked"):
        rows = read_jsonl(runs(name)[2] / "metrics.jsonl")
        rec[name] = next(r for r in rows if r.get("event") == "memory_breakdown")["ranks"][0]
    assert rec["activation_offload"]["peak"] < rec["no_offload_tracked"]["peak"]
    assert rec["activation_offload"].get("offloaded_activations", 0) > 0


@pytest.mark.cuda_only
def test_the_planner_predicts_the_pinned_host_memory_of_activation_offload(runs):
    """Each offloaded storage takes a pinned block rounded up to a power of two (torch's CachingHostAllocator):
    the planner's host terms (the storages and their rounding) against the allocator's own peak in the step."""
    from parallel.memory import PINNED
    from trainer.config import load_config
    from trainer.validate import derive

    rows = read_jsonl(runs("activation_offload")[2] / "metrics.jsonl")
    measured = next(r for r in rows if r.get("event") == "memory_breakdown")["ranks"][0][PINNED]
    cfg = load_config([*TINY, *RUNS["activation_offload"]])
    predicted = derive(cfg, 1, device="cuda").memory.ranks[0].host_bytes
    assert abs(predicted - measured) <= 0.10 * measured, (predicted, measured)


def test_checkpoint_resumes_bitwise_on_cuda(runs, tmp_path):
    """Both runs under torch's deterministic algorithms (RUNS["checkpointed"]): the resumed steps' losses equal."""
    _, want, straight = runs("checkpointed")
    moved = tmp_path / "moved"
    shutil.copytree(straight / "checkpoints" / "step-2", moved / "checkpoints" / "step-2")
    (moved / "checkpoints" / "latest").write_text("step-2")
    proc = run_train([*TINY, *RUNS["checkpointed"], f"run_dir={moved}"], timeout=600)
    assert "at step 2" in proc.stdout
    got = {r["step"]: r["train/loss"] for r in metric_rows(moved / "metrics.jsonl") if "train/loss" in r}
    assert got == {3: want[2], 4: want[3]}


@pytest.mark.cuda_only
def test_profiled_run_writes_a_memory_snapshot_and_a_cuda_trace(runs):
    """profile.steps with memory_snapshot and nvtx: the allocator's history, and a trace whose kernels
    trainer/profiling.py::phase_split reads as a GPU timeline."""
    from trainer.profiling import phase_split

    _, _, run_dir = runs("profiled")
    snap = pickle.loads((run_dir / "profile" / "memory-rank0-steps2-3.pickle").read_bytes())
    assert snap["segments"] and snap["device_traces"]
    events = json.loads((run_dir / "profile" / "trace-rank0-steps2-3.pt.trace.json").read_text())["traceEvents"]
    assert any(e.get("cat") == "kernel" for e in events)
    split = phase_split(events, 2)
    assert split["timeline"].startswith("GPU kernels") and split["device"]["compute"] > 0
    assert split["phases"]["forward"] > 0 and split["phases"]["backward"] > 0


@pytest.mark.cuda_only
@pytest.mark.parametrize("ac", ["none", "full"])
def test_planner_predicts_the_allocator(ac, tmp_path):
    """launch/bench.py on CUDA, bf16 autocast: the planner's peak against the tracker's (10%) and the caching
    allocator's max_memory_allocated (15%: the allocator rounds blocks and holds cuBLAS workspaces)."""
    run_dir = tmp_path / "bench"
    run_train(
        [
            *TINY,
            "training.precision=bf16",
            f"parallel.ac={ac}",
            "steps=2",
            "warmup=1",
            "profile_steps=1",
            f"run_dir={run_dir}",
        ],
        script="bench.py",
        timeout=600,
    )
    r = json.loads((run_dir / "bench.json").read_text())
    allocated = r["memory"]["mem/peak_allocated_gib"] * 2**30
    assert abs(r["predicted_peak_bytes"] - r["tracked_peak_bytes"]) <= 0.10 * r["tracked_peak_bytes"], r
    assert abs(r["predicted_peak_bytes"] - allocated) <= 0.15 * allocated, r
    assert r["split"]["timeline"].startswith("GPU kernels")
    assert r["vendor_peak_tflops"] is None or r["mfu_vs_vendor"] > 0
