"""Benchmark a recipe: `python launch/bench.py recipe=llama_debug steps=10`, or under torchrun.

Builds the recipe's Trainer (every override of launch/train.py applies), runs `warmup` steps that are not
counted (compilation, allocator growth, DDP's bucket rebuild), then `steps` timed steps with one device
synchronization at the end, then `profile_steps` steps under torch.profiler for the per-phase split, then one step
under the memory tracker. Prints a table and writes JSON (`out`, default <run_dir>/bench.json) with:

- tokens/s per device, TFLOP/s per device, MFU (model FLOPs) and HFU (recomputation counted), each against the
  matmul rate measured on this device at start and against the vendor's peak where it is known;
- the peak memory of the timed steps (CUDA allocated and reserved; peak RSS on CPU), the tracker's breakdown of
  every rank (parallel/memory.py) and the planner's prediction for the most loaded rank (parallel/plan.py);
- the profiled steps split by phase (data, forward, backward, optimizer step) and on the device timeline
  (compute, communication, exposed communication, idle), read from the trace (trainer/profiling.py::phase_split);
  the trace itself under <run_dir>/profile/, for Perfetto or TensorBoard's profiler plugin;
- the start-up time (model build, initialization and wrapping: the Trainer's construction).

Bench's own keys (no dot): steps (10), warmup (3), profile_steps (2; 0: no trace), out. Checkpoints, validation,
TensorBoard and W&B are off; the run directory defaults to runs/bench-<recipe>.

`python launch/bench.py --report RESULTS.jsonl [ANCHOR.log ...]` prints the markdown table of a set of results
(one JSON object per line), each against the best row of ../shared/bench/plain_torch_llama.py's output of the
same shape.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from models.args import model_args_of
from parallel.memory import StepMemory
from parallel.mesh import env_world_size
from parallel.timing import gpu_hardware, step_time
from trainer.config import ConfigError, load_config
from trainer.profiling import phase_split
from trainer.trainer import Trainer
from trainer.validate import check

OWN = {"steps": 10, "warmup": 3, "profile_steps": 2, "out": None}


def split_args(argv: list[str]) -> tuple[dict, list[str]]:
    """bench's own keys and the Trainer's overrides."""
    own, rest = dict(OWN), []
    for a in argv:
        key, _, value = a.partition("=")
        if key in OWN and "." not in key:
            if key != "out" and not value.isdigit():
                raise SystemExit(f"shardwise bench: {key}={value!r} must be a whole number (e.g. {key}={OWN[key]})")
            own[key] = value if key == "out" else int(value)
        else:
            rest.append(a)
    if own["steps"] < 1:
        raise SystemExit(f"shardwise bench: steps={own['steps']} must be at least 1")
    return own, rest


def matmul_tflops(device, dtype) -> float:
    """The achieved rate of a square matmul in the compute dtype (8192 on a GPU, 1024 on CPU), TFLOP/s."""
    import torch

    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn_like(a)
    reps = 20 if device.type == "cuda" else 5
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hw_flops_ratio(cfg, plan) -> float:
    """Hardware FLOPs over model FLOPs: parallel/timing.py's count of what activation checkpointing reruns."""

    st = step_time(cfg, model_args_of(cfg), plan.dims, gpu_hardware(None, str(cfg.training.precision)))
    return st.hw_flops / st.flops if st.flops else 1.0


