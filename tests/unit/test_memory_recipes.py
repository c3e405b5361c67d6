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
    # only the offloaded block inputs are on the host
    assert [t["category"] for t in terms.values() if t["category"] == "host"] == ["host"]
    assert out["step_time"]["tokens_per_sec_per_device"] > 0
