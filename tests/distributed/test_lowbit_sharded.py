"""bf16-moment AdamW and torchao's 8-bit AdamW under the native strategies: each follows its own
single-process run, and 8-bit states survive a DCP checkpoint bitwise."""

from __future__ import annotations

import importlib.util

import pytest

# 128-wide so each FSDP/TP shard of a matrix has >= 4096 values: torchao quantizes only such tensors. torchao
# compiles its update once per parameter shape (`dynamic=False`): four shapes here (the attention's four matrices
# alike, the SwiGLU hidden as wide as the vocabulary), not seven, which is 40% of these cases' cold compile
WIDE = [
    "model.dim=128",
    "model.n_kv_heads=4",
    "model.ffn_hidden_dim=256",
    "training.steps=10",
    "training.precision=fp32",
    "training.global_batch_size=8",
    "optim.lr=3e-3",
]


def worker_runs(test: str, params: dict) -> list[tuple[int, list[str]]]:
    """What each selected test asks the worker for (conftest.py batches them, one launch per rank count)."""
    if test != "test_low_precision_adamw_follows_one_process":
        return []
    if params["optimizer"] == "adamw8bit" and importlib.util.find_spec("torchao") is None:
        return []
    opt = f"optim.name={params['optimizer']}"
    return [(1, [*WIDE, opt]), (params["nproc"], [*WIDE, opt, *params["overrides"]]), (1, WIDE)]


@pytest.mark.parametrize("optimizer", ["adamw_bf16", "adamw8bit"])
@pytest.mark.parametrize(
    "nproc, overrides", [(2, ["parallel.data=fsdp"]), (2, ["parallel.tp=2"])], ids=["fsdp_2", "tp_2"]
)
def test_low_precision_adamw_follows_one_process(optimizer, nproc, overrides, worker):
    if optimizer == "adamw8bit" and importlib.util.find_spec("torchao") is None:
        pytest.skip("torchao, the optional `lowbit` extra (part of `dev`), is not installed")
    ref = worker(1, [*WIDE, f"optim.name={optimizer}"])
    got = worker(nproc, [*WIDE, f"optim.name={optimizer}", *overrides])
    adamw = worker(1, WIDE)
    # the state is rounded per shard (stochastic-rounding noise, 8-bit blocks of a TP column shard) rather
    # than per whole tensor, so the runs agree to the states' precision, not to fp32
    for step, (a, b) in enumerate(zip(ref["losses"], got["losses"]), 1):
        assert abs(b - a) <= 2e-3 * abs(a), f"{optimizer} {overrides}: loss at step {step} {b}, one process {a}"
    # and the low-precision state stays close to fp32 AdamW over these steps
    for step, (a, b) in enumerate(zip(adamw["losses"], got["losses"]), 1):
        assert abs(b - a) <= 2e-2 * abs(a), f"{optimizer}: loss at step {step} {b}, fp32 AdamW {a}"
    assert got["losses"][-1] < got["losses"][0]
