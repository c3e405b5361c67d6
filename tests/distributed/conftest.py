import os
import subprocess
import sys

import pytest
import torch

from helpers import REPO

WORKER = str(REPO / "tests" / "distributed" / "parity_worker.py")

# a 4-block LLaMA small enough that 8 gloo ranks run 5 steps in seconds
TINY = ["recipe=llama_debug", "model.dim=64", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2",
        "model.vocab_size=256", "data.source=synthetic", "training.seq_len=32", "training.micro_batch_size=2",
        "training.steps=5", "training.val_every=0", "optim.warmup_steps=1", "optim.lr=1e-2",
        "logging.tensorboard=false", "logging.jsonl=false", "logging.console=false", "logging.wandb.mode=disabled"]


def run_worker(script: str, nproc: int, args: list[str], out, extensions: str, timeout: float = 600) -> dict:
    """Run a test worker (one process, or torchrun with `nproc`) and load the OUT/result.pt it saves."""
    cmd = [sys.executable, script, *args] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args]
    env = {"OMP_NUM_THREADS": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(out),
           "TORCH_EXTENSIONS_DIR": extensions}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    assert proc.returncode == 0, f"{nproc} ranks, {' '.join(args)} failed:\n{proc.stderr[-3000:]}"
    return torch.load(out / "result.pt")


@pytest.fixture(scope="session")
def worker(tmp_path_factory):
    """run(nproc, overrides) -> the worker's result.pt, cached for the session by its arguments."""
    cache = {}
    # DeepSpeed compiles its CPU Adam and shared-memory ops on first use: once per test session
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR") or str(tmp_path_factory.mktemp("torch_extensions"))

    def run(nproc: int, overrides: list[str]) -> dict:
        key = (nproc, tuple(overrides))
        if key in cache:
            return cache[key]
        out = tmp_path_factory.mktemp("worker")
        cache[key] = run_worker(WORKER, nproc, [str(out), *TINY, *overrides, f"run_dir={out}"], out, extensions)
        return cache[key]

    return run
