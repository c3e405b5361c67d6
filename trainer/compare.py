"""Strategies side by side: one model, data, seed and batch; each strategy a real torchrun job.

`run(recipe="llama_debug", strategies=["ddp", "fsdp", "zero2"], nproc=2, steps=20)` runs each cell (a strategy,
crossed with any `sweep`) as `torchrun launch/train.py` with the same recipe and overrides, reads back what the run
wrote (metrics.jsonl: the loss curve, tokens/s, step times, MFU, the tracked memory breakdown of one step) and
what the planner predicts for the same layout (parallel/plan.py), and returns one record per cell. A cell that
fails is a record too: `refused` (validation's message, before any process group), `oom`, or `crashed` (the last
lines of its output). `write(records, out)` writes compare.csv, compare.md and the PNG plots (launch/compare.py
does both). Cells that finished are not run again: their record is kept in `out/cells/<cell>/record.json`.

Strategy names: none, ddp, fsdp, hsdp (2 replicas), zero1, zero2, zero3, tp (tensor parallel over every rank),
pp (pipeline over every rank), fsdp_tp (FSDP x TP 2); and the fine-tuning methods full, lora, dora, qlora (LoRA on an
NF4 base). A name may carry its own keys: `zero3+offload` (parallel.offload=cpu), `fsdp:ac=full`, `tp:tp=2`,
`fsdp:training.precision=fp32` (short keys are parallel.*; after a fine-tuning method, its own: `lora:rank=16`,
`qlora:data=fsdp`).
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from models.args import model_args_of
from parallel.memory import BESIDE, OFFLOADED
from parallel.timing import Hardware, calibrate_cpu, calibrate_cuda, step_time
from trainer.config import ConfigError, load_config
from trainer.validate import derive, validate

REPO = Path(__file__).resolve().parents[1]
BASE = {
    "none": [],
    "ddp": ["parallel.data=ddp"],
    "fsdp": ["parallel.data=fsdp"],
    "hsdp": ["parallel.data=hsdp", "parallel.dp_replicate=2"],
    "zero1": ["parallel.data=zero1"],
    "zero2": ["parallel.data=zero2"],
    "zero3": ["parallel.data=zero3"],
    "tp": ["parallel.data=none", "parallel.tp={nproc}"],
    "pp": ["parallel.data=none", "parallel.pp={nproc}"],
    "fsdp_tp": ["parallel.data=fsdp", "parallel.tp=2"],
    # fine-tuning on one process (another layout by keys: lora:data=fsdp): every parameter, or adapters on a frozen
    # base, in full precision or (qlora) NF4
    "full": [],
    "lora": ["finetune.method=lora"],
    "dora": ["finetune.method=dora"],
    "qlora": ["finetune.method=lora", "finetune.quantize_base=true"],
}
FINETUNE_CELLS = ("full", "lora", "dora", "qlora")
MODIFIERS = {"offload": ["parallel.offload=cpu"], "offload_params": ["parallel.offload_params=true"]}
# every cell: the same logging, so the records are comparable; one tracked step for the memory breakdown
COMMON = [
    "logging.every=1",
    "logging.jsonl=true",
    "logging.console=true",
    "logging.tensorboard=false",
    "logging.wandb.mode=disabled",
    "logging.memory_breakdown=true",
    "logging.memory_breakdown_step=3",
    "checkpoint.every=0",
    "training.val_every=0",
]
STEADY_FROM = 4  # step times from this step on: the first steps build buckets and warm caches, step 3 is tracked
CATEGORIES = (
    "params",
    "gathered_params",
    "grads",
    "unsharded_grads",
    "optim",
    "master",
    "buffers",
    "activations",
    "temporaries",
    "other",
)


class CompareError(ValueError):
    """A bad strategy name or sweep: one message naming it and what is accepted."""


def strategy_overrides(name: str, nproc: int) -> list[str]:
    """`fsdp:ac=full`, `zero3+offload`, `tp:tp=2`, `none:ac=full:training.loss_chunks=8` -> the config overrides of
    that cell (each key=value after a colon; short keys mean `parallel.*`)."""
    head, *keys = name.split(":")
    base, *mods = head.split("+")
    if base not in BASE:
        raise CompareError(
            f"strategies: unknown strategy '{base}' in '{name}'; known: {', '.join(BASE)} "
            f"(modifiers: +{', +'.join(MODIFIERS)}; keys after ':', e.g. fsdp:ac=full)"
        )
    out = [o.format(nproc=nproc) for o in BASE[base]]
    for m in mods:
        if m not in MODIFIERS:
            raise CompareError(f"strategies: unknown modifier '+{m}' in '{name}'; known: +{', +'.join(MODIFIERS)}")
        out += MODIFIERS[m]
    for kv in filter(None, keys):
        k, eq, v = kv.partition("=")
        if not eq:
            raise CompareError(f"strategies: '{kv}' in '{name}' is not key=value (e.g. fsdp:ac=full)")
        section = "finetune" if base in FINETUNE_CELLS and k in _FINETUNE_KEYS else "parallel"
        out.append(f"{k if '.' in k else section + '.' + k}={v}")
    return out


_FINETUNE_KEYS = ("method", "rank", "alpha", "dropout", "targets", "quantize_base", "nf4_scaler_block")


def cells(strategies: list[str], sweep: str | None) -> list[tuple[str, list[str]]]:
    """(cell id, extra overrides) for every strategy, crossed with `sweep` ("key=v1,v2,...")."""
    if not sweep:
        return [(s, []) for s in strategies]
    key, eq, values = sweep.partition("=")
    if not eq or not values:
        raise CompareError(f"sweep={sweep}: expected key=v1,v2,... (e.g. sweep=training.micro_batch_size=1,2,4)")
    return [(f"{s}@{key.rsplit('.', 1)[-1]}={v}", [f"{key}={v}"]) for s in strategies for v in values.split(",")]


def _safe(cell: str) -> str:
    return "".join(c if c.isalnum() or c in "-_=.@" else "_" for c in cell)


def _predicted(overrides: list[str], nproc: int) -> dict:
    """The planner for this cell: (layout, peak bytes and categories of the most loaded rank) or the refusal."""

    try:
        cfg = load_config(overrides)
        cfg.dry_run = True
        problems = validate(cfg, nproc)
        if problems:
            return {"refused": "; ".join(problems)}
        plan = derive(cfg, nproc)
    except ConfigError as e:
        return {"refused": str(e)}
    top = plan.memory.most_loaded
    return {
        "layout": plan.dims.describe(),
        "peak_bytes": top.peak_bytes,
        "categories": top.by_category(),
        "host_bytes": top.host_bytes,
        "precision": str(cfg.training.precision),
    }


def _read_run(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    start = max((i for i, r in enumerate(rows) if r.get("event") == "start"), default=0)
    steps = [r for r in rows[start:] if "train/loss" in r and "event" not in r]
    steady = [r for r in steps if r["step"] >= STEADY_FROM] or steps
    breakdown = next((r for r in reversed(rows) if r.get("event") == "memory_breakdown"), None)
    end = next((r for r in reversed(rows) if r.get("event") == "end"), {})
    mfu = [r["perf/mfu_pct"] for r in steady if r.get("perf/mfu_pct") is not None]
    out = {
        "losses": [(r["step"], r["train/loss"]) for r in steps],
        "final_loss": steps[-1]["train/loss"] if steps else None,
        "step_time_s": statistics.median(r["perf/step_time_s"] for r in steady) if steady else None,
        "tokens_per_sec_per_device": statistics.median(r["perf/tokens_per_sec_per_gpu"] for r in steady)
        if steady
        else None,
        "mfu_pct": statistics.median(mfu) if mfu else None,
        "peak_memory_gib": end.get("peak_memory_gib"),
    }
    alloc = [r["mem/peak_allocated_gib"] for r in steps if r.get("mem/peak_allocated_gib") is not None]
    if alloc:  # on a GPU: the caching allocator's peak (rank 0), beside the tracker's tensors
        out["allocator_peak_bytes"] = int(max(alloc) * 2**30)
    if breakdown:
        ranks = breakdown["ranks"]
        top = max(range(len(ranks)), key=lambda r: ranks[r]["peak"])
        out.update(
            measured_peak_bytes=ranks[top]["peak"],
            measured_rank=top,
            measured_categories={k: v for k, v in ranks[top].items() if k not in BESIDE},
        )
        if OFFLOADED in ranks[top]:  # activation offloading's host copies, apart from the device's memory
            out["measured_offloaded_bytes"] = ranks[top][OFFLOADED]
    return out


def _status_of(returncode: int, text: str) -> tuple[str, str]:
    tail = "\n".join(text.strip().splitlines()[-15:])
    if returncode == 0:
        return "ok", ""
    if "out of memory" in text.lower() or "OutOfMemoryError" in text:
        return "oom", tail
    if returncode == 2 and "invalid config" in text:
        return "refused", next((ln.strip() for ln in text.splitlines() if ln.strip().startswith("- ")), tail)
    return "crashed", tail


def _report_step(line: str, *, cell: str, steps: int, started: float, progress) -> None:
    """Report a logged training step of a cell's job (about five reports per cell)."""
    head = line.split()
    if len(head) >= 3 and head[0] == "step" and "/" in head[1] and head[2] == "loss":
        done = int(head[1].split("/")[0])
        if done % max(1, steps // 5) == 0 or done == steps:
            rate = (time.perf_counter() - started) / done
            progress(f"compare:   {cell}: step {done}/{steps}, about {rate * (steps - done):.0f} s left in this cell")


def _run_streaming(cmd: list[str], *, timeout: int, cell: str, steps: int, progress) -> tuple[int, str]:
    """Run a cell's job, reporting its training steps as they are logged."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    import threading

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
    watchdog = threading.Timer(timeout, proc.kill)  # a job that hangs without printing is stopped too
    watchdog.start()
    deadline, lines, started = time.monotonic() + timeout, [], time.perf_counter()
    for line in proc.stdout:
        lines.append(line)
        _report_step(line, cell=cell, steps=steps, started=started, progress=progress)
        if time.monotonic() > deadline:
            proc.kill()
            lines.append(f"\ntimed out after {timeout} s\n")
            break
    code = proc.wait()
    watchdog.cancel()
    if time.monotonic() > deadline and not (lines and lines[-1].startswith("\ntimed out")):
        lines.append(f"\ntimed out after {timeout} s\n")
    return code, "".join(lines)


def run_cell(
    cell: str,
    extra: list[str],
    *,
    recipe: str,
    overrides: list[str],
    nproc: int,
    steps: int,
    out: Path,
    timeout: int = 1800,
    progress=print,
    launch=None,
) -> dict:
    """One cell, or its saved record when it finished before. `launch(train.py arguments, nproc, timeout) ->
    (exit code, output)` runs the cell's job instead of `torchrun launch/train.py` (the test suite's long-lived
    pools); its output's steps are reported when it returns."""
    strategy = cell.split("@")[0]
    cell_dir = out / "cells" / _safe(cell)
    saved = cell_dir / "record.json"
    if saved.is_file():
        return {**json.loads(saved.read_text()), "kept": True}
    cfg_overrides = [
        f"recipe={recipe}",
        *overrides,
        *strategy_overrides(strategy, nproc),
        *extra,
        f"training.steps={steps}",
    ]
    record = {"cell": cell, "strategy": strategy, "nproc": nproc, "overrides": cfg_overrides}
    predicted = _predicted(cfg_overrides, nproc)
    if "refused" in predicted:  # validation's own message; no process is started
        record.update(status="refused", message=predicted["refused"])
    else:
        record.update(
            layout=predicted["layout"],
            predicted_peak_bytes=predicted["peak_bytes"],
            predicted_categories=predicted["categories"],
            predicted_host_bytes=predicted["host_bytes"],
            precision=predicted["precision"],
        )
        cell_dir.mkdir(parents=True, exist_ok=True)
        run_dir = cell_dir / "run"
        train_args = [*cfg_overrides, *COMMON, f"run_dir={run_dir}"]
        launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        cmd = [sys.executable, *launcher, str(REPO / "launch" / "train.py"), *train_args]
        started = time.perf_counter()
        if launch is None:
            code, text = _run_streaming(cmd, timeout=timeout, cell=cell, steps=steps, progress=progress)
        else:
            code, text = launch(train_args, nproc, timeout)
            for line in text.splitlines():
                _report_step(line, cell=cell, steps=steps, started=started, progress=progress)
        (cell_dir / "output.log").write_text(text)
        status, message = _status_of(code, text)
        record.update(status=status, message=message, wall_s=time.perf_counter() - started)
        if status == "ok":
            record.update(_read_run(run_dir))
    cell_dir.mkdir(parents=True, exist_ok=True)
    if record["status"] in ("ok", "refused"):  # a crash or an OOM is run again next time
        saved.write_text(json.dumps(record, indent=2))
    return record


