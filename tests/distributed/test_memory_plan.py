"""The planner's per-rank memory (parallel/plan.py) against torch's tracker on real gloo runs.

tests/distributed/memory_worker.py builds the Trainer of a layout for every AC mode and precision in turn and tracks
step 3 of each with parallel.memory.StepMemory (the layouts of one rank count in one launch, with the parity runs).
For every rank:
- the peak is within 10% of the measured one (a few stated gaps below: within their own bound);
- the model states the tracker sees as such (parameters, buffers, optimizer state, master copies) agree
  to 1% (ZeRO-3: its gathered parameters are an estimate, 15%; a peak inside the optimizer step also holds
  AdamW's update temporary, which the tracker files as optimizer state).
The transient categories (gathered parameters, gradients, activations, temporaries) are not compared one by
one: the tracker files a tensor under the category of the moment it first sees it, torch documents that under
activation checkpointing it mixes up activations and temporaries, FSDP's fp32 copies of bf16 gradients land in
"temporaries" and DeepSpeed's buffers in whichever category touched them first. With the states exact, their
sum is the peak's. docs/memory.md shows them term by term.
The tiny model of the parity suite (D 64, 4 blocks, vocabulary 256, micro-batch 2 x 32 tokens) keeps every
launch to seconds; its block-level terms weigh more than in a real model, so the bounds are strict ones.
"""

from __future__ import annotations

import json
import os

import pytest
from conftest import MOE, PACK_DATA

from parallel.memory import OFFLOADED

MODES = ["none/fp32", "selective/fp32", "full/fp32", "none/bf16", "selective/bf16", "full/bf16"]
ZERO3_SMALL = "parallel.deepspeed.zero_optimization.stage3_param_persistence_threshold=1000"  # partition the matrices

