"""Every `launch/train.py` command that README.md and docs/ show, run as a user would (shrunk to a few steps).

Commands are read from the fenced code blocks themselves, so a command added to the docs is run here the
next time the suite runs. Debug-sized recipes train for real under torchrun with their rank count (3 steps,
validation at step 0, 1, 2, 3: every pipeline schedule's validation path included); GPU-sized recipes, and
multi-node lines written with `...`, run their dry run at the world size they are shown with. The other
documented commands (convert, prepare_data, submit, bench) are run by the tests named in OTHER_COMMANDS.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
from helpers import REPO, read_jsonl, run_cli, run_train

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHRINK = [
    "training.steps=3",
    "optim.warmup_steps=1",
    "training.val_every=1",
    "training.val_batches=1",
    "logging.wandb.mode=disabled",
    "logging.tensorboard=false",
    "checkpoint.every=0",
]
# documented commands run elsewhere, by the named test
OTHER_COMMANDS = {
    "launch/convert_checkpoint.py": "test_checkpoints.py::test_export_to_hf_and_start_other_strategies_from_it",
    "launch/prepare_data.py": "test_data.py::test_prepare_data_cli",
    "launch/submit.py": "test_cluster.py",
    "launch/bench_checkpoint.py": "test_data.py::test_checkpoint_checksum_benchmark_runs",
    "launch/optimizer_memory.py": "test_lowbit_optim.py",
    "checkpoint.init_from=hf-model/": "test_checkpoints.py::test_export_to_hf_and_start_other_strategies_from_it",
    "data.source=tokens data.path=data/mine": "test_data.py::test_prepare_data_cli",
    "profile.steps=[10,12]": "test_profiling.py",
    "checkpoint.init_from=runs/pretrain-hf": "test_docs_commands.py::test_the_finetune_page_runs_end_to_end",
    "run_dir=runs/pretrain": "test_docs_commands.py::test_the_finetune_page_runs_end_to_end",
    "pip install": ".ci/run (the README's set-up command)",
    "launch/make_chat_data.py": "test_docs_commands.py::test_the_data_page_runs",
    "recipe=llama_debug_chat": "test_docs_commands.py::test_the_data_page_runs",
}


def doc_lines():
    """(doc name, line, inside a code block) for every line of README.md and docs/, comments cut off."""
    for doc in DOCS:
        inside = False
        for line in doc.read_text().splitlines():
            if line.startswith("```"):
                inside = not inside
                continue
            yield doc.name, line.split("  #")[0].strip().rstrip("\\").strip(), inside


def documented_commands() -> list[tuple[str, str]]:
    out = []
    for name, line, inside in doc_lines():
        if inside and "launch/train.py" in line and re.match(r"^(python|torchrun)\b", line):
            out.append((name, line))
        elif not inside:  # inline: `python launch/train.py ...` in a sentence
            out += [(name, m) for m in re.findall(r"`((?:python|torchrun) [^`]*launch/train\.py[^`]*)`", line)]
    return out


def plan(line: str) -> tuple[str, int, list[str]]:
    """('run' | 'dry' | 'other', world size, train.py arguments) for one documented line."""
    if any(k in line for k in OTHER_COMMANDS):
        return "other", 1, []
    toks = [t for t in shlex.split(line.replace("...", "")) if t]
    nproc = next((int(t.split("=")[1]) for t in toks if t.startswith("--nproc_per_node=")), 1)
    nnodes = next((int(t.split("=")[1]) for t in toks if t.startswith("--nnodes=")), 1)
    args = toks[toks.index("launch/train.py") + 1 :]
    if args[:1] == ["--help"]:
        return "help", 1, args
    recipe = next(a.split("=", 1)[1] for a in args if a.startswith("recipe="))
    kind = "run" if recipe.startswith("llama_debug") and nnodes == 1 else "dry"
    return kind, nproc * nnodes, args


COMMANDS = sorted({line for _, line in documented_commands()})


def test_the_docs_show_commands_and_each_is_understood():
    assert len(COMMANDS) >= 15
    for line in COMMANDS:
        kind, world, args = plan(line)
        assert kind in ("other", "help") or any(a.startswith("recipe=") for a in args), line


def _train_cmd(world: int, script: str, args: list[str]) -> list[str]:
    if world == 1:
        return [sys.executable, script, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", script, *args]


@pytest.fixture(scope="module")
def pooled(request, tmp_path_factory, cache_dir):
    """{documented line: its run_dir}, for the selected lines that train, run through tests/distributed/
    train_pool.py: one launch per rank count. DeepSpeed lines start the entry point for real, alone (its engine
    keeps process-wide state); a pool launch that fails leaves its lines out, and each then runs alone in its test,
    so a failure is its own."""
    lines = {
        item.callspec.params["line"]
        for item in request.session.items
        if item.module is request.module and item.originalname == "test_documented_command_runs"
    }
    by_world: dict[int, list[str]] = {}
    for line in sorted(lines):
        kind, world, args = plan(line)
        if kind == "run" and not any(a.startswith("recipe=llama_debug_zero") for a in args):
            by_world.setdefault(world, []).append(line)
    done = {}
    for world, group in by_world.items():
        root = tmp_path_factory.mktemp(f"pool{world}")
        jobs = [
            [*plan(line)[2], *SHRINK, f"data.cache_dir={cache_dir}", f"run_dir={root / str(i)}"]
            for i, line in enumerate(group)
        ]
        (root / "spec.json").write_text(json.dumps(jobs))
        script = str(REPO / "tests" / "distributed" / "train_pool.py")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
        proc = subprocess.run(
            _train_cmd(world, script, [str(root / "spec.json")]),
            capture_output=True,
            text=True,
            timeout=300 + 120 * len(group),
            cwd=REPO,
            env=env,
        )
        if proc.returncode == 0:
            done.update({line: root / str(i) for i, line in enumerate(group)})
    return done


# The lines that train start processes and check that a command runs end to end, no numbers: the slow tier (README).
# The help and dry-run lines run in this process, in the main tier.
SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "line",
    [pytest.param(c, marks=[SLOW] if plan(c)[0] == "run" else []) for c in COMMANDS if plan(c)[0] != "other"],
)
def test_documented_command_runs(line, tmp_path, cache_dir, pooled):
    kind, world, args = plan(line)
    if kind == "help":  # in this process (tests/unit/test_entrypoint.py starts the entry point for real)
        proc = run_cli("train.py", args)
        assert proc.returncode == 0 and f"  {args[1]}." in proc.stdout, proc.stderr
        return
    if kind == "dry":  # the plan only: nothing starts, so in this process at the shown world size
        proc = run_cli("train.py", [*args, "dry_run=true"], env={"WORLD_SIZE": world})
        assert proc.returncode == 0, f"{line}\n{proc.stderr[-3000:]}"
        assert f"world size            {world}" in proc.stdout
        return
    run_dir = pooled.get(line)
    if run_dir is None:  # a DeepSpeed line, or its pool failed: the entry point itself, alone
        run_dir = tmp_path / "run"
        extra = [*SHRINK, f"data.cache_dir={cache_dir}", f"run_dir={run_dir}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
        cmd = _train_cmd(world, str(REPO / "launch" / "train.py"), [*args, *extra])
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=REPO, env=env)
        assert proc.returncode == 0, f"{line}\n{proc.stderr[-3000:]}"
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if "val/loss" in r] == [0, 1, 2, 3], line  # validation before, during, after
    assert [r["step"] for r in rows if "train/loss" in r][-1] == 3


@SLOW
def test_the_readme_pipeline_command_validates_under_dualpipev_too(tmp_path, cache_dir):
    """The README's zbv line with the other zero-bubble V schedule (validation crashed in both before)."""
    line = next(c for c in COMMANDS if "pp_schedule=zbv" in c)
    _, world, args = plan(line.replace("pp_schedule=zbv", "pp_schedule=dualpipev"))
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={world}",
            str(REPO / "launch" / "train.py"),
            *args,
            *SHRINK,
            f"data.cache_dir={cache_dir}",
            f"run_dir={run_dir}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "val/loss" in r] == [0, 1, 2, 3]


