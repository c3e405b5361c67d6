"""Predict every byte per rank before launch, and whether it fits:

    python launch/plan.py recipe=llama70b_3d world_size=512 gpu_memory_gib=80 [key=value ...] [--json]
    python launch/plan.py recipe=llama8b_fsdp_tp world_size=16 gpu_memory_gib=80 --simulate
    python launch/plan.py recipe=llama7b_fsdp world_size=8 --build
    python launch/plan.py recipe=llama70b world_size=64 gpu_memory_gib=80 --search

The recipe and overrides are those of launch/train.py and are validated the same way (one message naming
every problem). `world_size` is the number of ranks (default: the recipe's `hardware.world_size`, else 8),
`ranks_per_node` (default 8) sizes the host memory per node that offloaded state needs, `gpu_memory_gib` the
device to fit (default: the recipe's `hardware.gpu_memory_gib`; with neither, only predict), `host_memory_gib` the
host memory of a node that the offloaded state must fit (default: the recipe's `hardware.host_memory_gib`; with
neither, no host verdict),
`device` (cuda, the default when gpu_memory_gib is given, or cpu) picks the device reserve.
`--json` prints the same numbers as JSON (peak tensor bytes per rank under `peak_bytes`, the device reserve
apart under `reserve_bytes`). `--simulate` builds the most loaded rank for real on this machine, without
the hardware (torch's fake process group, FakeTensorMode, the tracker), runs one step and prints the
measured breakdown beside the prediction. `--build` builds that rank with real tensors on this machine (the fake
process group: no communication, no other rank needed) and reports what starting it costs: seconds, growth of
the peak host memory, parameter bytes held.
`--search` enumerates the layouts validation accepts (data strategy, dp/tp/pp degrees, pipeline schedule,
micro-batch, AC, offload), keeps those predicted to fit in gpu_memory_gib (and host_memory_gib per node, when
given) and ranks them by the step time parallel/timing.py predicts; `top` (default 15) rows are printed.
The rates are a GPU's assumed ones (device=cuda: the matmul rate `achievable` (default 0.6, an assumption no run
has measured) of the datasheet's peak; tflops=, intra_gbps=, inter_gbps=, hbm_gbps=, pcie_gbps=
override them; measured when this machine has a GPU) or, with device=cpu, measured on this machine.
`max_pp` caps the pipeline degree tried.
An MoE model under expert parallelism (`parallel.ep`) gets three peaks, for the routing its experts' rows are sized
for: balanced, observed (`expert_load=` a run's metrics.jsonl: its largest logged max/mean tokens per expert) and
worst (every token of the ep group to one rank's experts), and the bytes each rank sends by all-to-all per step.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from models.args import model_args_of
from models.moe import moe_args_of
from parallel.memory_terms import EXPERT_LOADS, expert_exchange_bytes, expert_load
from parallel.timing import ACHIEVABLE, calibrate_cpu, calibrate_cuda, gpu_hardware, override, step_time
from trainer.config import ConfigError, load_config
from trainer.metrics import observed_expert_load
from trainer.search import search, table
from trainer.validate import derive, validate  # noqa: E402

OWN_KEYS = {
    "world_size": int,
    "gpu_memory_gib": float,
    "ranks_per_node": int,
    "device": str,
    "top": int,
    "host_memory_gib": float,
    "max_pp": int,
    "achievable": float,
    "tflops": float,
    "intra_gbps": float,
    "inter_gbps": float,
    "hbm_gbps": float,
    "pcie_gbps": float,
    "expert_load": str,
}
FLAGS = ("--json", "--simulate", "--build", "--search")


def parse(argv: list[str]) -> tuple[dict, list[str], set[str]]:
    own, rest, flags = {k: None for k in OWN_KEYS}, [], set()
    own.update(ranks_per_node=8, top=15)  # (world_size and gpu_memory_gib: the recipe's `hardware` when not given)
    for tok in argv:
        if tok.startswith("--"):
            if tok not in FLAGS:
                raise ConfigError(f"{tok}: unknown flag; known: {', '.join(FLAGS)}")
            flags.add(tok)
            continue
        key, _, value = tok.partition("=")
        if key in OWN_KEYS:
            try:
                own[key] = OWN_KEYS[key](value)
            except ValueError:
                raise ConfigError(f"{key}={value}: expected {OWN_KEYS[key].__name__}") from None
        else:
            rest.append(tok)
    if len(flags & {"--simulate", "--build", "--search"}) > 1:
        raise ConfigError("--simulate, --build and --search each need a process of their own: pass one of them")
    return own, rest, flags


def with_defaults(own: dict, cfg, flags: set[str]) -> dict:
    """world_size, gpu_memory_gib and host_memory_gib from the recipe's `hardware` section where the command line
    gave none."""
    own = dict(own)
    if own["world_size"] is None:
        own["world_size"] = cfg.hardware.world_size or 8
    if own["gpu_memory_gib"] is None:
        own["gpu_memory_gib"] = cfg.hardware.gpu_memory_gib
    if own["host_memory_gib"] is None:
        own["host_memory_gib"] = cfg.hardware.host_memory_gib
    if own["host_memory_gib"] is not None and own["host_memory_gib"] <= 0:
        raise ConfigError(f"host_memory_gib={own['host_memory_gib']} must be > 0: the host memory of one node")
    if "--search" in flags and own["gpu_memory_gib"] is None:
        raise ConfigError("--search needs the memory to fit: add gpu_memory_gib=N (e.g. gpu_memory_gib=80)")
    if own["world_size"] < 1:
        raise ConfigError(f"world_size={own['world_size']} must be >= 1")
    if own["device"] is None:
        own["device"] = "cuda" if own["gpu_memory_gib"] is not None else "cpu"
    if own["achievable"] is not None and not 0 < own["achievable"] <= 1:
        raise ConfigError(
            f"achievable={own['achievable']} must be in (0, 1]: the fraction of the datasheet's matmul peak a GPU "
            f"reaches (default {ACHIEVABLE}, an assumption)"
        )
    if own["device"] not in ("cuda", "cpu"):
        raise ConfigError(f"device={own['device']}: expected cuda or cpu")
    return own


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        own, rest, flags = parse(argv)
        cfg = load_config(rest)
        own = with_defaults(own, cfg, flags)
        cfg.dry_run = True  # planning writes nothing: skip the run_dir check
        if own["device"] == "cuda":
            cfg.training.device = "auto"  # plan for a GPU from a machine that may have none
        if "--search" in flags:  # the recipe's own layout need not suit this world size: every one is tried
            return _search(cfg, own, json_out="--json" in flags)
        problems = validate(cfg, own["world_size"])
        if problems:
            raise ConfigError(problems)
        plan = _derive(cfg, own)
        if own["host_memory_gib"] is not None:
            plan.memory.host_capacity_bytes = int(own["host_memory_gib"] * 2**30)
        routings = _expert_routings(cfg, plan, own)
    except ConfigError as e:
        print(f"shardwise: {e}", file=sys.stderr)
        return 2
    simulated, rank = None, plan.memory.most_loaded_rank(plan.dims)
    if "--simulate" in flags:
        from trainer.simulate import simulate

        try:
            simulated = simulate(cfg, own["world_size"], rank=rank, device=own["device"])
        except ValueError as e:
            print(f"shardwise: {e}", file=sys.stderr)
            return 2
    built = None
    if "--build" in flags:
        from trainer.simulate import build_cost

        built = build_cost(cfg, own["world_size"], rank=rank)
    timed = _step_time(cfg, plan, own)
    if "--json" in flags:
        out = {
            "recipe": cfg.name,
            "world_size": own["world_size"],
            "layout": plan.dims.describe(),
            **plan.memory.to_json(),
        }
        if timed is not None:
            out["step_time"] = timed[1].to_json()
        if simulated is not None:
            out["simulated"], out["simulated_rank"] = simulated, rank
        if built is not None:
            out["build"] = built
        if routings:
            out["expert_routing"] = routings
        print(json.dumps(out, indent=2))
        return 0
    print(
        f"{cfg.name}: {plan.params / 1e9:.2f} B parameters, world {own['world_size']} "
        f"({plan.dims.describe()}), {cfg.parallel.data}, {cfg.training.precision}, AC {cfg.parallel.ac}, "
        f"micro-batch {plan.micro_batch_size} x {cfg.training.seq_len} tokens, {plan.accum_steps} micro-batches"
    )
    print(plan.memory.table())
    if routings:
        big = routings["balanced"]["peak_bytes"] >= 2**30
        peaks = ", ".join(
            f"{k} {v['peak_bytes'] / 2**30:.2f} GiB" if big else f"{k} {v['peak_bytes'] / 2**20:.1f} MiB"
            for k, v in routings.items()
            if k != "all_to_all"
        )
        loads = ", ".join(f"{k} {v['load']:.2f}" for k, v in routings.items() if k != "all_to_all")
        print(
            f"expert routing     most loaded rank's peak: {peaks} (rows per rank over balanced: {loads}); "
            f"all-to-all {routings['all_to_all'] / 2**20:,.1f} MiB sent per rank per step (balanced)"
        )
    if timed is not None:
        hw, st = timed
        print(
            f"step time          {st.seconds:>10.3f} s  {st.tokens_per_sec_per_device:,.0f} tokens/s/device, "
            f"parallel/timing.py with {hw.name} rates ({'; '.join(sorted(set(hw.source.values())))})"
        )
    if simulated is not None:
        from trainer.simulate import comparison

        print(comparison(plan.memory, simulated))
    if built is not None:
        gib = 2**30
        predicted = plan.memory.most_loaded.by_category().get("params", 0)
        # (under DeepSpeed the planner's parameters are those of training: cast to 16 bits, ZeRO-3's gathered ones)
        versus = "" if str(cfg.parallel.data).startswith("zero") else f" (predicted: {predicted / gib:.3f} GiB)"
        print(
            f"\nbuilding rank {rank} of {own['world_size']} on this machine (real tensors, fake process group): "
            f"{built['seconds']:.1f} s, peak host memory +{built['peak_host_growth_bytes'] / gib:.2f} GiB, "
            f"parameters held {built['param_bytes'] / gib:.3f} GiB{versus}"
        )
    return 0


def _derive(cfg, own: dict, expert_routing=None):
    """The plan at the command line's world size, device and GPU (trainer/validate.py `derive`)."""
    return derive(
        cfg,
        own["world_size"],
        capacity_gib=own["gpu_memory_gib"],
        device=own["device"],
        ranks_per_node=own["ranks_per_node"],
        expert_routing=expert_routing,
    )


