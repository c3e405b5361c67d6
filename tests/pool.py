"""Long-lived training pools for the suite: `launch/train.py` jobs without a process start each.

`helpers.run_train` sends a job here when the test expects it to succeed and sets no environment of its own (a
fault injected through SHARDWISE_FAULT, a refusal, a crash: those keep their real launch). A pool is one
`torchrun --nproc_per_node=N tests/pool_server.py` (plain python for one process) that stays up for the session
and runs the jobs of its rank count one after the other, each as the entry point runs it; the test gets back the
ranks' stdout and stderr as a subprocess would give them.

Two pools per rank count: one runs the jobs that start from nothing, the other the jobs that read a checkpoint
(a run directory that holds one, or checkpoint.init_from): a checkpoint is always read by another process than the
one that wrote it. A job that fails in a pool, or outlives its timeout, stops that pool (the next job starts a new
one); its run directory is put back as it was, and the job runs again as a real launch, so a failure is reported by
the entry point itself. SHARDWISE_TEST_POOL=0 turns pools off (every job a real launch).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import costs

REPO = Path(__file__).resolve().parent.parent
SERVER = REPO / "tests" / "pool_server.py"


class Pool:
    def __init__(self, nproc: int, env: dict[str, str]):
        self.nproc = nproc
        self.queue = Path(tempfile.mkdtemp(prefix=f"shardwise-pool{nproc}-"))
        (self.queue / "env.json").write_text(json.dumps(env))
        cmd = [sys.executable, str(SERVER), str(self.queue)]
        if nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd[1:]]
        self.log = open(self.queue / "pool.log", "w")
        self.proc = costs.UNTIMED_POPEN(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True
        )
        self.jobs = 0
        self.last_used = time.monotonic()

    def run(self, argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess | None:
        """The job's CompletedProcess, or None when it failed here (the pool is then stopped)."""
        k = self.jobs
        self.jobs += 1
        tmp = self.queue / f"{k}.json.tmp"
        tmp.write_text(json.dumps({"argv": argv, "env": env}))
        tmp.rename(self.queue / f"{k}.json")
        rcs = [self.queue / f"{k}.rank-{r}.rc" for r in range(self.nproc)]
        deadline = time.monotonic() + timeout
        while not all(f.exists() for f in rcs):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop(now=True)
                return None
            time.sleep(0.02)
        self.last_used = time.monotonic()
        codes = [int(f.read_text()) for f in rcs]
        if any(codes):
            self.stop(now=True)
            return None
        out = "".join((self.queue / f"{k}.rank-{r}.out").read_text() for r in range(self.nproc))
        err = "".join((self.queue / f"{k}.rank-{r}.err").read_text() for r in range(self.nproc))
        return subprocess.CompletedProcess(["pool", str(self.nproc), *argv], 0, out, err)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, *, now: bool = False) -> None:
        """Between jobs: each rank leaves when it sees STOP. `now` (a job failed or hangs): killed, with its workers
        (the pool runs in a process group of its own)."""
        (self.queue / "STOP").write_text("")
        try:
            self.proc.wait(timeout=0 if now else 30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.queue, ignore_errors=True)


_POOLS: dict[tuple[int, str], Pool] = {}


@atexit.register
def _stop_all() -> None:
    for pool in _POOLS.values():
        if pool.alive():
            pool.stop()


# A pool left idle this long is stopped (conftest.py asks before each test): an idle rank is not free. Each layout
# a pool has run leaves its meshes' gloo groups in the process (parallel/mesh.py reuses them per layout; torch's DTensor
# caches key meshes by their ranks, so they cannot be destroyed while the process lives), and their threads wake: a
# 2-rank pool after its checkpoint tests took 5-15% of a core per rank doing nothing (before the meshes were reused,
# every job added groups), ~8 such ranks alive for most of the run, 20% of the 2 cores (top, 2026-12-06). Stopping
# costs the next job of that kind one pool start (~5 s).
IDLE_S = 45.0


def stop_idle(after: float = IDLE_S) -> None:
    """Stop the pools whose last job ended more than `after` seconds ago."""
    now = time.monotonic()
    for key, pool in list(_POOLS.items()):
        if now - pool.last_used > after:
            if pool.alive():
                pool.stop()
            del _POOLS[key]


def enabled() -> bool:
    return os.environ.get("SHARDWISE_TEST_POOL", "1") != "0"


def _reads_a_checkpoint(argv: list[str], run_dir: Path | None) -> bool:
    return any(a.startswith("checkpoint.init_from=") for a in argv) or (
        run_dir is not None and (run_dir / "checkpoints").is_dir()
    )


def run(argv: list[str], nproc: int, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess | None:
    """Run one train.py job in the pool of its rank count and kind, or return None (then run it for real): the run
    directory is as it was before the attempt."""
    run_dir = next((Path(a.split("=", 1)[1]) for a in argv if a.startswith("run_dir=")), None)
    if run_dir is not None and not run_dir.is_absolute():
        run_dir = REPO / run_dir
    kind = "reads" if _reads_a_checkpoint(argv, run_dir) else "fresh"
    backup = None
    if run_dir is not None and run_dir.exists():
        backup = Path(tempfile.mkdtemp(prefix="shardwise-pool-backup-")) / "run"
        shutil.copytree(run_dir, backup, symlinks=True)
    pool = _POOLS.get((nproc, kind))
    if pool is None or not pool.alive():
        pool = _POOLS[(nproc, kind)] = Pool(nproc, env)
    start = time.perf_counter()
    proc = pool.run(argv, env, timeout)
    if proc is not None:
        costs.log_pooled(proc.args, time.perf_counter() - start)
    if proc is None and run_dir is not None:  # put the run directory back for the real launch
        shutil.rmtree(run_dir, ignore_errors=True)
        if backup is not None:
            shutil.copytree(backup, run_dir, symlinks=True)
    if backup is not None:
        shutil.rmtree(backup.parent, ignore_errors=True)
    return proc
