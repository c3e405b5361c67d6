import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import costs  # noqa: E402  (tests/costs.py: with SHARDWISE_COST_LOG set, every test and launch is timed)

costs.install()

# DeepSpeed compiles its CPU Adam op on first use (a minute on 2 cores): every test and every process the suite
# starts reads the build directory a user's runs read (~/.cache/torch_extensions/<python>_<device>, resolved here
# because the test workers run with a HOME of their own), which the README's set-up fills (launch/build_ops.py)
if "TORCH_EXTENSIONS_DIR" not in os.environ:
    from torch.utils.cpp_extension import _get_build_directory

    os.environ["TORCH_EXTENSIONS_DIR"] = os.path.dirname(_get_build_directory("cpu_adam", verbose=False))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    """One default-dataset cache for the whole test session (built once, ~5 s)."""
    path = os.environ.get("SHARDWISE_TEST_CACHE") or str(tmp_path_factory.mktemp("shardwise-cache"))
    return path


@pytest.fixture(autouse=True)
def _quiet_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def pytest_collection_modifyitems(config, items):
    """tests/gpu/ needs a CUDA GPU (launch/gpu_check.sh runs it on one): skipped here without one, unless
    SHARDWISE_GPU_TESTS_ON=cpu rehearses the tests' own code on the CPU."""
    import torch

    if torch.cuda.is_available() or os.environ.get("SHARDWISE_GPU_TESTS_ON") == "cpu":
        return
    gpu = Path(__file__).resolve().parent / "gpu"
    skip = pytest.mark.skip(reason="needs a CUDA GPU (launch/gpu_check.sh runs tests/gpu/ on one)")
    for item in items:
        if gpu in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


def pytest_runtest_setup(item):
    """Pools idle since a while are stopped before the next test (tests/pool.py: idle ranks cost CPU)."""
    import pool

    pool.stop_idle()


def pytest_runtest_logreport(report):
    """Each test's setup, call and teardown seconds, summed into one row of the cost log (tests/costs.py)."""
    state = _test_seconds.setdefault(report.nodeid, [0.0, "passed"])
    state[0] += report.duration
    if report.failed:
        state[1] = "failed"
    elif report.skipped and report.when != "teardown":
        state[1] = "skipped"
    if report.when == "teardown":
        costs.log_test(report.nodeid, *_test_seconds.pop(report.nodeid))


_test_seconds: dict[str, list] = {}
