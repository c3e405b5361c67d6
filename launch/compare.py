"""Run strategies side by side on one model, data and seed; write a table and plots:

    python launch/compare.py recipe=llama_debug strategies=ddp,fsdp,zero2,zero3,tp,pp,fsdp_tp nproc=4 steps=20 \
        training.micro_batch_size=2
    python launch/compare.py recipe=llama_debug strategies=fsdp,fsdp:ac=full,zero3+offload nproc=2 steps=20 out=runs/cmp
    python launch/compare.py recipe=llama_debug strategies=ddp,fsdp sweep=training.micro_batch_size=2,4 nproc=2
    python launch/compare.py recipe=llama_debug strategies=ddp,fsdp,zero2 nproc=2 steps=20 --slurm partition=debug

Each cell (a strategy, crossed with `sweep`) is a real torchrun job of launch/train.py with the recipe and every
other key=value given here (the same model, data, seed, global batch, micro-batch and sequence length for all).
Into `out` (default runs/compare-<recipe>-<time>/): compare.csv, compare.md, records.json, memory.png,
throughput.png, loss.png, and cells/<cell>/ with each run. Rerunning with the same `out` skips finished cells.
`--slurm` runs the unfinished cells as one SLURM job array (a task per cell, one node each: `partition=`,
`slurm_time=` (default 01:00:00), `slurm_parallel=` (tasks at once), `cpus_per_task=` (default nproc),
`slurm_gpus=true` (nproc GPUs per task)), waits for it and collects the cells as without it.
`gpu_memory_gib=80` draws the device's capacity on memory.png. After the cells, the time model
(parallel/timing.py) is calibrated on this machine and its predicted step time and communication per step
are put beside the measured ones, with the two rankings.
Strategy names and their keys: trainer/compare.py and docs/compare.md.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from trainer.compare import CompareError, run, run_saved_cell  # noqa: E402

OWN = {"strategies": str, "nproc": int, "steps": int, "out": str, "sweep": str, "gpu_memory_gib": float}
SLURM = {"partition": str, "slurm_time": str, "slurm_parallel": int, "cpus_per_task": int, "slurm_gpus": bool}


def main(argv: list[str], *, launch=None) -> int:
    """The command line; `launch` (for the test suite) runs each cell's job in place of torchrun."""
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if len(argv) == 2 and argv[0] == "--run-cell":  # one task of a --slurm array
        return run_saved_cell(argv[1])
    own, rest = {"strategies": "", "nproc": 2, "steps": 20, "out": None, "sweep": None, "gpu_memory_gib": None}, []
    slurm: dict | None = None
    try:
        for tok in argv:
            key, eq, value = tok.partition("=")
            if tok == "--slurm":
                slurm = {} if slurm is None else slurm
            elif key in SLURM and eq:
                slurm = {} if slurm is None else slurm
                if SLURM[key] is bool:
                    slurm[key.removeprefix("slurm_")] = value.lower() in ("1", "true", "yes")
                else:
                    try:
                        slurm[key.removeprefix("slurm_")] = SLURM[key](value)
                    except ValueError:
                        raise CompareError(f"{key}={value}: expected {SLURM[key].__name__}") from None
            elif tok.startswith("--"):
                raise CompareError(f"{tok}: unknown flag; known: --slurm, --help")
            elif key in OWN and eq:
                try:
                    own[key] = OWN[key](value)
                except ValueError:
                    raise CompareError(f"{key}={value}: expected {OWN[key].__name__}") from None
            else:
                rest.append(tok)
        recipe = next((t.partition("=")[2] for t in rest if t.startswith("recipe=")), None)
        if recipe is None:
            raise CompareError("recipe=NAME is required (e.g. recipe=llama_debug)")
        if slurm is not None and "--slurm" not in argv:
            raise CompareError(
                f"{', '.join(k + '=' for k in SLURM if any(a.startswith(k + '=') for a in argv))}: "
                f"SLURM settings without --slurm; add --slurm to run the cells as a SLURM array"
            )
        if own["nproc"] < 1 or own["steps"] < 1:
            raise CompareError(f"nproc={own['nproc']}, steps={own['steps']}: both must be >= 1")
        rest = [t for t in rest if not t.startswith("recipe=")]
        run(
            recipe,
            own["strategies"],
            nproc=own["nproc"],
            steps=own["steps"],
            out=own["out"],
            overrides=rest,
            sweep=own["sweep"],
            gpu_memory_gib=own["gpu_memory_gib"],
            slurm=slurm,
            launch=launch,
        )
    except CompareError as e:
        print(f"shardwise: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
