"""The planner's pure parts against what torch and the model actually do (no process group needed)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from models.llama import FLAVORS, TP_SPLIT_DIM, build_model, canonical_name
from parallel.layout import in_flight, stage_ids


@pytest.mark.parametrize("flavor", ["debug", "1b", "8b"])
def test_param_shapes_are_the_models(flavor):
    args = FLAVORS[flavor]
    model = build_model(args, device="meta")
    got = [(canonical_name(n), tuple(p.shape)) for n, p in model.named_parameters()]
    assert got == args.param_shapes()
    assert sum(torch.Size(s).numel() for _, s in args.param_shapes()) == args.num_params()


def test_tp_split_table_is_the_models_tp_plan():
    """TP_SPLIT_DIM (what the planner reads) says what Transformer.tp_plan() does."""
    from torch import nn
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    model = build_model(FLAVORS["debug"], device="meta")
    root, blocks = model.tp_plan(loss_parallel=False)
    block = blocks["0"]
    derived = {}
    for name, style in [*root.items(), *block.items()]:
        module = model.get_submodule(name if name in root else f"layers.0.{name}")
        if isinstance(style, ColwiseParallel):
            derived[name] = 0
        elif isinstance(style, RowwiseParallel):
            derived[name] = 0 if isinstance(module, nn.Embedding) else 1
    assert derived == TP_SPLIT_DIM


def _torch_actions(schedule: str, pp: int, n_micro: int, rank: int):
    """The action list torch's schedule class computes for one rank (its own code, without stages or a
    process group: the attributes its constructor would set from them)."""
    from torch.distributed.pipelining import schedules as S

    cls = {
        "interleaved_1f1b": S.ScheduleInterleaved1F1B,
        "zbv": S.ScheduleZBVZeroBubble,
        "dualpipev": S.ScheduleDualPipeV,
    }[schedule]
    o = object.__new__(cls)
    o.pp_group_size, o.n_local_stages, o.rank, o._n_microbatches = pp, 2, rank, n_micro
    o._num_stages = o.num_stages = 2 * pp
    o.number_of_rounds = max(1, n_micro // pp)
    o.microbatches_per_round = n_micro // o.number_of_rounds
    o.stage_index_to_group_rank = S.generate_stage_to_rank_mapping(
        pp, 2 * pp, style="loop" if cls is S.ScheduleInterleaved1F1B else "v"
    )
    return o._calculate_single_rank_operations(rank)


def _held_at_peak(actions) -> dict[int, int]:
    """{stage: microbatches held} when the rank holds the most (forward adds one; full or weight backward frees)."""
    from torch.distributed.pipelining import schedules as S

    cur, best, at = Counter(), -1, {}
    for a in actions:
        if a is None:
            continue
        for b in getattr(a, "sub_actions", None) or [a]:
            if b.computation_type == S.FORWARD:
                cur[b.stage_index] += 1
            elif b.computation_type in (S.FULL_BACKWARD, S.BACKWARD_WEIGHT):
                cur[b.stage_index] -= 1
            if sum(cur.values()) > best:
                best, at = sum(cur.values()), dict(cur)
    return at


@pytest.mark.parametrize("schedule", ["interleaved_1f1b", "zbv", "dualpipev"])
@pytest.mark.parametrize("pp, n_micro", [(2, 4), (2, 8), (4, 8), (4, 16), (8, 16)])
def test_microbatches_in_flight_are_torchs(schedule, pp, n_micro):
    for rank in range(pp):
        want = {sid: n for sid, n in _held_at_peak(_torch_actions(schedule, pp, n_micro, rank)).items() if n}
        assert in_flight(schedule, pp, rank, n_micro) == want, f"{schedule} pp={pp} rank {rank}"
        assert set(want) == set(stage_ids(schedule, rank, pp))


@pytest.mark.parametrize(
    "args, message",
    [
        (["recipe=llama7b_fsdp", "world_size=eight"], "world_size=eight: expected int"),
        (["recipe=llama7b_fsdp", "--jsn"], "--jsn: unknown flag; known: --json, --simulate, --build"),
        (
            ["recipe=llama7b_fsdp", "--simulate", "--build"],
            "--simulate, --build and --search each need a process of their own",
        ),
        (["recipe=llama7b_fsdp", "--search"], "--search needs the memory to fit: add gpu_memory_gib=N"),
        (["recipe=llama7b_fsdp", "world_size=6"], "training.global_batch_size(64) must be divisible by"),
        (["recipe=llama7b_fsdp", "traning.steps=5"], "unknown key 'traning'"),
        (["recipe=llama7b_zero3", "--simulate"], "--simulate: parallel.data=zero3 runs DeepSpeed's engine"),
    ],
)
def test_plan_cli_refuses_bad_input_with_one_message(args, message):
    # in-process (plan.py's main); tests/unit/test_timing.py::test_plan_search_cli runs plan.py as its own process
    from helpers import run_cli

    proc = run_cli("plan.py", args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_planner_is_pure_arithmetic():
    """The planner's three modules (parallel/layout.py, parallel/memory_terms.py, parallel/plan.py) import the
    standard library, the model's shape table, the adapters' spec and each other: nothing that starts or needs a
    process group, no tensor library, nothing from trainer/ (which reads them; tests/unit/test_layers.py checks every
    layer)."""
    import ast

    from helpers import REPO

    allowed = {
        "__future__",
        "difflib",
        "math",
        "dataclasses",
        "functools",
        "models.llama",
        "models.adapters",  # the adapters' spec read off the config (spec_of), beside the model's shape table
        "parallel.layout",
        "parallel.memory_terms",
    }
    for name in ("layout", "memory_terms", "plan"):
        tree = ast.parse((REPO / "parallel" / f"{name}.py").read_text())
        imported = {
            n.module if isinstance(n, ast.ImportFrom) else a.name
            for n in ast.walk(tree)
            if isinstance(n, (ast.Import, ast.ImportFrom))
            for a in n.names
        }
        assert imported <= allowed, (name, imported - allowed)
