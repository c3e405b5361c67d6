"""`profile.steps: [start, end]`: a torch profiler trace of those steps (Chrome / Perfetto JSON), and on CUDA
with `profile.memory_snapshot: true` the caching allocator's history as a snapshot for
https://pytorch.org/memory_viz, also dumped when the run dies of an out-of-memory error.

Files: `<profile.dir or run_dir/profile>/trace-rank<r>-steps<start>-<end>.json` and
`memory-rank<r>-steps<start>-<end>.pickle` (`memory-rank<r>-oom.pickle` after an OOM). The trainer wraps each
step's work in `shardwise.forward_backward` and `shardwise.optimizer_step` ranges, so they are easy to find.
"""

from __future__ import annotations

from pathlib import Path

import torch


class Profiler:
    def __init__(self, cfg, run_dir: Path, rank: int, device: torch.device, note=print):
        p = cfg.profile
        self.window = tuple(p.steps) if p.steps else None
        self.memory = bool(p.memory_snapshot) and device.type == "cuda"
        self.dir = Path(p.dir or run_dir / "profile")
        self.rank, self.device, self.note = rank, device, note
        self.prof = None
        self.recording_memory = False

    def before_step(self, step: int) -> None:
        if not self.window or step != self.window[0]:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True)
        self.prof.__enter__()
        if self.memory:
            torch.cuda.memory._record_memory_history(max_entries=200_000)
            self.recording_memory = True

    def after_step(self, step: int) -> None:
        if self.prof is None or step != self.window[1]:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.prof.__exit__(None, None, None)
        a, b = self.window
        trace = self.dir / f"trace-rank{self.rank}-steps{a}-{b}.json"
        self.prof.export_chrome_trace(str(trace))
        self.prof = None
        self.note(f"profiler trace of steps {a}-{b}: {trace} (open in https://ui.perfetto.dev)")
        if self.recording_memory:
            self.dump_memory(self.dir / f"memory-rank{self.rank}-steps{a}-{b}.pickle")
            torch.cuda.memory._record_memory_history(enabled=None)
            self.recording_memory = False

    def dump_memory(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(path))
        self.note(f"CUDA memory snapshot: {path} (drag into https://pytorch.org/memory_viz)")

    def on_oom(self) -> None:
        if self.recording_memory:
            self.dump_memory(self.dir / f"memory-rank{self.rank}-oom.pickle")


def config_problems(cfg) -> list[str]:
    """The profile section's rules (trainer/config.py::validate collects every subsystem's)."""
    t = cfg.training
    problems: list[str] = []
    pr = cfg.profile
    if pr.steps and (len(pr.steps) != 2 or not 1 <= pr.steps[0] <= pr.steps[1]):
        problems.append(f"profile.steps={list(pr.steps)} must be [start, end] with 1 <= start <= end")
    if pr.memory_snapshot and not pr.steps:
        problems.append("profile.memory_snapshot=true needs profile.steps=[start,end] (the steps to record)")
    if pr.memory_snapshot and str(t.device) == "cpu":
        problems.append("profile.memory_snapshot=true records the CUDA caching allocator; training.device=cpu has "
                        "none (on CPU, peak RSS is logged every step)")
    return problems