def _slurm_array(
    pending: list[tuple[str, list[str]]],
    *,
    recipe: str,
    overrides: list[str],
    nproc: int,
    steps: int,
    out: Path,
    slurm: dict,
    progress,
) -> None:
    """Run the pending cells as one SLURM job array (a task per cell, each its own torchrun on one node), wait
    for it, reporting as cells finish. Each task runs `launch/compare.py --run-cell DIR`, which is run_cell."""
    import shutil

    if shutil.which("sbatch") is None or shutil.which("squeue") is None:
        raise CompareError("--slurm: sbatch and squeue are not on PATH; run on a SLURM login node or drop --slurm")
    dirs = []
    for cell, extra in pending:
        cell_dir = out / "cells" / _safe(cell)
        cell_dir.mkdir(parents=True, exist_ok=True)
        (cell_dir / "cell.json").write_text(
            json.dumps(
                {
                    "cell": cell,
                    "extra": extra,
                    "recipe": recipe,
                    "overrides": overrides,
                    "nproc": nproc,
                    "steps": steps,
                    "out": str(out),
                },
                indent=2,
            )
        )
        dirs.append(cell_dir)
    (out / "array.txt").write_text("".join(f"{d}\n" for d in dirs))
    header = [
        f"#SBATCH --job-name={slurm.get('job_name', 'compare')}",
        f"#SBATCH --array=0-{len(dirs) - 1}" + (f"%{slurm['parallel']}" if slurm.get("parallel") else ""),
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1",
        f"#SBATCH --cpus-per-task={slurm.get('cpus_per_task') or nproc}",
        f"#SBATCH --time={slurm.get('time', '01:00:00')}",
        f"#SBATCH --output={out}/cells/slurm-%A_%a.out",
    ]
    if slurm.get("partition"):
        header.append(f"#SBATCH --partition={slurm['partition']}")
    if slurm.get("gpus"):
        header.append(f"#SBATCH --gpus-per-task={nproc}")
    script = "\n".join(
        [
            "#!/bin/bash",
            *header,
            "set -euo pipefail",
            f"cd {REPO}",
            "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1",
            f'CELL=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {out}/array.txt)',
            f'exec {sys.executable} {REPO}/launch/compare.py --run-cell "$CELL"',
            "",
        ]
    )
    (out / "array.sbatch").write_text(script)
    proc = subprocess.run(
        ["sbatch", "--parsable", str(out / "array.sbatch")], capture_output=True, text=True, timeout=120
    )
    if proc.returncode:
        raise CompareError(f"--slurm: sbatch refused the array ({out / 'array.sbatch'}): {proc.stderr.strip()}")
    job = proc.stdout.strip().split(";")[0]
    progress(f"compare: submitted SLURM array job {job}: {len(dirs)} cells ({out / 'array.sbatch'})")
    last, started = None, time.monotonic()
    while True:
        q = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=60)
        states = [s for s in q.stdout.split() if s]
        done = sum((d / "record.json").is_file() for d in dirs)
        if not states:
            break
        report = (done, tuple(sorted(set(states))))
        if report != last:
            counts = ", ".join(f"{st.lower()} {states.count(st)}" for st in sorted(set(states)))
            progress(
                f"compare: SLURM job {job}: {done} of {len(dirs)} cells finished ({counts}), "
                f"{time.monotonic() - started:.0f} s"
            )
            last = report
        time.sleep(2)
    for i, d in enumerate(dirs):
        if not (d / "record.json").is_file():  # the task died before writing one: its SLURM output says why
            log = out / "cells" / f"slurm-{job}_{i}.out"
            tail = "\n".join(log.read_text().strip().splitlines()[-15:]) if log.is_file() else "no output"
            (d / "failed.json").write_text(
                json.dumps({"status": "crashed", "message": f"SLURM task {job}_{i}: {tail}"})
            )