def _expert_routings(cfg, plan, own: dict) -> dict:
    """Under expert parallelism: the most loaded rank's peak for each routing (memory_terms.py `expert_load`), and
    the all-to-all bytes; {} otherwise."""
    moe = moe_args_of(cfg.model.get("moe"))
    if moe is None or plan.dims.ep <= 1:
        if own["expert_load"] is not None:
            raise ConfigError(f"expert_load={own['expert_load']}: only under expert parallelism (parallel.ep > 1)")
        return {}
    out = {}
    for routing in EXPERT_LOADS:
        if routing == "observed":
            if own["expert_load"] is None:
                continue
            try:
                routing_value = observed_expert_load(own["expert_load"])
            except (OSError, ValueError) as e:
                raise ConfigError(f"expert_load={own['expert_load']}: {e}") from None
        else:
            routing_value = routing
        p = _derive(cfg, own, expert_routing=routing_value)
        load = expert_load(cfg, moe, plan.dims.ep, routing_value)
        out[routing] = {"peak_bytes": p.memory.most_loaded.peak_bytes, "load": load}
    out["all_to_all"] = expert_exchange_bytes(cfg, model_args_of(cfg), plan.dims)
    return out


def _step_time(cfg, plan, own: dict):
    """(hardware, the time model's step) on a GPU of gpu_memory_gib, with assumed datasheet rates; None without
    a GPU size (the rates would be guesses of which card)."""
    if own["gpu_memory_gib"] is None or own["device"] != "cuda":
        return None

    hw = _hardware(cfg, own)
    return hw, step_time(
        cfg, model_args_of(cfg), plan.dims, hw, ranks_per_node=own["ranks_per_node"], device=own["device"]
    )


