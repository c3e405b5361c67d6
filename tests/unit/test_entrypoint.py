"""launch/train.py as users run it: the dry-run plan, and bad input stopped before any process group."""

from __future__ import annotations

import time

import pytest
from helpers import REPO, run_cli, run_train


def test_dry_run_8b_prints_the_plan_without_allocating():
    import subprocess
    import sys

    # run the entry point in a process that reports its own peak RSS when it is done
    code = (
        "import resource, runpy, sys\n"
        "sys.argv = ['train.py', 'recipe=llama8b', 'training.global_batch_size=64', 'dry_run=true']\n"
        "try:\n"
        f"    runpy.run_path('{REPO / 'launch' / 'train.py'}', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print('maxrss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    took = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "flavor: 8b" in out
    assert "parameters            8,030,261,248 (8.030 B)" in out
    assert "micro-batch 1 x accumulation 64 x dp 1" in out
    assert "FLOPs per token       57,914,449,920" in out
    assert "tokens per step       524,288" in out
    # 8,030,261,248 fp32 parameters: 29.92 GiB each for weights and gradients, AdamW twice that
    assert "  params              29.92 GiB  fp32 parameters (whole model)" in out
    assert "  grads               29.92 GiB  gradients accumulated over micro-batches" in out
    assert "  optim               59.83 GiB  optimizer state (adamw" in out
    assert "  peak " in out and "tensor bytes per rank on the device" in out
    assert took < 60, f"dry run took {took:.1f} s"
    # 8 B parameters in fp32 would be 32 GB; the dry run's process stays far below 2 GiB
    maxrss_kib = int(out.rsplit("maxrss_kib", 1)[1])
    assert maxrss_kib < 2 * 2**20, f"dry run peaked at {maxrss_kib / 2**20:.2f} GiB"


def test_dry_run_predicts_adafactor_against_adamw_for_8b_on_fsdp_8():
    from helpers import run_cli

    lines = {}
    for opt in ("adamw", "adafactor"):  # in-process (train.py's main): a dry run starts no process group
        proc = run_cli(
            "train.py",
            ["recipe=llama8b", "dry_run=true", "parallel.data=fsdp", f"optim.name={opt}"],
            env={"WORLD_SIZE": 8},
        )
        assert proc.returncode == 0, proc.stderr
        lines[opt] = [
            ln.split()[:3] for ln in proc.stdout.splitlines() if ln.startswith(("  params ", "  grads ", "  optim "))
        ]
    # per rank: an eighth of the weights and gradients; Adafactor keeps only row/column statistics
    assert lines["adamw"] == [["params", "3.74", "GiB"], ["optim", "7.48", "GiB"], ["grads", "3.74", "GiB"]]
    assert lines["adafactor"] == [["params", "3.74", "GiB"], ["optim", "5.69", "MiB"], ["grads", "3.74", "GiB"]]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.source=tokens", "data.path=/nonexistent/tokens"], "data.path=/nonexistent/tokens: no such directory"),
        (
            ["training.global_batch_size=10", "training.micro_batch_size=4"],
            "training.global_batch_size(10) must be divisible by training.micro_batch_size(4) * dp(1) = 4: 10 % 4 = 2",
        ),
        (["optim.lr=-0.1"], "optim.lr=-0.1 must be > 0"),
        (["training.stpes=5"], "Did you mean: 'steps'"),
        (
            ["training.steps=2"],
            "optim.warmup_steps(40) must be in [0, training.steps(2)]: set optim.warmup_steps=2 or "
            "less (a short run: optim.warmup_steps=0)",
        ),
        (
            ["data.source=tokens", "data.path={short}"],
            "val.bin has 10 tokens, fewer than one sequence of training.seq_len + 1 = 129",
        ),
        (["recipe={broken}"], "broken.yaml: not valid YAML at line 3, column 1: expected ',' or '}'"),
        (["checkpoint.init_from=/etc/hostname"], "/etc/hostname is not an HF model directory"),
        (["checkpoint.init_from={other_shape}"], "shape(s) differ: layers.0.attention.wk.weight"),
        (
            ["parallel.data=zero2", "training.precision=fp16", "training.device=cpu"],
            "training.precision=fp16 with parallel.data=zero2 on the CPU: DeepSpeed's CPU accelerator runs fp16 only",
        ),
        # each of these raised a traceback after the run directory was written, or trained (2026-12-06 review)
        (["logging.wandb.mode=online"], "logging.wandb.mode=online: no W&B API key here"),
        (["model.dim=0"], "model.dim=0 must be >= 1"),
        (
            ["model.rope_scaling.type=llama3", "model.rope_scaling.factor=-1"],
            "model.rope_scaling.factor=-1.0 must be > 0",
        ),
        (["model.attention=cudnn", "training.device=cpu"], "model.attention=cudnn is a CUDA kernel"),
        (
            ["finetune.method=qlora"],
            "finetune.method=qlora: use full, lora or dora",
        ),
        (
            ["finetune.method=lora", "parallel.compile=true"],
            "finetune.method=lora with parallel.compile=True: not built with adapters yet",
        ),
        (
            ["finetune.quantize_base=true"],
            "finetune.quantize_base=true with finetune.method=full: a quantized base cannot train",
        ),
        (
            ["finetune.method=lora", "finetune.quantize_base=true", "parallel.data=ddp", "WORLD_SIZE=2"],
            "finetune.quantize_base=true with parallel.data=ddp: the NF4 base is not built there",
        ),
        (
            ["finetune.method=lora", "finetune.quantize_base=true", "model.dim=64", "model.n_heads=4"],
            "finetune.quantize_base=true: attention.wq (64, 64): NF4 with finetune.nf4_scaler_block=256 needs whole",
        ),
        (
            ["training.samples_every=10"],
            "training.samples_every=10 with data.source=default: the prompts are held-out conversations' first turns",
        ),
        (
            ["data.source=chat", "training.samples_every=10", "parallel.pp=2", "WORLD_SIZE=2"],
            "training.samples_every=10 with parallel.pp=2: greedy decoding runs the whole model on every rank",
        ),
        (  # (wq's 2 blocks of 64 x 32 split over FSDP 2 alone, but its TP shard holds 1)
            ["finetune.method=lora", "finetune.quantize_base=true", "finetune.nf4_scaler_block=32", "model.dim=64"]
            + ["model.n_heads=4", "parallel.tp=2", "parallel.data=fsdp", "WORLD_SIZE=4"],
            "finetune.quantize_base=true: attention.wq (64, 64) (its TP shard (32, 64)): NF4 with "
            "finetune.nf4_scaler_block=32 needs whole blocks",
        ),
        (
            ["finetune.method=dora", "parallel.data=zero3", "WORLD_SIZE=2"],
            "finetune.method=dora with parallel.data=zero3: DoRA's magnitudes start at the base's row norms",
        ),
        (
            ["model.attention=cudnn", "training.deterministic=true"],
            "model.attention=cudnn with training.deterministic=true: torch's deterministic mode excludes the cuDNN",
        ),
        (
            ["model.tie_embeddings=true", "parallel.pp=2", "WORLD_SIZE=2"],
            "model.tie_embeddings=true with parallel.pp=2: the tied table would be",
        ),
        (  # found by the pairwise parity matrix: crashed, and with donated buffers off trained 1e-3 off
            ["parallel.compile=true", "parallel.pp=2", "parallel.pp_schedule=zbv", "WORLD_SIZE=2"],
            "parallel.compile=true with parallel.pp_schedule=zbv: that schedule's split backward",
        ),
    ],
)
def test_bad_input_never_starts_training(tmp_path, overrides, message, monkeypatch):
    import parallel.zero

    run_dir = tmp_path / "run"
    overrides = [
        o.format(short=_short_tokens(tmp_path), broken=_broken_recipe(tmp_path), other_shape=_other_shape(tmp_path))
        for o in overrides
    ]
    # the CPU's fp16 capability forced to "none" (AMD EPYC's answer; an Intel Xeon with AVX512-FP16 says yes, and
    # test_zero_fp16_on_the_cpu_follows_the_capability runs both answers on either kind)
    monkeypatch.setattr(parallel.zero, "_deepspeed_cpu_fp16", lambda: False)
    env = {"NETRC": str(tmp_path / "no-netrc")}  # (no W&B key on this machine, whatever its ~/.netrc holds)
    env |= {o.split("=")[0]: o.split("=")[1] for o in overrides if o.startswith("WORLD_SIZE=")}
    overrides = [o for o in overrides if not o.startswith("WORLD_SIZE=")]
    proc = run_cli("train.py", ["recipe=llama_debug", f"run_dir={run_dir}", *overrides], env=env)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert proc.stderr.count("invalid config") == 1 and "Traceback" not in proc.stderr
    assert not run_dir.exists(), "a rejected run wrote to its run directory"