def run_saved_cell(cell_dir: str | Path) -> int:
    """One task of a SLURM array: the cell that cell.json describes (launch/compare.py --run-cell DIR)."""
    spec = json.loads((Path(cell_dir) / "cell.json").read_text())
    rec = run_cell(
        spec["cell"],
        spec["extra"],
        recipe=spec["recipe"],
        overrides=spec["overrides"],
        nproc=spec["nproc"],
        steps=spec["steps"],
        out=Path(spec["out"]),
    )
    if rec["status"] not in ("ok", "refused"):  # kept for the collecting process (run_cell saves only these two)
        (Path(cell_dir) / "failed.json").write_text(json.dumps(rec, indent=2))
    print(f"compare: {spec['cell']}: {rec['status']}")
    return 0


def agreement(records: list[dict], rtol: float = 1e-4) -> dict:
    """Whether the fp32 cells' loss curves agree with each other (every strategy computes the same
    function of the same data): the largest relative difference per step against the first such cell."""
    same = [r for r in records if r["status"] == "ok" and r.get("precision") == "fp32" and r.get("losses")]
    if len(same) < 2:
        return {"cells": [r["cell"] for r in same], "max_rel_diff": None, "agree": None, "rtol": rtol}
    ref = dict(same[0]["losses"])
    worst = 0.0
    for r in same[1:]:
        for step, loss in r["losses"]:
            if step in ref:
                worst = max(worst, abs(loss - ref[step]) / abs(ref[step]))
    return {"cells": [r["cell"] for r in same], "max_rel_diff": worst, "agree": worst <= rtol, "rtol": rtol}


