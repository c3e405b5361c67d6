"""Memory-saving AdamW variants: bf16 moments with stochastic rounding (ours) and torchao's 8-bit AdamW."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from optim.adamw_bf16 import AdamWBF16, round_to_bf16_stochastic

needs_torchao = pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None,
    reason="torchao, the optional `lowbit` extra (part of `dev`), is not installed",
)


def test_stochastic_rounding_is_unbiased_and_brackets_the_value():
    x = torch.full((200_000,), 1.0 + 2.0**-10)  # 1/8 of a bf16 ulp (2^-7) above 1.0
    r = round_to_bf16_stochastic(x, torch.Generator().manual_seed(0)).float()
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2.0**-7}  # only the two neighbours
    assert abs(r.mean().item() - x[0].item()) < 2e-5  # E[r] == x (std of the mean ~ 1.7e-5 / 2.6)
    assert x.to(torch.bfloat16).float().unique().tolist() == [1.0]  # round-to-nearest always loses it
    # negative values, exact bf16 values and non-finite values
    y = torch.tensor([-(1.0 + 2.0**-10), 0.5, float("inf"), float("-inf")])
    ry = round_to_bf16_stochastic(y, torch.Generator().manual_seed(1)).float()
    assert ry[0].item() in (-1.0, -(1.0 + 2.0**-7)) and ry[1:3].tolist() == [0.5, float("inf")]
    assert ry[3].item() == float("-inf")
    assert torch.isnan(round_to_bf16_stochastic(torch.tensor([float("nan")]))).all()


def test_second_moment_tracks_fp32_where_round_to_nearest_stalls():
    """beta2 = 0.999 moves v by 0.1 % per step, under half a bf16 ulp: rounding to nearest freezes v."""
    torch.manual_seed(0)
    g = torch.rand(4096) + 0.5
    b2 = 0.999
    v32 = torch.zeros(4096)
    v_near = torch.zeros(4096, dtype=torch.bfloat16)
    v_sr = torch.zeros(4096, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3000):
        v32.mul_(b2).addcmul_(g, g, value=1 - b2)
        v_near = (v_near.float() * b2 + (1 - b2) * g * g).to(torch.bfloat16)
        v_sr = round_to_bf16_stochastic(v_sr.float() * b2 + (1 - b2) * g * g, gen)
    # seen: stochastic rounding's ratio to fp32 averages 0.99964 (each element within ~1.2 % on average);
    # rounding to nearest freezes v at 0.28 of its fp32 value
    ratio_sr, ratio_near = (v_sr.float() / v32), (v_near.float() / v32)
    assert abs(ratio_sr.mean().item() - 1) < 2e-3 and (ratio_sr - 1).abs().mean().item() < 0.03, ratio_sr
    assert ratio_near.mean().item() < 0.5  # the failure mode stochastic rounding exists to avoid


def _fit(opt_cls, steps=100, **kw):
    torch.manual_seed(0)
    w_true = torch.randn(32, 64)
    x = torch.randn(256, 64)
    y = x @ w_true.T
    model = torch.nn.Linear(64, 32)
    opt = opt_cls(model.parameters(), lr=5e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **kw)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt, losses


def test_adamw_bf16_follows_torch_adamw():
    ref, _, ref_losses = _fit(torch.optim.AdamW)
    got, opt, losses = _fit(AdamWBF16)
    assert losses[0] == ref_losses[0]
    # the first update is AdamW's exactly (m and v are computed in fp32; only their storage is rounded)
    _, _, one = _fit(AdamWBF16, steps=2)
    _, _, ref_one = _fit(torch.optim.AdamW, steps=2)
    assert one[1] == pytest.approx(ref_one[1], rel=1e-6)
    for a, b in zip(ref_losses, losses):
        assert abs(a - b) <= 0.02 * a + 1e-4, (a, b)
    assert losses[-1] < 1e-3 * losses[0]  # seen: 67.9 -> 0.0556 (AdamW: 0.0561), worst step 0.9 % apart
    torch.testing.assert_close(got.weight, ref.weight, rtol=0, atol=2e-2)  # seen: 7.1e-3
    state = opt.state[got.weight]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16


def test_adamw_bf16_is_deterministic_for_bitwise_resume():
    a, _, la = _fit(AdamWBF16, steps=10)
    b, _, lb = _fit(AdamWBF16, steps=10)
    assert la == lb and torch.equal(a.weight, b.weight)


def test_adamw_bf16_state_stays_bf16_through_load_state_dict():
    # torch's Optimizer.load_state_dict casts floating state to the parameter's dtype; ours casts back
    model, opt, _ = _fit(AdamWBF16, steps=3)
    fresh = AdamWBF16(model.parameters(), lr=5e-2)
    fresh.load_state_dict(opt.state_dict())
    for key in ("exp_avg", "exp_avg_sq"):
        got, want = fresh.state[model.weight][key], opt.state[model.weight][key]
        assert got.dtype == torch.bfloat16 and torch.equal(got, want)


@pytest.mark.parametrize(
    "name, lo, hi", [("adamw", 8.0, 8.0), ("adamw_bf16", 4.0, 4.0), ("adamw8bit", 2.0, 2.1), ("adafactor", 0.0, 0.05)]
)
def test_measured_state_bytes_per_parameter(name, lo, hi):
    if name == "adamw8bit" and importlib.util.find_spec("torchao") is None:
        pytest.skip("torchao, the optional `lowbit` extra (part of `dev`), is not installed")
    import sys

    from helpers import REPO

    sys.path.insert(0, str(REPO / "launch"))
    from optimizer_memory import measure

    r = measure(name, steps=1, warmup=1)
    assert r["params"] == 5_048_576
    assert lo <= r["bytes_per_param"] <= hi, r


@needs_torchao
def test_adamw8bit_states_are_int8_codes_and_learn():
    from torchao.optim import AdamW8bit

    torch.manual_seed(0)
    model = torch.nn.Linear(256, 64)  # 16,384 weights: quantized; the 64 biases stay fp32 (< 4096 values)
    opt = AdamW8bit(model.parameters(), lr=1e-2)
    x, y = torch.randn(128, 256), torch.randn(128, 64)
    first = None
    for _ in range(20):
        loss = torch.nn.functional.mse_loss(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * first
    st = opt.state[model.weight]["exp_avg"]
    names, _ = st.__tensor_flatten__()
    assert any(getattr(st, n).dtype in (torch.int8, torch.uint8) for n in names)
    assert opt.state[model.bias]["exp_avg"].dtype == torch.float32


def test_optimizer_memory_cli_writes_its_rows(tmp_path):
    """`python launch/optimizer_memory.py --json FILE` (docs/optimizers.md's table is rendered from such a file):
    the printed table and the file's rows, with the machine and date."""
    import json

    from helpers import run_cli

    out = tmp_path / "rows.json"
    proc = run_cli("optimizer_memory.py", ["--optimizers", "adamw", "adafactor", "--steps", "1", "--json", str(out)])
    assert proc.returncode == 0, proc.stderr
    run = json.loads(out.read_text())
    assert [r["optimizer"] for r in run["rows"]] == ["adamw", "adafactor"] and run["date"] and run["cpu"]
    assert run["rows"][0]["state_bytes"] == 8 * 5_048_576 and "| adamw | 40,388,608 B | 8.0000 |" in proc.stdout
