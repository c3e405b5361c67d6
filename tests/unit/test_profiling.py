"""profile.steps writes a Chrome/Perfetto trace holding the profiled steps' forward/backward events."""

from __future__ import annotations

import json

from helpers import run_cli, run_train


def test_profiler_trace_has_the_steps_forward_and_backward(tmp_path):
    run = tmp_path / "run"
    proc = run_train(
        [
            "recipe=llama_debug",
            "model.dim=64",
            "model.n_layers=2",
            "model.n_heads=4",
            "model.vocab_size=256",
            "data.source=synthetic",
            "training.seq_len=32",
            "training.global_batch_size=4",
            "training.micro_batch_size=2",
            "training.steps=4",
            "training.val_every=0",
            "optim.warmup_steps=1",
            "logging.wandb.mode=disabled",
            "logging.tensorboard=false",
            "profile.steps=[2,3]",
            f"run_dir={run}",
        ]
    )
    trace = run / "profile" / "trace-rank0-steps2-3.pt.trace.json"
    assert str(trace) in proc.stdout  # the path is printed
    events = json.loads(trace.read_text())["traceEvents"]
    names = [e.get("name", "") for e in events]
    assert names.count("shardwise.forward_backward") == 2 and names.count("shardwise.optimizer_step") == 2
    assert any("MmBackward" in n for n in names), "no backward matmul in the trace"
    assert any(n == "aten::mm" or n == "aten::linear" for n in names)
    # only the two profiled steps: the forward/backward ranges lie inside the trace's time span
    fb = [e for e in events if e.get("name") == "shardwise.forward_backward"]
    assert all(e["dur"] > 0 for e in fb)


def test_memory_snapshot_is_refused_on_cpu(tmp_path):
    proc = run_cli(  # in-process: refused before anything starts
        "train.py",
        [
            "recipe=llama_debug",
            "training.device=cpu",
            "profile.steps=[1,1]",
            "profile.memory_snapshot=true",
            f"run_dir={tmp_path / 'run'}",
        ],
    )
    assert proc.returncode == 2 and "profile.memory_snapshot=true records the CUDA caching allocator" in proc.stderr
