"""The single-GPU recipes fit by the planner's prediction, as launch/plan.py --json reports it."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli

GIB = 2**30


def _plan(*args: str) -> dict:
    proc = run_cli("plan.py", [*args, "--json"])  # in-process: plan.py's main
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_llama8b_trains_in_16_gib_on_one_gpu():
    out = _plan("recipe=llama8b_1gpu_16g")  # world_size=1 gpu_memory_gib=16: the recipe's hardware section
    assert out["world_size"] == 1 and out["capacity_bytes"] == 16 * GIB
    assert out["peak_bytes"] + out["reserve_bytes"] <= 16 * GIB and out["fits"]
    terms = {t["name"]: t for t in out["ranks"][0]["terms"]}
    # the states live on the host (FSDP's CPU offload), where the step runs
    assert terms["optimizer state (adamw, with its step counters)"]["category"] == "host"
    assert out["host_bytes_per_node"] > 100 * GIB and out["step_time"]["seconds"] > 0


@pytest.mark.parametrize("recipe, params", [("llama20b_1gpu_h200", 20e9), ("llama30b_1gpu_h200", 30e9)])
def test_20b_and_30b_train_on_one_h200(recipe, params):
    out = _plan(f"recipe={recipe}")  # world_size=1 gpu_memory_gib=131 (141e9 bytes): the hardware section
    assert out["world_size"] == 1 and out["capacity_bytes"] == 131 * GIB
    assert out["peak_bytes"] + out["reserve_bytes"] <= 141e9 and out["fits"]
    assert out["host_bytes_per_node"] <= 128e9
    from models.args import model_args_of
    from trainer.config import load_config

    assert model_args_of(load_config([f"recipe={recipe}"])).num_params() >= params
    terms = {t["name"]: t for t in out["ranks"][0]["terms"]}
    names = " ".join(terms)
    assert "bf16 (no fp32 masters) parameters" in names and "gradients (all" not in names
    # only the offloaded block inputs are on the host, with the pinned allocator's rounding of each to a power of two
    host = {name: t["bytes"] for name, t in terms.items() if t["category"] == "host"}
    moved = next(b for name, b in host.items() if name.startswith("offloaded block activations"))
    rounding = next(b for name, b in host.items() if name.startswith("pinned host memory"))
    assert len(host) == 2 and out["host_bytes_per_node"] == moved + rounding
    assert out["step_time"]["tokens_per_sec_per_device"] > 0


def test_pinned_host_memory_is_rounded_to_powers_of_two_on_cuda():
    """torch's pinned host allocator (CachingHostAllocator, on CUDA) rounds each request up to a power of two and
    keeps the block: the planner counts that rounding for every pinned storage. llama20b_1gpu_h200 offloads 40
    block inputs of 2 x 4,096 tokens x 6,144 x 2 bytes = 96 MiB: 40 x 128 MiB = 5 GiB of host memory, not 3.75.
    FSDP's CPU offload (llama8b_1gpu_16g) pins every parameter and gradient shard: a 14,336 x 4,096 fp32 shard
    (224 MiB) takes 256 MiB. On a CPU run nothing is pinned and nothing is added."""
    from parallel.memory_terms import PINNED_ROUNDING, pinned_bytes

    assert [pinned_bytes(n) for n in (0, 1, 3, 64 * 2**20, 96 * 2**20)] == [0, 1, 4, 64 * 2**20, 128 * 2**20]
    out = _plan("recipe=llama20b_1gpu_h200")
    assert out["host_bytes_per_node"] == 40 * 128 * 2**20
    on_cpu = _plan("recipe=llama20b_1gpu_h200", "device=cpu")
    assert not [t for t in on_cpu["ranks"][0]["terms"] if t["name"].startswith(PINNED_ROUNDING)]
    fsdp = {t["name"]: t["bytes"] for t in _plan("recipe=llama8b_1gpu_16g")["ranks"][0]["terms"]}
    shards = fsdp[PINNED_ROUNDING + ": the parameter shards"]
    # per block: w1 and w3 (14,336 x 4,096) and w2 (4,096 x 14,336) round 224 -> 256 MiB; q, k, v, o and the norms
    # are powers of two already; the embedding and output tables (128,256 x 4,096 x 4 bytes) round up to 2 GiB
    table = 128256 * 4096 * 4
    assert shards == 32 * 3 * 32 * 2**20 + 2 * (2**31 - table)
    assert fsdp[PINNED_ROUNDING + ": the gradient shards"] == shards


def test_the_llama8b_ablation_table_is_the_planners():
    """docs/memory.md's Llama-3-8B table, row by row: the planner's peak and its moment for the documented command
    with that row's settings and those above it (the planner is arithmetic: the table is recomputed here)."""
    from helpers import REPO

    from trainer.config import load_config
    from trainer.validate import derive

    base = [
        "recipe=llama8b",
        "parallel.data=none",
        "training.micro_batch_size=1",
        "training.global_batch_size=1",
        "training.seq_len=2048",
        "optim.max_grad_norm=0",
        "hardware.gpu_memory_gib=80",
    ]
    steps = [
        ("baseline (bf16 autocast, fp32 parameters and AdamW)", []),
        ("+ full AC", ["parallel.ac=full"]),
        ("+ loss in 8 chunks", ["training.loss_chunks=8"]),
        ("+ optimizer in backward", ["optim.in_backward=true"]),
        ("+ bf16 AdamW moments (`optim.name=adamw_bf16`)", ["optim.name=adamw_bf16"]),
        ("+ 8-bit AdamW (`optim.name=adamw8bit`, torchao)", ["optim.name=adamw8bit"]),
        ("+ bf16 parameters without fp32 masters (`training.master_weights=false`)", ["training.master_weights=false"]),
        ("+ activation offloading (`parallel.activation_offload=true`", ["parallel.activation_offload=true"]),
    ]
    page = (REPO / "docs" / "memory.md").read_text()
    args = list(base)
    for label, more in steps:
        args += more
        cfg = load_config(args)
        rank = derive(cfg, 1, device="cuda").memory.ranks[0]
        moment = {"last block's backward": "a block's backward"}.get(rank.phase, rank.phase)
        line = next(x for x in page.splitlines() if x.startswith(f"| {label}"))
        assert line.endswith(f"| {rank.peak_bytes / 2**30:.2f} GiB | {moment} |"), (line, rank.peak_bytes, moment)


