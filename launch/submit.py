"""Write (and submit) the SLURM job for a recipe: `launch/slurm/train.sbatch` with its settings filled in.

    python launch/submit.py recipe=llama7b_fsdp optim.lr=2e-4 --nodes 2 --gpus-per-node 8 \\
        --partition gpu --time 24:00:00 --account myproj --dry-run      # print the script, queue nothing
    python launch/submit.py recipe=llama_debug_fsdp --nodes 1 --procs-per-node 2 --cpu --partition debug

The printed script stands alone (`sbatch script.sbatch`). Before anything is queued the request is checked:
the recipe must accept nodes x ranks-per-node as its world size (the trainer's own validation, with the
arithmetic), the partition must exist (`sinfo`), and the run directory must be writable.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from trainer.config import ConfigError, load_config
from trainer.validate import check

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TEMPLATE = REPO / "launch" / "slurm" / "train.sbatch"


class SubmitError(ValueError):
    pass


def render(
    *,
    overrides: list[str],
    nodes: int,
    procs_per_node: int,
    gpus: bool,
    partition: str | None,
    account: str | None,
    time: str,
    job_name: str,
    cpus_per_task: int,
    python: str,
    run_dir: str | None,
    max_requeues: int,
    signal_lead_s: int,
    port: int,
    output: str | None,
) -> str:
    """The template with its #SBATCH header and settings block filled in."""
    text = TEMPLATE.read_text()
    header = [f"#SBATCH --job-name={job_name}", f"#SBATCH --nodes={nodes}", "#SBATCH --ntasks-per-node=1"]
    if gpus:
        header.append(f"#SBATCH --gpus-per-node={procs_per_node}")
    header += [
        f"#SBATCH --cpus-per-task={cpus_per_task}",
        f"#SBATCH --time={time}",
        f"#SBATCH --signal=B:USR1@{signal_lead_s}",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={output or f'{REPO}/runs/slurm-%x-%j.out'}",
    ]
    if partition:
        header.append(f"#SBATCH --partition={partition}")
    if account:
        header.append(f"#SBATCH --account={account}")
    lines = text.splitlines()
    first = next(i for i, ln in enumerate(lines) if ln.startswith("#SBATCH"))
    last = max(i for i, ln in enumerate(lines) if ln.startswith("#SBATCH"))
    lines[first : last + 1] = header
    text = "\n".join(lines) + "\n"

    def q(s: str) -> str:
        return "'" + s.replace("'", "'\\''") + "'"

    settings = {
        "NPROC_PER_NODE": str(procs_per_node),
        "PYTHON": q(python),
        "REPO": q(str(REPO)),
        "MAX_REQUEUES": str(max_requeues),
        "RDZV_PORT": str(port),
    }
    if run_dir:
        settings["RUN_DIR"] = q(run_dir)
    for key, value in settings.items():
        text, n = re.subn(rf"^{key}=.*$", f"{key}={value}", text, count=1, flags=re.M)
        assert n == 1, f"{TEMPLATE} lost its {key}= setting"
    args = " ".join(q(o) for o in overrides)
    text, n = re.subn(r"^\[ \$# -gt 0 \] \|\| set -- .*$", f"[ $# -gt 0 ] || set -- {args}", text, count=1, flags=re.M)
    assert n == 1, f"{TEMPLATE} lost its default arguments line"
    return text


_SLURM_TIME = re.compile(
    r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2}"
    r"|UNLIMITED|INFINITE)$"
)


