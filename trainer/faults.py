"""What goes wrong in long runs, and what the trainer does about it.

- Preemption: SIGTERM to any rank, or a flag file (written by the SLURM batch script when it gets the
  early-warning signal), makes every rank stop after the same step. The ranks agree through one
  all-reduce of a CPU flag on the side gloo group per step (no device synchronization); the trainer then
  saves synchronously, writes the requeue marker and exits 0.
- Non-finite loss or gradient norm (`numerics.on_nonfinite`): `raise` (default) stops every rank with
  the step named; `skip` leaves the parameters and optimizer state untouched for that step and goes on.
  A NaN or Inf in any rank's gradients reaches every rank through the gradient all-reduce and the global
  norm, so all ranks see the same verdict without a vote.
- Two jobs in one run directory: rank 0 holds an exclusive lock (`flock`) on `.shardwise.lock` in run_dir
  and in the checkpoint root for the whole run; a second job is refused at start naming the holder. The
  kernel drops the lock when its process dies, so a lock left by a killed run is taken over (with a note).
- A dead torchrun agent: torchrun starts each worker in a session of its own, so killing the agent's
  process group (or the agent itself with SIGKILL) does not reach them. Every worker watches its parent
  and stops when the agent is gone, instead of training on unsupervised beside a rerun.
- Fault injection for tests (`SHARDWISE_FAULT`), so that the recovery paths are exercised for real:
    nan@STEP[:RANK]          the loss of that step becomes NaN on that rank (default all ranks)
    crash@STEP[:RANK]        that rank SIGKILLs itself after the step (first attempt only, so that a
                             torchrun restart can recover)
    kill_in_save@STEP[:RANK] that rank SIGKILLs itself inside the save of that step, after its shards
                             were written and before the checkpoint was marked complete
  Several faults are separated by commas.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

REQUEUE_MARKER = "REQUEUE"  # in run_dir after a preemption stop: the step saved, for the job script
PREEMPT_FLAG = "PREEMPT"  # default flag file in run_dir


class NonFiniteError(RuntimeError):
    pass


class RefusedStart(ValueError):
    """A start-up check refused the run: every rank exits 2, rank 0 prints the one message."""


LOCK_NAME = ".shardwise.lock"


class RunLock:
    """An exclusive lock on each directory a run writes (run_dir, the checkpoint root), held until close.

    The lock file records the holder (pid, host, start time). Its lock is `flock`, which the kernel
    releases when the holder dies: a file that still names a holder but is not locked was left by a run
    that was killed, and is taken over with a note. A clean close empties the file."""

    def __init__(self, dirs: list[Path]):
        self.dirs = list(dict.fromkeys(Path(d).absolute() for d in dirs))
        self.files: list = []

    def acquire(self) -> list[str]:
        notes = []
        for d in self.dirs:
            d.mkdir(parents=True, exist_ok=True)
            f = open(d / LOCK_NAME, "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "unknown"
                f.close()
                self.release()
                raise RefusedStart(
                    f"{d} is in use by another shardwise run ({_describe_holder(holder)}); two runs "
                    f"writing one directory would overwrite each other's checkpoints and metrics. "
                    f"Wait for it to finish (or stop it), or choose another run_dir / checkpoint.dir"
                ) from None
            f.seek(0)
            previous = f.read().strip()
            if previous:
                notes.append(
                    f"took over the lock of {d} from a run that is no longer running ({_describe_holder(previous)})"
                )
            f.seek(0)
            f.truncate()
            f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
            f.flush()
            self.files.append(f)
        return notes

    def release(self) -> None:
        for f in self.files:
            f.seek(0)
            f.truncate()  # a clean end: nothing stale to report to the next run
            f.flush()
            fcntl.flock(f, fcntl.LOCK_UN)
            f.close()
        self.files = []


def _describe_holder(text: str) -> str:
    try:
        h = json.loads(text)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["since"]))
        return f"pid {h['pid']} on {h['host']}, since {since}"
    except (ValueError, KeyError, TypeError):
        return text[:200]


def watch_parent(interval_s: float = 0.5) -> None:
    """Under torchrun: stop this worker when its agent (the parent process) is gone. The agent is what
    restarts, stops and reports the workers; without it a worker would train on unsupervised."""
    if any(t.name == "shardwise-parent-watch" for t in threading.enumerate()):
        return  # one per process (a process may run several jobs: tests/pool_server.py)
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:  # reparented: the agent died
                print(
                    f"shardwise: rank {os.environ.get('RANK', '?')}: the torchrun agent (pid {parent}) is gone; "
                    f"stopping this worker",
                    file=sys.stderr,
                    flush=True,
                )
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="shardwise-parent-watch", daemon=True).start()


@dataclass
class Fault:
    kind: str
    step: int
    rank: int | None


def parse_faults(spec: str | None) -> list[Fault]:
    faults = []
    for item in filter(None, (s.strip() for s in (spec or "").split(","))):
        try:
            kind, where = item.split("@")
            step, _, rank = where.partition(":")
            faults.append(Fault(kind, int(step), int(rank) if rank else None))
        except ValueError:
            raise ValueError(f"SHARDWISE_FAULT={spec}: cannot parse '{item}'; expected KIND@STEP[:RANK]") from None
        if kind not in ("nan", "crash", "kill_in_save"):
            raise ValueError(f"SHARDWISE_FAULT={spec}: unknown fault '{kind}'; known: nan, crash, kill_in_save")
    return faults


class Faults:
    """The injected faults that apply to this rank (none unless SHARDWISE_FAULT is set)."""

    def __init__(self, rank: int):
        self.rank = rank
        self.first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        self.faults = [f for f in parse_faults(os.environ.get("SHARDWISE_FAULT")) if f.rank is None or f.rank == rank]

    def _at(self, kind: str, step: int) -> bool:
        return any(f.kind == kind and f.step == step for f in self.faults)

    def poison_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if self._at("nan", step) else loss

    def maybe_crash(self, step: int) -> None:
        if self.first_attempt and self._at("crash", step):
            os.kill(os.getpid(), signal.SIGKILL)

    def maybe_kill_in_save(self, step: int) -> None:
        if self._at("kill_in_save", step):
            os.kill(os.getpid(), signal.SIGKILL)


class Preemption:
    """Turns SIGTERM or a flag file on any rank into one agreed stop step."""

    def __init__(self, flag_file: Path, group=None):
        self.flag_file = flag_file
        self.group = group  # a gloo group: the flag is a CPU tensor, reducing it never syncs the device
        self.signalled: str | None = None
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signalled = signal.Signals(signum).name

    def local_reason(self) -> str | None:
        if self.signalled:
            return self.signalled
        if self.flag_file.exists():
            return f"flag file {self.flag_file}"
        return None

    def should_stop(self) -> bool:
        """Collective: True on every rank if any rank was asked to stop."""
        flag = torch.tensor([1 if self.local_reason() else 0], dtype=torch.int32)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def write_requeue_marker(self, run_dir: Path, step: int, reason: str) -> Path:
        marker = run_dir / REQUEUE_MARKER
        marker.write_text(f"step {step}\nreason {reason}\n")
        return marker