def run(argv: list[str]) -> dict:
    own, overrides = split_args(argv)
    import torch
    import torch.distributed as dist

    total = own["warmup"] + own["steps"] + own["profile_steps"] + 1
    cfg = load_config(
        [
            *overrides,
            f"training.steps={total}",
            "training.val_every=0",
            "checkpoint.every=0",
            "logging.tensorboard=false",
            "logging.wandb.mode=disabled",
            "logging.memory_breakdown=false",
        ]
    )
    if int(cfg.optim.warmup_steps) > total:
        cfg.optim.warmup_steps = total  # the learning-rate warm-up does not change the speed
    if not any(a.startswith("run_dir=") for a in overrides):
        cfg.run_dir = f"runs/bench-{cfg.name}"
    plan = check(cfg, env_world_size())

    t0 = time.perf_counter()
    trainer = Trainer(cfg, plan)
    startup = time.perf_counter() - t0
    dev, rank, world = trainer.device, trainer.world.rank, trainer.world.world_size
    precision = str(cfg.training.precision)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    measured_peak = matmul_tflops(dev, dtype)
    for _ in range(own["warmup"]):
        trainer.run_step()
    sync(dev)
    trainer.memory.reset()
    t0 = time.perf_counter()
    for _ in range(own["steps"]):
        loss, _ = trainer.run_step()
    sync(dev)
    step_s = (time.perf_counter() - t0) / own["steps"]
    memory = trainer.memory.stats()
    loss = trainer._all_reduce_sum(trainer._all_reduce_sum(loss.clone(), "pp")).item()

    split = None
    if own["profile_steps"]:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if dev.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        trace = Path(cfg.run_dir) / "profile" / f"bench-rank{rank}.pt.trace.json"
        trace.parent.mkdir(parents=True, exist_ok=True)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(own["profile_steps"]):
                trainer.run_step()
            sync(dev)
        prof.export_chrome_trace(str(trace))
        split = phase_split(json.loads(trace.read_text())["traceEvents"], own["profile_steps"])
        split["trace"] = str(trace)

    with StepMemory(trainer.par, trainer.optimizer) as tracked:
        trainer.run_step()
    mine = tracked.breakdown()
    ranks = [mine]
    if world > 1:
        ranks = [None] * world
        dist.all_gather_object(ranks, mine, group=trainer.side_group)

    tokens_per_s = plan.tokens_per_step / step_s / world
    tflops = plan.flops_per_token * tokens_per_s / 1e12
    ratio = hw_flops_ratio(cfg, plan)
    vendor = trainer.peak_tflops  # logging.peak_tflops, else a known GPU's datasheet peak (trainer/metrics.py)
    top = plan.memory.most_loaded
    result = {
        "recipe": cfg.name,
        "overrides": [a for a in overrides if not a.startswith(("run_dir=", "recipe="))],
        "layout": plan.dims.describe(),
        "params": plan.params,
        "seq_len": int(cfg.training.seq_len),
        "micro_batch_size": int(cfg.training.micro_batch_size),
        "world_size": world,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "precision": precision,
        "tokens_per_step": plan.tokens_per_step,
        "warmup_steps": own["warmup"],
        "timed_steps": own["steps"],
        "startup_s": startup,
        "step_s": step_s,
        "tokens_per_s_per_device": tokens_per_s,
        "tflops_per_device": tflops,
        "hw_tflops_per_device": tflops * ratio,
        "matmul_tflops_measured": measured_peak,
        "vendor_peak_tflops": vendor,
        "mfu_vs_measured": tflops / measured_peak,
        "hfu_vs_measured": tflops * ratio / measured_peak,
        "mfu_vs_vendor": tflops / vendor if vendor else None,
        "hfu_vs_vendor": tflops * ratio / vendor if vendor else None,
        "loss": loss,
        "memory": memory,
        "tracked": ranks,
        "tracked_peak_bytes": max(r["peak"] for r in ranks),
        "predicted_peak_bytes": top.peak_bytes,
        "predicted_categories": top.by_category(),
        "predicted_host_bytes": top.host_bytes,
        "split": split,
        "run_dir": str(cfg.run_dir),
        "data": trainer.data_description,
        "sequences_per_epoch": int(trainer.train_loader.source.num_samples),
    }
    trainer.close()
    return result