IN_BACKWARD = ["optim.in_backward=true", "optim.max_grad_norm=0"]
NF4 = ["finetune.quantize_base=true", "finetune.nf4_scaler_block=8"]  # (the tiny model's weights: 32 x 64 blocks)
# every storage of at least 4 KiB moves (on the tiny model: all but 1/rms and the log-sum-exp)
OFFLOAD = ["parallel.activation_offload=true", "parallel.activation_offload_min_bytes=4096"]
FLOAT8 = ["training.float8=tensorwise", "training.float8_emulate=true"]
LONG = ["training.seq_len=128", "training.micro_batch_size=1"]
PACKED = [*PACK_DATA, "training.micro_batch_size=1"]
# (1,024 tokens, the loss in chunks: the dense mask, 4 MiB in fp32, a fifth of the peak with full AC)
PACKED_LONG = [*PACKED, "training.seq_len=1024", "training.loss_chunks=8"]
MASTERLESS = [
    "training.master_weights=false",
    "optim.name=adamw_bf16",
]  # bf16 parameters, bf16 moments  # (one micro-batch per step: no accumulation)
# (id, processes, overrides)
LAYOUTS = [
    ("none", 1, []),
    ("ddp", 2, ["parallel.data=ddp"]),
    ("fsdp", 2, ["parallel.data=fsdp"]),
    ("hsdp_2x2", 4, ["parallel.data=hsdp", "parallel.dp_replicate=2"]),
    ("tp", 2, ["parallel.tp=2"]),
    ("fsdp_tp", 4, ["parallel.data=fsdp", "parallel.tp=2"]),
    ("pp_1f1b", 2, ["parallel.pp=2"]),
    ("pp_interleaved", 2, ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b"]),
    ("pp_fsdp", 4, ["parallel.data=fsdp", "parallel.pp=2"]),
    ("3d", 8, ["parallel.data=fsdp", "parallel.pp=2", "parallel.tp=2", "training.global_batch_size=16"]),
    ("zero1", 2, ["parallel.data=zero1"]),
    ("zero2", 2, ["parallel.data=zero2"]),
    ("zero3", 2, ["parallel.data=zero3", ZERO3_SMALL]),
    ("loss_chunks", 1, ["training.loss_chunks=4"]),
    ("fsdp_tp_loss_chunks", 4, ["parallel.data=fsdp", "parallel.tp=2", "training.loss_chunks=4"]),
    ("masterless", 1, MASTERLESS),
    ("fsdp_masterless", 2, ["parallel.data=fsdp", *MASTERLESS]),
    ("in_backward", 1, [*IN_BACKWARD, "training.global_batch_size=2"]),
    ("fsdp_in_backward", 2, ["parallel.data=fsdp", *IN_BACKWARD, "training.global_batch_size=4"]),
    ("activation_offload", 1, OFFLOAD),
    ("fsdp_activation_offload", 2, ["parallel.data=fsdp", *OFFLOAD]),
    ("tp_activation_offload", 2, ["parallel.tp=2", *OFFLOAD]),
    # LoRA/DoRA adapters on a frozen base (models/adapters.py): no gradient or state for the base; under TP the
    # adapters split with their layer (parallel/tensor.py), under FSDP and ZeRO-3 sharded with the base
    ("lora", 1, ["finetune.method=lora"]),
    ("dora", 1, ["finetune.method=dora"]),
    ("lora_fsdp", 2, ["finetune.method=lora", "parallel.data=fsdp"]),
    ("dora_fsdp", 2, ["finetune.method=dora", "parallel.data=fsdp"]),
    ("lora_tp", 2, ["finetune.method=lora", "parallel.tp=2"]),
    ("dora_tp", 2, ["finetune.method=dora", "parallel.tp=2"]),
    ("lora_zero2", 2, ["finetune.method=lora", "parallel.data=zero2"]),
    ("lora_zero3", 2, ["finetune.method=lora", "parallel.data=zero3", ZERO3_SMALL]),
    # the loss in chunks against a frozen output projection: no weight gradient accumulated
    ("lora_loss_chunks", 1, ["finetune.method=lora", "training.loss_chunks=4"]),
    ("lora_fsdp_loss_chunks", 2, ["finetune.method=lora", "parallel.data=fsdp", "training.loss_chunks=4"]),
    # QLoRA: the base in NF4 (4-bit codes and scales), gathered in 4 bits by FSDP, dequantized per product
    ("qlora", 1, ["finetune.method=lora", *NF4]),
    ("qdora", 1, ["finetune.method=dora", *NF4]),
    ("qlora_fsdp", 2, ["finetune.method=lora", "parallel.data=fsdp", *NF4]),
    ("qlora_tp", 2, ["finetune.method=lora", "parallel.tp=2", *NF4]),  # (each rank's shard quantized on its own)
    # compiled blocks: inductor chooses what a block saves (its graph's outputs, which the offload hooks see)
    ("compile_activation_offload", 1, [*OFFLOAD, "parallel.compile=true"]),
    # context parallelism on a longer sequence (128 tokens, 4 x the rest): the same layout on one process, cp 2 both
    # ways, FSDP 2 x cp 2
    # the kv heads repeated to the query heads before SDPA (what cuDNN's and the memory-efficient kernel need)
    ("expand_kv", 1, ["model.attention=flash", "model.expand_kv=true"]),
    # the blocks' linears in float8, torchao's emulation (on a GPU the float8 casts' temporaries differ)
    ("float8", 1, FLOAT8),
    ("fsdp_float8", 2, ["parallel.data=fsdp", *FLOAT8]),
    # full AC on every second block only (the others keep everything)
    ("ac_every_2", 1, ["parallel.ac_every=2"]),
    ("fsdp_ac_every_2", 2, ["parallel.data=fsdp", "parallel.ac_every=2"]),
    # selective AC keeping every second matmul's output (torchtitan's op-level SAC)
    ("sac_every_second", 1, ["parallel.sac_matmuls=every_second"]),
    ("tp_sac_every_second", 2, ["parallel.tp=2", "parallel.sac_matmuls=every_second"]),
    # data.pack: conversations packed into one sequence per micro-batch (on the CPU a dense additive mask, T^2)
    ("packed", 1, PACKED_LONG),
    # (1,024 tokens: the last stage's logits, kept by torch's stage for its backward, are 16 MiB in fp32)
    ("pp_packed", 2, [*PACKED, "training.seq_len=1024", "parallel.pp=2"]),
    # MoE blocks (models/moe.py) on 128 tokens: forced routing, balanced and all on experts 0 and 1 (without expert
    # parallelism every expert is on the rank: the same rows either way), and with a capacity that drops half
    ("moe", 1, [*LONG, *MOE, "model.moe.routing=round_robin"]),
    ("moe_first", 1, [*LONG, *MOE, "model.moe.routing=first"]),
    ("moe_capacity", 1, [*LONG, *MOE, "model.moe.routing=first", "model.moe.capacity_factor=0.5"]),
    ("fsdp_moe", 2, [*LONG, *MOE, "parallel.data=fsdp", "model.moe.routing=round_robin"]),
    # expert parallelism over 2 ranks: balanced (round robin) and the worst case (every token of both ranks to
    # experts 0 and 1, on rank 0: the planner's worst-case load, 2 x the rows)
    ("ep2_moe", 2, [*LONG, *MOE, "parallel.data=fsdp", "parallel.ep=2", "model.moe.routing=round_robin"]),
    ("ep2_moe_first", 2, [*LONG, *MOE, "parallel.data=fsdp", "parallel.ep=2", "model.moe.routing=first"]),
    ("tp2_moe", 2, [*LONG, *MOE, "parallel.data=fsdp", "parallel.tp=2", "model.moe.routing=round_robin"]),
    (
        "pp2_ep2_moe",
        4,
        [*LONG, *MOE, "parallel.data=fsdp", "parallel.ep=2", "parallel.pp=2", "model.moe.routing=round_robin"],
    ),
    ("long", 1, LONG),
    # Qwen3's attention: heads wider than dim / n_heads, RMS-normalized queries and keys before RoPE
    ("qk_norm", 1, [*LONG, "model.head_dim=32", "model.qk_norm=true"]),
    ("cp_2", 2, [*LONG, "parallel.cp=2"]),
    ("cp_2_ring", 2, [*LONG, "parallel.cp=2", "parallel.cp_rotate=ring"]),
    ("fsdp_cp_2x2", 4, [*LONG, "parallel.data=fsdp", "parallel.cp=2"]),
]
# (ZeRO-Offload is not in the matrix: on a CPU machine the offloaded state stays on the same device, so it adds
# nothing to check here; its host-memory term needs a GPU run. 3-D runs 8 ranks: four of the six modes.)
# rows whose plan is one rank's, not every rank's: the worst-case routing under expert parallelism puts every row on
# the ranks holding experts 0 and 1 (ep rank 0), the others' experts compute nothing (their peak is below the plan)
PLANNED_RANKS = {"ep2_moe_first": [0]}
MODES_OF = {
    "3d": ["none/fp32", "full/fp32", "none/bf16", "full/bf16"],
    "loss_chunks": ["none/fp32", "none/bf16", "full/bf16"],
    "fsdp_tp_loss_chunks": ["none/fp32", "none/bf16"],
    "in_backward": ["none/fp32", "full/fp32", "none/bf16"],
    "masterless": ["none/bf16", "full/bf16"],
    "fsdp_masterless": ["none/bf16", "full/bf16"],
    "fsdp_in_backward": ["none/fp32", "full/bf16"],
    "activation_offload": ["none/fp32", "selective/fp32", "full/fp32", "none/bf16"],
    "fsdp_activation_offload": ["none/fp32", "full/bf16"],
    "tp_activation_offload": ["none/fp32"],
    "compile_activation_offload": ["none/fp32", "selective/fp32", "full/fp32", "none/bf16"],
    "lora": ["none/fp32", "full/fp32", "none/bf16", "full/bf16"],
    "dora": ["none/fp32", "full/fp32", "none/bf16", "full/bf16"],
    **{f"{k}_{s}": ["none/fp32", "full/bf16"] for k in ("lora", "dora") for s in ("fsdp", "tp")},
    "lora_fsdp": ["none/fp32", "none/bf16", "full/bf16"],  # (none/bf16: the simulation's mode)
    "lora_zero2": ["none/fp32", "full/bf16"],
    "lora_zero3": ["none/fp32", "full/bf16"],
    "lora_loss_chunks": ["none/fp32", "none/bf16"],
    "lora_fsdp_loss_chunks": ["none/bf16", "full/bf16"],
    "qlora": ["none/fp32", "full/fp32", "none/bf16", "full/bf16"],
    "qdora": ["none/fp32", "full/bf16"],
    "qlora_fsdp": ["none/fp32", "full/bf16"],
    "qlora_tp": ["none/fp32", "full/bf16"],
    "packed": ["none/fp32", "full/fp32", "none/bf16"],
    "moe": ["none/fp32", "full/fp32", "none/bf16", "full/bf16"],
    "moe_first": ["none/fp32", "none/bf16"],
    "moe_capacity": ["none/fp32", "none/bf16"],
    "fsdp_moe": ["none/fp32", "full/bf16"],
    "ep2_moe": ["none/fp32", "full/bf16"],
    "qk_norm": ["none/fp32", "none/bf16", "full/bf16"],
    "ep2_moe_first": ["none/fp32", "none/bf16"],
    "tp2_moe": ["none/fp32", "full/bf16"],
    "pp2_ep2_moe": ["none/fp32", "full/bf16"],
    "pp_packed": ["none/fp32", "full/bf16"],
    "expand_kv": ["none/fp32", "selective/fp32", "none/bf16"],
    "float8": ["none/bf16", "selective/bf16", "full/bf16"],
    "fsdp_float8": ["none/bf16", "full/bf16"],
    "ac_every_2": ["full/fp32", "full/bf16"],
    "fsdp_ac_every_2": ["full/fp32", "full/bf16"],
    "sac_every_second": ["selective/fp32", "selective/bf16"],
    "tp_sac_every_second": ["selective/fp32"],
    "long": ["none/fp32", "full/bf16"],
    "cp_2": ["none/fp32", "full/bf16"],
    "cp_2_ring": ["none/fp32"],
    "fsdp_cp_2x2": ["none/fp32"],
}

# Where the formulas are known to miss by more than 10% on this model (measured 2026-12-01, torch 2.13 CPU):
# (layout, mode) -> (peak bound, why). docs/memory.md lists them.
GAPS = {
    ("hsdp_2x2", "full/fp32"): (0.15, "a checkpointed block's backward under HSDP holds more than its recompute"),
    # 14.2% on rank 0 in the docs table's run; rank 1 measured 2,316,656 B (18.5%) in 1 of 7 runs on 2026-12-06
    ("pp_fsdp", "full/fp32"): (0.21, "FSDP under pipelining with full AC: the first stage's backward, under-predicted"),
    # +14.4% on stage 0 (2026-12-07, AMD EPYC); the same +14.1% without expert parallelism (pp 2 x FSDP, full and no
    # AC in bf16), while fp32 is within 4%: the tracker finds the first stage's peak with little of its MoE block's
    # recomputed forward alive, the planner counts all of it; not found
    ("pp2_ep2_moe", "full/bf16"): (0.16, "MoE blocks in a pipeline stage in bf16: over-predicted, not explained"),
}
# (3-D full/fp32 was a gap here, -10.9%, and 3-D none/fp32 varied by CPU kind, -4.6% on the AMD EPYC and -10.6% on
# an Intel Xeon: both are the pipeline's last stage, which keeps its output, the logits, for the backward, a term
# since 2026-12-07: -6.3% and -6.4% on the Intel measurements of the docs table, -0.1% on the AMD EPYC's none/fp32.)
# Within 10% here but not on every machine: (layout, mode) -> (peak bound, why). Not a known gap (it is inside
# 10% on this machine, so test_known_gaps_are_still_gaps leaves it out).
VARIES = {
    # ZeRO-2 full/fp32: 5,617,084 B (-7.9%) on both ranks in most runs; in 1 of 3 runs alone (2026-12-06, AMD EPYC)
    # one rank peaked at 6,113,212 B (-15.4%): 496,128 B more, about one gradient partition, which DeepSpeed's
    # overlap_comm reduction held a moment longer. Not found yet which buffer: the planner does not predict it.
    ("zero2", "full/fp32"): (0.16, "DeepSpeed's overlapped reduction held ~1 gradient partition more in 1 of 3 runs"),
    # the same in bf16: 3,531,708 B (-6.3%) usually; 3,779,772 B (-12.4%, 248,064 B more) on rank 1 in CI's run of
    # 7966868 (2026-12-06, AMD EPYC); on an Intel Xeon with AMX (2026-12-07) -11.6% on rank 1 in one of
    # three runs (3,691 KiB), and the same extra partition once in selective/fp32 (5,970 KiB, -5.5%: inside 10%)
    ("zero2", "full/bf16"): (0.14, "DeepSpeed's overlapped reduction held ~1 gradient partition more in one CI run"),
}
STATES = ("params", "buffers", "optim", "master")


def batch_of(nproc: int, overrides: list[str]) -> str:
    """The global batch a layout is measured at: 8 (a layout's own setting wins: 16 for 3-D), but at most two
    micro-batches per data-parallel rank outside a pipeline. Two are the steady state of accumulation (the
    first's gradients held while the second runs); more only repeat it, at the cost of the suite's time.
    Pipelines keep 8: their schedules' microbatch counts are what their rows measure."""
    from conftest import TINY

    from trainer.config import load_config
    from trainer.validate import parallel_dims

    cfg = load_config([*TINY, *overrides])
    dims, _ = parallel_dims(cfg, nproc)
    if dims.pp > 1:
        return "training.global_batch_size=8"
    return f"training.global_batch_size={min(8, 2 * cfg.training.micro_batch_size * dims.dp_size)}"


def _update_temporary(rank) -> int:
    """AdamW's update temporary, as the planner's optimizer-step moment states it, or (optim.in_backward) the
    moment of the peak (0 without one)."""
    return max(
        sum(t.bytes for t in terms if "update temporary" in t.name)
        for terms in (rank.moments["optimizer step"], rank.terms)
    )


def _memory_arguments(nproc: int, overrides: list[str]) -> tuple[str, list[str]]:
    """(the modes, the memory worker's arguments) of a layout."""
    from conftest import TINY

    modes = MODES_OF.get(next((n for n, _, ov in LAYOUTS if ov == overrides), ""), MODES)
    return ",".join(modes), [*TINY, batch_of(nproc, overrides), *overrides]


def test_the_packed_rows_fail_without_their_terms(measured):
    """The packed rows' two terms matter: without the documents' dense mask the packed row's prediction misses its
    measured peak by more than the 10% bound (full/fp32: the mask is a fifth of it), and without the pipeline's kept
    logits so does the pipelined row's last stage (none/fp32)."""
    name, nproc, overrides = next(row for row in LAYOUTS if row[0] == "packed")
    got = measured(nproc, overrides)["full/fp32"][0]["peak"]
    want = plan_of(nproc, overrides, "full/fp32")[0].ranks[0]
    mask = sum(t.bytes for t in want.terms if t.name.startswith("packed documents"))
    assert abs(want.peak_bytes - got) / got <= 0.10 < abs(want.peak_bytes - mask - got) / got
    name, nproc, overrides = next(row for row in LAYOUTS if row[0] == "pp_packed")
    got = measured(nproc, overrides)["none/fp32"][1]["peak"]
    want = plan_of(nproc, overrides, "none/fp32")[0].ranks[1]
    logits = sum(t.bytes for t in want.terms if t.name.startswith("the last stage's output, the logits"))
    assert abs(want.peak_bytes - got) / got <= 0.10 < abs(want.peak_bytes - logits - got) / got


def test_the_worst_case_expert_row_fails_when_planned_balanced(measured):
    """Under expert parallelism the routing the plan assumes matters: the worst-case row's rank 0 (every token of
    both ranks on its experts) is within 10% of the worst-case plan and more than 10% over the balanced one."""
    from models.args import model_args_of
    from parallel.plan import memory_plan
    from trainer.config import load_config

    name, nproc, overrides = next(row for row in LAYOUTS if row[0] == "ep2_moe_first")
    got = measured(nproc, overrides)["none/fp32"][0]["peak"]
    worst, dims = plan_of(nproc, overrides, "none/fp32")
    cfg = load_config(args_of(nproc, overrides, "none/fp32"))
    balanced = memory_plan(cfg, model_args_of(cfg), dims, expert_routing="balanced")
    assert abs(worst.ranks[0].peak_bytes - got) / got <= 0.10 < (got - balanced.ranks[0].peak_bytes) / got


def worker_cases(test: str, params: dict) -> list[tuple[str, int, list[str]]]:
    """The layouts the selected rows measure (conftest.py's `worker` batches them with the parity runs, one launch
    per rank count)."""
    if test == "test_predicted_memory_matches_the_tracker":
        modes, arguments = _memory_arguments(params["nproc"], params["overrides"])
        return [("memory_worker", params["nproc"], [modes, *arguments])]
    if test in (
        "test_the_packed_rows_fail_without_their_terms",
        "test_the_worst_case_expert_row_fails_when_planned_balanced",
    ):
        names = ("packed", "pp_packed") if "packed" in test else ("ep2_moe_first",)
        rows = [row for row in LAYOUTS if row[0] in names]
        return [("memory_worker", n, [m, *a]) for _, n, ov in rows for m, a in [_memory_arguments(n, ov)]]
    return []


@pytest.fixture(scope="session")
def measured(worker):
    """run(nproc, overrides) -> {mode: [breakdown per rank]}, cached for the session (tests/distributed/conftest.py's
    `worker`: the selected rows' layouts were measured in the batched launches; another layout is measured alone
    when asked, so a failure is its own)."""

    def run(nproc: int, overrides: list[str]) -> dict:
        modes, arguments = _memory_arguments(nproc, overrides)
        return worker.case("memory_worker", nproc, [modes, *arguments])

    return run


def _machine() -> str:
    """Where and when a measurement was made: the date, the CPU's model name, torch."""
    import datetime

    import torch

    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown CPU")
    return f"{datetime.date.today()}, {cpu} ({os.cpu_count()} cores), torch {torch.__version__}"


def args_of(nproc: int, overrides: list[str], mode: str) -> list[str]:
    """The train.py arguments a layout is measured with in one mode (`ac/precision`)."""
    from conftest import TINY

    ac, precision = mode.split("/")
    return [*TINY, batch_of(nproc, overrides), *overrides, f"parallel.ac={ac}", f"training.precision={precision}"]


def plan_of(nproc: int, overrides: list[str], mode: str):
    from memory_table import plan_from_args

    return plan_from_args(args_of(nproc, overrides, mode), nproc)


@pytest.mark.parametrize("name, nproc, overrides", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_predicted_memory_matches_the_tracker(name, nproc, overrides, measured):
    results = measured(nproc, overrides)
    modes = MODES_OF.get(name, MODES)
    assert sorted(results) == sorted(modes)
    failures = []
    for mode in modes:
        plan, dims = plan_of(nproc, overrides, mode)
        bound, why = GAPS.get((name, mode)) or VARIES.get((name, mode), (0.10, ""))
        for rank, got in enumerate(results[mode]):
            want = plan.ranks[rank // (nproc // dims.pp)]
            where = f"{name} {mode} rank {rank}"
            err = abs(want.peak_bytes - got["peak"]) / got["peak"]
            if err > bound and rank in PLANNED_RANKS.get(name, [rank]):
                failures.append(
                    f"{where}: peak predicted {want.peak_bytes:,}, measured {got['peak']:,} "
                    f"({err:.1%} > {bound:.0%}{'; ' + why if why else ''})"
                )
            offloaded = max(
                sum(t.bytes for t in terms if t.name.startswith("offloaded block activations"))
                for terms in want.moments.values()
            )
            if offloaded or OFFLOADED in got:  # activation offloading: the host copies' peak is the planner's
                if abs(got.get(OFFLOADED, 0) - offloaded) > 0.01 * offloaded:
                    failures.append(
                        f"{where}: offloaded activations predicted {offloaded:,}, measured {got.get(OFFLOADED, 0):,}"
                    )
            states = {
                k: sum(t.bytes for t in want.terms if t.category == k and "update temporary" not in t.name)
                for k in STATES
            }
            temp = _update_temporary(want)
            for k in STATES:
                tol = 0.15 if (k == "params" and "zero3" in name) else 0.01
                low, high = states[k] * (1 - tol), (states[k] + (temp if k == "optim" else 0)) * (1 + tol)
                if not low - 8 <= got[k] <= high + 8:
                    failures.append(f"{where}: {k} predicted {states[k]:,}, measured {got[k]:,}")
    # docs/memory.md's table: SHARDWISE_MEMORY_RESULTS=docs/benchmarks/memory-matrix.jsonl keeps the measurements
    # (tests/unit/test_docs_tables.py renders the table from them), SHARDWISE_MEMORY_TABLE the rows themselves
    records = [
        {
            "layout": name,
            "mode": mode,
            "nproc": nproc,
            "args": args_of(nproc, overrides, mode),
            "ranks": results[mode],
            "measured": _machine(),
            **({"planned_ranks": PLANNED_RANKS[name]} if name in PLANNED_RANKS else {}),
        }
        for mode in modes
    ]
    if path := os.environ.get("SHARDWISE_MEMORY_RESULTS"):
        with open(path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    if table := os.environ.get("SHARDWISE_MEMORY_TABLE"):
        from memory_table import row

        with open(table, "a") as f:
            f.writelines(row(r) + "\n" for r in records)
    assert not failures, "\n".join(failures)


def test_known_gaps_are_still_gaps(measured):
    """A gap that closed must leave GAPS (and docs/memory.md): each is outside 10% today."""
    closed = []
    layouts = {name: (nproc, ov) for name, nproc, ov in LAYOUTS}
    for (name, mode), _gap in GAPS.items():
        nproc, overrides = layouts[name]
        plan, dims = plan_of(nproc, overrides, mode)
        worst = max(
            abs(plan.ranks[r // (nproc // dims.pp)].peak_bytes - got["peak"]) / got["peak"]
            for r, got in enumerate(measured(nproc, overrides)[mode])
        )
        if worst <= 0.10:
            closed.append(f"{name} {mode}: now within {worst:.1%}")
    assert not closed, closed


def test_memory_breakdown_reaches_every_sink(tmp_path):
    """logging.memory_breakdown=true on a real 2-rank FSDP run: the chosen step (3, not a logging step) is
    tracked on every rank; console, metrics.jsonl, TensorBoard and W&B carry it, and it is the planner's."""
    from conftest import TINY
    from helpers import read_jsonl, read_wandb_records, run_train, wandb_history

    run_dir = tmp_path / "run"
    overrides = [*TINY, "training.global_batch_size=8", "parallel.data=fsdp", "training.steps=4", "logging.every=2"]
    overrides = [
        o
        for o in overrides
        if not o.startswith(("logging.jsonl", "logging.tensorboard", "logging.console", "logging.wandb"))
    ]
    proc = run_train(
        [*overrides, f"run_dir={run_dir}", "logging.memory_breakdown=true", "logging.wandb.mode=offline"], nproc=2
    )
    assert "memory at the peak of step 3, rank 0: " in proc.stdout and "rank 1: " in proc.stdout

    rows = read_jsonl(run_dir / "metrics.jsonl")
    (record,) = [r for r in rows if r.get("event") == "memory_breakdown"]
    assert record["step"] == 3 and record["unit"] == "bytes" and len(record["ranks"]) == 2
    for rank in record["ranks"]:
        assert rank["peak"] == sum(v for k, v in rank.items() if k != "peak") > 0
        assert rank["params"] > 0 and rank["optim"] > 0 and rank["activations"] > 0
    (step3,) = [r for r in rows if r.get("step") == 3 and "event" not in r]
    top = max(record["ranks"], key=lambda b: b["peak"])
    assert step3["memory/tracked_peak_bytes"] == top["peak"]
    assert step3["memory/tracked/activations_bytes"] == top["activations"]
    plan, _ = plan_of(2, ["parallel.data=fsdp"], "none/bf16")  # this run's layout: TINY's bf16 default, no AC
    assert abs(plan.peak_bytes - top["peak"]) <= 0.10 * top["peak"], (plan.peak_bytes, top["peak"])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / "tensorboard"))
    ea.Reload()
    assert [(e.step, e.value) for e in ea.Scalars("memory/tracked_peak_bytes")] == [(3, float(top["peak"]))]
    (wandb_file,) = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    logged = [h for h in wandb_history(read_wandb_records(wandb_file)) if "memory/tracked_peak_bytes" in h]
    assert [(h["train/step"], h["memory/tracked_peak_bytes"]) for h in logged] == [(3, top["peak"])]


SIMULATED = ["hsdp_2x2", "fsdp_tp", "pp_fsdp", "lora_fsdp"]


@pytest.mark.parametrize("name", SIMULATED)
def test_simulation_matches_the_real_run(name, measured):
    """launch/plan.py --simulate (fake process group, FakeTensorMode) measures what the real gloo run measured at
    the same layout: the same code and kernels, on FakeTensors. The most loaded rank, none/bf16: the peak within
    3%, the model states to the byte."""
    import json
    import subprocess
    import sys

    from conftest import TINY
    from helpers import REPO

    nproc, overrides = next((n, ov) for x, n, ov in LAYOUTS if x == name)
    args = [
        *TINY,
        batch_of(nproc, overrides),
        *overrides,
        "parallel.ac=none",
        "training.precision=bf16",
        f"world_size={nproc}",
        "device=cpu",
        "--simulate",
        "--json",
    ]
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "plan.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    simulated = out["simulated"]
    real = measured(nproc, overrides)["none/bf16"][out["simulated_rank"]]
    # measured 2026-12-01: one process exact; hsdp -1.4%, fsdp x tp +2.7% (the fake collectives' buffers are filed
    # between activations and temporaries differently); pp x fsdp, the first stage's rank: 148-197 KB fewer
    # temporaries at the per-microbatch reduce-scatter inside the pipeline's backward (most likely gloo's own
    # collective buffers, which the fake group does not allocate). That gap is not the same on every machine: the
    # real run's peak was 2,163,568 B here (2-core AMD EPYC, -6.8%) and 2,188,144 B on the CI machine (-7.9%,
    # 2026-12-02) with the same code, so its bound is 9%
    bound = 0.09 if name == "pp_fsdp" else 0.03
    assert abs(simulated["peak"] - real["peak"]) <= bound * real["peak"], f"simulated {simulated}, real {real}"
    for k in STATES:
        assert simulated[k] == real[k], (k, simulated[k], real[k])


def test_the_simulation_refuses_an_nf4_base():
    """FakeTensorMode has no values to quantize: --simulate of a QLoRA run would simulate a 16-bit base; refused."""
    from conftest import TINY
    from helpers import run_cli

    args = [*TINY, "finetune.method=lora", "finetune.quantize_base=true", "finetune.nf4_scaler_block=8"]
    proc = run_cli("plan.py", [*args, "world_size=1", "device=cpu", "--simulate"])
    assert proc.returncode != 0 and "--simulate with finetune.quantize_base=true" in proc.stderr, proc.stderr[-2000:]


def test_context_parallelism_divides_the_activations(measured):
    """On the longer sequence, cp 2 holds about half the one-process activations and temporaries per rank (the
    tracker; the planner's rows above say by how much exactly: the attention's gathered keys and values come on
    top)."""
    layouts = {name: (nproc, ov) for name, nproc, ov in LAYOUTS}
    act = lambda d: d["activations"] + d["temporaries"]  # noqa: E731
    one = act(measured(*layouts["long"])["none/fp32"][0])
    for name in ("cp_2", "cp_2_ring"):
        per_rank = max(act(r) for r in measured(*layouts[name])["none/fp32"])
        assert 0.45 * one <= per_rank <= 0.62 * one, f"{name}: {per_rank:,} bytes vs {one:,} on one process"
