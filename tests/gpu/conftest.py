"""tests/gpu/: what only a CUDA GPU can check. Every test here is skipped on a machine without one (the CPU suite
and CI); launch/gpu_check.sh runs them on the GPU machine."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (launch/gpu_check.sh runs tests/gpu/ on one)")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


# a tiny LLaMA: every dimension a multiple of 16 (float8's matmuls need it), fp32 unless a test says otherwise
TINY = ["recipe=llama_debug", "model.dim=256", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "model.vocab_size=1024", "data.source=synthetic", "training.seq_len=256", "training.micro_batch_size=4",
        "training.global_batch_size=8", "training.steps=4", "training.val_every=0", "optim.warmup_steps=1",
        "optim.lr=1e-3", "logging.every=1", "logging.tensorboard=false", "logging.wandb.mode=disabled",
        "training.precision=fp32", "training.device=cuda"]
