"""The pairwise (all-pairs) parity matrix over the plain configuration axes.

The parity rows of test_parity.py were written one combination at a time, and bugs hid between them (fp16 x pp
crashed, tied embeddings x pp were silently untied): no row crossed those plain options. `matrix()` generates runs
so that every pair of values of two different axes that validation accepts appears in at least one run; each run
is then compared with one process on every parameter's gradient after step 1 (tests/distributed/test_parity.py,
`test_pairwise_matrix_matches_single_process`). A pair that no run can hold (validation refuses every completion
tried) is listed with validation's message (`Matrix.refused`).

Generation is greedy and deterministic: take the first pair not yet covered, then fix the other axes one by one,
each to the value that covers the most uncovered pairs among those that keep the run valid (validation's own
`validate`, at most `MAX_WORLD` ranks). Unfixed axes sit at their defaults, the first value of each axis, which
is the plain setting, so a partial run that validates stays valid as axes are fixed.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field

# at most this many gloo ranks per run (2 cores): every pair fits in 8, the product of two axes' largest needs
MAX_WORLD = 8
MICRO = 2  # training.micro_batch_size of every run
# the greedy choice trades pairs covered against cost: a value is taken when it covers more new pairs than
# COST_WEIGHT x the cost it adds (`cost`); so compiled blocks and extra ranks go where they pay most
COMPILE_COST = 4
COST_WEIGHT = 0.5

# axis -> [(value label, {config key: value})]; the first value is the default (the plain setting). `dp` is the
# data-parallel degree the strategy gets: HSDP 2 replicas x 2 shards, every other sharded or replicated strategy 2
AXES: dict[str, list[tuple[str, dict]]] = {
    "data": [
        ("none", {"parallel.data": "none", "dp": 1}),
        ("ddp", {"parallel.data": "ddp", "dp": 2}),
        ("fsdp", {"parallel.data": "fsdp", "dp": 2}),
        ("hsdp", {"parallel.data": "hsdp", "parallel.dp_replicate": 2, "dp": 4}),
        ("zero1", {"parallel.data": "zero1", "dp": 2}),
        ("zero2", {"parallel.data": "zero2", "dp": 2}),
        ("zero3", {"parallel.data": "zero3", "dp": 2}),
    ],
    "tp": [("1", {"parallel.tp": 1}), ("2", {"parallel.tp": 2})],
    "pp": [("1", {"parallel.pp": 1})]
    + [
        (s, {"parallel.pp": 2, "parallel.pp_schedule": s})
        for s in ("1f1b", "gpipe", "interleaved_1f1b", "zbv", "dualpipev")
    ],
    "cp": [
        ("1", {"parallel.cp": 1}),
        ("2_allgather", {"parallel.cp": 2, "parallel.cp_rotate": "allgather"}),
        ("2_ring", {"parallel.cp": 2, "parallel.cp_rotate": "ring"}),
    ],
    "precision": [(p, {"training.precision": p}) for p in ("fp32", "bf16", "fp16")],
    "tie": [("untied", {"model.tie_embeddings": False}), ("tied", {"model.tie_embeddings": True})],
    "ac": [(a, {"parallel.ac": a}) for a in ("none", "selective", "full")],
    "compile": [("eager", {"parallel.compile": False}), ("compiled", {"parallel.compile": True})],
    "loss_chunks": [("1", {"training.loss_chunks": 0}), ("3", {"training.loss_chunks": 3})],
    "optimizer": [(o, {"optim.name": o}) for o in ("adamw", "adafactor")],
    # several micro-batches per optimizer step (4: accumulation; under pipelining, the schedule's micro-batches) or one
    "accumulation": [("on", {"accum": 4}), ("off", {"accum": 1})],
    "activation_offload": [
        ("off", {"parallel.activation_offload": False}),
        ("on", {"parallel.activation_offload": True, "parallel.activation_offload_min_bytes": 0}),
    ],
}
# the keys a run sets, at their defaults where no chosen value names them
DEFAULTS = {
    "parallel.data": "none",
    "parallel.dp_replicate": 1,
    "parallel.dp_shard": -1,
    "parallel.tp": 1,
    "parallel.pp": 1,
    "parallel.pp_schedule": "1f1b",
    "parallel.cp": 1,
    "parallel.cp_rotate": "allgather",
    "training.precision": "fp32",
    "model.tie_embeddings": False,
    "parallel.ac": "none",
    "parallel.compile": False,
    "training.loss_chunks": 0,
    "optim.name": "adamw",
    "parallel.activation_offload": False,
    "parallel.activation_offload_min_bytes": 1048576,
}


@dataclass
class Run:
    values: dict  # axis -> value label
    nproc: int
    overrides: list  # the run's keys (with training.global_batch_size)

    @property
    def name(self) -> str:
        plain = {a: v[0][0] for a, v in AXES.items()}
        return "-".join(f"{a}={v}" for a, v in self.values.items() if v != plain[a]) or "plain"

    def reference(self) -> list[str]:
        """The one-process run it is compared with: the same model (tied or not), optimizer and global batch, in
        fp32 with every layout and memory option at its plain setting."""
        keep = ("training.global_batch_size", "model.tie_embeddings", "optim.name")
        return [o for o in self.overrides if o.startswith(keep)] + ["training.precision=fp32"]


@dataclass
class Matrix:
    runs: list[Run]
    pairs: int  # pairs of values of different axes
    refused: dict = field(default_factory=dict)  # ((axis, value), (axis, value)) -> validation's message
    seeded: int = 0  # pairs the seed runs (the hand-written rows) already held


def _layout(values: dict) -> tuple[int, dict]:
    """(ranks, {key: value}) of a run with these axis values (the others at their defaults)."""
    keys = dict(DEFAULTS)
    extra = {"dp": 1, "accum": 4}
    for axis, options in AXES.items():
        label = values.get(axis, options[0][0])
        for k, v in dict(options)[label].items():
            (extra if k in extra else keys)[k] = v
    world = extra["dp"] * keys["parallel.tp"] * keys["parallel.pp"] * keys["parallel.cp"]
    keys["training.global_batch_size"] = MICRO * extra["dp"] * extra["accum"]
    return world, keys


def cost(values: dict) -> float:
    """A run's cost in the suite, roughly: its ranks (2 cores run them all), times COMPILE_COST when every rank
    compiles its blocks (inductor, cold in CI)."""
    world, _ = _layout(values)
    return world * (COMPILE_COST if values.get("compile") == "compiled" else 1)


def _overrides(keys: dict) -> list[str]:
    """The keys a run passes: those off their defaults, the precision (the recipe's default is bf16) and the batch."""
    always = ("training.precision", "training.global_batch_size")
    return [
        f"{k}={str(v).lower() if isinstance(v, bool) else v}"
        for k, v in keys.items()
        if k in always or v != DEFAULTS.get(k)
    ]


def values_of(overrides: list[str], *, nproc: int, global_batch: int, precision: str) -> dict:
    """The axis values a hand-written parity row (test_parity.py's CASES) holds, for the axes it can be read on:
    a row whose setting is none of an axis' values (a third pipeline stage, bf16 AdamW) leaves that axis out."""
    keys = {**DEFAULTS, "training.precision": precision}
    for o in overrides:
        k, v = o.split("=", 1)
        keys[k] = {"true": True, "false": False}.get(v, int(v) if v.lstrip("-").isdigit() else v)
    out = {}
    data = keys["parallel.data"]
    out["data"] = data if keys["parallel.dp_replicate"] == 1 or data == "hsdp" else None
    out["tp"] = str(keys["parallel.tp"])
    pp, sched = keys["parallel.pp"], keys["parallel.pp_schedule"]
    out["pp"] = "1" if pp == 1 else (sched if pp == 2 else None)
    cp = keys["parallel.cp"]
    out["cp"] = "1" if cp == 1 else f"2_{keys['parallel.cp_rotate']}" if cp == 2 else None
    out["precision"] = keys["training.precision"]
    out["tie"] = "tied" if keys["model.tie_embeddings"] else "untied"
    out["ac"] = keys["parallel.ac"] if "parallel.ac_every" not in keys else None
    out["compile"] = "compiled" if keys["parallel.compile"] else "eager"
    out["loss_chunks"] = "1" if keys["training.loss_chunks"] in (0, 1) else "3"
    out["optimizer"] = keys["optim.name"]
    dp = nproc // (keys["parallel.tp"] * pp * cp)
    out["accumulation"] = "on" if global_batch // (MICRO * dp) > 1 else "off"
    out["activation_offload"] = "on" if keys["parallel.activation_offload"] else "off"
    labels = {a: {label for label, _ in options} for a, options in AXES.items()}
    return {a: v for a, v in out.items() if v in labels[a]}


@functools.cache
def matrix(base_args: tuple[str, ...], seeds: tuple[tuple[tuple[str, str], ...], ...] = ()) -> Matrix:
    """The runs (over `base_args`, the tiny model's recipe and overrides) that cover every accepted pair not
    already held by one of `seeds` (the axis values of runs made elsewhere, `values_of`). Generated as on a CPU
    without fp16 kernels, whatever this one has: the same matrix on every CI machine (DeepSpeed's fp16 on a CPU
    with them is tests/distributed/test_zero_fp16.py's)."""
    from unittest import mock

    import parallel.zero

    with mock.patch.object(parallel.zero, "_deepspeed_cpu_fp16", lambda: False):
        return _generate(base_args, seeds)


def _generate(base_args: tuple[str, ...], seeds: tuple[tuple[tuple[str, str], ...], ...] = ()) -> Matrix:
    """`matrix` without its cache and capability."""
    from omegaconf import OmegaConf

    from trainer.config import load_config
    from trainer.validate import validate

    cfg = load_config([*base_args, f"training.micro_batch_size={MICRO}"])

    @functools.cache
    def problem(frozen: tuple) -> str | None:
        world, keys = _layout(dict(frozen))
        if world > MAX_WORLD:
            return f"{world} ranks (more than the {MAX_WORLD} this matrix runs)"
        for k, v in keys.items():  # every key a run sets, so one config serves every candidate
            OmegaConf.update(cfg, k, v)
        found = validate(cfg, world)
        return found[0] if found else None

    def ok(values: dict) -> bool:
        return problem(tuple(sorted(values.items()))) is None

    axes = list(AXES)
    labels = {a: [label for label, _ in AXES[a]] for a in axes}
    all_pairs = [((a, x), (b, y)) for a, b in itertools.combinations(axes, 2) for x in labels[a] for y in labels[b]]
    uncovered = set(all_pairs)
    for seed in seeds:
        for p, q in itertools.combinations(sorted(dict(seed).items(), key=lambda kv: axes.index(kv[0])), 2):
            uncovered.discard((p, q))
    covered_by_seeds = len(all_pairs) - len(uncovered)
    runs: list[Run] = []
    refused: dict = {}

    def gain(values: dict) -> int:
        chosen = list(values.items())
        return sum(1 for p, q in itertools.combinations(chosen, 2) if (p, q) in uncovered or (q, p) in uncovered)

    for pair in all_pairs:
        if pair not in uncovered:
            continue
        (a, x), (b, y) = pair
        start = {a: x, b: y}
        if not ok(start):  # the defaults may be what refuses: try the pair beside one other non-default value
            start = next(
                ({a: x, b: y, c: z} for c in axes if c not in (a, b) for z in labels[c][1:] if ok({a: x, b: y, c: z})),
                None,
            )
            if start is None:
                refused[pair] = problem(tuple(sorted({a: x, b: y}.items())))
                uncovered.discard(pair)
                continue
        values = dict(start)
        for c in axes:
            if c in values:
                continue
            options = [z for z in labels[c] if ok({**values, c: z})]
            values[c] = max(
                options,
                key=lambda z: (gain({**values, c: z}) - COST_WEIGHT * cost({**values, c: z}), -labels[c].index(z)),
            )
        values = {c: values[c] for c in axes}
        for p, q in itertools.combinations(values.items(), 2):
            uncovered.discard((p, q))
        world, keys = _layout(values)
        runs.append(Run(values=values, nproc=world, overrides=_overrides(keys)))
    return Matrix(runs=runs, pairs=len(all_pairs), refused=refused, seeded=covered_by_seeds)


def report(m: Matrix) -> str:
    """The matrix in words: its size and cost, its runs, and the pairs validation refused with their messages."""
    lines = [
        f"{m.pairs} pairs of values: {m.seeded} held by test_parity.py's rows, {len(m.runs)} pairwise runs for the "
        f"rest ({sum(r.nproc for r in m.runs)} ranks in all, {sum(r.values['compile'] == 'compiled' for r in m.runs)} "
        f"compiled), {len(m.refused)} refused by validation (as on a CPU without fp16 kernels, on every CPU)"
    ]
    lines += [f"  x{r.nproc} {r.name}" for r in m.runs]
    lines.append("refused:")
    lines += [f"  {a}={x} x {b}={y}: {msg}" for ((a, x), (b, y)), msg in sorted(m.refused.items())]
    return "\n".join(lines)


if __name__ == "__main__":  # python tests/distributed/pairwise.py: the matrix test_parity.py runs on this machine
    import sys
    from pathlib import Path

    here = Path(__file__).resolve()
    sys.path[:0] = [str(here.parent), str(here.parents[1]), str(here.parents[2])]
    from test_parity import PAIRWISE  # (inside the tests: the matrix they already made)

    print(report(PAIRWISE))
