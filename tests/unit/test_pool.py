"""tests/pool.py: the long-lived training pools that run the suite's train.py jobs without a process start each."""

from __future__ import annotations

import os

import pool
from helpers import losses_of, run_train

TINY = [
    "recipe=llama_debug",
    "model.dim=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.n_kv_heads=1",
    "model.vocab_size=128",
    "data.source=synthetic",
    "training.seq_len=16",
    "training.micro_batch_size=2",
    "training.global_batch_size=2",
    "training.precision=fp32",
    "training.val_every=0",
    "optim.warmup_steps=1",
    "checkpoint.every=2",
    "logging.every=1",
    "logging.tensorboard=false",
    "logging.wandb.mode=disabled",
]


def _files(run_dir) -> dict[str, bytes]:
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and "COMPLETE" not in p.name
    }


def test_a_resume_reads_its_checkpoint_in_another_process_and_matches_a_real_launch(tmp_path):
    """The run that writes a checkpoint and the run that resumes from it are two pools (two processes); the
    pooled runs log what the real entry point logs (losses to the bit)."""
    if not pool.enabled():
        return
    pooled = tmp_path / "pooled"
    first = run_train([*TINY, "training.steps=2", f"run_dir={pooled}"])
    assert first.args[0] == "pool" and "step" in first.stdout
    writer = pool._POOLS[(1, "fresh")].proc.pid
    second = run_train([*TINY, "training.steps=4", f"run_dir={pooled}"])
    assert second.args[0] == "pool" and "resumed from" in second.stdout and "at step 2" in second.stdout
    reader = pool._POOLS[(1, "reads")].proc.pid
    assert reader != writer and os.getpid() not in (reader, writer)
    real = tmp_path / "real"
    proc = run_train([*TINY, "training.steps=4", f"run_dir={real}"], env={"SHARDWISE_TEST_POOL": "0"})
    assert proc.args[0] != "pool"
    assert losses_of(pooled) == losses_of(real) and len(losses_of(real)) == 4  # (steps 1-2, then 3-4)


def test_a_job_that_fails_in_its_pool_leaves_the_run_directory_as_it_was(tmp_path):
    """A job the pool cannot finish (here: its timeout ends it mid-run, after it has trained and logged steps)
    stops that pool and puts the run directory back, byte for byte, for the real launch that follows; the next job
    starts a new pool."""
    if not pool.enabled():
        return
    run_dir = tmp_path / "run"
    run_train([*TINY, "training.steps=2", f"run_dir={run_dir}"])
    run_train([*TINY, "training.steps=3", f"run_dir={run_dir}"])  # (the pool of resumed runs is up and warm)
    before = _files(run_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    stopped = pool._POOLS[(1, "reads")]
    assert pool.run([*TINY, "training.steps=100000", f"run_dir={run_dir}"], 1, env, timeout=8) is None
    assert not stopped.alive()
    assert _files(run_dir) == before
    again = run_train([*TINY, "training.steps=4", f"run_dir={run_dir}"])
    assert again.args[0] == "pool" and "at step 3" in again.stdout  # (the step-3 run's last checkpoint)
    assert pool._POOLS[(1, "reads")] is not stopped and pool._POOLS[(1, "reads")].alive()


def test_an_idle_pool_is_stopped_cleanly_and_the_next_job_starts_a_new_one(tmp_path):
    """conftest.py stops pools idle for pool.IDLE_S before each test: the ranks leave between jobs (exit 0, not
    killed), and the next job of that kind starts a new pool."""
    if not pool.enabled():
        return
    run_train([*TINY, "training.steps=1", f"run_dir={tmp_path / 'a'}"])
    idle = pool._POOLS[(1, "fresh")]
    pool.stop_idle(after=60.0)
    assert pool._POOLS.get((1, "fresh")) is idle and idle.alive()  # used a moment ago: kept
    pool.stop_idle(after=0.0)
    assert (1, "fresh") not in pool._POOLS and idle.proc.returncode == 0
    again = run_train([*TINY, "training.steps=1", f"run_dir={tmp_path / 'b'}"])
    assert again.args[0] == "pool" and pool._POOLS[(1, "fresh")] is not idle
