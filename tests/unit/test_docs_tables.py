"""Tables in docs/ rendered from committed result files, so that a number edited by hand, or a result replaced without
re-rendering, fails here:
- docs/architecture.md's test-cost tables from the cost logs of docs/testing/ (`python tests/costs.py --write-docs`);
- docs/memory.md's prediction-against-simulation table from docs/benchmarks/plan-vs-simulation.json (the simulated
  peaks of `launch/plan.py --simulate` runs) and the planner's predictions, computed here;
- docs/memory.md's table of launch/compare.py at its defaults from that run's records.json (the planner's
  prediction recomputed here must be the one the run printed, and every strategy within 10% of the tracker);
- docs/compare.md's every-strategy tables from docs/compare/records.json (compare.py's own markdown of them);
- docs/memory.md's validation table from the measurements of tests/distributed/test_memory_plan.py,
  docs/benchmarks/memory-matrix.jsonl, beside the planner's predictions computed here.
`python tests/unit/test_docs_tables.py --write` re-renders all but the first.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import costs  # noqa: E402
from helpers import REPO, run_cli  # noqa: E402

GIB = 1024**3
RESULTS = REPO / "docs" / "benchmarks" / "plan-vs-simulation.json"
MEMORY_PAGE = REPO / "docs" / "memory.md"
BEGIN = (
    "<!-- plan-vs-simulation: rendered by tests/unit/test_docs_tables.py"
    " from docs/benchmarks/plan-vs-simulation.json -->"
)
END = "<!-- /plan-vs-simulation -->"
# (recipe, world size, why it is not simulated where it is not)
PLAN_ROWS = [
    ("llama1b", 1, None),
    ("llama7b_fsdp", 8, None),
    ("llama8b_fsdp_tp", 16, None),
    ("llama8b", 1, "not simulated (does not fit)"),
    ("llama13b_pp_fsdp", 16, "not simulated (two stages per rank)"),
    ("llama70b_3d", 512, "not simulated (pipeline with TP)"),
    ("llama7b_zero3", 8, "not simulated (DeepSpeed)"),
    ("llama7b_zero2_offload", 8, "not simulated (DeepSpeed)"),
]


def test_the_cost_tables_are_the_committed_logs():
    page = (costs.DOCS / "architecture.md").read_text()
    assert costs.docs_section() in page, "re-render with: python tests/costs.py --write-docs"


def _planned(recipe: str, world: int) -> dict:
    proc = run_cli("plan.py", [f"recipe={recipe}", f"world_size={world}", "gpu_memory_gib=80", "--json"])
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _layout(recipe: str, planned: dict) -> str:
    from trainer.config import load_config

    cfg = load_config([f"recipe={recipe}"])
    p = cfg.parallel
    dims = dict(zip(planned["layout"].split()[0::3], (int(n) for n in planned["layout"].split()[1::3]), strict=True))
    shape = " x ".join(f"{k} {v}" for k, v in dims.items() if v > 1) or "one rank"
    schedule = f", {p.pp_schedule}" if dims.get("pp", 1) > 1 else ""
    return f"{shape}: {p.data}, {cfg.training.precision}, AC {p.ac}{schedule}"


def plan_table() -> str:
    """The table, from the committed simulations and this code's predictions (which must be the ones the
    simulations were printed beside: a planner change needs the simulations rerun)."""
    results = json.loads(RESULTS.read_text())
    simulated = {(r["recipe"], r["world_size"]): r for r in results["rows"]}
    lines = [
        "Prediction against simulation for the GPU recipes at the world sizes they are meant for "
        f"({results['measured']}; `launch/plan.py --simulate` at each row's recipe and world size; peak tensor bytes "
        "of the most loaded rank, 80 GiB card):",
        "",
        "| recipe | world | layout | predicted peak | simulated peak | difference | + reserve on 80 GiB |",
        "| --- | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for recipe, world, why in PLAN_ROWS:
        planned = _planned(recipe, world)
        peak, reserve, host = planned["peak_bytes"], planned["reserve_bytes"], planned["host_bytes_per_node"]
        predicted = f"{peak / GIB:.2f} GiB" + (f" + {host / GIB:.2f} GiB host per node" if host else "")
        room = planned["capacity_bytes"] - peak - reserve
        fits = f"fits ({(peak + reserve) / GIB:.2f}" if room >= 0 else f"does not fit by {-room / GIB:.2f} GiB"
        sim = simulated.get((recipe, world))
        if sim is None:
            cells = [why or "not simulated", "-"]
        else:
            rerun = results["command"].replace("RECIPE", recipe).replace("WORLD", str(world))
            assert sim["predicted_peak_bytes"] == peak, (
                f"{recipe}: the planner now predicts {peak:,} B, the simulation was run beside "
                f"{sim['predicted_peak_bytes']:,}: rerun `{rerun}` into {RESULTS.name}"
            )
            s = sim["simulated_peak_bytes"]
            cells = [f"{s / GIB:.2f} GiB", f"{(peak - s) / s:+.1%}"]
            if room >= 0:
                fits += f"; simulated {(s + reserve) / GIB:.2f}"
        fits += ")" if room >= 0 else ""
        lines.append(
            f"| {recipe} | {world} | {_layout(recipe, planned)} | {predicted} | {' | '.join(cells)} | {fits} |"
        )
    return "\n".join(lines)


def _rendered_section() -> str:
    return f"{BEGIN}\n{plan_table()}\n{END}"


def test_the_plan_against_simulation_table_is_the_committed_results():
    page = MEMORY_PAGE.read_text()
    assert BEGIN in page and END in page
    current = page[page.index(BEGIN) : page.index(END) + len(END)]
    assert current == _rendered_section(), "re-render with: python tests/unit/test_docs_tables.py --write"


COMPARE_RUN = REPO / "docs" / "compare" / "defaults-2026-12-07"
COMPARE_BEGIN = (
    "<!-- compare-defaults: rendered by tests/unit/test_docs_tables.py"
    " from docs/compare/defaults-2026-12-07/records.json -->"
)
COMPARE_END = "<!-- /compare-defaults -->"


def compare_defaults_table() -> str:
    """The memory columns of the compare run at its defaults: the planner's peak for the most loaded rank beside
    the tracker's, per strategy. The prediction is recomputed with this code (on the CPU, where the run was made)
    and must be the run's: a planner change needs the run made again."""
    from trainer.compare import _predicted

    records = json.loads((COMPARE_RUN / "records.json").read_text())
    mib = 2**20
    lines = [
        "| strategy | layout | predicted peak | measured peak | error |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in records:
        assert r["status"] == "ok", r["cell"]
        now = _predicted([*r["overrides"], "training.device=cpu"], r["nproc"])["peak_bytes"]
        assert now == r["predicted_peak_bytes"], (
            f"{r['cell']}: the planner now predicts {now:,} B, the run printed {r['predicted_peak_bytes']:,}: rerun "
            f"docs/memory.md's compare command into {COMPARE_RUN.relative_to(REPO)}"
        )
        predicted, measured = r["predicted_peak_bytes"], r["measured_peak_bytes"]
        error = (predicted - measured) / measured
        assert abs(error) <= 0.10, f"{r['cell']}: predicted {predicted:,}, measured {measured:,} ({error:+.1%})"
        lines.append(
            f"| {r['cell']} | {r['layout']} | {predicted / mib:,.2f} MiB | {measured / mib:,.2f} MiB | {error:+.1%} |"
        )
    return "\n".join(lines)


def test_compare_at_its_defaults_is_within_10_percent_for_every_strategy():
    page = MEMORY_PAGE.read_text()
    rendered = f"{COMPARE_BEGIN}\n{compare_defaults_table()}\n{COMPARE_END}"
    current = page[page.index(COMPARE_BEGIN) : page.index(COMPARE_END) + len(COMPARE_END)]
    assert current == rendered, "re-render with: python tests/unit/test_docs_tables.py --write"


MATRIX = REPO / "docs" / "benchmarks" / "memory-matrix.jsonl"
MATRIX_BEGIN = (
    "<!-- memory-matrix: rendered by tests/unit/test_docs_tables.py from docs/benchmarks/memory-matrix.jsonl -->"
)
MATRIX_END = "<!-- /memory-matrix -->"


def memory_matrix_section() -> str:
    """docs/memory.md's validation table: each measured row (tests/distributed/test_memory_plan.py run with
    SHARDWISE_MEMORY_RESULTS) beside the planner's prediction for the same arguments, computed here (tests/
    memory_table.py): a planner change shows in the table at the next re-render, the measurements stay."""
    from memory_table import row

    records = [json.loads(line) for line in MATRIX.read_text().splitlines()]
    lines = [
        "| layout | AC / precision | rank | predicted moment | predicted peak | measured peak | error | "
        "predicted act.+temp. | measured act.+temp. |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
        *(row(r) for r in records),
    ]
    return f"{MATRIX_BEGIN}\n" + "\n".join(lines) + f"\n{MATRIX_END}"


def test_the_memory_matrix_table_is_the_committed_measurements():
    page = MEMORY_PAGE.read_text()
    current = page[page.index(MATRIX_BEGIN) : page.index(MATRIX_END) + len(MATRIX_END)]
    assert current == memory_matrix_section(), "re-render with: python tests/unit/test_docs_tables.py --write"


TABLE_BEGIN = re.compile(
    r"<!-- compare-table: rendered by tests/unit/test_docs_tables.py from (docs/compare/[\w.-]+/records\.json) -->\n"
)
TABLE_END = "<!-- /compare-table -->"


def compare_table(path: str) -> str:
    """The first table of trainer/compare.py's markdown for a committed compare.py run (its records.json)."""
    from trainer.compare import markdown

    return markdown(json.loads((REPO / path).read_text())).split("\n\n")[0] + "\n"


def compare_table_sections(text: str) -> list[tuple[str, int, int]]:
    return [(m.group(1), m.end(), text.index(TABLE_END, m.end())) for m in TABLE_BEGIN.finditer(text)]


def test_every_compare_table_in_the_docs_is_its_committed_run():
    """Each docs table between compare-table markers: the run it names, as compare.py renders it."""
    shown = 0
    for page in sorted((REPO / "docs").glob("*.md")):
        text = page.read_text()
        for path, start, end in compare_table_sections(text):
            assert text[start:end] == compare_table(path), f"{page.name}: {path}: re-render with --write"
            shown += 1
    assert shown >= 2


BENCH_RUNS = REPO / "docs" / "benchmarks" / "cpu-2026-12-07"
BENCH_BEGIN = "<!-- bench: rendered by tests/unit/test_docs_tables.py from docs/benchmarks/cpu-2026-12-07/*.json -->"
PHASES_BEGIN = (
    "<!-- bench-phases: rendered by tests/unit/test_docs_tables.py from docs/benchmarks/cpu-2026-12-07/"
    "llama_debug_fsdp.json -->"
)
BENCH_END, PHASES_END = "<!-- /bench -->", "<!-- /bench-phases -->"


def bench_table() -> str:
    """docs/benchmarks.md's CPU table: one row per committed launch/bench.py result."""
    mib = 2**20
    lines = [
        "| run | tokens/s/device | MFU of the measured matmul | peak predicted / tracked | forward / backward / "
        "optimizer (ms) | compute / communication (exposed) / idle (ms) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in ("llama_debug", "llama_debug_fsdp"):
        r = json.loads((BENCH_RUNS / f"{name}.json").read_text())
        ph, dev = r["split"]["phases"], r["split"]["device"]
        ms = lambda x: f"{1e3 * x:.1f}"  # noqa: E731
        where = "one process" if r["world_size"] == 1 else f"{r['world_size']} ranks"
        lines.append(
            f"| `{r['recipe']}`, {where} | {r['tokens_per_s_per_device']:,.0f} | {100 * r['mfu_vs_measured']:.1f}% "
            f"({r['tflops_per_device']:.2f} TFLOP/s) | {r['predicted_peak_bytes'] / mib:.1f} / "
            f"{r['tracked_peak_bytes'] / mib:.1f} MiB | {ms(ph['forward'])} / {ms(ph['backward'])} / "
            f"{ms(ph['optimizer_step'])} | {ms(dev['compute'])} / {ms(dev['communication'])} "
            f"({ms(dev['communication_exposed'])}) / {ms(dev['idle'])} |"
        )
    return f"{BENCH_BEGIN}\n" + "\n".join(lines) + f"\n{BENCH_END}"


def phases_table() -> str:
    """docs/observability.md's per-phase table: the FSDP bench run's rank 0, per step."""
    r = json.loads((BENCH_RUNS / "llama_debug_fsdp.json").read_text())
    ph, dev = r["split"]["phases"], r["split"]["device"]
    ms = lambda x: f"{1e3 * x:.1f}"  # noqa: E731
    left = [("data", ph["data"]), ("forward", ph["forward"]), ("backward", ph["backward"])]
    left += [("optimizer step", ph["optimizer_step"]), None]
    right = [("window", dev["window"]), ("compute", dev["compute"]), ("communication", dev["communication"])]
    right += [("of it exposed", dev["communication_exposed"]), ("idle", dev["idle"])]
    lines = ["| phase | ms | | device timeline | ms |", "| --- | ---: | --- | --- | ---: |"]
    for a, b in zip(left, right, strict=True):
        lines.append((f"| {a[0]} | {ms(a[1])} |" if a else "| | |") + f" | {b[0]} | {ms(b[1])} |")
    return f"{PHASES_BEGIN}\n" + "\n".join(lines) + f"\n{PHASES_END}"


def _section(page: Path, begin: str, end: str) -> str:
    text = page.read_text()
    return text[text.index(begin) : text.index(end) + len(end)]


def test_the_bench_tables_are_the_committed_runs():
    assert _section(REPO / "docs" / "benchmarks.md", BENCH_BEGIN, BENCH_END) == bench_table()
    assert _section(REPO / "docs" / "observability.md", PHASES_BEGIN, PHASES_END) == phases_table()


QUICKSTART = REPO / "docs" / "benchmarks" / "quickstart-2026-12-07.json"
_QS_FROM = "rendered by tests/unit/test_docs_tables.py from docs/benchmarks/quickstart-2026-12-07.json -->"
QS_BEGIN = f"<!-- quickstart: {_QS_FROM}"
QS_END = "<!-- /quickstart -->"
QS_LOG_BEGIN = f"<!-- quickstart-log: {_QS_FROM}"
QS_LOG_END = "<!-- /quickstart-log -->"


def quickstart_table() -> str:
    """docs/quickstart.md's validation losses and perplexities (exp of the loss) of the committed run."""
    import math

    run = json.loads(QUICKSTART.read_text())
    lines = ["| step | validation loss | validation perplexity |", "| ---: | ---: | ---: |"]
    lines += [f"| {v['step']} | {v['val/loss']:.3f} | {math.exp(v['val/loss']):.0f} |" for v in run["validation"]]
    return f"{QS_BEGIN}\n" + "\n".join(lines) + f"\n{QS_END}"


def quickstart_log() -> str:
    """The run's first and last console lines, as docs/quickstart.md shows them."""
    run = json.loads(QUICKSTART.read_text())
    return f"{QS_LOG_BEGIN}\n```\n" + "\n".join(run["console"]) + f"\n```\n{QS_LOG_END}"


def test_the_quickstart_numbers_are_the_committed_run():
    page = REPO / "docs" / "quickstart.md"
    assert _section(page, QS_BEGIN, QS_END) == quickstart_table()
    assert _section(page, QS_LOG_BEGIN, QS_LOG_END) == quickstart_log()
    banner = (REPO / "docs" / "observability.md").read_text()  # docs/observability.md quotes the same lines
    assert all(line in banner for line in json.loads(QUICKSTART.read_text())["console"])


OPTIMIZERS = REPO / "docs" / "benchmarks" / "optimizers-2026-12-07.json"
OPT_BEGIN = (
    "<!-- optimizers: rendered by tests/unit/test_docs_tables.py from docs/benchmarks/optimizers-2026-12-07.json -->"
)
OPT_END = "<!-- /optimizers -->"


def optimizers_table() -> str:
    """docs/optimizers.md's state bytes and step times: `launch/optimizer_memory.py --json`'s rows."""
    run = json.loads(OPTIMIZERS.read_text())
    lines = ["| optimizer | optimizer state | bytes per parameter | step time (CPU) |", "| --- | ---: | ---: | ---: |"]
    lines += [
        f"| `{r['optimizer']}` | {r['state_bytes']:,} B | {r['bytes_per_param']:.4f} | {r['step_ms']:.1f} ms |"
        for r in run["rows"]
    ]
    return f"{OPT_BEGIN}\n" + "\n".join(lines) + f"\n{OPT_END}"


def test_the_optimizer_table_is_the_committed_run():
    assert _section(REPO / "docs" / "optimizers.md", OPT_BEGIN, OPT_END) == optimizers_table()


COMPARE_PAGE = REPO / "docs" / "compare.md"
RUN_BEGIN = "<!-- compare-run: rendered by tests/unit/test_docs_tables.py from docs/compare/records.json -->"
RUN_END = "<!-- /compare-run -->"


def compare_run_section() -> str:
    """docs/compare.md's every-strategy tables: trainer/compare.py's own markdown of the committed run's records
    (what the run wrote as compare.md)."""
    from trainer.compare import markdown

    records = json.loads((REPO / "docs" / "compare" / "records.json").read_text())
    return f"{RUN_BEGIN}\n{markdown(records)}{RUN_END}"


def test_the_every_strategy_tables_are_the_committed_run():
    page = COMPARE_PAGE.read_text()
    current = page[page.index(RUN_BEGIN) : page.index(RUN_END) + len(RUN_END)]
    assert current == compare_run_section(), "re-render with: python tests/unit/test_docs_tables.py --write"


PACKING = REPO / "docs" / "benchmarks" / "packing-2026-12-07"
PACK_BEGIN = (
    "<!-- packing: rendered by tests/unit/test_docs_tables.py from docs/benchmarks/packing-2026-12-07/*.json -->"
)
PACK_END = "<!-- /packing -->"


def packing_table() -> str:
    """docs/data.md's packed-against-unpacked runs: launch/bench.py's results on the built-in chat set, one epoch's
    time being its sequences over the global batch times the step time."""
    lines = [
        "| run | tokens a sequence | sequences an epoch | s/step | tokens/s | epoch | peak predicted / tracked |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in ("llama_debug_chat", "llama_debug_chat-pack", "llama_debug_chat_packed"):
        r = json.loads((PACKING / f"{name}.json").read_text())
        batch = r["tokens_per_step"] // r["seq_len"]
        epoch = r["sequences_per_epoch"] / batch * r["step_s"]
        run = " ".join([f"recipe={r['recipe']}", *r["overrides"]])
        lines.append(
            f"| `{run}` | {r['seq_len']:,} | {r['sequences_per_epoch']:,} | {r['step_s']:.2f} | "
            f"{r['tokens_per_s_per_device']:,.0f} | {epoch:.0f} s | {r['predicted_peak_bytes'] / 2**20:.1f} / "
            f"{r['tracked_peak_bytes'] / 2**20:.1f} MiB |"
        )
    return f"{PACK_BEGIN}\n" + "\n".join(lines) + f"\n{PACK_END}"


def test_the_packing_table_is_the_committed_runs():
    assert _section(REPO / "docs" / "data.md", PACK_BEGIN, PACK_END) == packing_table()


# docs/moe.md's plans of the large MoE shapes: the planner is arithmetic, so the table is recomputed here
SHAPES_BEGIN = "<!-- moe-shapes: rendered by tests/unit/test_docs_tables.py from the recipes (the planner) -->"
SHAPES_END = "<!-- /moe-shapes -->"
MOE_SHAPES = ("mixtral8x7b_ep", "qwen3_30b_a3b_ep", "deepseek_v3_like_ep")


def moe_shapes_table() -> str:
    """One row per large MoE recipe at its hardware.world_size on 80 GB GPUs: the most loaded rank's peak for
    balanced routing and for the worst case (`launch/plan.py`'s expert routing line), and the all-to-all bytes."""
    from models.args import model_args_of
    from parallel.memory_terms import expert_exchange_bytes
    from trainer.config import load_config
    from trainer.validate import derive

    gib = 2**30
    lines = [
        "| recipe | parameters (active) | GPUs | layout | balanced | worst case | all-to-all / rank / step | "
        "fits 80 GB (worst, + reserve) |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for recipe in MOE_SHAPES:
        cfg = load_config([f"recipe={recipe}"])
        args, world = model_args_of(cfg), int(cfg.hardware.world_size)
        plans = {r: derive(cfg, world, capacity_gib=80, device="cuda", expert_routing=r) for r in ("balanced", "worst")}
        worst = plans["worst"].memory
        dims = plans["balanced"].dims
        fits = "yes" if worst.most_loaded.peak_bytes + worst.reserve_bytes <= 80 * gib else "no"
        lines.append(
            f"| `{recipe}` | {args.num_params() / 1e9:.1f} B ({args.num_params(active=True) / 1e9:.1f} B) | "
            f"{world:,} | "
            f"{dims.describe()} | {plans['balanced'].memory.most_loaded.peak_bytes / gib:.2f} GiB | "
            f"{worst.most_loaded.peak_bytes / gib:.2f} GiB | {expert_exchange_bytes(cfg, args, dims) / gib:,.1f} GiB | "
            f"{fits} |"
        )
    return f"{SHAPES_BEGIN}\n" + "\n".join(lines) + f"\n{SHAPES_END}"


def test_the_moe_shapes_table_is_the_planners():
    assert _section(REPO / "docs" / "moe.md", SHAPES_BEGIN, SHAPES_END) == moe_shapes_table()


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    for doc, begin, end, render in (
        (REPO / "docs" / "benchmarks.md", BENCH_BEGIN, BENCH_END, bench_table),
        (REPO / "docs" / "observability.md", PHASES_BEGIN, PHASES_END, phases_table),
        (REPO / "docs" / "quickstart.md", QS_BEGIN, QS_END, quickstart_table),
        (REPO / "docs" / "quickstart.md", QS_LOG_BEGIN, QS_LOG_END, quickstart_log),
        (REPO / "docs" / "optimizers.md", OPT_BEGIN, OPT_END, optimizers_table),
        (REPO / "docs" / "data.md", PACK_BEGIN, PACK_END, packing_table),
        (REPO / "docs" / "moe.md", SHAPES_BEGIN, SHAPES_END, moe_shapes_table),
    ):
        text = doc.read_text()
        doc.write_text(text.replace(_section(doc, begin, end), render()))
    for doc in sorted((REPO / "docs").glob("*.md")):
        text = doc.read_text()
        for path, start, end in reversed(compare_table_sections(text)):
            text = text[:start] + compare_table(path) + text[end:]
        doc.write_text(text)
    page = COMPARE_PAGE.read_text()
    start, end = page.index(RUN_BEGIN), page.index(RUN_END) + len(RUN_END)
    COMPARE_PAGE.write_text(page[:start] + compare_run_section() + page[end:])
    page = MEMORY_PAGE.read_text()
    start, end = page.index(BEGIN), page.index(END) + len(END)
    page = page[:start] + _rendered_section() + page[end:]
    start, end = page.index(COMPARE_BEGIN), page.index(COMPARE_END) + len(COMPARE_END)
    page = page[:start] + f"{COMPARE_BEGIN}\n{compare_defaults_table()}\n{COMPARE_END}" + page[end:]
    start, end = page.index(MATRIX_BEGIN), page.index(MATRIX_END) + len(MATRIX_END)
    page = page[:start] + memory_matrix_section() + page[end:]
    MEMORY_PAGE.write_text(page)
