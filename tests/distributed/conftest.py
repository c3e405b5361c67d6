import json
import os
import subprocess
import sys
import tempfile
import warnings
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

# data.pack's rows (test_parity.py, test_memory_plan.py): the built-in chat set (trainer/stdlib_chat.py, from 2 MiB of
# the standard library: built once per machine in the temporary directory, ~7 s), conversations packed into sequences
PACK_DATA = [
    "data.source=chat",
    "data.pack=true",
    f"data.cache_dir={tempfile.gettempdir()}/shardwise-test-data-{os.getuid()}",
    "data.default_corpus_mb=2",
    "model.vocab_size=4096",  # (the default tokenizer's)
]

# MoE blocks on the tiny model (models/moe.py): blocks 1-3 with 4 experts (top-2, each 64 wide) and a shared one
MOE = [
    "model.moe.n_experts=4",
    "model.moe.top_k=2",
    "model.moe.expert_hidden=64",
    "model.moe.n_shared_experts=1",
    "model.moe.dense_layers=1",
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


def selected_worker_runs(session) -> tuple[list[tuple[int, list[str]]], list[tuple[str, int, list[str]]]]:
    """Every run the session's selected tests will ask the workers for, from their modules' hooks: `worker_runs(test
    name, parameters) -> [(nproc, overrides)]` for the parity worker (test_parity.py, test_adafactor_sharded.py,
    test_lowbit_sharded.py, test_float8.py, test_memory_per_rank.py) and `worker_cases(test name, parameters) ->
    [(worker, nproc, arguments)]` for the other workers (memory_worker: test_memory_plan.py; adafactor_comm_worker:
    test_adafactor_sharded.py): batched together, across modules, before the first of them runs."""
    runs, cases = [], []
    for item in session.items:
        module = getattr(item, "module", None)
        params = getattr(getattr(item, "callspec", None), "params", {})
        if (hook := getattr(module, "worker_runs", None)) is not None:
            runs += hook(item.originalname, params)
        if (hook := getattr(module, "worker_cases", None)) is not None:
            cases += hook(item.originalname, params)
    return runs, cases


@pytest.fixture(scope="session")
def worker(tmp_path_factory, request):
    """run(nproc, overrides) -> the parity worker's result.pt, and run.case(worker, nproc, arguments) -> another
    worker's (tests/distributed/<worker>.py OUT_DIR arguments...), each cached for the session by its arguments. The
    selected tests' runs of every worker are launched first, one launch per rank count for all the modules that
    declare them (parity_worker.py --batch runs the other workers' cases too, those first)."""
    cache: dict[tuple, dict] = {}
    # DeepSpeed compiles its CPU Adam and shared-memory ops on first use: once per test session
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR") or str(tmp_path_factory.mktemp("torch_extensions"))

    def run(nproc: int, overrides: list[str]) -> dict:
        key = ("parity", nproc, tuple(overrides))
        if key not in cache:
            out = tmp_path_factory.mktemp("worker")
            cache[key] = run_worker(WORKER, nproc, [str(out), *TINY, *overrides, f"run_dir={out}"], out, extensions)
        return cache[key]

    def case(name: str, nproc: int, arguments: list[str]) -> dict:
        key = (name, nproc, tuple(arguments))
        if key not in cache:
            out = tmp_path_factory.mktemp(name)
            script = str(REPO / "tests" / "distributed" / f"{name}.py")
            cache[key] = run_worker(script, nproc, [str(out), *arguments], out, extensions)
        return cache[key]

    def batch(requests: list[tuple[int, list[str]]], cases: list[tuple[str, int, list[str]]] = ()) -> None:
        """Run the requests not yet cached, those of one rank count in one launch (the parity worker's --batch, the
        other workers' cases first), to spare each its launch. DeepSpeed cases share a launch of their own: its
        engine keeps process-wide state, which leaves DeepSpeed's own results as they are alone (checked 2026-12-06:
        losses, gradients, parameters and bytes bitwise the same batched and alone) but is kept away from the
        native strategies. A launch that fails leaves its cases uncached, and each then runs alone when its test
        asks, so the failure is its own."""
        keys = [(name, n, tuple(a)) for name, n, a in cases] + [("parity", n, tuple(o)) for n, o in requests]
        todo: dict[tuple[int, bool], list[tuple]] = {}
        for key in keys:
            group = (key[1], any(o.startswith("parallel.data=zero") for o in key[2]))
            if key not in cache and key not in todo.get(group, []):
                todo.setdefault(group, []).append(key)
        for (nproc, _), group in todo.items():
            if len(group) < 2:
                continue
            root = tmp_path_factory.mktemp("batch")
            spec = []
            for i, (name, _, arguments) in enumerate(group):
                out = str(root / str(i))
                if name == "parity":
                    spec.append({"out": out, "argv": [*TINY, *arguments, f"run_dir={out}"]})
                else:
                    spec.append({"out": out, "worker": name, "argv": list(arguments)})
            (root / "spec.json").write_text(json.dumps(spec))
            try:
                run_worker(
                    WORKER,
                    nproc,
                    ["--batch", str(root / "spec.json")],
                    root,
                    extensions,
                    timeout=600 + 90 * len(group),
                    result=None,
                )
            except AssertionError as e:  # said aloud: each of its cases now pays a launch of its own
                said = f"the batched launch of {len(group)} cases on {nproc} ranks failed: {e}"
                warnings.warn(said[:4000], stacklevel=2)
                continue
            for entry, key in zip(spec, group):
                cache[key] = torch.load(Path(entry["out"]) / "result.pt")
                own = list(key[2]) if key[0] == "parity" else [key[0], *(a for a in key[2] if a not in TINY)]
                costs.log_batched(nproc, own, json.loads((Path(entry["out"]) / "seconds.json").read_text()))

    run.case = case
    run.batch = batch
    batch(*selected_worker_runs(request.session))
    return run


def pytest_collection_modifyitems(config, items):
    """The first selected test that asks for `worker` waits for every batched launch (parity and memory layouts, ten
    minutes and more on 2 cores with cold caches): its timeout (pytest-timeout's marker) covers them. Each launch
    keeps its own subprocess timeout."""
    first = next((item for item in items if "worker" in getattr(item, "fixturenames", ())), None)
    if first is not None:
        first.add_marker(pytest.mark.timeout(2400))
