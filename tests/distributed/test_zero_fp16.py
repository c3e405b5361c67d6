"""fp16 under DeepSpeed ZeRO: a loss-scale overflow is a skipped step, counted, with the scale logged; the run goes on.

DeepSpeed refuses fp16 on CPUs without oneDNN fp16 kernels (AVX512-FP16), which shardwise's validation reports
before starting (tests/unit/test_entrypoint.py). Here zero_fp16_worker.py lifts only that gate, so DeepSpeed's
real engine, ZeRO-2 optimizer and dynamic loss scaler run on the CPU. An initial loss scale of 2^24 overflows the
fp16 gradients for real: DeepSpeed skips those steps and halves the scale until the gradients fit.
"""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import REPO, read_jsonl

TINY = [
    "recipe=llama_debug",
    "model.dim=64",
    "model.n_layers=4",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.vocab_size=256",
    "data.source=synthetic",
    "training.seq_len=32",
    "training.global_batch_size=8",
    "training.micro_batch_size=2",
    "training.steps=8",
    "training.val_every=0",
    "optim.warmup_steps=1",
    "optim.lr=1e-2",
    "logging.every=1",
    "logging.tensorboard=false",
    "logging.wandb.mode=disabled",
]


def test_zero2_fp16_overflows_are_skipped_steps_with_the_loss_scale_logged(tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "tests" / "distributed" / "zero_fp16_worker.py"),
        *TINY,
        "parallel.data=zero2",
        "training.precision=fp16",
        "parallel.deepspeed.fp16.initial_scale_power=24",
        f"run_dir={run}",
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]  # overflows are normal fp16 operation, not an error
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    skipped = [r["step"] for r in rows if "train/grad_norm" not in r]  # no made-up norm for a skipped step
    applied = [r["step"] for r in rows if "train/grad_norm" in r]
    assert skipped and applied and max(skipped) < min(applied), (skipped, applied)  # skips first, then training
    assert [r["train/skipped_steps"] for r in rows] == [min(s, len(skipped)) for s in range(1, 9)]
    scales = [r["train/loss_scale"] for r in rows]
    assert scales[0] <= 2.0**24 and all(b <= a for a, b in zip(scales, scales[1:]))
    assert scales[len(skipped)] < scales[0]  # DeepSpeed lowered the scale after the overflows
    assert all(0 < r["train/grad_norm"] < 10 for r in rows if "train/grad_norm" in r)
    end = next(r for r in read_jsonl(run / "metrics.jsonl") if r.get("event") == "end")
    assert end["skipped_steps"] == len(skipped) and end["step"] == 8
    assert "Detected call of `lr_scheduler.step()`" not in proc.stderr