def run(
    recipe: str = "llama_debug",
    strategies=("ddp", "fsdp"),
    *,
    nproc: int = 2,
    steps: int = 20,
    out: str | Path | None = None,
    overrides=(),
    sweep: str | None = None,
    progress=print,
    as_frame=False,
    gpu_memory_gib: float | None = None,
    slurm: dict | None = None,
    launch=None,
):
    """Run every cell (skipping finished ones), write the table and plots into `out`, return the records
    (a pandas DataFrame with `as_frame=True`, when pandas is installed). `gpu_memory_gib` draws the device's
    capacity on the memory plot. `slurm` (a dict: partition, time, parallel, cpus_per_task, gpus; {} for the
    defaults) runs the cells that are not finished as one SLURM job array instead of one after the other.
    `launch` runs each cell's job in place of torchrun (`run_cell`)."""
    strategies = [s for s in (strategies.split(",") if isinstance(strategies, str) else strategies) if s]
    if not strategies:
        raise CompareError("strategies: give at least one, e.g. strategies=ddp,fsdp,zero2")
    todo = cells(strategies, sweep)
    for s in strategies:  # every name checked before anything runs
        strategy_overrides(s, nproc)
    overrides = list(overrides)
    if not any(o.startswith("optim.warmup_steps=") for o in overrides):
        # a comparison is short: the recipe's warmup may be longer than the whole run, which validation refuses;
        # every cell gets the same shortened warmup (given explicitly, optim.warmup_steps is left as it is)
        from trainer.config import ConfigError, load_config

        try:
            warmup = int(load_config([f"recipe={recipe}", *overrides]).optim.warmup_steps)
        except ConfigError as e:
            raise CompareError(str(e)) from None
        if warmup > steps // 4:
            overrides.append(f"optim.warmup_steps={steps // 4}")
            progress(
                f"compare: optim.warmup_steps={steps // 4} for every cell (the recipe's {warmup} is longer "
                f"than a quarter of steps={steps}; pass optim.warmup_steps= to choose)"
            )
    out = Path(out) if out else REPO / "runs" / f"compare-{recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    records, started = [], time.perf_counter()
    if slurm is not None:
        for cell_dir in (out / "cells").glob("*/failed.json"):
            cell_dir.unlink()  # a crashed cell of an earlier array runs again
        pending = [
            (c, e)
            for c, e in todo
            if not (out / "cells" / _safe(c) / "record.json").is_file()
            and "refused"
            not in _predicted(
                [
                    f"recipe={recipe}",
                    *overrides,
                    *strategy_overrides(c.split("@")[0], nproc),
                    *e,
                    f"training.steps={steps}",
                ],
                nproc,
            )
        ]
        ran_in_array = {c for c, _ in pending}
        if pending:
            _slurm_array(
                pending,
                recipe=recipe,
                overrides=overrides,
                nproc=nproc,
                steps=steps,
                out=out,
                slurm=slurm,
                progress=progress,
            )
    for i, (cell, extra) in enumerate(todo):
        done = time.perf_counter() - started
        eta = f", ETA {done / i * (len(todo) - i):.0f} s" if i else ""
        progress(f"compare: [{i + 1}/{len(todo)}] {cell} ({steps} steps on {nproc} ranks{eta})")
        failed = out / "cells" / _safe(cell) / "failed.json"
        if slurm is not None and failed.is_file():  # a task of the array that crashed or ran out of memory
            rec = {"cell": cell, "strategy": cell.split("@")[0], "nproc": nproc, **json.loads(failed.read_text())}
        else:  # without SLURM: the cell runs here; with it, it finished in the array (its record is read back)
            rec = run_cell(
                cell,
                extra,
                recipe=recipe,
                overrides=overrides,
                nproc=nproc,
                steps=steps,
                out=out,
                progress=progress,
                launch=launch,
            )
            if slurm is not None and cell in ran_in_array:
                rec.pop("kept", None)
        progress(
            f"compare: {cell}: {rec['status']}{' (finished before: kept)' if rec.get('kept') else ''}"
            + (
                f", {rec['tokens_per_sec_per_device']:,.0f} tokens/s/device, final loss {rec['final_loss']:.4f}"
                if rec["status"] == "ok"
                else f": {rec.get('message', '')[:300]}"
            )
        )
        records.append(rec)
    progress("compare: the time model (parallel/timing.py): calibrating on this machine")
    add_time_model(records, out, nproc)
    write(records, out, capacity_bytes=int(gpu_memory_gib * 2**30) if gpu_memory_gib else None)
    ok = sum(r["status"] == "ok" for r in records)
    progress(f"compare: {ok} of {len(records)} cells ran; compare.md, compare.csv and the plots are in {out}")
    if as_frame:
        import pandas as pd

        return pd.DataFrame(records)
    return records


