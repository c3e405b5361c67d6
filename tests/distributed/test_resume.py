"""Save, crash, resume with low-precision optimizer states; ZeRO-3 and FSDP checkpoints convert alike."""

from __future__ import annotations

import shutil

import pytest
from helpers import metric_rows, run_train

TINY = [
    "recipe=llama_debug",
    "model.dim=64",
    "model.n_layers=4",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.vocab_size=256",
    "data.source=synthetic",
    "training.seq_len=32",
    "training.precision=fp32",
    "training.global_batch_size=8",
    "training.micro_batch_size=2",
    "training.steps=4",
    "training.val_every=0",
    "optim.warmup_steps=1",
    "optim.lr=1e-2",
    "logging.every=1",
    "logging.tensorboard=false",
    "logging.wandb.mode=disabled",
    "checkpoint.every=2",
]


# plain fsdp/zero3 (and ddp, tp, pp, fsdp+tp) resume bitwise in test_checkpoints.py; these are the optimizers
# whose states are not plain fp32 tensors
@pytest.mark.parametrize(
    "strategy, extra",
    [
        # torchao's 8-bit states (tensor subclasses inside DTensors) through DCP; 128-wide so they are quantized, the
        # shapes of test_lowbit_sharded.py's WIDE model, whose compiled updates this run then finds in inductor's cache
        ("fsdp", ["optim.name=adamw8bit", "model.dim=128", "model.n_kv_heads=4", "model.ffn_hidden_dim=256"]),
        ("fsdp", ["optim.name=adamw_bf16"]),  # bf16 moments; the rounding noise is a function of the step
    ],
    ids=["fsdp_adamw8bit", "fsdp_adamw_bf16"],
)
def test_resume_after_a_crash_continues_the_same_run(strategy, extra, tmp_path):
    if "optim.name=adamw8bit" in extra:
        pytest.importorskip("torchao")
    run_dir = tmp_path / "run"
    args = [*TINY, f"parallel.data={strategy}", *extra, f"run_dir={run_dir}"]
    run_train(args, nproc=2)
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text() == "step-4"
    assert (ckpts / "step-2" / "COMPLETE").is_file() and (ckpts / "step-4" / "COMPLETE").is_file()
    uninterrupted = {r["step"]: r["train/loss"] for r in metric_rows(run_dir / "metrics.jsonl")}

    # the job "crashed" after saving step 2: step 4 never happened, a save of step 3 died half-way
    shutil.rmtree(ckpts / "step-4")
    (ckpts / "latest").write_text("step-4")  # a stale pointer must not be trusted either
    (ckpts / "step-3").mkdir()
    (ckpts / "step-3" / "half-written.distcp").write_bytes(b"\0" * 10)

    proc = run_train(args, nproc=2)  # the same command resumes
    assert "skipping incomplete checkpoint" in proc.stdout and "step-3" in proc.stdout
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    rows = metric_rows(run_dir / "metrics.jsonl")
    resumed = {r["step"]: r["train/loss"] for r in rows[len(uninterrupted) :]}
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == uninterrupted[step], (
            f"{strategy}: step {step} after resume {resumed[step]} != uninterrupted {uninterrupted[step]}"
        )
    assert (ckpts / "latest").read_text() == "step-4" and (ckpts / "step-4" / "COMPLETE").is_file()


def test_zero3_and_fsdp_checkpoints_convert_to_the_same_safetensors(tmp_path):
    import subprocess
    import sys

    import torch
    from helpers import REPO
    from safetensors.torch import load_file

    from models.llama import ModelArgs, build_model

    files = {}
    for strategy in ("zero3", "fsdp"):
        run_dir = tmp_path / strategy
        run_train([*TINY, f"parallel.data={strategy}", f"run_dir={run_dir}"], nproc=2)
        out = tmp_path / f"{strategy}.safetensors"
        proc = subprocess.run(
            [
                sys.executable,
                str(REPO / "launch" / "convert_checkpoint.py"),
                str(run_dir / "checkpoints" / "step-4"),
                "--out",
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        files[strategy] = load_file(str(out))
    zero, fsdp = files["zero3"], files["fsdp"]
    assert zero.keys() == fsdp.keys()
    for k in zero:
        # 4 AdamW steps at lr 1e-2 turn 1e-7 gradient differences into up to ~1e-6 in a weight near 0
        torch.testing.assert_close(zero[k], fsdp[k], rtol=1e-5, atol=1e-5, msg=lambda m: f"{k}: {m}")  # noqa: B023 (called at once)
    # the file is a complete model: it loads strictly into a fresh one
    model = build_model(
        ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=64), device="cpu"
    )
    model.load_state_dict(zero, strict=True)
    # an incomplete checkpoint is refused
    (tmp_path / "zero3" / "checkpoints" / "step-4" / "COMPLETE").unlink()
    bad = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch" / "convert_checkpoint.py"),
            str(tmp_path / "zero3" / "checkpoints" / "step-4"),
            "--out",
            str(tmp_path / "x.st"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "no COMPLETE marker" in bad.stderr
