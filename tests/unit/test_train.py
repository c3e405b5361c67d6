"""The Trainer end to end on one process: accumulation, loss normalization, a falling loss, every sink."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import yaml
from helpers import read_jsonl, read_wandb_records, run_train, wandb_config, wandb_history

from trainer.config import load_config
from trainer.trainer import Trainer
from trainer.validate import check

TINY = [
    "model.dim=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.vocab_size=256",
    "data.source=synthetic",
    "training.seq_len=32",
    "training.precision=fp32",
    "logging.progress=false",
    "logging.console=false",
    "logging.jsonl=false",
    "logging.tensorboard=false",
    "logging.wandb.mode=disabled",
    "training.val_every=0",
]


def _trainer(tmp_path, *overrides) -> Trainer:
    cfg = load_config(["recipe=llama_debug", f"run_dir={tmp_path}", *TINY, *overrides])
    return Trainer(cfg, check(cfg, 1))


def _grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in trainer.par.parts[0].named_parameters()}


def test_accumulation_1x8_equals_4x2(tmp_path):
    """The same 8 sequences as one micro-batch or as four of two give the same gradients (fp32)."""
    one = _trainer(tmp_path / "a", "training.global_batch_size=8", "training.micro_batch_size=8")
    four = _trainer(tmp_path / "b", "training.global_batch_size=8", "training.micro_batch_size=2")
    batch1, idx1 = one.train_loader.next_batch()
    batch4, idx4 = four.train_loader.next_batch()
    assert batch1.shape[:2] == (1, 8) and batch4.shape[:2] == (4, 2)
    assert torch.equal(idx1.flatten(), idx4.flatten())
    loss1, loss4 = one.forward_backward(batch1), four.forward_backward(batch4)
    torch.testing.assert_close(loss1, loss4, rtol=1e-6, atol=0)
    g1, g4 = _grads(one), _grads(four)
    for name in g1:
        torch.testing.assert_close(g4[name], g1[name], rtol=1e-5, atol=1e-8, msg=lambda m: f"{name}: {m}")  # noqa: B023 (called at once)
    # and the clipped global norms agree
    torch.testing.assert_close(one.optimizer_step(), four.optimizer_step(), rtol=1e-6, atol=0)


def test_loss_is_the_global_token_mean(tmp_path):
    """The accumulated loss equals a plain mean cross-entropy over every token of the global batch."""
    tr = _trainer(tmp_path, "training.global_batch_size=4", "training.micro_batch_size=2")
    batch, _ = tr.train_loader.next_batch()
    flat = batch.flatten(0, 1)
    with torch.no_grad():
        logits = tr.model(flat[:, :-1])
        ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), flat[:, 1:].flatten())
    torch.testing.assert_close(tr.forward_backward(batch), ref, rtol=1e-6, atol=0)


def test_training_is_reproducible(tmp_path):
    args = ("training.steps=3", "optim.warmup_steps=1", "logging.every=1")
    a = _trainer(tmp_path / "a", *args).train()
    b = _trainer(tmp_path / "b", *args).train()
    assert [r["train/loss"] for r in a] == [r["train/loss"] for r in b]


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapters_train_and_leave_the_base_as_it_was(method, tmp_path, cache_dir):
    """finetune.method=lora or dora on one process: the loss falls, every base parameter ends bitwise as it started, the
    optimizer holds state for the adapters only, and the planner's states are the adapters' (no base gradient or
    moments). The same run without adapters changes the base (the check can fail)."""
    from models.adapters import adapter_parameters
    from trainer.validate import derive

    # text with something to learn (the default dataset), so that the adapters' effect shows in the loss
    data = ("data.source=default", "model.vocab_size=4096", f"data.cache_dir={cache_dir}")
    args = ("training.steps=8", "optim.warmup_steps=1", "logging.every=1", "optim.lr=2e-2", *data)
    trainer = _trainer(tmp_path / method, *args, f"finetune.method={method}")
    model = trainer.par.parts[0]
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = adapter_parameters(model)
    rows = trainer.train()
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.03, losses  # (the last three steps' mean: one step is noisy)
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), f"{n}: the frozen base moved"
    held = {id(p) for p in trainer.optimizer.state}
    per_linear = 3 if method == "dora" else 2  # A, B (and DoRA's magnitude)
    assert held == {id(p) for p in adapters.values()} and len(held) == 7 * len(model.layers) * per_linear
    plan = derive(trainer.cfg, 1, device="cpu").memory.ranks[0]
    n_adapters = sum(p.numel() for p in adapters.values())
    assert plan.by_category()["grads"] == 4 * n_adapters
    trainer.close()
    full = _trainer(tmp_path / "full", *args)
    before = {n: p.detach().clone() for n, p in full.par.parts[0].named_parameters() if n in base}
    full.train()
    assert any(not torch.equal(p, before[n]) for n, p in full.par.parts[0].named_parameters() if n in before)
    full.close()


def test_deterministic_mode_holds_for_the_run_and_is_restored_after(tmp_path):
    """training.deterministic: torch's deterministic algorithms (strict) and cuBLAS's fixed workspace for the
    Trainer's life, switched back at its end (the test pools run several Trainers in one process). On the CPU, whose
    kernels are deterministic already, the losses are those of the same run without it."""
    args = ("training.steps=3", "optim.warmup_steps=1", "logging.every=1")
    assert not torch.are_deterministic_algorithms_enabled()
    trainer = _trainer(tmp_path / "on", *args, "training.deterministic=true")
    assert torch.are_deterministic_algorithms_enabled() and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    on = trainer.train()
    trainer.close()
    assert not torch.are_deterministic_algorithms_enabled()
    off = _trainer(tmp_path / "off", *args).train()
    assert [r["train/loss"] for r in on] == [r["train/loss"] for r in off]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(tmp_path, precision):
    tr = _trainer(
        tmp_path,
        f"training.precision={precision}",
        "training.steps=4",
        "logging.every=1",
        "optim.lr=1e-2",
        "optim.warmup_steps=0",
    )
    assert (tr.scaler is not None) == (precision == "fp16")
    hist = tr.train()
    assert all(math.isfinite(r["train/loss"]) for r in hist)
    assert all(p.dtype == torch.float32 for p in tr.par.parts[0].parameters())  # fp32 master weights


def test_schedule_reaches_the_optimizer(tmp_path):
    tr = _trainer(tmp_path, "training.steps=10", "optim.warmup_steps=5", "optim.lr=1e-3", "logging.every=1")
    lrs = [r["train/lr"] for r in tr.train()]
    # the lr logged at step s is the one its update used: warmup 1/5, 2/5 ... of 1e-3, peak at step 5, decay
    assert (
        lrs[0] == pytest.approx(2e-4)
        and lrs[4] == pytest.approx(1e-3)
        and lrs[5] == pytest.approx(1e-3)
        and lrs[-1] < lrs[6] < lrs[5]
    )


def test_quickstart_run_writes_every_artifact_and_learns(tmp_path, cache_dir):
    """The real entry point on the default dataset: config, JSONL, TensorBoard, W&B offline; loss falls."""
    run_dir = tmp_path / "run"
    proc = run_train(
        [
            "recipe=llama_debug",
            f"run_dir={run_dir}",
            f"data.cache_dir={cache_dir}",
            "training.steps=60",
            "optim.warmup_steps=10",
            "training.val_every=30",
            "logging.every=10",
            "logging.wandb.mode=offline",
        ]
    )
    # the start-up banner: what runs, as resolved, and the end-of-run summary
    assert (
        "shardwise: model llama debug: 5,0" in proc.stdout and "strategy none; precision bf16; world 1" in proc.stdout
    )
    assert (
        "shardwise: layout pp 1 x dp_replicate 1 x dp_shard 1 x tp 1; global batch 16 = micro-batch 8 x "
        "accumulation 2 x dp 1" in proc.stdout
    )
    assert "shardwise: predicted peak per rank (most loaded): " in proc.stdout
    assert "shardwise: done: 60 steps (to step 60), 122,880 tokens in " in proc.stdout
    assert "last checkpoint none" in proc.stdout
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["training"]["steps"] == 60 and saved["run_dir"] == str(run_dir)

    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert rows[0]["event"] == "start" and rows[0]["step"] == 0 and rows[0]["resumed_from"] is None
    end = rows[-1]
    assert end["event"] == "end" and end["steps_this_run"] == 60 and end["tokens_this_run"] == 60 * 16 * 128
    assert end["final_loss"] == [r for r in rows if "train/loss" in r][-1]["train/loss"] and end["wall_time_s"] > 0
    train = [r for r in rows if "train/loss" in r]
    val = [r for r in rows if "val/loss" in r]
    assert [r["step"] for r in train] == [10, 20, 30, 40, 50, 60]
    assert [r["step"] for r in val] == [0, 30, 60]
    assert val[0]["val/loss"] > 8.0  # ~ln(4096) = 8.3 at initialization
    assert val[-1]["val/loss"] < 6.5, f"validation loss did not fall enough: {[r['val/loss'] for r in val]}"
    assert val[-1]["val/loss"] < val[1]["val/loss"] < val[0]["val/loss"]
    assert val[-1]["val/perplexity"] == pytest.approx(math.exp(val[-1]["val/loss"]))
    for key in (
        "train/grad_norm",
        "train/lr",
        "train/tokens_seen",
        "perf/tokens_per_sec_per_gpu",
        "perf/tflops_per_gpu",
        "perf/step_time_s",
        "mem/peak_rss_gib",
        "mem/peak_pct",
    ):
        assert key in train[-1], key
    assert train[-1]["train/tokens_seen"] == 60 * 16 * 128

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / "tensorboard"))
    ea.Reload()
    tb_loss = ea.Scalars("train/loss")
    assert [e.step for e in tb_loss] == [10, 20, 30, 40, 50, 60]
    assert tb_loss[-1].value == pytest.approx(train[-1]["train/loss"], rel=1e-6)

    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    records = read_wandb_records(files[0])
    history = wandb_history(records)
    logged = [h for h in history if "train/loss" in h]
    assert [h["train/step"] for h in logged] == [10, 20, 30, 40, 50, 60]
    assert [h["train/loss"] for h in logged] == pytest.approx([r["train/loss"] for r in train], rel=1e-6)
    assert [h["val/loss"] for h in history if "val/loss" in h] == pytest.approx([r["val/loss"] for r in val])
    config = wandb_config(records)
    assert config["training"]["steps"] == 60 and config["model"]["flavor"] == "debug"
    metric_defs = [r.metric for r in records if r.WhichOneof("record_type") == "metric"]
    assert any(m.glob_name == "*" and m.step_metric == "train/step" for m in metric_defs)


def test_secrets_never_reach_wandb(tmp_path):
    from trainer.metrics import strip_secrets

    cfg = {"logging": {"wandb": {"api_key": "s3cret", "project": "p"}}, "hf_token": "x", "lr": 1}
    assert strip_secrets(cfg) == {"logging": {"wandb": {"project": "p"}}, "lr": 1}
    assert "s3cret" not in json.dumps(strip_secrets(cfg))


def test_train_lr_is_the_schedule_base_lr_and_each_multiplier_rule_is_logged(tmp_path):
    """Group 0 is the scaled embedding group here: train/lr must still be optim.lr x schedule."""
    from optim.schedule import lr_multiplier

    rules = tmp_path / "r.yaml"
    rules.write_text("base: llama_debug\noptim:\n  lr_multipliers:\n    - {pattern: 'tok_embeddings.*', scale: 0.1}\n")
    cfg = load_config(
        [
            f"recipe={rules}",
            f"run_dir={tmp_path / 'run'}",
            *TINY,
            "training.steps=4",
            "optim.warmup_steps=2",
            "optim.lr=1e-3",
            "logging.every=1",
            "training.global_batch_size=4",
            "training.micro_batch_size=4",
        ]
    )
    trainer = Trainer(cfg, check(cfg, 1))
    assert trainer.optimizer.param_groups[0]["lr"] != cfg.optim.lr  # the trap: group 0 is not the base
    history = [r for r in trainer.train() if "train/lr" in r]
    trainer.close()
    fn = lr_multiplier("cosine", steps=4, warmup=2, min_ratio=0.1, decay_fraction=0.2)
    for r in history:
        assert r["train/lr"] == pytest.approx(1e-3 * fn(r["step"] - 1), rel=1e-12)
        assert r["train/lr/tok_embeddings._"] == pytest.approx(0.1 * r["train/lr"], rel=1e-12)


def test_start_banner_names_the_layout_and_warns_when_a_strategy_degenerates():
    from helpers import run_cli

    def dry(recipe, world):  # in-process (train.py's main): a dry run starts no process group
        proc = run_cli("train.py", [f"recipe={recipe}", "dry_run=true"], env={"WORLD_SIZE": world})
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert "warning               parallel.data=hsdp with dp_shard 1 shards nothing: 2 full replicas" in dry(
        "llama_debug_hsdp", 2
    )
    assert "warning" not in dry("llama_debug_hsdp", 4)
    assert "warning               parallel.data=fsdp with dp_shard 1 shards nothing" in dry("llama_debug_3d", 4)
    assert "layout                dp_replicate 1 x dp_shard 2 x tp 2 x pp 2" in dry("llama_debug_3d", 8)


def test_fsdp_and_zero_run_as_one_plain_process(tmp_path):
    """`python launch/train.py` (no torchrun) with FSDP or DeepSpeed, as the one-GPU recipes run: a one-rank
    process group is started for them, and the losses are those of the same run without a strategy (fp32)."""
    args = [
        "recipe=llama_debug",
        *[a for a in TINY if a != "logging.jsonl=false"],
        "training.global_batch_size=4",
        "training.micro_batch_size=2",
        "training.steps=3",
        "optim.warmup_steps=1",
        "logging.every=1",
        "training.device=cpu",
    ]
    got = {}
    for data in ("none", "fsdp", "zero2"):
        run_train([*args, f"parallel.data={data}", f"run_dir={tmp_path / data}"])
        got[data] = [r["train/loss"] for r in read_jsonl(tmp_path / data / "metrics.jsonl") if "train/loss" in r]
    assert len(got["none"]) == 3
    for data in ("fsdp", "zero2"):
        assert got[data] == pytest.approx(got["none"], rel=1e-5), (data, got)
