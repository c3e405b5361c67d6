"""The cluster path for real: jobs submitted to a one-node SLURM (started by .ci/slurm.sh), preemption by
SLURM's early-warning signal with requeue and resume, two torchrun agents as two nodes, and the submit
checks. SLURM tests skip on a machine without SLURM, except where SHARDWISE_REQUIRE_SLURM=1 (CI) makes a
missing SLURM a failure."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, metric_rows, run_cli, run_train

SUBMIT = [sys.executable, str(REPO / "launch" / "submit.py")]
SMALL = [
    "data.source=synthetic",
    "model.dim=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.vocab_size=256",
    "training.seq_len=32",
    "training.global_batch_size=8",
    "training.micro_batch_size=2",
    "training.val_every=0",
    "optim.warmup_steps=5",
    "logging.every=1",
    "logging.wandb.mode=disabled",
    "logging.tensorboard=false",
]


def slurm_up() -> bool:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    return out.returncode == 0 and any(state in out.stdout for state in ("idle", "mix", "alloc"))


@pytest.fixture
def slurm():
    if not slurm_up():
        if os.environ.get("SHARDWISE_REQUIRE_SLURM") == "1":
            pytest.fail("SHARDWISE_REQUIRE_SLURM=1 but no SLURM answers (.ci/slurm.sh start)")
        pytest.skip("no SLURM here (.ci/slurm.sh start brings one up)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_field(job: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job, "-o"], capture_output=True, text=True, timeout=30).stdout
    m = re.search(rf"\b{field}=(\S+)", out)
    return m.group(1) if m else ""


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}")


def submit(tmp_path: Path, overrides: list[str], name: str) -> tuple[str, Path, Path]:
    run_dir, log = tmp_path / name, tmp_path / f"{name}.out"
    proc = subprocess.run(
        [
            *SUBMIT,
            "recipe=llama_debug_fsdp",
            *overrides,
            "--nodes",
            "1",
            "--cpu",
            "--procs-per-node",
            "2",
            "--partition",
            "debug",
            "--time",
            "00:15:00",
            "--run-dir",
            str(run_dir),
            "--output",
            str(log),
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    job = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    return job, run_dir, log


@pytest.mark.slow  # a SLURM job (the slow tier: README)
def test_submitted_job_completes_with_a_complete_checkpoint(slurm, tmp_path):
    job, run_dir, log = submit(tmp_path, [*SMALL, "training.steps=12", "checkpoint.every=6"], "job")
    wait_for(lambda: job_field(job, "JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 240, "the job")
    assert job_field(job, "JobState") == "COMPLETED", log.read_text()[-3000:]
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text() == "step-12" and (ckpts / "step-12" / "COMPLETE").is_file()
    assert [r["step"] for r in metric_rows(run_dir / "metrics.jsonl")] == list(range(1, 13))
    assert "head localhost" in log.read_text()


@pytest.mark.slow  # a SLURM job (the slow tier: README)
def test_early_warning_signal_saves_requeues_and_resumes_to_the_same_loss(slurm, tmp_path):
    args = [*SMALL, "training.steps=150", "checkpoint.every=0"]
    job, run_dir, log = submit(tmp_path, args, "preempted")
    wait_for(
        lambda: (run_dir / "metrics.jsonl").is_file() and len(metric_rows(run_dir / "metrics.jsonl")) >= 5,
        180,
        "step 5",
    )
    # what SLURM does `--signal` seconds before the time limit: SIGUSR1 to the batch shell only
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
    wait_for(lambda: job_field(job, "Restarts") == "1" and job_field(job, "JobState") == "PENDING", 120, "the requeue")
    # SLURM holds a requeued job (EligibleTime) while the old run's credential expires: AuthInfo=cred_expire,
    # 120 s by default, 20 s on the CI's one-node cluster (.ci/slurm.sh); releasing it earlier gets "Job
    # credential revoked" from slurmd, so the test waits like a cluster would and runs the reference meanwhile
    straight = tmp_path / "straight"
    run_train(["recipe=llama_debug_fsdp", *args, f"run_dir={straight}"], nproc=2)
    wait_for(lambda: job_field(job, "JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 360, "the resumed job")
    text = log.read_text()
    assert job_field(job, "JobState") == "COMPLETED", text[-3000:]
    saved = int(re.search(r"preempted \(flag file .*\): saved step (\d+), wrote .*REQUEUE", text).group(1))
    assert f"saved after preemption (step {saved}); requeueing job {job}" in text
    assert "(restart 1)" in text and f"resumed from {run_dir}/checkpoints/step-{saved} at step {saved}" in text
    assert 5 <= saved < 150
    rows = {r["step"]: r["train/loss"] for r in metric_rows(run_dir / "metrics.jsonl")}
    want = {r["step"]: r["train/loss"] for r in metric_rows(straight / "metrics.jsonl")}
    assert rows[150] == want[150] and rows == want


def test_two_torchrun_agents_as_two_nodes_match_one_agent(tmp_path):
    args = ["recipe=llama_debug_fsdp", *SMALL, "training.steps=6"]
    one = tmp_path / "one"
    run_train([*args, f"run_dir={one}"], nproc=2)
    two = tmp_path / "two"
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{port}",
        "--rdzv_id=two-nodes",
        str(REPO / "launch" / "train.py"),
        *args,
        f"run_dir={two}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agents = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
        for _ in range(2)
    ]
    outs = [a.communicate(timeout=300) for a in agents]
    for a, (_out, err) in zip(agents, outs):
        assert a.returncode == 0, err[-3000:]
    got = {r["step"]: r["train/loss"] for r in metric_rows(two / "metrics.jsonl")}
    want = {r["step"]: r["train/loss"] for r in metric_rows(one / "metrics.jsonl")}
    assert sorted(got) == list(range(1, 7))
    for step in want:
        assert abs(got[step] - want[step]) <= 1e-6 * want[step], (
            f"step {step}: two agents {got[step]}, one {want[step]}"
        )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--nodes", "1", "--cpu", "--procs-per-node", "3", "parallel.tp=2"], "1 node(s) x 3 rank(s) = world 3"),
        (["--nodes", "1", "--cpu", "--procs-per-node", "2", "--partition", "no-such-partition"], "no-such-partition"),
        (
            ["--nodes", "1", "--cpu", "--procs-per-node", "2", "--run-dir", "/etc/hostname/run"],
            "not writable",
        ),  # under a file
        (["--nodes", "1", "--cpu", "--procs-per-node", "2", "--time", "25h"], "--time 25h: not a SLURM time limit"),
    ],
)
def test_submit_refuses_bad_requests_before_queueing(extra, message):
    before = subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout if shutil.which("squeue") else ""
    # in-process (submit.py's main); the dry run below starts the script as its own process
    proc = run_cli("submit.py", ["recipe=llama_debug_fsdp", *extra])
    assert proc.returncode == 2 and "refused, nothing was queued" in proc.stderr and message in proc.stderr, proc.stderr
    if shutil.which("squeue"):
        assert subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout == before


def test_submit_dry_run_without_slurm_notes_the_partition_instead_of_refusing(tmp_path):
    """On a laptop (no sinfo on PATH) a dry run prints the script and says what it could not check."""
    proc = subprocess.run(
        [
            *SUBMIT,
            "recipe=llama_debug_fsdp",
            "--cpu",
            "--procs-per-node",
            "2",
            "--partition",
            "gpu",
            "--time",
            "1-01:30:00",
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PATH": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --partition=gpu" in proc.stdout and "#SBATCH --time=1-01:30:00" in proc.stdout
    assert "note: --partition gpu: not checked (sinfo not found" in proc.stderr


@pytest.mark.slow  # a SLURM job (the slow tier: README)
def test_compare_runs_its_cells_as_a_slurm_array(slurm, tmp_path):
    """launch/compare.py --slurm: the runnable cells become one job array (the refused one is not queued), each
    task runs its cell's torchrun, and the table is collected from what the tasks wrote, as without SLURM."""
    import csv

    out = tmp_path / "cmp"
    # docs/compare.md's --slurm line, shrunk (the small model, 4 steps), with an impossible cell more
    shown = next(
        ln
        for ln in (REPO / "docs" / "compare.md").read_text().splitlines()
        if ln.startswith("python launch/compare.py") and "--slurm" in ln
    ).split()[2:]
    strategies = next(a for a in shown if a.startswith("strategies=")) + ",tp:tp=3"
    args = [
        *[a for a in shown if not a.startswith(("strategies=", "steps="))],
        *SMALL,
        "training.precision=fp32",
        "optim.warmup_steps=1",
        strategies,
        "steps=4",
        f"out={out}",
        "slurm_time=00:15:00",
    ]
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "compare.py"), *args],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cells = strategies.split("=", 1)[1].split(",")[:-1]  # the runnable ones, in order
    script = (out / "array.sbatch").read_text()
    assert f"#SBATCH --array=0-{len(cells) - 1}" in script and "#SBATCH --partition=debug" in script
    job = re.search(rf"submitted SLURM array job (\d+): {len(cells)} cells", proc.stdout).group(1)
    assert sorted(p.name for p in (out / "cells").glob("slurm-*.out")) == [
        f"slurm-{job}_{i}.out" for i in range(len(cells))
    ]
    with open(out / "compare.csv") as f:
        rows = {r["cell"]: r for r in csv.DictReader(f)}
    assert all(rows[c]["status"] == "ok" for c in cells) and rows["tp:tp=3"]["status"] == "refused"
    for i, cell in enumerate(cells):
        steps = [r for r in metric_rows(out / "cells" / cell / "run" / "metrics.jsonl") if "train/loss" in r]
        assert float(rows[cell]["final_loss"]) == steps[-1]["train/loss"] and len(steps) == 4
        assert f"compare: {cell}: ok" in (out / "cells" / f"slurm-{job}_{i}.out").read_text()
    assert "finished before" not in proc.stdout
