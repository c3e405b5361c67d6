"""Throughput, MFU, memory, and the logging sinks (console, JSONL, TensorBoard, Weights & Biases).

Every sink implements `log(metrics, step)` and `close()`; a sink that is switched off is simply not
built, and only the logging rank builds any. Heavy packages (tensorboard, wandb) are imported lazily.
Metric names follow the common convention (train/loss, perf/mfu_pct, mem/peak_allocated_gib ...).
"""

from __future__ import annotations

import json
import os
import re
import resource
import sys
import time
from pathlib import Path
from typing import Protocol

import torch

# Dense (no sparsity) peak TFLOP/s per device, by name fragment; bf16/fp16 tensor cores and fp32.
# Sources: NVIDIA data sheets (H100 SXM 989 bf16 dense, A100 312, ...).
_PEAKS: list[tuple[str, float, float]] = [  # (name fragment, 16-bit, fp32)
    ("h200", 989.0, 67.0),
    ("h100", 989.0, 67.0),  # SXM; the PCIe card is lower (756) and reports "H100 PCIe"
    ("h800", 989.0, 67.0),
    ("gh200", 989.0, 67.0),
    ("b200", 2250.0, 80.0),
    ("a100", 312.0, 19.5),
    ("a800", 312.0, 19.5),
    ("l40s", 362.0, 91.6),
    ("a10g", 125.0, 31.2),
    ("l4", 121.0, 30.3),
    ("v100", 125.0, 15.7),
    ("4090", 165.2, 82.6),
    ("3090", 71.0, 35.6),
]


def detect_peak_tflops(device: torch.device, precision: str) -> float | None:
    """The device's dense peak for `precision`, or None when unknown (CPUs, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    if "h100" in name and "pcie" in name:
        return 756.0 if precision != "fp32" else 51.0
    for frag, half, single in _PEAKS:
        if frag in name:
            return single if precision == "fp32" else half
    return None


def mfu_pct(flops_per_token: int, tokens_per_sec_per_device: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilization in percent: achieved model FLOP/s over the device's peak."""
    if not peak_tflops:
        return None
    return 100.0 * flops_per_token * tokens_per_sec_per_device / (peak_tflops * 1e12)


class MemoryMonitor:
    """Peak memory since the last reset: the CUDA allocator on GPU, the process's peak RSS on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.total = torch.cuda.get_device_properties(device).total_memory
        else:
            self.total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def stats(self) -> dict[str, float]:
        gib = 2**30
        if self.device.type == "cuda":
            alloc = torch.cuda.max_memory_allocated(self.device)
            reserved = torch.cuda.max_memory_reserved(self.device)
            return {
                "mem/peak_allocated_gib": alloc / gib,
                "mem/peak_reserved_gib": reserved / gib,
                "mem/peak_pct": 100.0 * reserved / self.total,
            }
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        return {"mem/peak_rss_gib": rss / gib, "mem/peak_pct": 100.0 * rss / self.total}


# ----------------------------------------------------------------------------------------------
# Sinks


class Sink(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}%"  # "-": no known peak for this device (set logging.peak_tflops)


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class ConsoleSink:
    """One line per logging step: step, loss, grad norm, lr, tokens/s/device, TFLOP/s, MFU, memory."""

    def __init__(self, total_steps: int, write=None):
        self.total_steps = total_steps
        self.write = write or (lambda s: print(s, flush=True))

    def log(self, m: dict[str, float], step: int) -> None:
        if "train/loss" in m:
            mem = m.get("mem/peak_reserved_gib", m.get("mem/peak_rss_gib"))
            self.write(
                f"step {step:>6}/{self.total_steps}  loss {m['train/loss']:.4f}  "
                f"gnorm {_fmt(m.get('train/grad_norm'), '.3f')}"
                f"  lr {m['train/lr']:.2e}  tok/s/dev {m['perf/tokens_per_sec_per_gpu']:,.0f}"
                f"  TFLOP/s {m['perf/tflops_per_gpu']:.2f}  MFU {_pct(m.get('perf/mfu_pct'))}"
                f"  mem {mem:.2f} GiB ({m['mem/peak_pct']:.0f}%)  eta {_duration(m.get('perf/eta_s', 0.0))}"
            )
        if "val/loss" in m:
            self.write(
                f"step {step:>6}/{self.total_steps}  val loss {m['val/loss']:.4f}  val ppl {m['val/perplexity']:.2f}"
            )

    def close(self) -> None:
        pass


class JsonlSink:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a", buffering=1)  # line-buffered: a crash keeps every finished line

    def log(self, m: dict[str, float], step: int) -> None:
        self.f.write(json.dumps({"step": step, "time": time.time(), **m}) + "\n")

    def close(self) -> None:
        self.f.close()


def observed_expert_load(path) -> float:
    """A run's routing imbalance from its metrics.jsonl (`JsonlSink`'s rows), in the worst step and layer: the busiest
    rank's rows over the mean rank's (`moe/<layer>/rank_max_over_mean`, logged under expert parallelism), else the
    busiest expert's tokens over the mean (`max_over_mean`), which bounds any rank's (a rank's experts together carry
    at most their number times the busiest one's share)."""
    worst: dict[str, float] = {"rank_max_over_mean": 0.0, "max_over_mean": 0.0}
    for line in Path(path).read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        for key, value in row.items():
            kind = key.rsplit("/", 1)[-1]
            if key.startswith("moe/") and kind in worst and value is not None:
                worst[kind] = max(worst[kind], float(value))
    if not any(worst.values()):
        raise ValueError(f"{path}: no moe/<layer>/max_over_mean values (a log of an MoE run's metrics.jsonl)")
    return worst["rank_max_over_mean"] or worst["max_over_mean"]


class TensorBoardSink:
    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(log_dir=str(log_dir))

    def log(self, m: dict[str, float], step: int) -> None:
        for k, v in m.items():
            if v is not None:
                self.w.add_scalar(k, v, step)
        self.w.flush()

    def close(self) -> None:
        self.w.close()


_SECRET = re.compile(r"(api[_-]?key|token|secret|password|passwd|credential)", re.IGNORECASE)


def strip_secrets(obj):
    """Drop every mapping key that looks like a secret, recursively (for logged configs)."""
    if isinstance(obj, dict):
        return {k: strip_secrets(v) for k, v in obj.items() if not _SECRET.search(str(k))}
    if isinstance(obj, list):
        return [strip_secrets(v) for v in obj]
    return obj


class WandbSink:
    """Weights & Biases; `train/step` is the step metric so a resumed run never drops points."""

    def __init__(self, cfg, run_dir: Path, config: dict, run_id: str | None = None):
        import wandb

        w = cfg.logging.wandb
        (run_dir / "wandb").parent.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            mode=str(w.mode),
            project=w.project,
            entity=w.entity,
            name=w.run_name or cfg.name,
            group=w.group,
            tags=list(w.tags),
            dir=str(run_dir),
            config=strip_secrets(config),
            id=run_id,
            resume="allow" if run_id else None,
            settings=wandb.Settings(console="off", quiet=True),
        )
        self.run.define_metric("train/step")
        self.run.define_metric("*", step_metric="train/step")

    @property
    def run_id(self) -> str:
        return self.run.id

    def log(self, m: dict[str, float], step: int) -> None:
        self.run.log({"train/step": step, **{k: v for k, v in m.items() if v is not None}})

    def close(self) -> None:
        self.run.finish()


