"""Predict every byte per rank before launch, and whether it fits:

    python launch/plan.py recipe=llama70b_3d world_size=512 gpu_memory_gib=80 [key=value ...] [--json]
    python launch/plan.py recipe=llama8b_fsdp_tp world_size=16 gpu_memory_gib=80 --simulate
    python launch/plan.py recipe=llama7b_fsdp world_size=8 --build

The recipe and overrides are those of launch/train.py and are validated the same way (one message naming
every problem). `world_size` (default 8) is the number of ranks, `ranks_per_node` (default 8) sizes the host
memory per node that offloaded state needs, `gpu_memory_gib` the device to fit (omit it to only predict),
`device` (cuda, the default when gpu_memory_gib is given, or cpu) picks the device reserve.
`--json` prints the same numbers as JSON (peak tensor bytes per rank under `peak_bytes`, the device reserve
apart under `reserve_bytes`). `--simulate` builds the most loaded rank for real on this machine, without
the hardware (torch's fake process group, FakeTensorMode, the tracker), runs one step and prints the
measured breakdown beside the prediction. `--build` builds that rank with real tensors on this machine (the fake
process group: no communication, no other rank needed) and reports what starting it costs: seconds, growth of
the peak host memory, parameter bytes held.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from trainer.config import ConfigError, derive, load_config, validate  # noqa: E402

OWN_KEYS = {"world_size": int, "gpu_memory_gib": float, "ranks_per_node": int, "device": str}


def parse(argv: list[str]) -> tuple[dict, list[str], set[str]]:
    own, rest, flags = {"world_size": 8, "gpu_memory_gib": None, "ranks_per_node": 8, "device": None}, [], set()
    for tok in argv:
        if tok.startswith("--"):
            if tok not in ("--json", "--simulate", "--build"):
                raise ConfigError(f"{tok}: unknown flag; known: --json, --simulate, --build")
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
    if {"--simulate", "--build"} <= flags:
        raise ConfigError("--simulate and --build each need a process of their own: pass one of them")
    if own["world_size"] < 1:
        raise ConfigError(f"world_size={own['world_size']} must be >= 1")
    if own["device"] is None:
        own["device"] = "cuda" if own["gpu_memory_gib"] is not None else "cpu"
    if own["device"] not in ("cuda", "cpu"):
        raise ConfigError(f"device={own['device']}: expected cuda or cpu")
    return own, rest, flags


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        own, rest, flags = parse(argv)
        cfg = load_config(rest)
        cfg.dry_run = True  # planning writes nothing: skip the run_dir check
        if own["device"] == "cuda":
            cfg.training.device = "auto"  # plan for a GPU from a machine that may have none
        problems = validate(cfg, own["world_size"])
        if problems:
            raise ConfigError(problems)
        plan = derive(cfg, own["world_size"], capacity_gib=own["gpu_memory_gib"], device=own["device"],
                      ranks_per_node=own["ranks_per_node"])
    except ConfigError as e:
        print(f"shardwise: {e}", file=sys.stderr)
        return 2
    simulated, rank = None, plan.memory.most_loaded_rank(plan.dims)
    if "--simulate" in flags:
        from parallel.simulate import simulate

        try:
            simulated = simulate(cfg, own["world_size"], rank=rank, device=own["device"])
        except ValueError as e:
            print(f"shardwise: {e}", file=sys.stderr)
            return 2
    built = None
    if "--build" in flags:
        from parallel.simulate import build_cost

        built = build_cost(cfg, own["world_size"], rank=rank)
    if "--json" in flags:
        out = {"recipe": cfg.name, "world_size": own["world_size"], "layout": plan.dims.describe(),
               **plan.memory.to_json()}
        if simulated is not None:
            out["simulated"], out["simulated_rank"] = simulated, rank
        if built is not None:
            out["build"] = built
        print(json.dumps(out, indent=2))
        return 0
    print(f"{cfg.name}: {plan.params / 1e9:.2f} B parameters, world {own['world_size']} "
          f"({plan.dims.describe()}), {cfg.parallel.data}, {cfg.training.precision}, AC {cfg.parallel.ac}, "
          f"micro-batch {plan.micro_batch_size} x {cfg.training.seq_len} tokens, {plan.accum_steps} micro-batches")
    print(plan.memory.table())
    if simulated is not None:
        from parallel.simulate import comparison

        print(comparison(plan.memory, simulated))
    if built is not None:
        gib = 2**30
        predicted = plan.memory.most_loaded.by_category().get("params", 0)
        # (under DeepSpeed the planner's parameters are those of training: cast to 16 bits, ZeRO-3's gathered ones)
        versus = "" if str(cfg.parallel.data).startswith("zero") else f" (predicted: {predicted / gib:.3f} GiB)"
        print(f"\nbuilding rank {rank} of {own['world_size']} on this machine (real tensors, fake process group): "
              f"{built['seconds']:.1f} s, peak host memory +{built['peak_host_growth_bytes'] / gib:.2f} GiB, "
              f"parameters held {built['param_bytes'] / gib:.3f} GiB{versus}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
