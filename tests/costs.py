"""What the suite spends its time on: every process a test starts, and every test, timed.

With SHARDWISE_COST_LOG=FILE, tests/conftest.py appends one JSON line per finished test (`kind: test`, its
setup + call + teardown seconds) and one per process started through `subprocess` (`kind: launch`: the test that
started it, the program, wall seconds from start to exit). `python tests/costs.py FILE [--top N]` prints the
markdown tables of the most expensive tests and launches that docs/architecture.md's testing section keeps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

_LOG = os.environ.get("SHARDWISE_COST_LOG")
UNTIMED_POPEN = subprocess.Popen  # for the pools of tests/pool.py: their jobs are logged one by one instead


def _write(record: dict) -> None:
    with open(_LOG, "a") as f:
        f.write(json.dumps(record) + "\n")


def describe(args) -> str:
    """A launch in a few words: torchrun's rank count, the script, and its first few arguments."""
    argv = [str(a) for a in (args if isinstance(args, (list, tuple)) else [args])]
    nproc = next((a.split("=", 1)[1] for a in argv if a.startswith("--nproc_per_node=")), None)
    at = next((i for i, a in enumerate(argv) if a.endswith((".py", ".sh"))), 0)
    rest = [a for a in argv[at + 1 :] if "/" not in a or a.startswith(("recipe=", "strategies="))]
    return ((f"torchrun x{nproc} " if nproc else "") + " ".join([Path(argv[at]).name, *rest[:3]]))[:110]


class _TimedPopen(subprocess.Popen):
    """subprocess.Popen that logs its wall time when its exit is first seen (wait, poll, run, communicate)."""

    def __init__(self, args, *a, **kw):
        self._cost_start = time.perf_counter()
        self._cost_test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
        self._cost_logged = False
        super().__init__(args, *a, **kw)

    def _log_exit(self):
        if self.returncode is not None and not self._cost_logged:
            self._cost_logged = True
            _write(
                {
                    "kind": "launch",
                    "test": self._cost_test,
                    "what": describe(self.args),
                    "seconds": round(time.perf_counter() - self._cost_start, 2),
                    "rc": self.returncode,
                }
            )

    def wait(self, timeout=None):
        try:
            return super().wait(timeout)
        finally:
            self._log_exit()

    def poll(self):
        rc = super().poll()
        self._log_exit()
        return rc


def install() -> None:
    """Time every process the test session starts (called by tests/conftest.py when SHARDWISE_COST_LOG is set)."""
    if _LOG:
        subprocess.Popen = _TimedPopen


def log_pooled(args, seconds: float) -> None:
    """One job run in a pool of tests/pool.py (`kind: pooled`): the test, the job, wall seconds from its submission
    to its end (the first job of a pool includes the pool's start)."""
    if _LOG:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
        _write({"kind": "pooled", "test": test, "what": describe(args), "seconds": round(seconds, 2)})


def log_batched(nproc: int, overrides, seconds: float) -> None:
    """One case of a worker batch (tests/distributed/conftest.py's `batch`, `kind: batched`): the rank count, the
    case's own overrides (after the shared tiny model's), its wall seconds inside the batch's launch."""
    if _LOG:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
        what = f"x{nproc} " + " ".join(overrides)
        _write({"kind": "batched", "test": test, "what": what[:110], "seconds": round(seconds, 2)})


def log_test(report_nodeid: str, seconds: float, outcome: str) -> None:
    if _LOG:
        _write({"kind": "test", "test": report_nodeid, "seconds": round(seconds, 2), "outcome": outcome})


def tables(path: Path, top: int = 20) -> str:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    # one row per test that ran (a skipped GPU test can be reported more than once; it costs nothing)
    ran = {r["test"]: r for r in rows if r["kind"] == "test" and r["outcome"] != "skipped"}
    tests = sorted(ran.values(), key=lambda r: -r["seconds"])
    launches = [r for r in rows if r["kind"] == "launch"]
    pooled = [r for r in rows if r["kind"] == "pooled"]
    batched = [r for r in rows if r["kind"] == "batched"]
    total = sum(r["seconds"] for r in tests)
    out = [
        f"{len(tests)} tests ran, {total / 60:.1f} min in all; {len(launches)} launches, "
        f"{sum(r['seconds'] for r in launches) / 60:.1f} min of wall time inside them"
        + (f"; {len(pooled)} jobs in pools, {sum(r['seconds'] for r in pooled) / 60:.1f} min" if pooled else "")
        + (
            f"; {len(batched)} worker cases in batches, {sum(r['seconds'] for r in batched) / 60:.1f} min"
            if batched
            else ""
        )
        + ".",
        "",
        "| test | s |",
        "| --- | ---: |",
    ]
    out += [f"| `{r['test']}` | {r['seconds']:.0f} |" for r in tests[:top]]
    by_file: dict[str, list[float]] = {}
    for r in launches:
        by_file.setdefault(r["test"].split("::")[0], []).append(r["seconds"])
    out += ["", "| test file | launches | s in launches |", "| --- | ---: | ---: |"]
    for f, secs in sorted(by_file.items(), key=lambda kv: -sum(kv[1]))[:top]:
        out.append(f"| `{f}` | {len(secs)} | {sum(secs):.0f} |")
    out += ["", "| launch | test | s |", "| --- | --- | ---: |"]
    for r in sorted(launches, key=lambda r: -r["seconds"])[:top]:
        out.append(f"| `{r['what']}` | `{r['test'].split('::')[-1][:60]}` | {r['seconds']:.0f} |")
    if batched:  # the parity worker's cases, each inside its rank count's one launch
        out += ["", "| batched worker case | s |", "| --- | ---: |"]
        out += [f"| `{r['what']}` | {r['seconds']:.0f} |" for r in sorted(batched, key=lambda r: -r["seconds"])[:top]]
    return "\n".join(out)


DOCS = Path(__file__).resolve().parent.parent / "docs"
BEGIN, END = "<!-- costs: rendered by tests/unit/test_docs_tables.py from docs/testing/*.jsonl -->", "<!-- /costs -->"


def docs_section() -> str:
    """The cost tables of docs/architecture.md, from the committed logs that docs/testing/runs.json names."""
    runs = json.loads((DOCS / "testing" / "runs.json").read_text())
    parts = []
    for run in runs:
        parts += [f"**{run['title']}**", "", tables(DOCS / "testing" / run["file"]), ""]
    return "\n".join([BEGIN, *parts, END])


def write_docs() -> None:
    page = DOCS / "architecture.md"
    text = page.read_text()
    a, b = text.index(BEGIN), text.index(END) + len(END)
    page.write_text(text[:a] + docs_section() + text[b:])


if __name__ == "__main__":
    if sys.argv[1] == "--write-docs":  # re-render docs/architecture.md's tables from docs/testing/
        write_docs()
    else:
        n = int(sys.argv[sys.argv.index("--top") + 1]) if "--top" in sys.argv else 20
        print(tables(Path(sys.argv[1]), n))