class ProgressBar:
    """A tqdm bar with ETA on the logging rank (stderr), advanced once per step."""

    def __init__(self, total: int, initial: int = 0):
        from tqdm import tqdm

        self.bar = tqdm(
            total=total, initial=initial, unit="step", file=sys.stderr, dynamic_ncols=True, mininterval=1.0, leave=False
        )

    def update(self, n: int = 1, **postfix) -> None:
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(n)

    def write(self, line: str) -> None:
        self.bar.write(line)

    def close(self) -> None:
        self.bar.close()


class MetricLogger:
    """Fans every logging step out to the configured sinks. On non-logging ranks it holds none."""

    def __init__(
        self, cfg, run_dir: Path, *, enabled: bool, config: dict, start_step: int = 0, wandb_run_id: str | None = None
    ):
        self.sinks: list[Sink] = []
        self.progress: ProgressBar | None = None
        self.wandb: WandbSink | None = None
        self.enabled = enabled
        self.sample_rows: list[dict] = []  # (every sampling of the run so far: W&B's table is logged whole each time)
        if not enabled:
            return
        lg = cfg.logging
        if lg.progress and sys.stderr.isatty():  # a bar in a log file is noise; the console line has the ETA
            self.progress = ProgressBar(cfg.training.steps, initial=start_step)
        if lg.console:
            self.sinks.append(ConsoleSink(cfg.training.steps, write=self.progress.write if self.progress else None))
        if lg.jsonl:
            self.sinks.append(JsonlSink(run_dir / "metrics.jsonl"))
        if lg.tensorboard:
            self.sinks.append(TensorBoardSink(run_dir / "tensorboard"))
        if str(lg.wandb.mode) != "disabled":
            self.wandb = WandbSink(cfg, run_dir, config, run_id=wandb_run_id)
            self.sinks.append(self.wandb)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for s in self.sinks:
            s.log(metrics, step)

    def event(self, record: dict) -> None:
        """A record that is not a logging step (a run's start or end, a damaged checkpoint moved aside):
        into metrics.jsonl, marked by its "event" key, so two runs in one run_dir stay apart."""
        for s in self.sinks:
            if isinstance(s, JsonlSink):
                s.f.write(json.dumps({"time": time.time(), **record}) + "\n")

    def samples(self, rows: list[dict], step: int) -> None:
        """Greedy completions of held-out prompts (training.samples_every): printed, into metrics.jsonl as a
        "samples" event, into TensorBoard as text and into W&B as a table (every sampling so far, one row each)."""
        if not self.enabled:
            return
        self.sample_rows += [{"step": step, **r} for r in rows]
        for i, r in enumerate(rows):
            self.note(f"sample {i + 1} at step {step}: {r['completion'][:300]!r}")
        self.event({"event": "samples", "step": step, "samples": rows})
        for sink in self.sinks:
            if isinstance(sink, TensorBoardSink):
                text = "\n\n".join(f"**prompt** {r['prompt']}\n\n**completion** {r['completion']}" for r in rows)
                sink.w.add_text("samples", text, step)
                sink.w.flush()
        if self.wandb is not None:
            import wandb

            columns = ["step", "prompt", "completion", "reference"]
            table = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in self.sample_rows])
            self.wandb.run.log({"train/step": step, "samples": table})

    def note(self, line: str) -> None:
        """A one-off message on the logging rank (decisions the run made, e.g. a no-op setting)."""
        if self.enabled:
            (self.progress.write if self.progress else print)(f"shardwise: {line}")

    def step_done(self, loss: float | None = None) -> None:
        if self.progress is not None:
            self.progress.update(1, **({"loss": f"{loss:.3f}"} if loss is not None else {}))

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        for s in self.sinks:
            s.close()