def check_request(
    overrides: list[str],
    *,
    nodes: int,
    procs_per_node: int,
    partition: str | None,
    run_dir: str | None,
    gpus: bool,
    time: str = "24:00:00",
    dry_run: bool = False,
) -> list[str]:
    """Refuse what would fail on the cluster, before anything is queued; every problem at once. Returns
    notes (what a dry run could not check here)."""

    problems, notes = [], []
    if not _SLURM_TIME.match(time):
        problems.append(
            f"--time {time}: not a SLURM time limit; write minutes (90), HH:MM:SS (25:00:00) or D-HH:MM:SS (1-01:00:00)"
        )
    world = nodes * procs_per_node
    try:
        cfg = load_config(
            [*overrides, *(["training.device=cpu"] if not gpus else []), *([f"run_dir={run_dir}"] if run_dir else [])]
        )
        check(cfg, world)
    except ConfigError as e:
        problems += [f"{nodes} node(s) x {procs_per_node} rank(s) = world {world}: {p}" for p in e.problems]
    if partition is not None:
        if shutil.which("sinfo") is None and dry_run:
            notes.append(
                f"--partition {partition}: not checked (sinfo not found: this machine is not a SLURM submit host)"
            )
        elif shutil.which("sinfo") is None:
            problems.append(f"--partition {partition}: sinfo not found, this machine is not a SLURM submit host")
        else:
            out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30)
            known = [p.rstrip("*") for p in out.stdout.split()]
            if partition not in known:
                problems.append(
                    f"--partition {partition}: no such partition; this cluster has {', '.join(known) or 'none'}"
                )
    if run_dir:
        p = Path(run_dir).expanduser().absolute()
        while not p.exists():
            p = p.parent
        if not p.is_dir() or not os.access(p, os.W_OK | os.X_OK):
            problems.append(
                f"run directory {run_dir}: not writable ({p} is not a writable directory); choose another --run-dir"
            )
    if problems:
        raise SubmitError("\n".join(f"  - {p}" for p in problems))
    return notes


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="+", help="recipe=NAME and dotted overrides, as for launch/train.py")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=None, help="GPUs (and ranks) per node")
    ap.add_argument("--procs-per-node", type=int, default=None, help="ranks per node on CPU nodes (with --cpu)")
    ap.add_argument("--cpu", action="store_true", help="CPU nodes: gloo, no --gpus-per-node")
    ap.add_argument("--partition")
    ap.add_argument("--account")
    ap.add_argument("--time", default="24:00:00")
    ap.add_argument("--job-name", default=None, help="default: the recipe's name")
    ap.add_argument("--cpus-per-task", type=int, default=None, help="default: 8 per GPU, or the ranks per node")
    ap.add_argument("--python", default=sys.executable, help="the interpreter with shardwise installed")
    ap.add_argument("--run-dir", default=None, help="default: runs/<job name>-<job id> (kept across requeues)")
    ap.add_argument("--max-requeues", type=int, default=3)
    ap.add_argument("--signal-lead", type=int, default=300, help="seconds of warning before the time limit")
    ap.add_argument("--port", type=int, default=29500, help="c10d rendezvous port on the first node")
    ap.add_argument("--output", default=None, help="SLURM's log file (default runs/slurm-<name>-<id>.out)")
    ap.add_argument("--dry-run", action="store_true", help="print the script; queue nothing")
    ap.add_argument("--write", type=Path, default=None, help="also save the script here")
    a = ap.parse_intermixed_args(argv)  # overrides may come before or after the options
    per_node = a.procs_per_node if a.cpu else a.gpus_per_node
    if per_node is None:
        ap.error("say how many ranks per node: --gpus-per-node N, or --cpu --procs-per-node N")
    if a.nodes < 1 or per_node < 1:
        ap.error(f"--nodes {a.nodes} and ranks per node {per_node} must be >= 1")
    recipe = next((o.split("=", 1)[1] for o in a.overrides if o.startswith("recipe=")), None)
    if recipe is None:
        ap.error("name a recipe: recipe=NAME")
    try:
        notes = check_request(
            a.overrides,
            nodes=a.nodes,
            procs_per_node=per_node,
            partition=a.partition,
            run_dir=a.run_dir,
            gpus=not a.cpu,
            time=a.time,
            dry_run=a.dry_run,
        )
    except SubmitError as e:
        print(f"submit: refused, nothing was queued:\n{e}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"submit: note: {note}", file=sys.stderr)
    overrides = [*a.overrides, *(["training.device=cpu"] if a.cpu else [])]
    script = render(
        overrides=overrides,
        nodes=a.nodes,
        procs_per_node=per_node,
        gpus=not a.cpu,
        partition=a.partition,
        account=a.account,
        time=a.time,
        job_name=a.job_name or Path(recipe).stem,
        cpus_per_task=a.cpus_per_task or (8 * per_node if not a.cpu else per_node),
        python=a.python,
        run_dir=a.run_dir,
        max_requeues=a.max_requeues,
        signal_lead_s=a.signal_lead,
        port=a.port,
        output=a.output,
    )
    if a.write:
        a.write.write_text(script)
    if a.dry_run:
        print(script, end="")
        return 0
    (REPO / "runs").mkdir(exist_ok=True)
    proc = subprocess.run(["sbatch", "--parsable"], input=script, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        print(f"submit: sbatch failed: {proc.stderr.strip()}", file=sys.stderr)
        return 1
    job = proc.stdout.strip().split(";")[0]
    print(f"submitted job {job}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
