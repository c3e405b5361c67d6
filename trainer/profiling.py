"""`profile.steps: [start, end]`: a torch profiler trace of those steps (Chrome / Perfetto JSON), and on CUDA
with `profile.memory_snapshot: true` the caching allocator's history as a snapshot for
https://pytorch.org/memory_viz, also dumped when the run dies of an out-of-memory error.

Files: `<profile.dir or run_dir/profile>/trace-rank<r>-steps<start>-<end>.pt.trace.json` and
`memory-rank<r>-steps<start>-<end>.pickle` (`memory-rank<r>-oom.pickle` after an OOM). The trainer wraps each
step's work in ranges named `shardwise.<phase>` (data, forward_backward, forward, backward, optimizer_step,
log_sync, checkpoint_save), so they are easy to find; with `profile.nvtx: true` the
same ranges are NVTX ranges too, for Nsight Systems. `phase_split` reads a trace back into a step's split.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

# (`forward_backward` holds a step's forward and backward passes: one pipeline schedule step under pp, where the
# two interleave.)


class Phases:
    """`with phases("forward"): ...` opens `shardwise.forward` as a torch profiler range (free unless a profiler
    runs) and, with `nvtx`, as an NVTX range as well."""

    def __init__(self, nvtx: bool = False):
        self.nvtx = nvtx

    @contextlib.contextmanager
    def __call__(self, name: str):
        label = f"shardwise.{name}"
        with torch.profiler.record_function(label):
            if not self.nvtx:
                yield
                return
            torch.cuda.nvtx.range_push(label)
            try:
                yield
            finally:
                torch.cuda.nvtx.range_pop()


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
        trace = (
            self.dir / f"trace-rank{self.rank}-steps{a}-{b}.pt.trace.json"
        )  # (TensorBoard's profiler plugin reads *.pt.trace.json)
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


def config_problems(cfg, *, runs_on_cpu: bool) -> list[str]:
    """The profile section's rules (trainer/validate.py::validate collects every subsystem's; `runs_on_cpu`: its
    verdict on where this run's steps run)."""
    t = cfg.training
    problems: list[str] = []
    pr = cfg.profile
    if pr.steps and (len(pr.steps) != 2 or not 1 <= pr.steps[0] <= pr.steps[1]):
        problems.append(f"profile.steps={list(pr.steps)} must be [start, end] with 1 <= start <= end")
    if pr.memory_snapshot and not pr.steps:
        problems.append("profile.memory_snapshot=true needs profile.steps=[start,end] (the steps to record)")
    if pr.nvtx and runs_on_cpu:
        problems.append(
            f"profile.nvtx=true writes NVTX ranges, which are CUDA's; training.device={t.device} runs on "
            "the CPU here (the same shardwise.* ranges are in the torch profiler trace: set profile.steps=[start,end])"
        )
    if pr.memory_snapshot and str(t.device) == "cpu":
        problems.append(
            "profile.memory_snapshot=true records the CUDA caching allocator; training.device=cpu has "
            "none (on CPU, peak RSS is logged every step)"
        )
    return problems


# ------------------------------------------------------------------------------------------------
# A trace read back: where a step's time went

_COMM_PREFIXES = ("c10d::", "_c10d_functional::", "c10d_functional::", "record_param_comms", "nccl:", "gloo:")


def _is_comm(name: str) -> bool:
    return name.startswith(_COMM_PREFIXES) or "nccl" in name.lower()


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _length(merged: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in merged)


def _overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """The length of the intersection of two merged interval lists."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0.0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def phase_split(events: list[dict], steps: int) -> dict:
    """A profiled window of `steps` training steps (Chrome trace events, as torch.profiler exports them),
    split per step, in seconds.

    `phases`: the mean time per step in each `shardwise.<phase>` range: on a GPU the ranges' spans on the device
    (Kineto's gpu_user_annotation), else their spans on the main thread. `device`: over the window (first range's
    start to last range's end), what the device did: `compute` (GPU kernels other than NCCL's; on CPU the main
    thread's operators other than collectives), `communication` (NCCL kernels; gloo's worker threads on CPU),
    `communication_exposed` (communication while no compute ran: time the step waited for it) and `idle` (neither:
    launch and Python overhead, host syncs, pipeline bubbles)."""
    xs = [e for e in events if e.get("ph") == "X" and "dur" in e]
    kernels = [e for e in xs if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    on_gpu = bool(kernels)
    ours = [e for e in xs if str(e.get("name", "")).startswith("shardwise.")]
    on_device = [e for e in ours if e.get("cat") == "gpu_user_annotation"]
    ranges = on_device if on_gpu and on_device else [e for e in ours if e.get("cat") == "user_annotation"]
    if not ranges:
        raise ValueError("no shardwise.* ranges in the trace: was it recorded around Trainer.run_step?")
    us = 1e-6
    phases: dict[str, float] = {}
    for e in ranges:
        name = e["name"].removeprefix("shardwise.")
        phases[name] = phases.get(name, 0.0) + e["dur"] * us / steps
    start = min(e["ts"] for e in ranges)
    end = max(e["ts"] + e["dur"] for e in ranges)
    if on_gpu:
        comm = [(e["ts"], e["ts"] + e["dur"]) for e in kernels if _is_comm(e["name"])]
        compute = [(e["ts"], e["ts"] + e["dur"]) for e in kernels if not _is_comm(e["name"])]
        timeline = "GPU kernels (NCCL's are communication)"
    else:
        main = ranges[0].get("tid")
        ops = [e for e in xs if e.get("cat") == "cpu_op"]
        compute = [(e["ts"], e["ts"] + e["dur"]) for e in ops if e.get("tid") == main and not _is_comm(e["name"])]
        comm = [
            (e["ts"], e["ts"] + e["dur"]) for e in xs if e.get("tid") != main and str(e["name"]).startswith("gloo:")
        ]
        timeline = "CPU threads (the main thread's operators compute; gloo's worker threads communicate)"
    clip = [(start, end)]
    compute_u, comm_u = _union(compute), _union(comm)
    compute_t = _overlap(compute_u, clip)
    comm_t = _overlap(comm_u, clip)
    busy = _overlap(_union(compute_u + comm_u), clip)
    exposed = busy - compute_t
    window = end - start
    return {
        "steps": steps,
        "timeline": timeline,
        "phases": phases,
        "device": {
            "window": window * us / steps,
            "compute": compute_t * us / steps,
            "communication": comm_t * us / steps,
            "communication_exposed": exposed * us / steps,
            "idle": (window - busy) * us / steps,
        },
    }
