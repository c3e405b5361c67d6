"""Activation checkpointing measurably trades memory for recompute: none > selective > full in the bytes
kept alive for backward, and the other way round in backward work."""

from __future__ import annotations

import gc

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from models.llama import ModelArgs, build_model
from parallel.activation import apply_ac

ARGS = ModelArgs(dim=256, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=64, max_seq_len=256)
B, T = 2, 256


class _Outputs(TorchDispatchMode):
    """Remember (weakly) the storage of every tensor an op produces, and count the ops."""

    def __init__(self):
        super().__init__()
        self.storages: list[StorageWeakRef] = []
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.storages.append(
                    (StorageWeakRef(t.untyped_storage()), t.untyped_storage().nbytes(), t.untyped_storage().data_ptr())
                )
        return out


def _measure(mode: str) -> dict[str, float]:
    model = build_model(ARGS, device="meta")
    apply_ac(model, mode.removesuffix("_every_second"), sac_matmuls="every_second" if "every" in mode else "all")
    model.to_empty(device="cpu")
    model.init_weights(seed=0)
    block = model.layers["0"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, ARGS.dim, generator=g).requires_grad_()
    track = _Outputs()
    # forward and backward run under the same stack of modes: selective AC replays the forward's op
    # sequence in backward and must see it dispatched the same way
    with FlopCounterMode(display=False), track:
        y = block(x, model.rope_cos, model.rope_sin)
    gc.collect()
    # views of weights, buffers, the input and the output are not activations kept for backward
    not_activations = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), x, y]}
    alive = {ptr: n for ref, n, ptr in track.storages if not ref.expired() and ptr not in not_activations}
    grad = torch.randn(y.shape, generator=g)
    with FlopCounterMode(display=False) as flops:
        count = _Outputs()
        with count:
            y.backward(grad)
    return {
        "saved_bytes": sum(alive.values()),
        "backward_flops": flops.get_total_flops(),
        "backward_ops": count.ops,
        "grad": x.grad,
    }


@pytest.fixture(scope="module")
def measured():
    return {mode: _measure(mode) for mode in ("none", "selective", "selective_every_second", "full")}


def test_memory_none_gt_selective_gt_full(measured):
    none, sel, full = (measured[m]["saved_bytes"] for m in ("none", "selective", "full"))
    assert none > sel > full, f"bytes kept for backward: none {none}, selective {sel}, full {full}"
    # full AC keeps nothing inside the block (its input is the caller's tensor, not an op output here)
    assert full == 0
    # selective keeps the 7 projections' outputs and attention, not the norms, SiLU, RoPE and casts
    assert sel < 0.75 * none


def test_recompute_cost_goes_the_other_way(measured):
    none, sel, full = (measured[m] for m in ("none", "selective", "full"))
    # matmul FLOPs: full AC reruns the forward's matmuls in backward; selective keeps their outputs
    fwd_flops = 2 * B * T * ARGS.num_params(exclude_embedding=True) // ARGS.n_layers  # about, per block
    assert full["backward_flops"] > none["backward_flops"] + 0.5 * fwd_flops
    assert sel["backward_flops"] < full["backward_flops"]
    # every recomputed op counts: selective reruns the cheap ones, full reruns everything
    assert none["backward_ops"] < sel["backward_ops"] < full["backward_ops"]


def test_checkpointing_does_not_change_gradients(measured):
    ref = measured["none"]["grad"]
    for mode in ("selective", "selective_every_second", "full"):
        torch.testing.assert_close(measured[mode]["grad"], ref, rtol=1e-5, atol=1e-6)


def test_every_second_matmul_recomputes_wk_wo_and_w3(measured):
    """parallel.sac_matmuls=every_second (torchtitan's op-level SAC): of the block's seven matmuls the 2nd, 4th and
    6th (wk, wo, w3) are not kept; their outputs are the bytes saved, their FLOPs the extra backward work."""
    sel, sel2 = measured["selective"], measured["selective_every_second"]
    D, K, F = ARGS.dim, ARGS.kv_heads * ARGS.head_dim, ARGS.ffn_hidden
    assert sel["saved_bytes"] - sel2["saved_bytes"] == B * T * (K + D + F) * 4
    assert sel2["backward_flops"] - sel["backward_flops"] == 2 * B * T * (D * K + D * D + D * F)


