"""launch/compare.py: three strategies and one impossible one on 2 CPU ranks, one job each (in the suite's pools),
shared by the assertions: the CSV against each run's own metrics.jsonl, real PNGs with the expected axes, the refused
cell with validation's message, the loss agreement of the fp32 cells, and a rerun that keeps the finished cells."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys

import pytest
from conftest import TINY
from helpers import REPO, read_jsonl, run_cli, run_train

# README.md's and docs/compare.md's example, run here (shrunk: the tiny model, 6 steps) with one impossible cell more;
# tests/distributed/test_docs_commands.py leaves it to this module
DOCUMENTED = (
    "python launch/compare.py recipe=llama_debug strategies=ddp,fsdp,zero2 nproc=2 steps=20 training.precision=fp32"
)
STRATEGIES = "ddp,fsdp,zero2,tp:tp=3"
STEPS = 6


def test_the_example_of_the_docs_is_the_one_run_here():
    for doc in (REPO / "README.md", REPO / "docs" / "compare.md"):
        assert DOCUMENTED in doc.read_text(), doc


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    shown = [a for a in DOCUMENTED.split()[2:] if not a.startswith(("strategies=", "steps="))]
    args = [
        *shown,
        *TINY[1:],
        "training.global_batch_size=8",
        f"strategies={STRATEGIES}",
        f"steps={STEPS}",
        f"out={out}",
        "gpu_memory_gib=0.01",
    ]
    proc = run_cli("compare.py", args, launch=_pooled)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, args, proc.stdout


def _pooled(argv: list[str], nproc: int, timeout: float) -> tuple[int, str]:
    """A cell's launch/train.py job in the suite's pool of its rank count (tests/pool.py), what compare.py's
    torchrun would print. compare.py itself runs in this process; test_a_rerun_keeps_the_finished_cells starts it
    as its own process, and the slow tier runs the documented lines with their own torchrun cells."""
    proc = run_train(argv, nproc=nproc, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def _cells(out):
    with open(out / "compare.csv") as f:
        return {row["cell"]: row for row in csv.DictReader(f)}


def test_the_table_holds_what_each_run_wrote(compared):
    out, _, stdout = compared
    rows = _cells(out)
    assert list(rows) == STRATEGIES.split(",")
    for cell in ("ddp", "fsdp", "zero2"):
        row = rows[cell]
        assert row["status"] == "ok", row
        metrics = read_jsonl(out / "cells" / cell / "run" / "metrics.jsonl")
        steps = [r for r in metrics if "train/loss" in r]
        assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
        assert float(row["final_loss"]) == steps[-1]["train/loss"]
        steady = [r for r in steps if r["step"] >= 4]  # after the tracked step 3
        assert float(row["tokens_per_sec_per_device"]) == statistics.median(
            r["perf/tokens_per_sec_per_gpu"] for r in steady
        )
        assert float(row["step_time_s"]) == statistics.median(r["perf/step_time_s"] for r in steady)
        breakdown = next(r for r in metrics if r.get("event") == "memory_breakdown")
        assert int(row["measured_peak_bytes"]) == max(r["peak"] for r in breakdown["ranks"])
        # the planner's number for the same layout, and its error against the tracker, within the planner's 10%
        assert abs(float(row["memory_error_pct"])) <= 10.0, row
    # progress while it runs: the cell, its steps as they are logged, an ETA over the cells
    assert f"[1/4] ddp ({STEPS} steps on 2 ranks)" in stdout and "ETA" in stdout
    assert f"ddp: step {STEPS}/{STEPS}" in stdout and "s left in this cell" in stdout


def test_an_impossible_strategy_shows_as_refused_with_its_message(compared):
    out, _, _ = compared
    row = _cells(out)["tp:tp=3"]
    assert row["status"] == "refused" and "tp" in row["message"] and row["measured_peak_bytes"] == ""
    assert "| tp:tp=3 | - |" in (out / "compare.md").read_text() and "refused: " in (out / "compare.md").read_text()


def test_the_fp32_losses_agree_and_the_table_says_so(compared):
    out, _, _ = compared
    md = (out / "compare.md").read_text()
    assert "Loss agreement (fp32 cells ddp, fsdp, zero2)" in md and ": agree within 1e-04" in md, md


def test_the_plots_are_real_pngs_with_their_axes(compared):
    import matplotlib.image

    from trainer.compare import figures

    out, _, _ = compared
    for name in ("memory", "throughput", "loss"):
        path = out / f"{name}.png"
        assert path.stat().st_size > 10_000, name
        pixels = matplotlib.image.imread(path)
        assert pixels.shape[0] > 300 and pixels.shape[1] > 500 and pixels.std() > 0.05, name
    records = json.loads((out / "records.json").read_text())
    figs = figures(records)
    mem, thr, loss = (figs[k].axes[0] for k in ("memory", "throughput", "loss"))
    assert (
        mem.get_ylabel().startswith("memory per rank")
        and [t.get_text() for t in mem.get_xticklabels()][-1] == "tp:tp=3\n(refused)"
    )
    assert {t.get_text() for t in mem.get_legend().get_texts()} >= {"params", "optim"}
    assert thr.get_ylabel() == "tokens/s per device" and len(thr.patches) == 3
    assert loss.get_xlabel() == "step" and loss.get_ylabel() == "training loss"
    assert [ln.get_label() for ln in loss.get_lines()] == ["ddp", "fsdp", "zero2"]
    assert all(len(ln.get_xdata()) == STEPS for ln in loss.get_lines())


def test_the_time_model_stands_beside_the_measured_step_times(compared):
    """Each run cell has the step time parallel/timing.py predicts with the rates measured on this machine (kept in
    calibration.json), its communication per step, and both rankings in compare.md."""
    from models.args import model_args_of
    from parallel.timing import Hardware, step_time
    from trainer.config import load_config
    from trainer.validate import derive

    out, _, _ = compared
    hw = Hardware(**json.loads((out / "calibration.json").read_text()))
    assert hw.device == "cpu" and hw.matmul_flops > 1e8 and hw.intra_bw > 1e6 and hw.latency_s > 0
    assert "measured here" in hw.source["matmul_flops"] and "gloo" in hw.source["intra_bw"]
    rows = _cells(out)
    records = {r["cell"]: r for r in json.loads((out / "records.json").read_text())}
    for cell in ("ddp", "fsdp", "zero2"):
        cfg = load_config(records[cell]["overrides"])
        cfg.dry_run = True
        expect = step_time(cfg, model_args_of(cfg), derive(cfg, 2).dims, hw, device="cpu")
        assert float(rows[cell]["predicted_step_time_s"]) == pytest.approx(expect.seconds)
        assert int(rows[cell]["predicted_comm_bytes_per_step"]) == expect.comm_total > 0
        measured = float(rows[cell]["step_time_s"])
        assert float(rows[cell]["step_time_error_pct"]) == pytest.approx(100 * (expect.seconds - measured) / measured)
    # FSDP gathers the parameters in forward and backward and reduce-scatters the gradients: 3 model-sized
    # collectives against DDP's one all-reduce (2 x): more bytes per step
    assert int(rows["fsdp"]["predicted_comm_bytes_per_step"]) > int(rows["ddp"]["predicted_comm_bytes_per_step"])
    md = (out / "compare.md").read_text()
    assert "| predicted rank | measured rank | strategy |" in md and "Rank correlation (Spearman)" in md
    assert rows["tp:tp=3"]["predicted_step_time_s"] == ""  # refused: nothing to predict


def test_the_memory_plot_draws_the_device_capacity(compared):
    from trainer.compare import figures

    out, _, _ = compared
    records = json.loads((out / "records.json").read_text())
    ax = figures(records, capacity_bytes=int(0.01 * 2**30))["memory"].axes[0]
    lines = [ln for ln in ax.get_lines() if ln.get_label() == "device capacity"]
    assert len(lines) == 1 and lines[0].get_ydata()[0] == pytest.approx(0.01 * 1024)


def test_a_rerun_keeps_the_finished_cells(compared):
    out, args, _ = compared
    before = {c: (out / "cells" / c / "record.json").stat().st_mtime_ns for c in ("ddp", "fsdp", "zero2")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "compare.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("(finished before: kept)") == 4, proc.stdout
    assert before == {c: (out / "cells" / c / "record.json").stat().st_mtime_ns for c in before}


def test_help_shows_the_usage():
    # --help and the refusals below in-process (compare.py's main); the runs above start it as its own process
    proc = run_cli("compare.py", ["--help"])
    assert proc.returncode == 0 and "strategies=" in proc.stdout and "sweep=" in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["recipe=llama_debug", "strategies=fsdp,zero4"], "unknown strategy 'zero4'"),
        (["recipe=llama_debug", "strategies=fsdp+gpu"], "unknown modifier '+gpu'"),
        (
            ["recipe=llama_debug", "strategies=fsdp", "sweep=training.micro_batch_size"],
            "sweep=training.micro_batch_size",
        ),
        (["strategies=fsdp"], "recipe=NAME is required"),
        (["recipe=llama_debug", "strategies=fsdp", "nproc=two"], "nproc=two: expected int"),
    ],
)
def test_bad_input_is_one_message(args, message):
    proc = run_cli("compare.py", args)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_cell_carries_several_keys_each_after_its_own_colon():
    from trainer.compare import CompareError, strategy_overrides

    got = strategy_overrides("none:ac=full:training.loss_chunks=8:activation_offload=true", 1)
    assert got[-3:] == ["parallel.ac=full", "training.loss_chunks=8", "parallel.activation_offload=true"]
    with pytest.raises(CompareError, match="'ac' in 'fsdp:ac' is not key=value"):
        strategy_overrides("fsdp:ac", 2)


def test_fine_tuning_methods_are_cells_with_their_own_short_keys():
    """full, lora, dora, qlora are cells like the strategies; after a method, its own keys are short (`rank=16`),
    the others still parallel.*."""
    from trainer.compare import strategy_overrides

    assert strategy_overrides("full", 1) == []
    assert strategy_overrides("lora:rank=16", 1) == ["finetune.method=lora", "finetune.rank=16"]
    assert strategy_overrides("qlora:data=fsdp:nf4_scaler_block=64", 2) == [
        "finetune.method=lora",
        "finetune.quantize_base=true",
        "parallel.data=fsdp",
        "finetune.nf4_scaler_block=64",
    ]
    assert strategy_overrides("dora:ac=full", 1) == ["finetune.method=dora", "parallel.ac=full"]
