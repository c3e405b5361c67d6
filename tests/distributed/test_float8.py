"""training.float8 through torchao's emulation on CPU (parallel/float8.py): the numerics of float8 training, not
its speed. Each run is launched once and read back from its metrics.jsonl."""

from __future__ import annotations

import pytest
from conftest import TINY
from helpers import losses_of, once_per_name, run_train

BASE = [
    *[a for a in TINY if not a.startswith(("logging.jsonl", "logging.console"))],
    "training.precision=bf16",
    "training.global_batch_size=8",
    "training.steps=4",
    "logging.every=1",
]
EMULATED = ["training.float8_emulate=true"]
RUNS = {
    "bf16": (1, []),
    "tensorwise": (1, ["training.float8=tensorwise", *EMULATED]),
    "rowwise": (1, ["training.float8=rowwise", *EMULATED]),
    "fsdp_bf16": (2, ["parallel.data=fsdp"]),
    "fsdp_tensorwise": (2, ["parallel.data=fsdp", "training.float8=tensorwise", *EMULATED]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    def launch(name, run_dir):
        nproc, overrides = RUNS[name]
        proc = run_train([*BASE, *overrides, f"run_dir={run_dir}"], nproc=nproc)
        return proc, losses_of(run_dir)

    return once_per_name(tmp_path_factory, launch)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_trains_like_bf16(recipe, runs):
    """Every block linear in float8 (4 blocks x 7), the output projection in bf16: each step's loss within 1% of
    the bf16 run's, and not the same numbers (the float8 rounding is really there)."""
    proc, f8 = runs(recipe)
    _, bf16 = runs("bf16")
    assert f"training.float8={recipe}: 28 linear layers in float8 (torchao, emulated)" in proc.stdout
    assert len(f8) == len(bf16) == 4
    for a, b in zip(f8, bf16):
        assert abs(a - b) <= 0.01 * b, (f8, bf16)
    assert f8 != bf16
    assert f8[-1] < f8[0]


def test_fsdp_float8_follows_one_process(runs):
    """FSDP gathers each weight before its float8 cast, so the tensorwise scales are the whole weight's, as on
    one process: FSDP's float8 run differs from the one-process float8 run by no more than FSDP's bf16 run differs
    from the one-process bf16 run (bf16 parameters against autocast over fp32 ones), with a small margin."""
    _, one = runs("tensorwise")
    _, fsdp = runs("fsdp_tensorwise")
    _, bf16 = runs("bf16")
    _, fsdp_bf16 = runs("fsdp_bf16")
    gap = max(abs(a - b) for a, b in zip(fsdp_bf16, bf16))
    assert max(abs(a - b) for a, b in zip(fsdp, one)) <= 2 * gap + 1e-3, (fsdp, one, fsdp_bf16, bf16)
