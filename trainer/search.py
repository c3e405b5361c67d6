"""Every layout of a recipe at a world size: which the validation accepts, which fit, ranked by predicted step time.

`search(cfg, world_size, capacity_gib=80, hw=gpu_hardware(80, "bf16"))` enumerates the data strategy (none, ddp,
fsdp, hsdp with every replica count, zero1-3), the tensor-parallel degree (divisors of the world up to a node that
divide the heads), the pipeline degree and schedule (1f1b, interleaved_1f1b, zbv), the micro-batch (1, 2, 4, 8, the
global batch kept), activation checkpointing and offload, and for an MoE model the expert-parallel degree
(`parallel.ep`: 1, the experts sharded by FSDP alone, and every divisor of dp_shard that divides the experts). For
one layout and micro-batch only the lightest configuration that fits is kept: AC none, then selective, then full,
and CPU offload only where nothing fits without it. Those are slower by construction (recompute, host steps) and
hold less memory, so under the time model (parallel/timing.py) a heavier one never ranks above a lighter one that
fits.
Each candidate goes through trainer/config.py's `validate` and parallel/plan.py's memory plan, as a run would.
"""

from __future__ import annotations

import copy
import csv
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from models.args import model_args_of
from parallel.layout import V_SHAPED
from parallel.plan import GIB
from parallel.timing import Hardware, StepTime, step_time
from trainer.compare import spearman
from trainer.config import read_view
from trainer.validate import derive, validate

SCHEDULES = ("1f1b", "interleaved_1f1b", "zbv")
MICRO_BATCHES = (1, 2, 4, 8)
AC_ORDER = ("none", "selective", "full")


@dataclass
class Candidate:
    keys: dict  # the overrides that make it, e.g. {"parallel.data": "fsdp", "parallel.tp": 2, ...}
    layout: str
    peak_bytes: int
    reserve_bytes: int
    host_bytes_per_node: int
    step: StepTime

    def override_args(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.keys.items()]

    def to_json(self) -> dict:
        return {
            "keys": self.keys,
            "layout": self.layout,
            "peak_bytes": self.peak_bytes,
            "reserve_bytes": self.reserve_bytes,
            "host_bytes_per_node": self.host_bytes_per_node,
            "step": self.step.to_json(),
        }