def _short_tokens(tmp_path):
    import numpy as np

    d = tmp_path / "short"
    d.mkdir(exist_ok=True)
    (d / "meta.json").write_text('{"vocab_size": 4096, "dtype": "uint16"}')
    np.zeros(10_000, dtype=np.uint16).tofile(d / "train.bin")
    np.zeros(10, dtype=np.uint16).tofile(d / "val.bin")
    return d


def _broken_recipe(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("base: llama_debug\ntraining: {steps: 5\n")
    return f


def _other_shape(tmp_path):
    from safetensors.torch import save_file

    from models.llama import build_model, model_args

    f = tmp_path / "other.safetensors"
    if not f.exists():
        m = build_model(model_args("debug", n_kv_heads=8), device="cpu")
        m.init_weights(0)
        save_file({k: v for k, v in m.state_dict().items() if "rope" not in k}, str(f))
    return f


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["training.device=cuda"], "training.device=cuda, but this machine has no CUDA device"),
        (["run_dir=/proc/shardwise-run"], "run_dir=/proc/shardwise-run: cannot create or write there"),
    ],
)
def test_bad_machine_settings_never_start_training(overrides, message):
    import torch

    if "training.device=cuda" in overrides and torch.cuda.is_available():
        pytest.skip(
            "training.device=cuda is a valid setting where CUDA exists; its refusal is only testable on a "
            "machine without CUDA, such as CI's"
        )
    proc = run_cli("train.py", ["recipe=llama_debug", *overrides])
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_help_lists_every_key_with_type_default_and_comment():
    import typing
    from dataclasses import fields, is_dataclass

    from trainer.config import Config

    def keys(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if is_dataclass(hints[f.name]):
                yield from keys(hints[f.name], f"{prefix}{f.name}.")
            else:
                yield prefix + f.name

    proc = run_train(["--help"], check=False, timeout=60)  # the entry point's one real start in this file's help test
    assert proc.returncode == 0, proc.stderr
    listed = {ln.split()[0] for ln in proc.stdout.splitlines() if ln.startswith(" ") and "(" in ln and "default" in ln}
    missing = [k for k in keys(Config) if k not in listed]
    assert not missing, f"--help does not list {missing}"
    assert "  training.steps  (int, default 200)\n      optimizer steps" in proc.stdout
    assert "fp16       fp32 master weights, fp16 compute with a dynamic loss scaler" in proc.stdout
    one = run_cli("train.py", ["--help", "checkpoint"])
    assert one.returncode == 0 and "checkpoint.on_damaged" in one.stdout and "training.steps" not in one.stdout
    bad = run_cli("train.py", ["--help", "trainin"])
    assert bad.returncode == 2 and "did you mean training?" in bad.stderr
    bare = run_cli("train.py", [])
    assert bare.returncode == 2 and "usage: python launch/train.py recipe=NAME" in bare.stderr
    assert "step" not in bare.stdout


def test_missing_token_file(tmp_path):
    data = tmp_path / "tokens"
    data.mkdir()
    (data / "meta.json").write_text('{"vocab_size": 4096, "dtype": "uint16"}')
    (data / "val.bin").write_bytes(b"\0\0" * 100)
    proc = run_cli("train.py", ["recipe=llama_debug", "data.source=tokens", f"data.path={data}"])
    assert proc.returncode == 2 and "missing train.bin" in proc.stderr


def test_bad_input_under_torchrun_stops_every_rank_before_the_process_group(tmp_path):
    proc = run_train(
        [
            "recipe=llama_debug",
            "parallel.data=ddp",
            "training.global_batch_size=6",
            "training.micro_batch_size=4",
            f"run_dir={tmp_path / 'run'}",
        ],
        nproc=2,
        check=False,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "training.global_batch_size(6) must be divisible by training.micro_batch_size(4) * dp(2) = 8" in proc.stderr
    assert proc.stderr.count("invalid config") == 1  # one message, from rank 0
    # ... which torchrun reports as the root cause (rank 0's error file), with the config-error exit code
    root = proc.stderr.split("Root Cause (first observed failure):", 1)[1]
    assert "rank      : 0" in root and "exitcode  : 2" in root
    assert "traceback : shardwise: invalid config (1 problem):" in root
    assert 'train.py", line' not in proc.stderr  # no traceback from inside the trainer


def test_missing_deepspeed_is_one_clear_error(tmp_path):
    """Without DeepSpeed installed (here: its import blocked), a ZeRO recipe stops before anything starts."""
    import subprocess
    import sys

    code = (
        "import sys, runpy; sys.modules['deepspeed'] = None; "
        f"sys.argv = ['train.py', 'recipe=llama_debug_zero3', 'run_dir={tmp_path / 'run'}']; "
        f"runpy.run_path('{REPO / 'launch' / 'train.py'}', run_name='__main__')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2
    assert "parallel.data=zero3 needs DeepSpeed, which is not installed: pip install -e '.[deepspeed]'" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_zero_fp16_on_the_cpu_follows_the_capability(monkeypatch):
    """DeepSpeed's fp16 on the CPU is refused where oneDNN has no fp16 kernels and accepted where it has (Intel Xeon
    with AVX512-FP16): both answers forced here, so the rule is checked on either kind of CPU. Where fp16 runs,
    tests/distributed/test_zero_fp16.py trains ZeRO-2 in fp16 for real (its worker lifts the gate on any CPU)."""
    import parallel.zero
    from trainer.config import load_config
    from trainer.validate import validate

    cfg = load_config(["recipe=llama_debug", "parallel.data=zero2", "training.precision=fp16", "training.device=cpu"])
    refusal = "training.precision=fp16 with parallel.data=zero2 on the CPU"
    monkeypatch.setattr(parallel.zero, "_deepspeed_cpu_fp16", lambda: False)
    assert any(refusal in p for p in validate(cfg, 1))
    monkeypatch.setattr(parallel.zero, "_deepspeed_cpu_fp16", lambda: True)
    assert validate(cfg, 1) == []
    # and the real answer of this machine's DeepSpeed is one of the two
    monkeypatch.undo()
    assert parallel.zero._deepspeed_cpu_fp16() in (True, False)


def test_build_ops_compiles_or_loads_cpu_adam_where_the_runs_read_it(monkeypatch):
    """launch/build_ops.py (the README's set-up runs it): DeepSpeed's CPU Adam op built, or loaded when the set-up
    built it already, in the directory every run and test reads ($TORCH_EXTENSIONS_DIR, tests/conftest.py); a real
    process, as the set-up starts it. Its usage and a missing DeepSpeed in-process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("deepspeed")
    root = os.environ["TORCH_EXTENSIONS_DIR"]
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "build_ops.py")], capture_output=True, text=True, timeout=600, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "DeepSpeed's cpu_adam op ready in" in proc.stdout and f"({root}/cpu_adam)" in proc.stdout, proc.stdout
    assert list(Path(root, "cpu_adam").glob("cpu_adam*.so")), sorted(os.listdir(Path(root, "cpu_adam")))
    usage = run_cli("build_ops.py", ["--help"])
    assert usage.returncode == 0 and "DS_BUILD_CPU_ADAM=1" in usage.stderr
    assert run_cli("build_ops.py", ["now"]).returncode == 2
    monkeypatch.setitem(sys.modules, "deepspeed.ops.op_builder", None)  # what an import without DeepSpeed meets
    missing = run_cli("build_ops.py", [])
    assert missing.returncode == 2 and "DeepSpeed is not installed" in missing.stderr
