"""docs/finetune.md's tables, rendered here so that a number edited by hand, or a result replaced without re-rendering,
fails:
- the fine-tune on this machine from docs/benchmarks/finetune-2026-12-07.json, which `--collect RUNS_DIR` writes from
  the documented runs (their metrics.jsonl, and PEFT's and transformers' logits against shardwise's);
- the parity rows from tests/distributed/test_parity.py's ADAPTER_CASES (the test holds each to its bounds);
- the recipes at real shapes from launch/plan.py, against the targets and the best published figures.
`python tests/unit/test_finetune_docs.py --write` re-renders them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "distributed"))

from helpers import REPO, run_cli  # noqa: E402

PAGE = REPO / "docs" / "finetune.md"
GIB = 1024**3
RESULTS = REPO / "docs" / "benchmarks" / "finetune-2026-12-07.json"


def _markers(name: str, source: str) -> tuple[str, str]:
    return f"<!-- {name}: rendered by tests/unit/test_finetune_docs.py from {source} -->", f"<!-- /{name} -->"


RUN_BEGIN, RUN_END = _markers("finetune-run", "docs/benchmarks/finetune-2026-12-07.json")
PARITY_BEGIN, PARITY_END = _markers("adapter-parity", "tests/distributed/test_parity.py")
PLAN_BEGIN, PLAN_END = _markers("finetune-plan", "launch/plan.py")
CHAT = REPO / "docs" / "benchmarks" / "finetune-chat-2026-12-07.json"
CHAT_BEGIN, CHAT_END = _markers("finetune-chat", "docs/benchmarks/finetune-chat-2026-12-07.json")
LOAD = REPO / "docs" / "benchmarks" / "sharded-load-2026-12-07.json"
LOAD_BEGIN, LOAD_END = _markers("sharded-load", "docs/benchmarks/sharded-load-2026-12-07.json")
# (recipe, target per GPU in GiB, target host GiB per node or None, best published): issue 26's table
TARGETS = [
    ("llama8b_qlora_1gpu", 6, None, "torchtune 7.4 GiB (RTX 4090); Unsloth: 6 GB minimum"),
    ("llama8b_lora_1gpu", 15, None, "torchtune 16.2 GiB"),
    ("llama8b_full_1gpu_24g", 18, 64, "torchtune 18.9 GiB (full fine-tune, one 24 GB GPU)"),
    ("llama8b_1gpu_16g", 18, 64, "torchtune 18.9 GiB (full fine-tune, one 24 GB GPU)"),
    ("llama70b_qlora_2gpu", 16, 64, "Answer.AI 14.92 GiB with > 128 GB host; PEFT 19.6 GB + 107 GB host"),
    ("llama70b_lora_8gpu", 25, None, "torchtune 27.6 GiB"),
]
RUNS = ("lora", "qlora")


def _section(begin: str, end: str) -> str:
    text = PAGE.read_text()
    return text[text.index(begin) : text.index(end) + len(end)]


def run_table() -> str:
    r = json.loads(RESULTS.read_text())
    lines = [
        f"Measured {r['measured']}.",
        "",
        "| run | trained parameters | held-out loss, step 0 | held-out loss, last step | tokens/s | peak RSS |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in RUNS:
        x = r["runs"][name]
        lines.append(
            f"| {x['recipe']} | {x['trained']:,} of {x['parameters']:,} | {x['val_first']:.3f} | "
            f"{x['val_last']:.3f} (step {x['last_step']}) | {x['tokens_per_s']:,.0f} | {x['peak_gib']:.2f} GiB |"
        )
    p = r["peft"]
    lines += [
        "",
        f"PEFT's logits against shardwise's: {p['peft']:.1e} (relative); the merged model's in transformers: "
        f"{p['merged']:.1e}; the base alone: {p['base']:.2f}.",
    ]
    return f"{RUN_BEGIN}\n" + "\n".join(lines) + f"\n{RUN_END}"


def parity_table() -> str:
    from adapter_cases import ADAPTER_CASES

    lines = ["| row | processes | settings |", "| --- | ---: | --- |"]
    for name, nproc, overrides in ADAPTER_CASES:
        lines.append(f"| {name} | {nproc} | `{' '.join(overrides)}` |")
    return f"{PARITY_BEGIN}\n" + "\n".join(lines) + f"\n{PARITY_END}"


def plan_table() -> str:
    lines = [
        "| recipe | GPUs | predicted per GPU (with the 2 GiB reserve) | host per node | target | best published |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    for recipe, target, host, published in TARGETS:
        proc = run_cli("plan.py", [f"recipe={recipe}", "--json"])
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        need = (out["peak_bytes"] + out["reserve_bytes"]) / GIB
        have = out["host_bytes_per_node"] / GIB
        met = need <= target and (host is None or have <= host)
        lines.append(
            f"| `{recipe}` | {out['world_size']} x {out['capacity_bytes'] / GIB:.0f} GiB | {need:.2f} GiB | "
            f"{have:.1f} GiB | <= {target} GiB{f' and <= {host} GiB host' if host else ''}: "
            f"{'met' if met else 'missed'} | {published} |"
        )
    return f"{PLAN_BEGIN}\n" + "\n".join(lines) + f"\n{PLAN_END}"


def _cell(text: str, width: int = 90) -> str:
    """A completion in one table cell: newlines shown as the return symbol, pipes escaped, cut at `width`."""
    text = text.replace("\n", "⏎").replace("|", "\\|")
    return f"`{text[:width]}{'...' if len(text) > width else ''}`"


def chat_text() -> str:
    r = json.loads(CHAT.read_text())
    first, last = r["samples"]["0"], r["samples"][str(r["last_step"])]
    lines = [
        f"Measured {r['measured']}: held-out loss on the assistant's tokens {r['val_first']:.3f} at step 0 (the "
        f"pretrained base) and {r['val_last']:.3f} after step {r['last_step']}; {r['tokens_per_s']:,.0f} tokens/s. "
        f"The greedy completions of the first {len(first)} held-out prompts (each a docstring; completions cut at "
        "90 characters, newlines shown as ⏎):",
        "",
        f"| prompt | step 0 | step {r['last_step']} |",
        "| --- | --- | --- |",
    ]
    for a, b in zip(first, last):
        prompt = a["prompt"].split("<|user|>\n", 1)[-1].split("<|end|>", 1)[0]
        lines.append(f"| {_cell(prompt, 60)} | {_cell(a['completion'])} | {_cell(b['completion'])} |")
    return f"{CHAT_BEGIN}\n" + "\n".join(lines) + f"\n{CHAT_END}"


def collect_chat(run: Path) -> dict:
    """The chat fine-tune's numbers: the first and last validation loss (assistant tokens), the steady tokens/s, the
    samples at each sampling step."""
    import datetime
    import os

    import torch

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [(x["step"], x["val/loss"]) for x in rows if "val/loss" in x]
    speed = sorted(x["perf/tokens_per_sec_per_gpu"] for x in rows if "perf/tokens_per_sec_per_gpu" in x)
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown CPU")
    return {
        "recipe": "llama_debug_chat_lora",
        "val_first": val[0][1],
        "val_last": val[-1][1],
        "last_step": val[-1][0],
        "tokens_per_s": speed[len(speed) // 2],
        "samples": {str(x["step"]): x["samples"] for x in rows if x.get("event") == "samples"},
        "measured": f"{datetime.date.today()}, {cpu} ({os.cpu_count()} cores), torch {torch.__version__}",
    }


def test_the_chat_fine_tune_is_the_committed_run():
    r = json.loads(CHAT.read_text())
    assert r["val_last"] < r["val_first"] - 0.3 and set(r["samples"]) >= {"0", str(r["last_step"])}
    assert _section(CHAT_BEGIN, CHAT_END) == chat_text(), "re-render: python tests/unit/test_finetune_docs.py --write"


def load_text() -> str:
    r = json.loads(LOAD.read_text())
    mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
    text = (
        f"Measured {r['measured']} (`test_a_sharded_load_reads_only_each_ranks_slices`, FSDP over 2 ranks, a model of "
        f"{mib(r['model_bytes'])} in fp32): rank 0's host memory grew by at most {mib(r['sliced'])} while reading "
        f"the HF directory slice by slice (the planner's bound: {mib(r['planned'])} per rank), and by "
        f"{mib(r['whole'])} reading the same weights from a step-N checkpoint, which every rank reads whole."
    )
    return f"{LOAD_BEGIN}\n{text}\n{LOAD_END}"


def test_the_sharded_load_numbers_are_the_committed_run():
    r = json.loads(LOAD.read_text())
    assert r["sliced"] < 0.25 * r["model_bytes"] <= r["whole"]
    assert _section(LOAD_BEGIN, LOAD_END) == load_text(), "re-render with --write"


def test_the_finetune_run_table_is_the_committed_run():
    r = json.loads(RESULTS.read_text())
    for name in RUNS:  # the fine-tune learned the new text
        assert r["runs"][name]["val_last"] < r["runs"][name]["val_first"] - 0.5, name
    assert r["peft"]["peft"] < 1e-5 and r["peft"]["merged"] < 1e-5 and r["peft"]["base"] > 1e-2
    assert _section(RUN_BEGIN, RUN_END) == run_table(), "re-render: python tests/unit/test_finetune_docs.py --write"


def test_the_parity_rows_are_the_tests_rows():
    assert _section(PARITY_BEGIN, PARITY_END) == parity_table(), "re-render with --write"


def test_the_recipe_plans_are_the_planners():
    assert _section(PLAN_BEGIN, PLAN_END) == plan_table(), "re-render with --write"


def collect(runs: Path) -> dict:
    """The documented runs' numbers: each fine-tune's first and last validation loss, its steady tokens/s and peak
    memory, and the exported adapter's logits in PEFT and the merged model's in transformers against shardwise's."""
    import datetime
    import os

    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from trainer.hf import adapted_model

    out = {"runs": {}}
    for name in RUNS:
        rows = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
        val = [(x["step"], x["val/loss"]) for x in rows if "val/loss" in x]
        speed = [x["perf/tokens_per_sec_per_gpu"] for x in rows if "perf/tokens_per_sec_per_gpu" in x][2:]
        step = runs / name / "checkpoints" / f"step-{val[-1][0]}"
        model, args, spec, _ = adapted_model(step)
        out["runs"][name] = {
            "recipe": f"llama_debug_{name}",
            "val_first": val[0][1],
            "val_last": val[-1][1],
            "last_step": val[-1][0],
            "tokens_per_s": sorted(speed)[len(speed) // 2],
            "peak_gib": max(x.get("mem/peak_rss_gib", 0) for x in rows),
            "trained": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "parameters": sum(p.numel() for p in model.parameters()),
        }
    model, args, _, _ = adapted_model(runs / "lora" / "checkpoints" / f"step-{out['runs']['lora']['last_step']}")
    tokens = torch.randint(0, args.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.eval()(tokens)
        hf = LlamaForCausalLM.from_pretrained(runs / "pretrain-hf", torch_dtype=torch.float32).eval()
        base = hf(tokens).logits
        peft = PeftModel.from_pretrained(hf, runs / "lora-peft").eval()(tokens).logits
        merged = LlamaForCausalLM.from_pretrained(runs / "lora-merged", torch_dtype=torch.float32).eval()(tokens).logits
    rel = lambda a: ((a - want).norm() / want.norm()).item()  # noqa: E731
    out["peft"] = {"peft": rel(peft), "merged": rel(merged), "base": rel(base)}
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown CPU")
    out["measured"] = f"{datetime.date.today()}, {cpu} ({os.cpu_count()} cores), torch {torch.__version__}"
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["--collect"]:
        RESULTS.write_text(json.dumps(collect(Path(sys.argv[2])), indent=1) + "\n")
    elif sys.argv[1:2] == ["--collect-chat"]:
        CHAT.write_text(json.dumps(collect_chat(Path(sys.argv[2])), indent=1) + "\n")
    elif sys.argv[1:] == ["--write"]:
        text = PAGE.read_text()
        for begin, end, render in (
            (RUN_BEGIN, RUN_END, run_table),
            (PARITY_BEGIN, PARITY_END, parity_table),
            (PLAN_BEGIN, PLAN_END, plan_table),
            (LOAD_BEGIN, LOAD_END, load_text),
            (CHAT_BEGIN, CHAT_END, chat_text),
        ):
            text = text.replace(text[text.index(begin) : text.index(end) + len(end)], render())
        PAGE.write_text(text)
