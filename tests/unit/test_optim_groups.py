"""Parameter groups: what gets weight decay, per-group learning rates, and the schedule on top."""

from __future__ import annotations

import pytest

from models.llama import ModelArgs, build_model
from optim import build_optimizer, build_scheduler
from trainer.config import load_config
from trainer.validate import validate

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=64)
MODEL = [
    "model.dim=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.vocab_size=256",
    "data.source=synthetic",
]


def _groups(*overrides, tmp_path=None):
    cfg = load_config(["recipe=llama_debug", *MODEL, "optim.lr=1e-3", "optim.weight_decay=0.1", *overrides])
    model = build_model(ARGS, device="cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    opt = build_optimizer([model], cfg, device_type="cpu")
    return cfg, opt, [({names[id(p)] for p in g["params"]}, g["weight_decay"], g["lr"]) for g in opt.param_groups]


def _find(groups, name):
    return next((wd, lr) for names, wd, lr in groups if name in names)


def test_decay_only_on_linear_matrices_by_default():
    _, _, groups = _groups()
    assert _find(groups, "layers.0.attention.wq.weight") == (0.1, 1e-3)
    assert _find(groups, "output.weight") == (0.1, 1e-3)
    assert _find(groups, "layers.0.attention_norm.weight")[0] == 0.0
    assert _find(groups, "norm.weight")[0] == 0.0
    assert _find(groups, "tok_embeddings.weight")[0] == 0.0


def test_embeddings_can_be_decayed():
    _, _, groups = _groups("optim.decay_embeddings=true")
    assert _find(groups, "tok_embeddings.weight")[0] == 0.1


def test_lr_multipliers_and_the_schedule_scale_together(tmp_path):
    rules = tmp_path / "r.yaml"
    rules.write_text(
        "base: llama_debug\noptim:\n  lr_multipliers:\n"
        "    - {pattern: 'tok_embeddings.*', scale: 0.1}\n"
        "    - {pattern: 'layers.*.feed_forward.*', scale: 2.0}\n"
    )
    cfg = load_config([f"recipe={rules}", *MODEL, "optim.lr=1e-3", "optim.warmup_steps=2", "training.steps=10"])
    model = build_model(ARGS, device="cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    opt = build_optimizer([model], cfg, device_type="cpu")
    lr_of = {names[id(p)]: g for g in opt.param_groups for p in g["params"]}
    sched = build_scheduler(opt, cfg)
    for _ in range(4):
        opt.step()  # no gradients: a no-op, but the order torch expects
        sched.step()
    base = lr_of["layers.0.attention.wq.weight"]["lr"]
    assert lr_of["tok_embeddings.weight"]["lr"] == pytest.approx(0.1 * base)
    assert lr_of["layers.1.feed_forward.w2.weight"]["lr"] == pytest.approx(2.0 * base)
    assert lr_of["layers.1.feed_forward.w2.weight"]["weight_decay"] == 0.1  # decay is kept per group


def test_a_pattern_that_matches_nothing_is_refused(tmp_path):
    rules = tmp_path / "r.yaml"
    rules.write_text("base: llama_debug\noptim:\n  lr_multipliers:\n    - {pattern: 'embedding.*', scale: 0.1}\n")
    problems = validate(load_config([f"recipe={rules}"]), 1)
    assert any("pattern 'embedding.*' matches no parameter" in p for p in problems)
