"""docs/memory.md's validation table: one row per layout and mode of tests/distributed/test_memory_plan.py, the
planner (recomputed from the row's own arguments) beside the tracker's measurement. The test writes the measurements
(SHARDWISE_MEMORY_RESULTS=FILE: a JSON line per row) and tests/unit/test_docs_tables.py renders the table from the
committed file, docs/benchmarks/memory-matrix.jsonl."""

from __future__ import annotations


def plan_from_args(args: list[str], nproc: int):
    """(the memory plan, the parallel dims) of a launch with these train.py arguments on `nproc` ranks."""
    from models.args import model_args_of
    from parallel.plan import memory_plan
    from trainer.config import load_config
    from trainer.validate import parallel_dims

    cfg = load_config(list(args))
    dims, problems = parallel_dims(cfg, nproc)
    assert not problems, problems
    return memory_plan(cfg, model_args_of(cfg), dims), dims


def row(record: dict) -> str:
    """One markdown row: the rank with the largest error, the planner's moment for it, the predicted and measured
    peak (KiB), their difference, and the activations plus temporaries (KiB) of each. Only the ranks the plan
    describes where a record names them (`planned_ranks`: the most loaded ranks of a worst-case expert routing)."""
    plan, dims = plan_from_args(record["args"], record["nproc"])
    ranks = record["ranks"]
    per = len(ranks) // dims.pp
    worst = max(
        record.get("planned_ranks") or range(len(ranks)),
        key=lambda r: abs(plan.ranks[r // per].peak_bytes - ranks[r]["peak"]) / ranks[r]["peak"],
    )
    want, got = plan.ranks[worst // per], ranks[worst]
    kib = lambda b: f"{b / 1024:,.0f}"  # noqa: E731
    cats = want.by_category()
    act = lambda d: d.get("activations", 0) + d.get("temporaries", 0)  # noqa: E731
    return (
        f"| {record['layout']} | {record['mode']} | {worst} | {want.phase} | {kib(want.peak_bytes)} | "
        f"{kib(got['peak'])} | {(want.peak_bytes - got['peak']) / got['peak']:+.1%} | {kib(act(cats))} | "
        f"{kib(act(got))} |"
    )