def test_llama8b_1gpu_16g_states_the_host_memory_it_needs():
    """The recipe and docs/recipes.md say how much host memory the offloaded states take, as the planner predicts
    it (pinned memory's rounding included): a user with less host memory sees it before renting the GPU."""
    from helpers import REPO

    from trainer.config import load_config
    from trainer.validate import derive

    cfg = load_config(["recipe=llama8b_1gpu_16g"])
    host = derive(cfg, 1, device="cuda").memory.host_bytes_per_node
    said = f"{host / 2**30:.1f} GiB"
    assert said in (REPO / "recipes" / "llama8b_1gpu_16g.yaml").read_text(), said
    assert said in (REPO / "docs" / "recipes.md").read_text(), said


def test_the_plan_says_whether_the_offloaded_state_fits_the_host():
    """host_memory_gib (the recipe's `hardware` section, or plan.py's argument) gets a verdict of its own: the 8B
    full fine-tune sized for 24 GB and 64 GiB of host memory fits both; the 16 GiB recipe's fp32 states (153.8 GiB
    of host memory) do not fit 64 GiB, and the JSON says so."""
    out = _plan("recipe=llama8b_full_1gpu_24g")  # hardware: 1 GPU of 24 GiB, 64 GiB of host memory
    assert out["fits"] and out["host_fits"] and out["host_capacity_bytes"] == 64 * GIB
    assert out["peak_bytes"] + out["reserve_bytes"] <= 18 * GIB and out["host_bytes_per_node"] <= 64 * GIB
    out = _plan("recipe=llama8b_1gpu_16g", "host_memory_gib=64")
    assert out["fits"] and out["host_fits"] is False and out["host_bytes_per_node"] > 64 * GIB
    assert _plan("recipe=llama8b_1gpu_16g")["host_fits"] is None  # (no host memory given: no host verdict)
    proc = run_cli("plan.py", ["recipe=llama8b_1gpu_16g", "host_memory_gib=64"])
    assert "host verdict       does not fit by 89.79 GiB (153.79 > 64.00 GiB per node)" in proc.stdout, proc.stdout