def table(r: dict) -> str:
    mib = 2**20

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    lines = [
        f"{r['recipe']} {' '.join(r['overrides'])} | {r['layout']} | {r['device']} x {r['world_size']} | "
        f"torch {r['torch']}",
        f"  start-up {r['startup_s']:.1f} s; {r['timed_steps']} steps after {r['warmup_steps']} of warm-up: "
        f"{r['step_s']:.4f} s/step, {r['tokens_per_s_per_device']:,.0f} tokens/s/device, "
        f"{r['tflops_per_device']:.2f} TFLOP/s ({r['hw_tflops_per_device']:.2f} with recompute)",
        f"  MFU {pct(r['mfu_vs_measured'])} / HFU {pct(r['hfu_vs_measured'])} of the measured matmul rate "
        f"({r['matmul_tflops_measured']:.1f} TFLOP/s); of the vendor peak: MFU {pct(r['mfu_vs_vendor'])}, "
        f"HFU {pct(r['hfu_vs_vendor'])}",
        f"  memory: predicted {r['predicted_peak_bytes'] / mib:,.1f} MiB, "
        f"tracked {r['tracked_peak_bytes'] / mib:,.1f} MiB "
        f"(most loaded rank); " + ", ".join(f"{k} {v:.2f}" for k, v in r["memory"].items()),
    ]
    s = r.get("split")
    if s:
        ph = ", ".join(f"{k} {1e3 * v:.1f}" for k, v in s["phases"].items())
        d = s["device"]
        lines.append(f"  per step (ms): {ph}")
        lines.append(
            f"  device ({s['timeline']}): window {1e3 * d['window']:.1f}, compute {1e3 * d['compute']:.1f}, "
            f"communication {1e3 * d['communication']:.1f} (exposed {1e3 * d['communication_exposed']:.1f}), "
            f"idle {1e3 * d['idle']:.1f}"
        )
    return "\n".join(lines)


def anchor_rows(path: Path) -> list[dict]:
    """The variant rows ../shared/bench/plain_torch_llama.py printed (one JSON object per line)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            if "tokens_per_s" in r:
                rows.append(r)
    return rows


def report(results: list[dict], anchors: list[dict]) -> str:
    """A markdown table of bench results, each against the best anchor row of its shape (the same sequence length
    and parameter count, to 2%) measured in the same job: docs/benchmarks.md's table."""
    head = (
        "| run | tokens/s/device | vs anchor | MFU (measured matmul / vendor) | HFU | start-up | peak predicted | "
        "tracked | allocated | reserved |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    gib = 2**30
    lines = [head]
    for r in results:
        # (the anchor rounds its parameter count to 1e6: a tiny model matches within that rounding)
        same = [
            a
            for a in anchors
            if a["seq"] == r["seq_len"] and abs(a["params_b"] * 1e9 - r["params"]) <= max(0.02 * r["params"], 5e5)
        ]
        best = max(same, key=lambda a: a["tokens_per_s"], default=None)
        ratio = (
            f"{r['tokens_per_s_per_device'] / best['tokens_per_s']:.3f}x of {best['tokens_per_s']:,}" if best else "-"
        )
        mem = r["memory"]
        vendor = "-" if r["mfu_vs_vendor"] is None else f"{100 * r['mfu_vs_vendor']:.1f}%"
        alloc = mem.get("mem/peak_allocated_gib")
        res = mem.get("mem/peak_reserved_gib")
        lines.append(
            f"| {r['recipe']} {' '.join(r['overrides'])} | {r['tokens_per_s_per_device']:,.0f} | {ratio} | "
            f"{100 * r['mfu_vs_measured']:.1f}% / {vendor} | {100 * r['hfu_vs_measured']:.1f}% | "
            f"{r['startup_s']:.1f} s | {r['predicted_peak_bytes'] / gib:.2f} GiB | "
            f"{r['tracked_peak_bytes'] / gib:.2f} GiB | {'-' if alloc is None else f'{alloc:.2f} GiB'} | "
            f"{'-' if res is None else f'{res:.2f} GiB'} |"
        )
    if anchors:
        lines += ["", "| anchor (plain PyTorch) | tokens/s | MFU | peak |", "| --- | ---: | ---: | ---: |"]
        for a in anchors:
            lines.append(
                f"| {a['size']} seq {a['seq']} batch {a['bs']} ac {a['ac']} compile {a['compile']} {a['opt']} "
                f"{a['mode']} | {a['tokens_per_s']:,} | {100 * a['mfu_vs_measured_peak']:.1f}% | "
                f"{a['peak_mem_gib']} GiB |"
            )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    if argv[0] == "--report":  # bench.py --report RESULTS.jsonl [ANCHOR.log ...]: the markdown table
        results = [json.loads(line) for line in Path(argv[1]).read_text().splitlines() if line.strip()]
        anchors = [row for path in argv[2:] for row in anchor_rows(Path(path))]
        print(report(results, anchors))
        return 0

    try:
        result = run(argv)
    except ConfigError as e:
        print(f"shardwise: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        own, _ = split_args(argv)
        out = Path(own["out"] or Path(result["run_dir"]) / "bench.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(table(result))
        print(f"bench: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