# -- the table and the plots

COLUMNS = [
    "cell",
    "status",
    "layout",
    "predicted_peak_bytes",
    "measured_peak_bytes",
    "memory_error_pct",
    "allocator_peak_bytes",
    "tokens_per_sec_per_device",
    "mfu_pct",
    "step_time_s",
    "predicted_step_time_s",
    "step_time_error_pct",
    "predicted_comm_bytes_per_step",
    "predicted_host_bytes",
    "measured_offloaded_bytes",
    "final_loss",
    "message",
]


def _row(r: dict) -> dict:
    row = {k: r.get(k) for k in COLUMNS}
    p, m = r.get("predicted_peak_bytes"), r.get("measured_peak_bytes")
    row["memory_error_pct"] = 100.0 * (p - m) / m if p and m else None
    p, m = r.get("predicted_step_time_s"), r.get("step_time_s")
    row["step_time_error_pct"] = 100.0 * (p - m) / m if p and m else None
    return row


def calibration(out: Path, nproc: int, cfg) -> Hardware:  # noqa: F821
    """This machine's rates for the time model, measured once per comparison (kept in out/calibration.json)."""

    saved = Path(out) / "calibration.json"
    if saved.is_file():
        return Hardware(**json.loads(saved.read_text()))
    import torch

    if torch.cuda.is_available():
        hw = calibrate_cuda(cfg, None)
    else:
        hw = calibrate_cpu(cfg, nproc, threads=int(os.environ.get("OMP_NUM_THREADS", "1")))
    saved.write_text(json.dumps(hw.to_json(), indent=2))
    return hw


