import json
import os
import subprocess
import sys
from pathlib import Path

import costs
import pytest
import torch
from helpers import REPO

WORKER = str(REPO / "tests" / "distributed" / "parity_worker.py")

# a 4-block LLaMA small enough that 8 gloo ranks run 5 steps in seconds
TINY = [
    "recipe=llama_debug",
    "model.dim=64",
    "model.n_layers=4",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.vocab_size=256",
    "data.source=synthetic",
    "training.seq_len=32",
    "training.micro_batch_size=2",
    "training.steps=5",
    "training.val_every=0",
    "training.val_batches=1",  # the workers' one validation (its loss is compared): one global batch of it
    "optim.warmup_steps=1",
    "optim.lr=1e-2",
    "logging.tensorboard=false",
    "logging.jsonl=false",
    "logging.console=false",
    "logging.wandb.mode=disabled",
]

# the parity rows' length, shared by the tests that read the same runs (test_parity.py, test_memory_per_rank.py):
# step 1's gradients are compared parameter by parameter; steps 2 and 3 step on the sharded optimizer state the
# first step made, and the validation loss after step 3 sees the trained parameters
PARITY_STEPS = "training.steps=3"


def run_worker(
    script: str,
    nproc: int,
    args: list[str],
    out,
    extensions: str,
    timeout: float = 600,
    result: str | None = "result.pt",
) -> dict | None:
    """Run a test worker (one process, or torchrun with `nproc`) and load the OUT/result.pt it saves."""
    cmd = (
        [sys.executable, script, *args]
        if nproc == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args]
    )
    env = {
        "OMP_NUM_THREADS": "1",
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(out),
        "TORCH_EXTENSIONS_DIR": extensions,
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    assert proc.returncode == 0, f"{nproc} ranks, {' '.join(args)} failed:\n{proc.stderr[-3000:]}"
    return torch.load(out / result) if result else None


def selected_worker_runs(session) -> list[tuple[int, list[str]]]:
    """Every run the session's selected tests will ask the worker for, from their modules' `worker_runs(test name,
    parameters) -> [(nproc, overrides)]` (test_parity.py, test_adafactor_sharded.py, test_lowbit_sharded.py,
    test_memory_per_rank.py): batched together, across modules, before the first of them runs."""
    runs = []
    for item in session.items:
        hook = getattr(getattr(item, "module", None), "worker_runs", None)
        if hook is not None:
            runs += hook(item.originalname, getattr(getattr(item, "callspec", None), "params", {}))
    return runs


@pytest.fixture(scope="session")
def worker(tmp_path_factory, request):
    """run(nproc, overrides) -> the worker's result.pt, cached for the session by its arguments. The selected
    tests' runs are launched first, one launch per rank count for all the modules that declare them."""
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

    def batch(requests: list[tuple[int, list[str]]]) -> None:
        """Run the requests not yet cached, those of one rank count in one launch (the worker's --batch), to spare
        each its launch. DeepSpeed cases share a launch of their own: its engine keeps process-wide state, which
        leaves DeepSpeed's own results as they are alone (checked 2026-12-06: losses, gradients, parameters and
        bytes bitwise the same batched and alone) but is kept away from the native strategies. A launch that
        fails leaves its cases uncached, and each then runs alone when its test asks, so the failure is its own."""
        todo: dict[tuple[int, bool], list[tuple[str, ...]]] = {}
        for nproc, overrides in requests:
            key = (nproc, tuple(overrides))
            group = (nproc, any(o.startswith("parallel.data=zero") for o in overrides))
            if key not in cache and key[1] not in todo.get(group, []):
                todo.setdefault(group, []).append(key[1])
        for (nproc, _), group in todo.items():
            if len(group) < 2:
                continue
            root = tmp_path_factory.mktemp("batch")
            cases = [
                (str(root / str(i)), [*TINY, *overrides, f"run_dir={root / str(i)}"])
                for i, overrides in enumerate(group)
            ]
            (root / "spec.json").write_text(json.dumps(cases))
            try:
                run_worker(
                    WORKER,
                    nproc,
                    ["--batch", str(root / "spec.json")],
                    root,
                    extensions,
                    timeout=600 + 60 * len(cases),
                    result=None,
                )
            except AssertionError:
                continue
            for (out, _), overrides in zip(cases, group):
                cache[(nproc, overrides)] = torch.load(Path(out) / "result.pt")
                costs.log_batched(nproc, overrides, json.loads((Path(out) / "seconds.json").read_text()))

    run.batch = batch
    batch(selected_worker_runs(request.session))
    return run