@pytest.mark.parametrize("sac_matmuls", ["all", "every_second"])
def test_selective_policy_keeps_float8_matmuls(sac_matmuls, monkeypatch):
    """A block of torchao float8 linears (not emulated: torch's _scaled_mm runs on the CPU) under selective AC: the
    policy sees each of the seven matmuls, in the forward and again in the recomputation, and keeps them all
    (`all`) or every other one (`every_second`), the same ones both times."""
    import parallel.activation as act
    from models.llama import ModelArgs, build_model
    from parallel.float8 import convert

    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=64, max_seq_len=32)
    model = build_model(args, "cpu")
    model.init_weights(0)
    assert convert(model, "tensorwise", emulate=False) == 7
    seen = []
    policy = act._selective_policy

    def spy(save, width, counts, ctx, op, *a, **k):
        decision = policy(save, width, counts, ctx, op, *a, **k)
        if op in act._MATMULS:
            seen.append((ctx.is_recompute, decision.name))
        return decision

    monkeypatch.setattr(act, "_selective_policy", spy)
    act.apply_ac(model, "selective", sac_matmuls=sac_matmuls)
    x = torch.randint(0, args.vocab_size, (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x).float().sum().backward()
    forward = [d for r, d in seen if not r]
    want = ["MUST_SAVE"] * 7 if sac_matmuls == "all" else ["MUST_SAVE", "PREFER_RECOMPUTE"] * 3 + ["MUST_SAVE"]
    assert forward == want, seen
    assert [d for r, d in seen if r] in ([], want)  # (recomputed, when anything is, with the same decisions)


def test_selective_policy_saves_scaled_mm_and_counts_it_as_a_matmul():
    """Where float8's `_scaled_mm` reaches the policy itself (a compiled or hand-written float8 path; torchtitan
    saves it), it is a matmul like `mm`: saved, and counted by every_second (it was recomputed before)."""
    from types import SimpleNamespace

    from torch.utils.checkpoint import CheckpointPolicy

    from parallel.activation import _ops_to_save, _selective_policy

    scaled = torch.ops.aten._scaled_mm.default
    ctx = SimpleNamespace(is_recompute=False)
    b = torch.empty(64, 192)
    assert _selective_policy(_ops_to_save(), None, None, ctx, scaled, None, b) == CheckpointPolicy.MUST_SAVE
    counts = {"forward": 0, "recompute": 0}
    decisions = [_selective_policy(_ops_to_save(), None, counts, ctx, scaled, None, b).name for _ in range(4)]
    assert decisions == ["MUST_SAVE", "PREFER_RECOMPUTE"] * 2


def test_the_docs_table_is_this_measurement(measured):
    """docs/strategies.md's AC table is this module's measurement (bytes kept, backward FLOPs, ops), row by row."""
    from helpers import REPO

    names = {
        "none": "none",
        "selective": "selective",
        "selective_every_second": "selective, `sac_matmuls=every_second`",
    }
    rows = []
    for mode, label in [*names.items(), ("full", "full")]:
        m = measured[mode]
        kept = f"{m['saved_bytes']:,}" if m["saved_bytes"] else "0 (only the block input)"
        rows.append(f"| {label} | {kept} | {m['backward_flops'] / 1e9:.2f} G | {m['backward_ops']} |")
    page = (REPO / "docs" / "strategies.md").read_text()
    header = (
        "| ac | bytes kept for backward | backward matmul FLOPs | ops run in backward |\n| --- | ---: | ---: | ---: |\n"
    )
    assert header + "\n".join(rows) + "\n" in page, "\n".join(rows)
