"""launch/bench.py on CPU: one process and two FSDP ranks, each launched once and shared by the assertions."""

from __future__ import annotations

import json

import pytest
from conftest import TINY
from helpers import once_per_name, run_cli, run_train

BENCH = [*TINY, "training.global_batch_size=8", "steps=3", "warmup=2", "profile_steps=2"]
LAYOUTS = {"one_process": (1, []), "fsdp_2": (2, ["parallel.data=fsdp"])}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    def launch(name, run_dir):
        nproc, overrides = LAYOUTS[name]
        proc = run_train([*BENCH, *overrides, f"run_dir={run_dir}"], nproc=nproc, script="bench.py")
        return proc, json.loads((run_dir / "bench.json").read_text()), run_dir

    return once_per_name(tmp_path_factory, launch)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_bench_reports_speed_memory_and_the_split(name, bench):
    proc, r, run_dir = bench(name)
    nproc = LAYOUTS[name][0]
    assert f"bench: {run_dir / 'bench.json'}" in proc.stdout and "tokens/s/device" in proc.stdout
    assert r["world_size"] == nproc and r["timed_steps"] == 3 and r["warmup_steps"] == 2
    # the throughput is the step time's: tokens per step over seconds, per device
    assert r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_step"] / r["step_s"] / nproc, rel=1e-9)
    assert r["tokens_per_step"] == 8 * 32
    assert 0 < r["mfu_vs_measured"] == pytest.approx(r["tflops_per_device"] / r["matmul_tflops_measured"])
    assert r["hfu_vs_measured"] == pytest.approx(r["mfu_vs_measured"])  # no activation checkpointing: no recompute
    assert r["vendor_peak_tflops"] is None and r["mfu_vs_vendor"] is None  # no datasheet peak for a CPU
    # the planner against the tracker, the most loaded rank: the memory_plan suite's bound
    assert len(r["tracked"]) == nproc
    assert abs(r["predicted_peak_bytes"] - r["tracked_peak_bytes"]) <= 0.10 * r["tracked_peak_bytes"]
    assert r["memory"]["mem/peak_rss_gib"] > 0
    # the split: the ranges nest as the trainer opens them; a profiled step lasts about a timed one (the profiler
    # slows it), most of it in operators
    s = r["split"]
    ph, dev = s["phases"], s["device"]
    assert set(ph) >= {"data", "forward_backward", "forward", "backward", "optimizer_step"}
    assert ph["forward"] + ph["backward"] <= ph["forward_backward"] <= dev["window"]
    assert 0.5 * r["step_s"] <= dev["window"] <= 3 * r["step_s"]
    assert 0.3 * dev["window"] <= dev["compute"] <= dev["window"] and dev["idle"] >= 0
    trace = json.loads(open(s["trace"]).read())["traceEvents"]
    assert sum(e.get("name") == "shardwise.optimizer_step" for e in trace) == 2  # the profiled steps only
    if nproc == 1:
        assert dev["communication"] == 0
    else:  # FSDP's all-gathers and reduce-scatters on gloo's threads, some of it waited for
        assert 0 < dev["communication_exposed"] <= dev["communication"]


def test_bench_refuses_a_bad_count(tmp_path):
    proc = run_cli("bench.py", [*TINY, "steps=ten", f"run_dir={tmp_path}"])  # in-process: refused before it starts
    assert proc.returncode != 0 and "steps='ten' must be a whole number" in proc.stderr
