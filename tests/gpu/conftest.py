"""tests/gpu/: what only a CUDA GPU can check. Every test here is skipped on a machine without one (the CPU suite
and CI); launch/gpu_check.sh runs them on the GPU machine."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    import os

    if torch.cuda.is_available() or os.environ.get("SHARDWISE_GPU_TESTS_ON") == "cpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (launch/gpu_check.sh runs tests/gpu/ on one)")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


from gpu_runs import RUNS, TINY  # noqa: E402  (tests/gpu/gpu_runs.py: the table of runs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs(name) -> (process, losses per step, run dir): launch/train.py as one plain process (FSDP and
    DeepSpeed on a one-rank group), once per module."""
    from helpers import metric_rows, run_train

    cache = {}

    def run(name: str):
        if name not in cache:
            run_dir = tmp_path_factory.mktemp(name) / "run"
            proc = run_train([*TINY, *RUNS[name], f"run_dir={run_dir}"], timeout=600)
            losses = [r["train/loss"] for r in metric_rows(run_dir / "metrics.jsonl") if "train/loss" in r]
            cache[name] = proc, losses, run_dir
        return cache[name]

    return run
