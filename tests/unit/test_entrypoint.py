"""launch/train.py as users run it: the dry-run plan, and bad input stopped before any process group."""

from __future__ import annotations

import time

import pytest

from helpers import run_train


def test_dry_run_8b_prints_the_plan_without_allocating():
    import subprocess
    import sys

    from helpers import REPO

    # run the entry point in a process that reports its own peak RSS when it is done
    code = ("import resource, runpy, sys\n"
            "sys.argv = ['train.py', 'recipe=llama8b', 'training.global_batch_size=64', 'dry_run=true']\n"
            "try:\n"
            f"    runpy.run_path('{REPO / 'launch' / 'train.py'}', run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            "print('maxrss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
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
    assert "model states / rank   params 29.92 + grads 29.92 + optim 59.83 = 119.66 GiB" in out
    assert took < 60, f"dry run took {took:.1f} s"
    # 8 B parameters in fp32 would be 32 GB; the dry run's process stays far below 2 GiB
    maxrss_kib = int(out.rsplit("maxrss_kib", 1)[1])
    assert maxrss_kib < 2 * 2**20, f"dry run peaked at {maxrss_kib / 2**20:.2f} GiB"


def test_dry_run_predicts_adafactor_against_adamw_for_8b_on_fsdp_8():
    import os
    import subprocess
    import sys

    from helpers import REPO

    lines = {}
    for opt in ("adamw", "adafactor"):
        proc = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "recipe=llama8b", "dry_run=true",
                               "parallel.data=fsdp", f"optim.name={opt}"], capture_output=True, text=True,
                              timeout=120, cwd=REPO, env={**os.environ, "WORLD_SIZE": "8"})
        assert proc.returncode == 0, proc.stderr
        lines[opt] = next(ln for ln in proc.stdout.splitlines() if ln.startswith("model states / rank"))
    # per rank: an eighth of the weights and gradients; Adafactor keeps only row/column statistics
    assert "params 3.74 + grads 3.74 + optim 7.48 = 14.96 GiB" in lines["adamw"]
    assert "params 3.74 + grads 3.74 + optim 0.01 = 7.48 GiB" in lines["adafactor"]


@pytest.mark.parametrize("overrides, message", [
    (["data.source=tokens", "data.path=/nonexistent/tokens"], "data.path=/nonexistent/tokens: no such directory"),
    (["training.global_batch_size=10", "training.micro_batch_size=4"],
     "training.global_batch_size(10) must be divisible by training.micro_batch_size(4) * dp(1) = 4: 10 % 4 = 2"),
    (["optim.lr=-0.1"], "optim.lr=-0.1 must be > 0"),
    (["training.stpes=5"], "Did you mean: 'steps'"),
])
def test_bad_input_never_starts_training(tmp_path, overrides, message):
    run_dir = tmp_path / "run"
    proc = run_train(["recipe=llama_debug", f"run_dir={run_dir}", *overrides], check=False, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert proc.stderr.count("invalid config") == 1 and "Traceback" not in proc.stderr
    assert not run_dir.exists(), "a rejected run wrote to its run directory"


def test_missing_token_file(tmp_path):
    data = tmp_path / "tokens"
    data.mkdir()
    (data / "meta.json").write_text('{"vocab_size": 4096, "dtype": "uint16"}')
    (data / "val.bin").write_bytes(b"\0\0" * 100)
    proc = run_train(["recipe=llama_debug", "data.source=tokens", f"data.path={data}"], check=False, timeout=60)
    assert proc.returncode == 2 and "missing train.bin" in proc.stderr


def test_bad_input_under_torchrun_stops_every_rank_before_the_process_group(tmp_path):
    proc = run_train(["recipe=llama_debug", "parallel.data=ddp", "training.global_batch_size=6",
                      "training.micro_batch_size=4", f"run_dir={tmp_path / 'run'}"], nproc=2, check=False, timeout=120)
    assert proc.returncode != 0
    assert "training.global_batch_size(6) must be divisible by training.micro_batch_size(4) * dp(2) = 8" in proc.stderr
    assert proc.stderr.count("invalid config") == 1  # one message, from rank 0
    assert "exitcode  : 2" in proc.stderr  # both workers exited with the config-error code, no crash
    assert 'train.py", line' not in proc.stderr  # no traceback from inside the trainer


def test_missing_deepspeed_is_one_clear_error(tmp_path):
    """Without DeepSpeed installed (here: its import blocked), a ZeRO recipe stops before anything starts."""
    import subprocess
    import sys

    from helpers import REPO

    code = ("import sys, runpy; sys.modules['deepspeed'] = None; "
            f"sys.argv = ['train.py', 'recipe=llama_debug_zero3', 'run_dir={tmp_path / 'run'}']; "
            f"runpy.run_path('{REPO / 'launch' / 'train.py'}', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2
    assert "parallel.data=zero3 needs DeepSpeed, which is not installed: pip install -e '.[deepspeed]'" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()
