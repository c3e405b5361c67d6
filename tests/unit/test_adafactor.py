"""Our Adafactor against torch.optim.Adafactor on plain tensors, and its own options."""

from __future__ import annotations

import pytest
import torch

from optim.adafactor import Adafactor


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(16, 8), (7, 5), (5,), (3, 4, 6), (1, 9)]  # matrices, a vector, a batched matrix, a single row
    return [torch.randn(s, generator=g).requires_grad_() for s in shapes]


def _run(opt_cls, steps=10, **kw):
    params = _params()
    opt = opt_cls(params, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return params, opt


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"lr": 1e-3},
        {"weight_decay": 0.1},
        {"maximize": True},
        {"d": 2.0},
        {"beta2_decay": -0.5},
        {"eps": (1e-20, 1e-2)},
    ],
)
def test_matches_torch_adafactor(kw):
    ours, _ = _run(Adafactor, **kw)
    ref, _ = _run(torch.optim.Adafactor, **kw)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_factored_state_is_rows_plus_columns():
    params, opt = _run(Adafactor, steps=1)
    st = opt.state[params[0]]
    assert st["row_var"].shape == (16, 1) and st["col_var"].shape == (1, 8) and "exp_avg" not in st
    assert opt.state[params[2]]["variance"].shape == (5,)


def test_options_change_the_update():
    base, _ = _run(Adafactor, steps=3)
    for kw in ({"relative_step": False, "lr": 1e-3}, {"scale_parameter": False}, {"beta1": 0.9}):
        other, opt = _run(Adafactor, steps=3, **kw)
        assert not torch.allclose(other[0], base[0]), kw
    assert opt.state[other[0]]["exp_avg"].shape == other[0].shape


def test_beta1_zero_equals_no_first_moment():
    a, _ = _run(Adafactor, steps=4, beta1=0.0)
    b, _ = _run(Adafactor, steps=4)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [{"lr": -1.0}, {"beta2_decay": 0.5}, {"d": 0.5}, {"beta1": 1.0}, {"eps": (None, -1.0)}])
def test_bad_hyperparameters_are_refused(bad):
    with pytest.raises(ValueError, match="Adafactor"):
        Adafactor(_params(), **bad)


def _run_groups(opt_cls, steps=5):
    """Two parameter groups with their own settings (weight decay and learning rate differ, as shardwise's
    decayed and not-decayed groups do), each parameter updated by its own group's."""
    params = _params()
    groups = [
        {"params": params[:2], "weight_decay": 0.1, "lr": 1e-2},
        {"params": params[2:], "weight_decay": 0.0, "lr": 5e-3},
    ]
    opt = opt_cls(groups)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return params


def test_each_parameter_follows_its_own_group():
    for a, b in zip(_run_groups(Adafactor), _run_groups(torch.optim.Adafactor)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # the check can fail: every group given the last group's settings (a loop reading a stale group variable,
    # the bug this test was written after) moves the first group's parameters
    wrong = _params()
    opt = torch.optim.Adafactor(
        [{"params": wrong[:2], "weight_decay": 0.0, "lr": 5e-3}, {"params": wrong[2:], "weight_decay": 0.0, "lr": 5e-3}]
    )
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        for p in wrong:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    assert not torch.allclose(wrong[0], _run_groups(Adafactor)[0], rtol=1e-6, atol=1e-7)
