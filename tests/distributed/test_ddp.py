"""DDP on 2 gloo ranks trains the same model to the same losses as one process (fp32)."""

from __future__ import annotations

import pytest
from helpers import metric_rows, run_train

TINY = [
    "recipe=llama_debug",
    "model.dim=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.vocab_size=256",
    "data.source=synthetic",
    "training.seq_len=32",
    "training.precision=fp32",
    "training.global_batch_size=8",
    "training.micro_batch_size=2",
    "training.steps=5",
    "training.val_every=0",
    "optim.warmup_steps=1",
    "optim.lr=1e-2",
    "logging.every=1",
    "logging.tensorboard=false",
    "logging.wandb.mode=disabled",
]


def test_ddp_matches_single_process(tmp_path):
    run_train([*TINY, f"run_dir={tmp_path / 'single'}"])
    run_train([*TINY, "parallel.data=ddp", f"run_dir={tmp_path / 'ddp'}"], nproc=2)
    single = metric_rows(tmp_path / "single" / "metrics.jsonl")
    ddp = metric_rows(tmp_path / "ddp" / "metrics.jsonl")
    assert [r["step"] for r in ddp] == [1, 2, 3, 4, 5]
    for a, b in zip(single, ddp):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5), f"step {a['step']}"
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-5), f"step {a['step']}"
