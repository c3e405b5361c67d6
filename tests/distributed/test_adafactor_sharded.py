"""Sharding-aware Adafactor: the same numbers under every layout as on one process (every parameter after 4 steps,
the losses and gradient norms of each), including shards of uneven size; and a step's collectives do not grow with
the number of parameters."""

from __future__ import annotations

import pytest

# 4 steps: the factored statistics' running averages, the update clipping (an RMS across shards) and the relative
# step size all act from step 1; each further step only repeats them
STEPS = 4
ADAFACTOR = ["optim.name=adafactor", "optim.lr=1e-2", f"training.steps={STEPS}", "training.precision=fp32"]

# (id, processes, overrides, global batch)
CASES = [
    ("ddp", 2, ["parallel.data=ddp"], 8),
    ("fsdp_2", 2, ["parallel.data=fsdp"], 8),
    ("fsdp_3_uneven", 3, ["parallel.data=fsdp"], 12),  # 64 and 256 rows over 3 ranks: shards of 22/22/20, 86/86/84
    ("fsdp_4", 4, ["parallel.data=fsdp"], 8),
    ("hsdp_2x2", 4, ["parallel.data=hsdp", "parallel.dp_replicate=2"], 8),
    ("tp_2", 2, ["parallel.tp=2"], 8),  # column- and row-split matrices: both statistics cross shards
    ("fsdp_2_tp_2", 4, ["parallel.data=fsdp", "parallel.tp=2"], 8),
    ("pp_2_fsdp_2", 4, ["parallel.data=fsdp", "parallel.pp=2"], 8),
]


def worker_runs(test: str, params: dict) -> list[tuple[int, list[str]]]:
    """What each selected test asks the worker for (conftest.py batches them, one launch per rank count)."""
    if test == "test_adafactor_matches_single_process":
        batch = f"training.global_batch_size={params['global_batch']}"
        return [(1, [*ADAFACTOR, batch]), (params["nproc"], [*ADAFACTOR, *params["overrides"], batch])]
    if test == "test_adafactor_learns_differently_from_adamw":
        return [(1, [*ADAFACTOR, "training.global_batch_size=8"]), (1, ADAMW)]
    return []


ADAMW = ["optim.lr=1e-2", f"training.steps={STEPS}", "training.precision=fp32", "training.global_batch_size=8"]


def _params_match(got: dict, ref: dict) -> list[str]:
    """The parameters that differ from the one-process run's beyond fp32 reduction-order noise."""
    import torch

    assert sorted(got) == sorted(ref)
    return [k for k in ref if not torch.allclose(got[k], ref[k], rtol=1e-5, atol=1e-7)]


@pytest.mark.parametrize("name, nproc, overrides, global_batch", CASES, ids=[c[0] for c in CASES])
def test_adafactor_matches_single_process(name, nproc, overrides, global_batch, worker):
    ref = worker(1, [*ADAFACTOR, f"training.global_batch_size={global_batch}"])
    got = worker(nproc, [*ADAFACTOR, *overrides, f"training.global_batch_size={global_batch}"])
    assert len(got["losses"]) == STEPS
    assert not _params_match(got["params"], ref["params"]), f"adafactor {name}: parameters differ after {STEPS} steps"
    for step, (a, b) in enumerate(zip(ref["losses"], got["losses"]), 1):
        assert abs(b - a) <= 1e-5 * abs(a), f"adafactor {name}: loss at step {step} is {b}, one process {a}"
    for step, (a, b) in enumerate(zip(ref["grad_norms"], got["grad_norms"]), 1):
        assert abs(b - a) <= 1e-5 * abs(a), f"adafactor {name}: grad norm at step {step} is {b}, one process {a}"


def test_adafactor_learns_differently_from_adamw(worker):
    """Guard against the optimizer switch being ignored: the two optimizers' loss curves differ. And the parameter
    check above can fail: AdamW's parameters after the same steps (the same gradients at step 1) miss it."""
    ada = worker(1, [*ADAFACTOR, "training.global_batch_size=8"])
    adamw = worker(1, ADAMW)
    assert ada["losses"][0] == adamw["losses"][0] and ada["losses"][-1] != adamw["losses"][-1]
    assert len(_params_match(adamw["params"], ada["params"])) == len(ada["params"])


def _comm_case(nproc: int, overrides: list[str]) -> tuple[str, int, list[str]]:
    """The collective count of 2 and 4 blocks (tests/distributed/adafactor_comm_worker.py, a Trainer each)."""
    from conftest import TINY

    return ("adafactor_comm_worker", nproc, ["2,4", *TINY, *ADAFACTOR, *overrides, "training.global_batch_size=8"])


def worker_cases(test: str, params: dict) -> list[tuple[str, int, list[str]]]:
    """The other workers' cases of the selected tests (conftest.py batches them with the parity runs)."""
    if test == "test_collectives_per_step_do_not_grow_with_parameters":
        return [_comm_case(params["nproc"], params["overrides"])]
    return []


@pytest.mark.parametrize(
    "nproc, overrides, per_step",
    [
        (2, ["parallel.data=fsdp"], 3),  # 3 phases x 1 group (dp)
        (4, ["parallel.data=fsdp", "parallel.tp=2"], 6),  # 3 phases x 2 groups (dp, tp)
    ],
    ids=["fsdp_2", "fsdp_2_tp_2"],
)
def test_collectives_per_step_do_not_grow_with_parameters(nproc, overrides, per_step, worker):
    totals = worker.case(*_comm_case(nproc, overrides))
    assert totals[4]["params"] > totals[2]["params"]  # twice the blocks, many more parameters
    assert totals[2]["total"] == totals[4]["total"] == per_step, totals


@pytest.mark.parametrize(
    "second",
    [["parallel.data=fsdp", 4], ["parallel.tp=2", 2], ["parallel.data=none", 1]],
    ids=["fsdp_4", "tp_2", "one_process"],
)
def test_adafactor_state_reshards_through_dcp(second, tmp_path):
    """Save Adafactor (its factored statistics are DTensors) under FSDP on 2 ranks, resume under another
    layout: training continues with the uninterrupted run's losses (fp32 tolerance)."""
    from conftest import TINY
    from helpers import metric_rows, run_train

    layout, nproc = second
    base = [
        *TINY,
        *ADAFACTOR,
        "training.steps=4",
        "training.global_batch_size=8",
        "logging.every=1",
        "logging.jsonl=true",
        "checkpoint.every=2",
    ]
    straight = tmp_path / "straight"
    run_train([*base, "parallel.data=fsdp", f"run_dir={straight}"], nproc=2)
    want = {r["step"]: r["train/loss"] for r in metric_rows(straight / "metrics.jsonl")}

    # a second run directory that holds only the step-2 checkpoint of the 2-rank FSDP run
    import shutil

    moved = tmp_path / "moved"
    (moved / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step-2", moved / "checkpoints" / "step-2")
    proc = run_train([*base, layout, f"run_dir={moved}"], nproc=nproc)
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    got = {r["step"]: r["train/loss"] for r in metric_rows(moved / "metrics.jsonl")}
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        assert got[step] == pytest.approx(want[step], rel=1e-5), f"{layout}: step {step}"