@dataclass
class SearchResult:
    fits: list[Candidate]  # ranked, fastest first
    layouts: int  # (data, degrees, schedule, micro-batch) combinations tried
    refused: int  # configurations validation refused
    too_big: int  # layouts with no configuration that fits
    seconds: float
    refusal: str = ""  # one of validation's messages, shown when nothing was accepted


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(cfg, args, world_size: int, ranks_per_node: int, max_pp: int | None = None):
    """(data, dp_replicate, tp, pp, cp, schedule, micro-batch) worth trying: the arithmetic validation would refuse
    anyway (heads not divisible, more stages than blocks, batch not divisible, a sequence not divisible by 2 cp)
    is left out here for speed. Context parallelism is tried inside a node (cp x tp <= ranks_per_node), with FSDP
    or HSDP over dp_shard x cp."""
    t = cfg.training
    gb, seq = int(t.global_batch_size), int(t.seq_len)
    for tp in _divisors(world_size):
        if tp > ranks_per_node or args.n_heads % tp or args.kv_heads % tp or (tp > 1 and args.tie_embeddings):
            continue
        for pp in _divisors(world_size // tp):
            if pp > args.n_layers or (max_pp and pp > max_pp):
                continue
            for cp in _divisors(world_size // (tp * pp)):
                if cp > 1 and (cp * tp > ranks_per_node or seq % (2 * cp)):
                    continue
                dp = world_size // (tp * pp * cp)
                datas: list[tuple[str, int]] = [("none", 1)] if dp == 1 and cp == 1 else []
                if dp > 1 or cp > 1:
                    # (under cp an HSDP replica may be a single dp rank: its shards are the cp ranks)
                    most = dp if cp > 1 else dp - 1
                    datas += [("fsdp", 1)] + [("hsdp", r) for r in _divisors(dp) if 1 < r <= most]
                if cp == 1 and dp > 1 and tp == 1 and pp == 1:
                    datas += [(z, 1) for z in ("zero1", "zero2", "zero3")] + [("ddp", 1)]
                for sched in SCHEDULES if pp > 1 else (str(cfg.parallel.pp_schedule),):
                    stages = pp * (1 if sched == "1f1b" else 2) if pp > 1 else 1
                    if stages > args.n_layers:
                        continue
                    for mb in MICRO_BATCHES:
                        if gb % (mb * dp) or (pp > 1 and gb // (mb * dp) < stages):
                            continue
                        for data, dr in datas:
                            yield data, dr, tp, pp, cp, sched, mb


def expert_degrees(args, data: str, dp: int, dp_replicate: int) -> list[int]:
    """The `parallel.ep` values to try for one layout: 1, and for an MoE model under FSDP or HSDP every divisor of
    its dp_shard (dp / dp_replicate) that divides the experts."""
    if args.moe is None or data not in ("fsdp", "hsdp"):
        return [1]
    shard = dp // dp_replicate
    return [e for e in _divisors(shard) if args.moe.n_experts % e == 0]


def search(
    cfg,
    world_size: int,
    *,
    capacity_gib: float,
    hw: Hardware,
    ranks_per_node: int = 8,
    host_memory_gib: float | None = None,
    device: str = "cuda",
    max_pp: int | None = None,
    offload: bool = True,
) -> SearchResult:

    started = time.perf_counter()
    args = model_args_of(cfg)
    base = copy.deepcopy(cfg)
    base.dry_run = True
    fits: list[Candidate] = []
    n_layouts = refused = too_big = 0
    refusal = ""

    def attempt(data, dr, tp, pp, cp, sched, mb, ac, off, ep=1):
        """(validation's first problem or None, the candidate if it fits)."""
        OmegaConf.update(base, "parallel.ep", ep)
        keys = {
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
            **({"parallel.ep": ep} if ep > 1 else {}),
        }
        for k, v in keys.items():
            OmegaConf.update(base, k, v)
        view = read_view(base)  # (validation and the planner read it thousands of times: plain dicts, not OmegaConf)
        problems = validate(view, world_size)
        if problems:
            return problems[0], None
        plan = derive(view, world_size, capacity_gib=capacity_gib, device=device, ranks_per_node=ranks_per_node)
        mem = plan.memory
        host_ok = host_memory_gib is None or mem.host_bytes_per_node <= host_memory_gib * GIB
        if mem.peak_bytes + mem.reserve_bytes > capacity_gib * GIB or not host_ok:
            return None, None
        if data == "hsdp":
            keys["parallel.dp_shard"] = plan.dims.dp_shard
        return None, Candidate(
            keys=keys,
            layout=layout_label(keys, world_size),
            peak_bytes=mem.peak_bytes,
            reserve_bytes=mem.reserve_bytes,
            host_bytes_per_node=mem.host_bytes_per_node,
            step=step_time(view, args, plan.dims, hw, ranks_per_node=ranks_per_node, device=device),
        )

    for data, dr, tp, pp, cp, sched, mb in layouts(base, args, world_size, ranks_per_node, max_pp):
        for ep in expert_degrees(args, data, world_size // (tp * pp * cp), dr):
            n_layouts += 1
            found, any_valid, problems = _lightest(attempt, (data, dr, tp, pp, cp, sched, mb), ep, offload, device)
            refused += len(problems)
            refusal = refusal or (problems[0] if problems else "")
            if found:
                fits.append(found)
            elif any_valid:
                too_big += 1
    fits.sort(key=lambda c: c.step.seconds)
    return SearchResult(
        fits=fits,
        layouts=n_layouts,
        refused=refused,
        too_big=too_big,
        seconds=time.perf_counter() - started,
        refusal=refusal,
    )


def _lightest(attempt, layout: tuple, ep: int, offload: bool, device: str):
    """(the lightest configuration of one layout that fits or None, whether any was valid, validation's problems):
    full AC first (the least memory); the lighter (faster) modes are tried only when it fits, or when validation
    refuses it (e.g. compile x TP x AC) and they may be accepted; CPU offload only where nothing fits without it."""
    data, dr, tp, pp, cp, sched, mb = layout
    sharded = data in ("fsdp", "hsdp", "zero1", "zero2", "zero3")
    found, any_valid, problems = None, False, []
    for off in ("none", "cpu") if offload and sharded and device == "cuda" else ("none",):
        problem, lightest = attempt(*layout, "full", off, ep)
        if problem:
            problems.append(problem)
        else:
            any_valid = True
        if problem or lightest:
            for ac in ("none", "selective"):
                if pp > 1 and sched in V_SHAPED and ac == "selective":
                    continue  # refused by validation (torch's selective AC allows one backward per region)
                problem, found = attempt(*layout, ac, off, ep)
                if problem:
                    problems.append(problem)
                    continue
                any_valid = True
                if found:
                    break
        found = found or lightest
        if found:
            break
    return found, any_valid, problems


def layout_label(keys: dict, world_size: int) -> str:
    """The degrees that are not 1, by name: `pp 4 (1f1b) x dp_shard 4 x tp 4`, `dp 64 (zero3)`."""
    data, tp, pp, cp = keys["parallel.data"], keys["parallel.tp"], keys["parallel.pp"], keys.get("parallel.cp", 1)
    dp = world_size // (tp * pp * cp)
    out = [f"pp {pp} ({keys['parallel.pp_schedule']})"] if pp > 1 else []
    if data == "hsdp":
        out.append(f"dp_replicate {keys['parallel.dp_replicate']} x dp_shard {dp // keys['parallel.dp_replicate']}")
    elif data != "none" and dp > 1:
        out.append(f"{'dp_shard' if data == 'fsdp' else 'dp'} {dp}")
    if keys.get("parallel.ep", 1) > 1:  # (the experts over ep of the dp_shard ranks)
        out[-1] += f" (ep {keys['parallel.ep']})"
    if cp > 1:
        out.append(f"cp {cp}")
    if tp > 1:
        out.append(f"tp {tp}")
    return " x ".join(out) or "1 rank"


# the one run that measured the time model against real step times: docs/compare.md's every-strategy table
MEASURED_ERRORS = Path(__file__).resolve().parent.parent / "docs" / "compare" / "compare.csv"


def time_model_error(path: Path = MEASURED_ERRORS) -> str:
    """One line on how far the time model was from measured step times, read from a compare.py result file (its
    step_time_error_pct column): how many strategies, the median and largest error, the rank correlation."""
    try:
        with open(path) as f:
            rows = [r for r in csv.DictReader(f) if r.get("step_time_error_pct")]
    except OSError:
        rows = []
    if not rows:
        return "time model error: never measured here (no compare.py result file); the ranking is the model's alone"
    errors = [abs(float(r["step_time_error_pct"])) for r in rows]
    rho = spearman([float(r["predicted_step_time_s"]) for r in rows], [float(r["step_time_s"]) for r in rows])
    return (
        f"time model error, measured once ({len(rows)} strategies on a 2-core CPU, docs/compare.md): step times off "
        f"by {statistics.median(errors):.0f}% in the median, {max(errors):.0f}% at most, rank correlation "
        f"{rho:.2f}; never measured on a GPU, so read the ranking as the model's, not as timings"
    )


def table(result: SearchResult, *, top: int = 15, capacity_gib: float, hw: Hardware) -> str:
    lines = [
        f"{result.layouts} layouts tried ({result.refused} configurations refused by validation), "
        f"{len(result.fits)} fit in {capacity_gib:g} GiB, {result.too_big} do not fit; "
        f"{result.seconds:.1f} s",
        f"time model: {hw.name}, matmul {hw.matmul_flops / 1e12:.1f} TFLOP/s, intra-node {hw.intra_bw / 1e9:.0f} GB/s, "
        f"inter-node {hw.inter_bw / 1e9:.0f} GB/s, memory {hw.mem_bw / 1e9:.0f} GB/s "
        f"(matmul: {hw.source.get('matmul_flops', 'assumed')}; parallel/timing.py)",
        time_model_error(),
        "",
        "| rank | layout | data | AC | mb | offload | peak + reserve GiB | step s | tokens/s/device | MFU | "
        "compute | exposed comm | bubble | recompute | comm/step GiB |",
        "| ---: | --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for i, c in enumerate(result.fits[:top], 1):
        k, s = c.keys, c.step
        p = s.parts
        layout = c.layout
        exposed = p.get("dp_comm_exposed", 0) + p.get("tp_comm", 0) + p.get("pp_comm", 0) + p.get("ep_comm", 0)
        mfu = 100 * s.flops / s.seconds / (hw.peak_flops or hw.matmul_flops)  # against the datasheet peak
        lines.append(
            f"| {i} | {layout} | {k['parallel.data']} | {k['parallel.ac']} | {k['training.micro_batch_size']} | "
            f"{k['parallel.offload']} | {(c.peak_bytes + c.reserve_bytes) / GIB:.1f} | {s.seconds:.3f} | "
            f"{s.tokens_per_sec_per_device:,.0f} | {mfu:.1f}% | {p['compute']:.3f} | {exposed:.3f} | "
            f"{p.get('bubble', 0):.3f} | {p.get('recompute', 0):.3f} | {s.comm_total / GIB:.1f} |"
        )
    if not result.fits:
        why = (
            f"validation refused every layout, e.g. {result.refusal}"
            if result.refused and not result.too_big
            else "nothing fits: raise world_size or gpu_memory_gib, or shorten training.seq_len"
        )
        lines.append(f"\n{why}")
    return "\n".join(lines)


__all__ = ["Candidate", "SearchResult", "search", "table", "layouts"]