def test_docs_cite_only_files_that_exist():
    """A repository path named in README.md or docs/ exists (placeholders under run_dir/, runs/, data/ aside),
    and the docs never point at the developers' notes outside the repository."""
    missing = []
    for doc in DOCS:
        text = doc.read_text()
        assert "REFERENCES" not in text and "../shared" not in text, f"{doc.name} cites notes outside the repository"
        for path in re.findall(r"`?((?:[\w.-]+/)+[\w.-]+\.(?:py|md|yaml|sh|sbatch))`?", text):
            if path.startswith(("run_dir/", "runs/", "data/", "path/", "recipes/NAME", "recipes/my_")):
                continue
            if not (REPO / path).exists() and not (REPO / "launch" / path).exists():
                missing.append(f"{doc.name}: {path}")
    assert not missing, missing


def documented_script_commands(script: str, *, torchrun: bool = False) -> list[str]:
    """Every `python launch/<script>` line of the docs (with `torchrun`, also `torchrun ... launch/<script>` and
    `python -m ...` ones), in code blocks and inline."""
    lead = r"(?:python|torchrun) [^`]*" if torchrun else r"python "
    out = set()
    for _, line, inside in doc_lines():
        if inside and re.match(rf"^{lead}launch/{re.escape(script)}\b", line):
            out.add(line)
        elif not inside:
            out |= set(re.findall(rf"`({lead}launch/{re.escape(script)}[^`]*)`", line))
    return sorted(out)


