"""What goes wrong in long runs, and what the trainer does about it.

- Preemption: SIGTERM to any rank, or a flag file (written by the SLURM batch script when it gets the
  early-warning signal), makes every rank stop after the same step. The ranks agree through one
  all-reduce of a CPU flag on the side gloo group per step (no device synchronization); the trainer then
  saves synchronously, writes the requeue marker and exits 0.
- Non-finite loss or gradient norm (`numerics.on_nonfinite`): `raise` (default) stops every rank with
  the step named; `skip` leaves the parameters and optimizer state untouched for that step and goes on.
  A NaN or Inf in any rank's gradients reaches every rank through the gradient all-reduce and the global
  norm, so all ranks see the same verdict without a vote.
- Fault injection for tests (`SHARDWISE_FAULT`), so that the recovery paths are exercised for real:
    nan@STEP[:RANK]          the loss of that step becomes NaN on that rank (default all ranks)
    crash@STEP[:RANK]        that rank SIGKILLs itself after the step (first attempt only, so that a
                             torchrun restart can recover)
    kill_in_save@STEP[:RANK] that rank SIGKILLs itself inside the save of that step, after its shards
                             were written and before the checkpoint was marked complete
  Several faults are separated by commas.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

REQUEUE_MARKER = "REQUEUE"  # in run_dir after a preemption stop: the step saved, for the job script
PREEMPT_FLAG = "PREEMPT"  # default flag file in run_dir


class NonFiniteError(RuntimeError):
    pass


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
        self.faults = [f for f in parse_faults(os.environ.get("SHARDWISE_FAULT"))
                       if f.rank is None or f.rank == rank]

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
