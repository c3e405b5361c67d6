"""The runs tests/gpu/ compares, the `runs` fixture that launches each once per test module (imported by the
modules), and their helpers. (tests/gpu/ has no conftest.py of its own: a second module named `conftest` would
shadow tests/distributed/conftest.py for the tests that import it; tests/conftest.py skips tests/gpu/ without
CUDA.)"""

from __future__ import annotations

import os

import pytest

# SHARDWISE_GPU_TESTS_ON=cpu: run them on the CPU anyway, to rehearse the tests' own code (the CUDA-only ones fail)
DEVICE = os.environ.get("SHARDWISE_GPU_TESTS_ON", "cuda")

# a tiny LLaMA: every dimension a multiple of 16 (float8's matmuls need it), fp32 unless a test says otherwise
TINY = [
    "recipe=llama_debug",
    "model.dim=256",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.vocab_size=1024",
    "data.source=synthetic",
    "training.seq_len=256",
    "training.micro_batch_size=4",
    "training.global_batch_size=8",
    "training.steps=4",
    "training.val_every=0",
    "optim.warmup_steps=1",
    "optim.lr=1e-3",
    "logging.every=1",
    "logging.tensorboard=false",
    "logging.wandb.mode=disabled",
    "training.precision=fp32",
    f"training.device={DEVICE}",
]


# name -> overrides of TINY; each run is launched once per test module that asks for it (`runs`), and the files
# are split so that pytest-xdist's --dist loadfile spreads them over workers (launch/gpu_check.sh: 4)
RUNS = {
    "cpu_fp32": ["training.device=cpu"],
    "fp32": [],
    "bf16": ["training.precision=bf16"],
    "fp16": ["training.precision=fp16"],
    "compile_bf16": ["training.precision=bf16", "parallel.compile=true"],
    "fsdp_fused": ["parallel.data=fsdp"],  # optim.fused=null: fused on CUDA
    "fsdp_foreach": ["parallel.data=fsdp", "optim.fused=false"],
    "fsdp_offload": ["parallel.data=fsdp", "parallel.offload=cpu", "optim.fused=false"],
    "zero2": ["parallel.data=zero2", "training.precision=bf16"],
    "flash": ["training.precision=bf16", "model.attention=flash"],
    "cudnn": ["training.precision=bf16", "model.attention=cudnn"],
    "efficient": ["training.precision=bf16", "model.attention=efficient"],
    "float8_tensorwise": ["training.precision=bf16", "training.float8=tensorwise"],
    "float8_rowwise": ["training.precision=bf16", "training.float8=rowwise"],
    "activation_offload": [
        "parallel.activation_offload=true",
        "logging.memory_breakdown=true",
        "logging.memory_breakdown_step=3",
    ],
    "no_offload_tracked": ["logging.memory_breakdown=true", "logging.memory_breakdown_step=3"],
    "profiled": ["training.precision=bf16", "profile.steps=[2,3]", "profile.memory_snapshot=true", "profile.nvtx=true"],
    "checkpointed": ["checkpoint.every=2", "checkpoint.keep=5"],
}


def close(a, b, rel):
    return len(a) == len(b) and all(abs(x - y) <= rel * abs(y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs(name) -> (process, losses per step, run dir): launch/train.py as one plain process (FSDP and
    DeepSpeed on a one-rank group), once per module."""
    from helpers import losses_of, once_per_name, run_train

    def launch(name, run_dir):
        proc = run_train([*TINY, *RUNS[name], f"run_dir={run_dir}"], timeout=600)
        return proc, losses_of(run_dir), run_dir

    return once_per_name(tmp_path_factory, launch)
