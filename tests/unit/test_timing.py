"""parallel/timing.py (the step-time model) and trainer/search.py (plan.py --search): the communication
volumes against their ring formulas, the terms moving the way the strategies do, and the search keeping only
validated layouts that fit, fastest first."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from helpers import REPO, run_cli
from omegaconf import OmegaConf

from models.args import model_args_of
from parallel.plan import GIB
from parallel.timing import Hardware, gpu_hardware, step_time
from trainer.config import load_config
from trainer.search import AC_ORDER, search
from trainer.validate import derive

GPU = gpu_hardware(80, "bf16")


def _time(overrides: list[str], world: int, hw: Hardware = GPU, **kw):
    cfg = load_config(overrides)
    cfg.dry_run = True
    cfg.training.device = "auto"
    plan = derive(cfg, world, device="cuda")
    return step_time(cfg, model_args_of(cfg), plan.dims, hw, **kw), plan, cfg


def _local_params(cfg, plan) -> int:
    from parallel.memory_terms import _params_of_rank

    params = _params_of_rank(model_args_of(cfg), cfg, plan.dims, 0)[0]
    return sum(math.prod(q.tp) for q in params)


def test_data_parallel_volumes_follow_the_ring_formulas():
    base = ["recipe=llama7b_fsdp", "training.global_batch_size=32", "training.micro_batch_size=2"]  # 2 microbatches
    ddp, plan, cfg = _time([*base, "parallel.data=ddp", "training.precision=fp32"], 8)
    n = _local_params(cfg, plan)
    assert ddp.comm_bytes == {"DDP gradient all-reduce": pytest.approx(2 * 7 / 8 * 4 * n)}
    fsdp, plan, cfg = _time([*base, "parallel.data=fsdp"], 8)
    # bf16 gathers in forward and again in backward per microbatch; fp32 reduce-scatter per microbatch
    assert fsdp.comm_bytes["FSDP parameter all-gather"] == pytest.approx(2 * 2 * 7 / 8 * 2 * n)
    assert fsdp.comm_bytes["FSDP gradient reduce-scatter"] == pytest.approx(2 * 7 / 8 * 4 * n)
    once, _, _ = _time([*base, "parallel.data=fsdp", "parallel.accumulate_unsharded_grads=true"], 8)
    assert once.comm_bytes["FSDP gradient reduce-scatter"] == pytest.approx(7 / 8 * 4 * n)
    z3, _, _ = _time([*base, "parallel.data=zero3"], 8)
    assert z3.comm_bytes["ZeRO-3 parameter all-gather"] == pytest.approx(2 * 2 * 7 / 8 * 2 * n)
    z1, _, _ = _time([*base, "parallel.data=zero1"], 8)
    assert z1.comm_bytes["ZeRO gradient reduce-scatter"] == pytest.approx(7 / 8 * 2 * n)  # once, at the boundary
    hsdp, plan, _ = _time([*base, "parallel.data=hsdp", "parallel.dp_replicate=2"], 8)
    assert plan.dims.dp_shard == 4
    assert hsdp.comm_bytes["HSDP gradient all-reduce across replicas"] == pytest.approx(2 * 2 * 1 / 2 * 4 * n / 4)


def test_tensor_and_pipeline_terms():
    tp, plan, cfg = _time(["recipe=llama8b_fsdp_tp"], 16)
    assert plan.dims.tp > 1 and tp.parts["tp_comm"] > 0 and "TP activation collectives" in tp.comm_bytes
    full, _, _ = _time(["recipe=llama8b_fsdp_tp", "parallel.ac=full"], 16)
    assert full.comm_bytes["TP activation collectives"] == pytest.approx(
        tp.comm_bytes["TP activation collectives"]
        * (12 * 32 + 4)
        / ((8 if str(cfg.parallel.ac) == "none" else 10) * 32 + 4)
    )
    assert full.parts["recompute"] > 0 and full.hw_flops > full.flops == tp.flops
    pp = {
        s: _time(["recipe=llama13b_pp_fsdp", f"parallel.pp_schedule={s}", "parallel.ac=full"], 16)[0]
        for s in ("1f1b", "interleaved_1f1b", "zbv")
    }
    assert pp["1f1b"].parts["bubble"] > pp["interleaved_1f1b"].parts["bubble"] > pp["zbv"].parts["bubble"] > 0
    assert all(p.comm_bytes["PP sends"] > 0 for p in pp.values())


def test_slower_links_and_offload_cost_time():
    fsdp = ["recipe=llama70b", "parallel.data=fsdp"]
    one_node, _, _ = _time(fsdp, 8)
    slow = gpu_hardware(80, "bf16", intra_gbps=1)
    assert _time(fsdp, 8, slow)[0].parts["dp_comm_exposed"] > one_node.parts["dp_comm_exposed"]
    local, _, _ = _time(["recipe=llama7b_fsdp"], 8)
    off, _, _ = _time(["recipe=llama7b_fsdp", "parallel.offload=cpu"], 8)
    assert off.parts["optimizer"] > local.parts["optimizer"] and off.parts["host_transfers"] > 0
    assert off.seconds > local.seconds


def test_search_keeps_validated_layouts_that_fit_fastest_first():
    from trainer.validate import validate

    cfg = load_config(["recipe=llama7b_fsdp"])
    cfg.training.device = "auto"
    result = search(cfg, 8, capacity_gib=40, hw=GPU)
    assert result.fits and result.too_big > 0 and result.refused > 0
    times = [c.step.seconds for c in result.fits]
    assert times == sorted(times)
    seen = set()
    for c in result.fits:
        assert c.peak_bytes + c.reserve_bytes <= 40 * GIB
        check = load_config(["recipe=llama7b_fsdp", *c.override_args()])
        check.dry_run, check.training.device = True, "auto"
        assert validate(check, 8) == [], c.keys
        plan = derive(check, 8, capacity_gib=40, device="cuda")
        assert plan.memory.peak_bytes == c.peak_bytes
        layout = tuple(v for k, v in c.keys.items() if k not in ("parallel.ac", "parallel.offload"))
        assert layout not in seen  # one configuration per layout and micro-batch: the lightest that fits
        seen.add(layout)
        lighter = AC_ORDER[: AC_ORDER.index(c.keys["parallel.ac"])]
        for ac in lighter:  # every lighter AC was tried and did not fit
            OmegaConf.update(check, "parallel.ac", ac)
            if not validate(check, 8):
                assert derive(check, 8, capacity_gib=40, device="cuda").memory.peak_bytes + c.reserve_bytes > 40 * GIB
    # and nothing is missed: a layout is in the result exactly when some AC mode (with or without offload) of it
    # passes validation and fits, tried here one by one
    from trainer.search import layouts

    base = load_config(["recipe=llama7b_fsdp"])
    base.dry_run, base.training.device = True, "auto"
    cps = set()
    for data, dr, tp, pp, cp, sched, mb in layouts(base, model_args_of(base), 8, 8):
        cps.add(cp)
        fits_somehow = False
        for off in ("none", "cpu"):
            for ac in AC_ORDER:
                for k, v in {
                    "parallel.data": data,
                    "parallel.dp_replicate": dr if data == "hsdp" else 1,
                    "parallel.dp_shard": -1,
                    "parallel.tp": tp,
                    "parallel.pp": pp,
                    "parallel.cp": cp,
                    "parallel.pp_schedule": sched,
                    "training.micro_batch_size": mb,
                    "parallel.ac": ac,
                    "parallel.offload": off,
                }.items():
                    OmegaConf.update(base, k, v)
                if not validate(base, 8):
                    mem = derive(base, 8, capacity_gib=40, device="cuda").memory
                    fits_somehow |= mem.peak_bytes + mem.reserve_bytes <= 40 * GIB
        assert ((data, dr, tp, pp, cp, sched, mb) in {_layout_of(c) for c in result.fits}) == fits_somehow, (
            data,
            dr,
            tp,
            pp,
            cp,
            sched,
            mb,
        )
    assert cps == {1, 2, 4, 8}  # context parallelism is searched too (4,096 tokens: chunks of 256 at cp 8)


def _layout_of(c) -> tuple:
    k = c.keys
    return (
        k["parallel.data"],
        k["parallel.dp_replicate"],
        k["parallel.tp"],
        k["parallel.pp"],
        k["parallel.cp"],
        k["parallel.pp_schedule"],
        k["training.micro_batch_size"],
    )


def test_plan_search_cli(tmp_path):
    def plan(*args):
        return subprocess.run(
            [sys.executable, str(REPO / "launch" / "plan.py"), *args],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=REPO,
        )

    # the refusal and the second search in-process (plan.py's main); the first search as its own process
    missing = run_cli("plan.py", ["recipe=llama7b_fsdp", "--search"])
    assert missing.returncode == 2 and "gpu_memory_gib" in missing.stderr and "Traceback" not in missing.stderr
    out = plan("recipe=llama7b_fsdp", "world_size=8", "gpu_memory_gib=80", "--search", "--json", "top=3")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert len(got["fits"]) == 3 and got["hardware"]["source"]["matmul_flops"].startswith("assumed")
    assert got["fits"][0]["step"]["seconds"] <= got["fits"][1]["step"]["seconds"]
    given = run_cli(
        "plan.py",
        ["recipe=llama7b_fsdp", "world_size=8", "gpu_memory_gib=80", "--search", "--json", "top=1", "tflops=100"],
    )
    assert json.loads(given.stdout)["hardware"]["matmul_flops"] == 100e12


def test_pipeline_sends_cross_nodes_when_context_parallelism_spreads_the_stages():
    """pp 2 x dp 2 x cp 2 x tp 2 on nodes of 8: a stage's neighbour is dp x cp x tp = 8 ranks away, on the next
    node (the stride counted without cp, 4, put both stages on one node and the sends on NVLink)."""
    base = ["recipe=llama7b_fsdp", "training.global_batch_size=16", "training.micro_batch_size=1"]
    st, plan, cfg = _time([*base, "parallel.pp=2", "parallel.tp=2", "parallel.cp=2", "training.seq_len=4096"], 16)
    assert (plan.dims.pp, plan.dims.dp_size, plan.dims.cp, plan.dims.tp) == (2, 2, 2, 2)
    n_micro = 16 // (1 * 2)
    latency = n_micro * GPU.latency_s  # rank 0 holds the first stage: the model counts its one send per microbatch
    assert st.parts["pp_comm"] == pytest.approx(latency + st.comm_bytes["PP sends"] / GPU.inter_bw)


def test_the_assumed_matmul_fraction_is_a_stated_parameter():
    """ACHIEVABLE is an assumption (no GPU run measured it): every ranking prints it as one, `achievable=` sets
    it, and it moves the compute time by its ratio; MFU is against the datasheet peak either way."""
    from helpers import run_cli

    base = ["recipe=llama7b_fsdp", "world_size=8", "gpu_memory_gib=80", "--search", "max_pp=1", "top=1"]
    default = run_cli("plan.py", base)
    assert default.returncode == 0, default.stderr
    assert "matmul: assumed: 60% of the 989 TFLOP/s datasheet peak, no measured run (achievable=)" in default.stdout
    half = run_cli("plan.py", [*base, "achievable=0.3"])
    assert "assumed: 30% of the 989 TFLOP/s datasheet peak" in half.stdout
    slow, fast = gpu_hardware(80, "bf16", achievable=0.3), gpu_hardware(80, "bf16")
    assert slow.matmul_flops == pytest.approx(fast.matmul_flops / 2) and slow.peak_flops == fast.peak_flops == 989e12
    a, *_ = _time(["recipe=llama7b_fsdp"], 8, hw=slow)
    b, *_ = _time(["recipe=llama7b_fsdp"], 8, hw=fast)
    assert a.parts["compute"] == pytest.approx(2 * b.parts["compute"])
    bad = run_cli("plan.py", [*base, "achievable=1.5"])
    assert bad.returncode != 0 and "achievable=1.5 must be in (0, 1]" in bad.stderr


def test_every_search_ranking_states_the_time_models_measured_error(tmp_path):
    """The search table carries the time model's error as measured by the one compare.py run that timed it
    (docs/compare/compare.csv, re-read each time), and says so when no such file exists."""
    import csv
    import statistics

    from trainer.search import MEASURED_ERRORS, time_model_error

    with open(MEASURED_ERRORS) as f:
        rows = [r for r in csv.DictReader(f) if r["step_time_error_pct"]]
    errors = [abs(float(r["step_time_error_pct"])) for r in rows]
    line = time_model_error()
    assert f"({len(rows)} strategies" in line and f"{statistics.median(errors):.0f}% in the median" in line
    assert f"{max(errors):.0f}% at most" in line and "never measured on a GPU" in line
    assert "never measured here" in time_model_error(tmp_path / "missing.csv")
    out = run_cli("plan.py", ["recipe=llama7b_fsdp", "world_size=8", "gpu_memory_gib=80", "--search", "top=3"])
    assert out.returncode == 0 and line in out.stdout, out.stdout[-2000:]