PLAN_COMMANDS = documented_script_commands("plan.py")


def test_the_docs_show_plan_commands():
    assert any("--json" in c for c in PLAN_COMMANDS) and any("--simulate" in c for c in PLAN_COMMANDS)


@pytest.mark.parametrize(
    "line",
    [pytest.param(c, marks=[SLOW] if ("--simulate" in c or "--build" in c) else []) for c in PLAN_COMMANDS],
)
def test_documented_plan_command_runs(line):
    """launch/plan.py lines run as shown (they need no GPU: the planner is arithmetic, the simulation fake)."""
    import json

    args = shlex.split(line)[2:]
    if "--build" in args:  # a real build: shrunk to two blocks (the embedding and output stay full size)
        args.append("model.n_layers=2")
    if "--search" in args:  # arithmetic only, but thousands of plans: pipelines of at most 2 stages
        args.append("max_pp=2")
    if "--simulate" in args or "--build" in args:  # fake process groups, a real build: a process of their own
        proc = subprocess.run(
            [sys.executable, str(REPO / "launch" / "plan.py"), *args],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    else:  # arithmetic: in this process
        proc = run_cli("plan.py", args)
    assert proc.returncode == 0, f"{line}\n{proc.stderr[-3000:]}"
    if "--search" in args:
        assert re.search(r"\d+ layouts tried .* \d+ fit in [\d.]+ GiB", proc.stdout), proc.stdout[-2000:]
        assert "| rank | layout | data | AC | mb |" in proc.stdout and "\n| 1 | " in proc.stdout
    elif "--json" in args:
        out = json.loads(proc.stdout)
        assert out["peak_bytes"] > 0 and "reserve_bytes" in out and out["fits"] in (True, False)
    else:
        assert "tensor bytes per rank on the device" in proc.stdout
        from trainer.config import load_config

        sized = load_config([a for a in args if a.startswith("recipe=")]).hardware.gpu_memory_gib is not None
        assert ("verdict" in proc.stdout) == (sized or any(a.startswith("gpu_memory_gib=") for a in args))
    if "--simulate" in args:
        assert "simulated (fake process group" in proc.stdout
    if "--build" in args:
        assert re.search(r"building rank \d+ of \d+ on this machine .*parameters held [\d.]+ GiB", proc.stdout)


# run elsewhere: the --slurm line needs a SLURM (test_cluster.py::test_compare_runs_its_cells_as_a_slurm_array), and
# the README's example is the one test_compare.py runs and checks value by value
COMPARE_ELSEWHERE = ("--slurm", "strategies=ddp,fsdp,zero2 nproc=2 steps=20 training.precision=fp32")
COMPARE_COMMANDS = [c for c in documented_script_commands("compare.py") if not any(k in c for k in COMPARE_ELSEWHERE)]


def test_the_docs_show_compare_commands():
    assert COMPARE_COMMANDS and any("sweep=" in c for c in COMPARE_COMMANDS)


COMPARE_SHRINK = [
    "model.dim=64",
    "model.n_layers=4",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.vocab_size=256",
    "data.source=synthetic",
    "training.seq_len=32",
    "finetune.nf4_scaler_block=8",  # (a qlora cell: the tiny model's weights are 32 x 64 NF4 blocks)
]


@SLOW
@pytest.mark.parametrize("line", COMPARE_COMMANDS)
def test_documented_compare_command_runs(line, tmp_path):
    """launch/compare.py lines run as shown, shrunk: the tiny model, 4 steps, at most 2 ranks unless a cell is
    context-parallel (every cell still runs, or is refused by validation as it would be at full size)."""
    import csv

    from trainer.compare import _predicted, strategy_overrides

    # (a warmup given for the documented length is dropped: compare.py shortens the recipe's to the 4 steps)
    args = [a for a in shlex.split(line)[2:] if not a.startswith(("steps=", "nproc=", "out=", "optim.warmup_steps="))]
    shown = int(next((a.split("=")[1] for a in shlex.split(line) if a.startswith("nproc=")), "2"))
    nproc = shown if ("cp=" in line or "ep=" in line) else min(2, shown)  # (a cp or ep cell needs its ranks)
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch" / "compare.py"),
            *args,
            *COMPARE_SHRINK,
            "steps=4",
            f"nproc={nproc}",
            f"out={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, f"{line}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    strategies = next(a for a in args if a.startswith("strategies=")).split("=", 1)[1].split(",")
    with open(tmp_path / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["cell"].split("@")[0] for r in rows} == set(strategies)  # every cell is a row, failed ones too
    # a cell is refused here only if validation refuses it as documented (full size, the documented ranks)
    documented = [
        a
        for a in shlex.split(line)[2:]
        if "=" in a and a.split("=")[0] not in ("strategies", "steps", "nproc", "out", "sweep")
    ]
    steps = next((a.split("=")[1] for a in shlex.split(line) if a.startswith("steps=")), "20")
    for r in rows:
        assert r["status"] in ("ok", "refused"), r
        if r["status"] == "refused":
            as_shown = _predicted(
                [*documented, *strategy_overrides(r["cell"].split("@")[0], shown), f"training.steps={steps}"], shown
            )
            assert "refused" in as_shown, f"{r['cell']} refused only when shrunk: {r['message']}"
    for name in ("memory", "throughput", "loss"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0


# docs/compare.md's search tables: each between markers naming the command that prints it, re-rendered from that
# command (full size: the search is arithmetic, 40-100 s for the 70B ones on 2 cores, so in the slow tier)
SEARCH_BEGIN = re.compile(r"<!-- plan-search: (python launch/plan\.py [^>]*--search) -->\n")
SEARCH_END = "<!-- /plan-search -->"
SEARCH_ROWS = 8  # the table's first rows


def search_block(line: str) -> str:
    """What a documented `plan.py ... --search` prints, as the docs show it: the heading and counts (without the
    search's own wall time) and the table's first SEARCH_ROWS rows; the time-model lines are left out."""
    proc = run_cli("plan.py", shlex.split(line)[2:])
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    head = [lines[0], re.sub(r"; [\d.]+ s$", "", lines[1])]
    table = [x for x in lines if x.startswith("|")][: 2 + SEARCH_ROWS]
    return "\n".join([*head, "", *table]) + "\n"


def search_sections(text: str) -> list[tuple[str, int, int]]:
    """(command, start, end) of every search section of a page: its content is text[start:end]."""
    return [(m.group(1), m.end(), text.index(SEARCH_END, m.end())) for m in SEARCH_BEGIN.finditer(text)]


SEARCH_PAGES = (REPO / "docs" / "compare.md", REPO / "docs" / "moe.md")
SEARCHES = [(page, c) for page in SEARCH_PAGES for c, _, _ in search_sections(page.read_text())]


@SLOW
@pytest.mark.parametrize("page, line", SEARCHES, ids=[f"{p.name}:{c}" for p, c in SEARCHES])
def test_the_search_tables_are_what_the_planner_prints(page, line):
    text = page.read_text()
    (start, end) = next((s, e) for c, s, e in search_sections(text) if c == line)
    assert text[start:end] == search_block(line), "the planner prints another table now: re-render it (search_block)"


def test_the_search_tables_name_documented_commands():
    assert len(SEARCHES) == 4 and all(c in PLAN_COMMANDS for _, c in SEARCHES), SEARCHES


# (the --report form is run by tests/distributed/test_gpu_check.py)
BENCH_COMMANDS = [c for c in documented_script_commands("bench.py", torchrun=True) if "--report" not in c]


def test_the_docs_show_bench_commands():
    assert any(c.startswith("torchrun") for c in BENCH_COMMANDS) and any(c.startswith("python") for c in BENCH_COMMANDS)


@SLOW
@pytest.mark.parametrize("line", BENCH_COMMANDS)
def test_documented_bench_command_runs(line, tmp_path):
    """launch/bench.py lines run as shown, at their rank count, shrunk to 2 timed steps after 1 of warm-up."""
    toks = shlex.split(line)
    nproc = next((int(t.split("=")[1]) for t in toks if t.startswith("--nproc_per_node=")), 1)
    args = [*toks[toks.index("launch/bench.py") + 1 :], "steps=2", "warmup=1", "profile_steps=1", f"run_dir={tmp_path}"]
    proc = run_train(args, nproc=nproc, script="bench.py", timeout=300)
    assert "tokens/s/device" in proc.stdout and (tmp_path / "bench.json").is_file()


def _blocks(text: str, lang: str) -> list[str]:
    """The fenced code blocks of one language, backslash continuations joined."""
    return [b.replace("\\\n", " ") for b in re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)]


@SLOW
def test_the_finetune_page_runs_end_to_end(tmp_path, cache_dir):
    """docs/finetune.md's walk-through as shown, shrunk to 3 steps a run: pretrain, export to HF, tokenize other text
    with the default tokenizer, LoRA and QLoRA from the export, the PEFT and merged export, the Python block that
    loads them with peft and transformers (its two errors printed below 1e-5), and the chat fine-tune."""
    page = (REPO / "docs" / "finetune.md").read_text()
    commands = [c for c in _blocks(page, "bash")[0].splitlines() if c.strip()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "SHARDWISE_CACHE": cache_dir}
    fix = {
        "runs/": f"{tmp_path}/runs/",
        "data/torch-distributed": f"{tmp_path}/data/torch-distributed",
        "step-400": "step-3",
    }
    fix["step-200"] = "step-3"
    shrink = ["training.steps=3", "optim.warmup_steps=1", "training.val_every=1", "training.val_batches=1"]
    shrink.append("checkpoint.every=3")
    shrink += ["logging.wandb.mode=disabled", "logging.tensorboard=false", f"data.cache_dir={cache_dir}"]
    for line in commands:
        for a, b in fix.items():
            line = line.replace(a, b)
        if "$(" in line:  # (the tokenizing line finds torch's package with a shell substitution: run in a shell)
            shell = line.replace("python ", f"{sys.executable} ") + " --no-progress"
            proc = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
            assert proc.returncode == 0, f"{line}\n{proc.stderr[-3000:]}"
            continue
        args = shlex.split(line)
        if "launch/train.py" in line:
            args += shrink
        proc = subprocess.run(
            [sys.executable, *args[1:]], capture_output=True, text=True, timeout=600, cwd=REPO, env=env
        )
        assert proc.returncode == 0, f"{line}\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}"
        if "recipe=llama_debug_" in line:
            assert "initialized the base weights from" in proc.stdout
    code = _blocks(page, "python")[0]
    for a, b in fix.items():
        code = code.replace(a, b)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peft_err, merged_err = (float(x) for x in proc.stdout.split()[-2:])
    assert peft_err < 1e-5 and merged_err < 1e-5, proc.stdout
    # the chat fine-tune from the same export: samples at step 0 and at the last step
    (line,) = [c for c in _blocks(page, "bash")[1].splitlines() if c.strip()]
    for a, b in fix.items():
        line = line.replace(a, b)
    args = [*shlex.split(line)[1:], *shrink, "training.sample_tokens=8"]
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert proc.returncode == 0, f"{line}\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}"
    assert "sample 3 at step 0:" in proc.stdout and "sample 3 at step 3:" in proc.stdout, proc.stdout[-3000:]


def test_the_data_page_runs(tmp_path, cache_dir):
    """docs/data.md's chat commands as shown, shrunk to 3 steps a run: the recipe on the built-in set (the standard
    library's conversations, the default tokenizer with a chat template), then the same set written as files by
    launch/make_chat_data.py and read from them, then the packed recipe. Each run trains on assistant
    tokens, says how many, and its loss falls from the uniform guess."""
    page = (REPO / "docs" / "data.md").read_text()
    blocks = [[c for c in b.splitlines() if c.strip()] for b in _blocks(page, "bash")[:3]]
    assert blocks[0] == ["python launch/train.py recipe=llama_debug_chat"], blocks
    assert "make_chat_data.py" in blocks[1][0] and "recipe=llama_debug_chat data.path=" in blocks[1][1], blocks
    # (the packing block's second line, pretraining, is run by test_documented_command_runs)
    assert blocks[2][0] == "python launch/train.py recipe=llama_debug_chat_packed", blocks
    build = shlex.split(blocks[1][0].replace("data/", f"{tmp_path}/data/")) + ["--max-mb", "1"]
    proc = run_cli("make_chat_data.py", build[2:], env={"SHARDWISE_CACHE": cache_dir})  # (in this process: no start)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [blocks[0][0], blocks[1][1].replace("data/", f"{tmp_path}/data/"), blocks[2][0]]
    for i, line in enumerate(lines):
        run = tmp_path / f"run{i}"
        args = [
            *shlex.split(line)[2:],
            *SHRINK,
            "training.seq_len=128",
            f"data.cache_dir={cache_dir}",
            f"run_dir={run}",
        ]
        proc = run_train(args, nproc=1)
        assert "of their tokens trained (assistant turns, from the template's generation markers)" in proc.stdout
        assert ("sequences of 129 tokens" in proc.stdout) == ("packed" in line), proc.stdout[-2000:]
        losses = [r["val/loss"] for r in read_jsonl(run / "metrics.jsonl") if "val/loss" in r]
        assert len(losses) == 4 and losses[-1] < losses[0], (line, losses)