def _hardware(cfg, own: dict):
    """Measured rates (this CPU, or the GPU if there is one), else the datasheet's; the given rates override."""

    rates = {k: own[k] for k in ("tflops", "intra_gbps", "inter_gbps", "hbm_gbps", "pcie_gbps")}
    if own["device"] == "cpu":
        hw = calibrate_cpu(cfg, own["world_size"])
    else:
        import torch

        hw = (
            calibrate_cuda(cfg, own["gpu_memory_gib"])
            if torch.cuda.is_available()
            else gpu_hardware(
                own["gpu_memory_gib"], str(cfg.training.precision), achievable=own["achievable"] or ACHIEVABLE
            )
        )
    return override(hw, **rates)


def _search(cfg, own: dict, *, json_out: bool) -> int:
    hw = _hardware(cfg, own)
    result = search(
        cfg,
        own["world_size"],
        capacity_gib=own["gpu_memory_gib"],
        hw=hw,
        ranks_per_node=own["ranks_per_node"],
        host_memory_gib=own["host_memory_gib"],
        device=own["device"],
        max_pp=own["max_pp"],
    )
    if json_out:
        print(
            json.dumps(
                {
                    "recipe": cfg.name,
                    "world_size": own["world_size"],
                    "hardware": hw.to_json(),
                    "layouts": result.layouts,
                    "refused": result.refused,
                    "too_big": result.too_big,
                    "fits": [c.to_json() for c in result.fits[: own["top"]]],
                },
                indent=2,
            )
        )
        return 0
    print(
        f"{cfg.name} at world {own['world_size']} ({own['ranks_per_node']} ranks per node), "
        f"{cfg.training.precision}, global batch {cfg.training.global_batch_size} x {cfg.training.seq_len} tokens"
    )
    print(table(result, top=own["top"], capacity_gib=own["gpu_memory_gib"], hw=hw))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
