"""launch/gpu_check.sh's rehearsal on this CPU machine: --prepare fetches the GPU machine's wheels (PyPI), then
--cpu-smoke runs every step of both parts (core and levers) at tiny sizes, so no GPU minute is spent on a typo."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO


@pytest.mark.slow  # the GPU job's rehearsal (the slow tier: README)
def test_gpu_check_rehearses_every_step_on_cpu(tmp_path):
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "GPU_DIR": str(tmp_path / "gpu"),
        "OUT": str(tmp_path / "out"),
        "OMP_NUM_THREADS": "2",
    }
    script = str(REPO / "launch" / "gpu_check.sh")
    prep = subprocess.run(["bash", script, "--prepare"], capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert prep.returncode == 0, prep.stderr[-3000:]
    wheels = sorted(p.name.split("-")[0] for p in (tmp_path / "gpu" / "wheels").glob("*.whl"))
    assert {"omegaconf", "wandb", "deepspeed", "torchao", "pydantic"} <= set(wheels)
    assert not any(w in ("torch", "numpy", "triton") for w in wheels)  # the GPU image has those
    proc = subprocess.run(
        ["bash", script, "--cpu-smoke", "--part", "all"], capture_output=True, text=True, timeout=900, env=env, cwd=REPO
    )
    out = tmp_path / "out"
    assert proc.returncode == 0, (proc.stdout[-4000:], proc.stderr[-2000:])
    assert "failed:" not in proc.stdout and "gpu_check.sh: done" in proc.stdout
    files = {p.name for p in out.iterdir()}
    assert {"gpu_check.log", "env.txt", "gpu_tests.log", "results.jsonl", "report.md", "trace.json.gz"} <= files
    assert len(files) <= 8  # what the device tool brings back
    env_txt = (out / "env.txt").read_text()
    assert json.loads(env_txt[env_txt.index("\n{") + 1 :])["torch"]  # the probe's JSON, after nvidia-smi's lines
    assert "skipped" in (out / "gpu_tests.log").read_text()  # tests/gpu/ collected, skipped without CUDA
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    names = [r["run_dir"].rsplit("/", 1)[1] for r in results]
    assert names == [
        "llama1b_1gpu",
        "llama8b_1gpu",
        "base",
        "attention_flash",
        "sac_every_second",
        "fsdp_bf16_params",
        "loss_chunks_8",
        "float8_tensorwise",
        "float8_rowwise",
    ]
    report = (out / "report.md").read_text()
    assert report.count("\n| llama") == 9
    if (tmp_path / "gpu" / "plain_torch_llama.py").exists():  # the anchor beside this checkout: the ratios
        assert "x of " in report and "| tiny seq 32" in report


@pytest.mark.slow  # (docs/benchmarks.md's rehearsal of tests/gpu/: the GPU tests' own code, on the CPU)
def test_the_gpu_tests_rehearse_on_the_cpu():
    """`SHARDWISE_GPU_TESTS_ON=cpu python -m pytest tests/gpu -m "not cuda_only"`, as docs/benchmarks.md shows it:
    every comparison of tests/gpu/ that a CPU can run passes here, each checked against broken blocks too."""
    env = {**os.environ, "SHARDWISE_GPU_TESTS_ON": "cpu", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/gpu", "-m", "not cuda_only"],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "12 passed" in proc.stdout, proc.stdout[-2000:]
