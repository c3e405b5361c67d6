import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

# DeepSpeed compiles its CPU Adam and shared-memory ops on first use (a minute or more): one build directory for
# every test and every process the suite starts, kept between runs on this machine
os.environ.setdefault("TORCH_EXTENSIONS_DIR",
                      str(Path(tempfile.gettempdir()) / f"shardwise-torch-extensions-{os.getuid()}"))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    """One default-dataset cache for the whole test session (built once, ~5 s)."""
    path = os.environ.get("SHARDWISE_TEST_CACHE") or str(tmp_path_factory.mktemp("shardwise-cache"))
    return path


@pytest.fixture(autouse=True)
def _quiet_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