def add_time_model(records: list[dict], out: Path, nproc: int) -> None:
    """Each cell's step time and communication per step as parallel/timing.py predicts them, with this machine's
    measured rates: `predicted_step_time_s`, `predicted_step_parts`, `predicted_comm_bytes_per_step`."""

    runnable = [r for r in records if r.get("layout")]
    if not runnable:
        return
    hw = None
    for r in runnable:
        cfg = load_config(r["overrides"])
        cfg.dry_run = True
        hw = hw or calibration(out, nproc, cfg)
        plan = derive(cfg, nproc)
        st = step_time(cfg, model_args_of(cfg), plan.dims, hw, device=hw.device)
        r.update(
            predicted_step_time_s=st.seconds,
            predicted_step_parts=st.parts,
            predicted_comm_bytes_per_step=st.comm_total,
            predicted_comm=st.comm_bytes,
        )


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (no ties expected; ties get the average rank)."""
    if len(xs) < 3:
        return None

    def ranks(v):
        order = sorted(range(len(v)), key=v.__getitem__)
        out = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx and sy else None


def write(records: list[dict], out: Path, capacity_bytes: int | None = None) -> None:
    out = Path(out)
    rows = [_row(r) for r in records]
    with open(out / "compare.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    (out / "compare.md").write_text(markdown(records))
    (out / "records.json").write_text(json.dumps(records, indent=2))
    plot(records, out, capacity_bytes)


def _fmt(v, spec: str, unit: str = "") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:{spec}}{unit}"


def markdown(records: list[dict]) -> str:
    mib = 2**20
    # activation offloading in any cell: the host copies' peak, predicted and measured, beside the device's
    offload = any(r.get("measured_offloaded_bytes") for r in records)
    lines = [
        "| strategy | layout | memory predicted | memory measured | error | "
        + ("offloaded predicted | offloaded measured | " if offload else "")
        + "tokens/s/device | MFU | step time | final loss | status |",
        "| --- | --- | ---: | ---: | ---: | "
        + ("---: | ---: | " if offload else "")
        + "---: | ---: | ---: | ---: | --- |",
    ]
    for r in records:
        row = _row(r)
        last = (r.get("message") or "").strip().splitlines()[-1:]
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {last[0][:200] if last else ''}"
        host = (
            f"{_fmt(row['predicted_host_bytes'] and row['predicted_host_bytes'] / mib, ',.2f', ' MiB')} | "
            f"{_fmt(row['measured_offloaded_bytes'] and row['measured_offloaded_bytes'] / mib, ',.2f', ' MiB')} | "
            if offload
            else ""
        )
        lines.append(
            f"| {r['cell']} | {r.get('layout') or '-'} | "
            f"{_fmt(row['predicted_peak_bytes'] and row['predicted_peak_bytes'] / mib, ',.2f', ' MiB')} | "
            f"{_fmt(row['measured_peak_bytes'] and row['measured_peak_bytes'] / mib, ',.2f', ' MiB')} | "
            f"{_fmt(row['memory_error_pct'], '+.1f', '%')} | {host}{_fmt(row['tokens_per_sec_per_device'], ',.0f')} | "
            f"{_fmt(row['mfu_pct'], '.1f', '%')} | {_fmt(row['step_time_s'], '.3f', ' s')} | "
            f"{_fmt(row['final_loss'], '.4f')} | {status.replace('|', '/')} |"
        )
    timed = [r for r in records if r["status"] == "ok" and r.get("predicted_step_time_s") and r.get("step_time_s")]
    if timed:
        by_pred = sorted(timed, key=lambda r: r["predicted_step_time_s"])
        by_meas = sorted(timed, key=lambda r: r["step_time_s"])
        lines += [
            "",
            "Time model (parallel/timing.py, this machine's measured rates) against the measured step time, "
            "fastest first:",
            "",
            "| predicted rank | measured rank | strategy | step predicted | step measured | error | "
            "comm/step (model) |",
            "| ---: | ---: | --- | ---: | ---: | ---: | ---: |",
        ]
        for i, r in enumerate(by_pred, 1):
            err = 100 * (r["predicted_step_time_s"] - r["step_time_s"]) / r["step_time_s"]
            lines.append(
                f"| {i} | {by_meas.index(r) + 1} | {r['cell']} | {r['predicted_step_time_s']:.3f} s | "
                f"{r['step_time_s']:.3f} s | {err:+.0f}% | "
                f"{r.get('predicted_comm_bytes_per_step', 0) / mib:,.1f} MiB |"
            )
        rho = spearman([r["predicted_step_time_s"] for r in timed], [r["step_time_s"] for r in timed])
        errs = sorted(abs(r["predicted_step_time_s"] - r["step_time_s"]) / r["step_time_s"] for r in timed)
        lines.append(
            f"\nRank correlation (Spearman) {_fmt(rho, '.2f')}; median |error| "
            f"{100 * statistics.median(errs):.0f}%, largest {100 * errs[-1]:.0f}%."
        )
    a = agreement(records)
    if a["agree"] is None:
        lines.append("\nLoss agreement: fewer than two fp32 cells finished; nothing to compare.")
    else:
        lines.append(
            f"\nLoss agreement (fp32 cells {', '.join(a['cells'])}): largest relative difference per step "
            f"{a['max_rel_diff']:.2e}: {'agree' if a['agree'] else 'DO NOT agree'} within {a['rtol']:.0e}."
        )
    return "\n".join(lines) + "\n"


def plot(records: list[dict], out: Path, capacity_bytes: int | None = None) -> None:
    """memory.png, throughput.png and loss.png in `out`."""
    import matplotlib.pyplot as plt

    for name, fig in figures(records, capacity_bytes).items():
        fig.savefig(Path(out) / f"{name}.png", dpi=110)
        plt.close(fig)


def figures(records: list[dict], capacity_bytes: int | None = None) -> dict:
    """The three matplotlib figures: {"memory", "throughput", "loss"}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r["status"] == "ok"]
    mib = 2**20
    figs = {}
    # 1. stacked memory by category, predicted beside measured
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(records)), 4.5))
    x = list(range(len(records)))
    for side, key, off in (("predicted", "predicted_categories", -0.2), ("measured", "measured_categories", 0.2)):
        bottom = [0.0] * len(records)
        for ci, cat in enumerate(CATEGORIES):
            vals = [(r.get(key) or {}).get(cat, 0) / mib for r in records]
            if any(vals):
                ax.bar(
                    [i + off for i in x],
                    vals,
                    0.38,
                    bottom=bottom,
                    color=plt.cm.tab10(ci % 10),
                    label=cat if side == "predicted" else None,
                    hatch="" if side == "predicted" else "//",
                    edgecolor="white",
                )
                bottom = [b + v for b, v in zip(bottom, vals)]
    if capacity_bytes:
        ax.axhline(capacity_bytes / mib, color="red", linestyle="--", label="device capacity")
    ax.set_xticks(
        x, [r["cell"] + ("" if r["status"] == "ok" else f"\n({r['status']})") for r in records], rotation=20, ha="right"
    )
    ax.set_ylabel("memory per rank, most loaded (MiB)")
    ax.set_title("memory by category: predicted (plain) | measured (hatched)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    figs["memory"] = fig
    # 2. throughput, with MFU where the device's peak is known
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(ok)), 4))
    ax.bar([r["cell"] for r in ok], [r.get("tokens_per_sec_per_device") or 0 for r in ok], color="tab:blue")
    for i, r in enumerate(ok):
        if r.get("mfu_pct") is not None:
            ax.text(i, r["tokens_per_sec_per_device"], f"MFU {r['mfu_pct']:.1f}%", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("tokens/s per device")
    ax.set_title("throughput (median of the steady steps)")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    figs["throughput"] = fig
    # 3. loss curves overlaid
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in ok:
        if r.get("losses"):
            steps, losses = zip(*r["losses"])
            ax.plot(steps, losses, label=r["cell"], linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("loss curves")
    if ok:
        ax.legend(fontsize=8)
    fig.tight_layout()
    figs["loss"] = fig
    return figs
