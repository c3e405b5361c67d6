"""Every strategy, combination and AC mode trains to the single-process numbers.

For each row, tests/distributed/parity_worker.py runs 3 steps under torchrun with gloo and saves the
per-step global losses, gradient norms and the full gradients after step 1; the same worker on one
process with the same seed and global batch is the reference. fp32 rows must agree to a relative 1e-5
(losses and norms per step; each parameter's gradient by ||g - g_ref|| / ||g_ref||); bf16 and fp16 rows
are compared with the fp32 reference under looser bounds (BF16 below).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from adapter_cases import ADAPTER_CASES, ADAPTER_STEPS, NF4
from conftest import MOE, PACK_DATA, PARITY_STEPS, TINY
from pairwise import AXES, matrix, values_of
from parity_worker import UNMASKED, UNPACK

# (id, processes, overrides, global batch, precision, tolerance)
# (loss and grad-norm tolerance, per-parameter gradient tolerance), relative
FP32 = (1e-5, 1e-5)
# 16-bit compute against the fp32 reference: observed losses within 2.1e-4 and gradients within 1e-2 (bf16)
BF16 = (2e-3, 5e-2)
OFFLOAD = ["parallel.activation_offload=true", "parallel.activation_offload_min_bytes=0"]
CASES = [
    ("ddp", 2, ["parallel.data=ddp"], 8, "fp32", FP32),
    ("fsdp", 2, ["parallel.data=fsdp"], 8, "fp32", FP32),
    ("fsdp_4", 4, ["parallel.data=fsdp"], 8, "fp32", FP32),
    ("fsdp_no_reshard", 2, ["parallel.data=fsdp", "parallel.reshard_after_forward=false"], 8, "fp32", FP32),
    ("hsdp_2x2", 4, ["parallel.data=hsdp", "parallel.dp_replicate=2"], 8, "fp32", FP32),
    ("tp", 2, ["parallel.tp=2"], 8, "fp32", FP32),
    ("fsdp_tp", 4, ["parallel.data=fsdp", "parallel.tp=2"], 8, "fp32", FP32),
    ("hsdp_tp", 8, ["parallel.data=hsdp", "parallel.dp_replicate=2", "parallel.tp=2"], 16, "fp32", FP32),
    ("pp_gpipe", 2, ["parallel.pp=2", "parallel.pp_schedule=gpipe"], 8, "fp32", FP32),
    ("pp_1f1b", 2, ["parallel.pp=2", "parallel.pp_schedule=1f1b"], 8, "fp32", FP32),
    ("pp_interleaved_1f1b", 2, ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b"], 8, "fp32", FP32),
    ("pp_zbv", 2, ["parallel.pp=2", "parallel.pp_schedule=zbv"], 8, "fp32", FP32),
    ("pp_dualpipev", 2, ["parallel.pp=2", "parallel.pp_schedule=dualpipev"], 8, "fp32", FP32),
    ("pp_uneven_3_stages", 3, ["parallel.pp=3"], 8, "fp32", FP32),  # 4 blocks over 3 stages: 1, 2, 1
    ("pp_fsdp", 4, ["parallel.data=fsdp", "parallel.pp=2"], 8, "fp32", FP32),
    ("pp_tp", 4, ["parallel.tp=2", "parallel.pp=2"], 8, "fp32", FP32),
    (
        "3d_pp_fsdp_tp",
        8,
        ["parallel.data=fsdp", "parallel.pp=2", "parallel.tp=2", "parallel.pp_schedule=interleaved_1f1b"],
        16,
        "fp32",
        FP32,
    ),
    ("ac_full", 1, ["parallel.ac=full"], 8, "fp32", FP32),
    ("ac_full_every_2", 1, ["parallel.ac=full", "parallel.ac_every=2"], 8, "fp32", FP32),
    ("ac_selective", 1, ["parallel.ac=selective"], 8, "fp32", FP32),
    ("fsdp_ac_full", 2, ["parallel.data=fsdp", "parallel.ac=full"], 8, "fp32", FP32),
    ("fsdp_ac_selective", 2, ["parallel.data=fsdp", "parallel.ac=selective"], 8, "fp32", FP32),
    ("fsdp_tp_ac_selective", 4, ["parallel.data=fsdp", "parallel.tp=2", "parallel.ac=selective"], 8, "fp32", FP32),
    ("pp_ac_full", 2, ["parallel.pp=2", "parallel.ac=full"], 8, "fp32", FP32),
    ("fsdp_offload_cpu_noop", 2, ["parallel.data=fsdp", "parallel.offload=cpu"], 8, "fp32", FP32),
    ("zero1", 2, ["parallel.data=zero1"], 8, "fp32", FP32),
    ("zero2", 2, ["parallel.data=zero2"], 8, "fp32", FP32),
    ("zero3", 2, ["parallel.data=zero3"], 8, "fp32", FP32),
    ("zero3_offload_optimizer", 2, ["parallel.data=zero3", "parallel.offload=cpu"], 8, "fp32", FP32),
    ("zero3_offload_params", 2, ["parallel.data=zero3", "parallel.offload_params=true"], 8, "fp32", FP32),
    ("zero2_ac_full", 2, ["parallel.data=zero2", "parallel.ac=full"], 8, "fp32", FP32),
    ("zero3_ac_selective", 2, ["parallel.data=zero3", "parallel.ac=selective"], 8, "fp32", FP32),
    # the chunked loss (one process: tests/unit/test_loss.py) with FSDP and AC, and under TP's loss_parallel
    (
        "fsdp_ac_full_loss_chunks",
        2,
        ["parallel.data=fsdp", "parallel.ac=full", "training.loss_chunks=3"],
        8,
        "fp32",
        FP32,
    ),
    ("tp_loss_chunks", 2, ["parallel.tp=2", "training.loss_chunks=5"], 8, "fp32", FP32),
    ("compile", 1, ["parallel.compile=true"], 8, "fp32", FP32),
    (
        "fsdp_compile_ac_selective",
        2,
        ["parallel.data=fsdp", "parallel.compile=true", "parallel.ac=selective"],
        8,
        "fp32",
        FP32,
    ),
    ("tp_compile", 2, ["parallel.tp=2", "parallel.compile=true"], 8, "fp32", FP32),
    # activation offloading (one process: tests/unit/test_activation_offload.py, bitwise); every storage moves
    ("fsdp_ac_full_activation_offload", 2, ["parallel.data=fsdp", "parallel.ac=full", *OFFLOAD], 8, "fp32", FP32),
    ("tp_activation_offload", 2, ["parallel.tp=2", *OFFLOAD], 8, "fp32", FP32),
    ("pp_activation_offload", 2, ["parallel.pp=2", *OFFLOAD], 8, "fp32", FP32),
    ("zero2_activation_offload", 2, ["parallel.data=zero2", *OFFLOAD], 8, "fp32", FP32),
    # context parallelism (parallel/context.py), both ways of seeing the other ranks' keys and values
    *[
        (f"cp_{name}{'_ring' if rotate == 'ring' else ''}", n, [*ov, f"parallel.cp_rotate={rotate}"], 8, "fp32", FP32)
        for rotate in ("allgather", "ring")
        for name, n, ov in [
            ("2", 2, ["parallel.cp=2"]),
            ("4", 4, ["parallel.cp=4"]),
            ("fsdp_2x2", 4, ["parallel.data=fsdp", "parallel.cp=2"]),
            ("tp_2x2", 4, ["parallel.tp=2", "parallel.cp=2"]),
            ("pp_2x2", 4, ["parallel.pp=2", "parallel.cp=2"]),
        ]
    ],
    ("cp_2_ac_full", 2, ["parallel.cp=2", "parallel.ac=full"], 8, "fp32", FP32),
    ("cp_2_compile", 2, ["parallel.cp=2", "parallel.compile=true"], 8, "fp32", FP32),
    (
        "fsdp_cp_2_ring_compile",
        2,
        ["parallel.data=fsdp", "parallel.cp=2", "parallel.cp_rotate=ring", "parallel.compile=true"],
        8,
        "fp32",
        FP32,
    ),
    (
        "hsdp_cp_2x2",
        4,
        ["parallel.data=hsdp", "parallel.dp_replicate=2", "parallel.dp_shard=1", "parallel.cp=2"],
        8,
        "fp32",
        FP32,
    ),
    (
        "cp_2_ring_ac_selective",
        2,
        ["parallel.cp=2", "parallel.cp_rotate=ring", "parallel.ac=selective"],
        8,
        "fp32",
        FP32,
    ),
    ("fsdp_bf16", 2, ["parallel.data=fsdp"], 8, "bf16", BF16),
    ("fsdp_fp16", 2, ["parallel.data=fsdp"], 8, "fp16", BF16),
    # the pipeline's loss carries the loss scale itself (it crashed at step 1 before: the scale never initialized)
    ("pp_fp16", 2, ["parallel.pp=2"], 8, "fp16", BF16),
    ("fsdp_tp_bf16", 4, ["parallel.data=fsdp", "parallel.tp=2"], 8, "bf16", BF16),
    # bf16 parameters without fp32 masters, bf16 moments (tests/unit/test_masterless.py: 200 steps on one process)
    (
        "fsdp_bf16_masterless",
        2,
        ["parallel.data=fsdp", "training.master_weights=false", "optim.name=adamw_bf16"],
        8,
        "bf16",
        BF16,
    ),
]


STEPS = PARITY_STEPS  # (conftest.py says why three)

# the axis values each row holds: the pairwise matrix (pairwise.py) adds runs only for the pairs these leave out
SEEDS = tuple(tuple(values_of(ov, nproc=n, global_batch=gb, precision=prec).items()) for _, n, ov, gb, prec, _ in CASES)


def _strategy_runs(nproc, overrides, global_batch, precision) -> list[tuple[int, list[str]]]:
    """(the single-process reference, the layout's run) of one CASES row, as worker() requests."""
    return [
        (1, [STEPS, f"training.global_batch_size={global_batch}", "training.precision=fp32"]),
        (nproc, [STEPS, *overrides, f"training.global_batch_size={global_batch}", f"training.precision={precision}"]),
    ]


def _in_backward_runs(nproc, overrides, global_batch) -> list[tuple[int, list[str]]]:
    """(the reference with the step after the backward, the in-backward run) of one IN_BACKWARD row."""
    common = [STEPS, f"training.global_batch_size={global_batch}", "training.precision=fp32", "optim.max_grad_norm=0"]
    optim = [o for o in overrides if o.startswith("optim.")]
    return [(1, [*common, *optim]), (nproc, [*common, *overrides, "optim.in_backward=true"])]


# the pairwise matrix (pairwise.py): the runs that hold the pairs of values CASES leaves out. Two steps: step 1's
# gradients, parameter by parameter, and step 2's loss, which sees the optimizer's first update
MATRIX_STEPS = "training.steps=2"
PAIRWISE = matrix((*TINY, MATRIX_STEPS), SEEDS)
FIRST_FP32 = next(i for i, r in enumerate(PAIRWISE.runs) if r.values["precision"] == "fp32")


def _pairwise_runs(index: int) -> list[tuple[int, list[str]]]:
    """(the single-process reference, the run) of one pairwise run."""
    run = PAIRWISE.runs[index]
    return [(1, [MATRIX_STEPS, *run.reference()]), (run.nproc, [MATRIX_STEPS, *run.overrides])]


def _adapter_runs(nproc, overrides) -> list[tuple[int, list[str]]]:
    """(one process with the row's adapters, the row's layout) of one ADAPTER_CASES row."""
    common = [ADAPTER_STEPS, "training.global_batch_size=8", "training.precision=fp32"]
    method = [o for o in overrides if o.startswith("finetune.")]
    tp = next((o.split("=")[1] for o in overrides if o.startswith("parallel.tp=")), None)
    if tp is not None and set(NF4) <= set(overrides):  # (TP's NF4 shards: parity_worker.py nf4_like_tp_reference)
        method.append(f"worker.nf4_like_tp={tp}")
    return [(1, [*common, *method]), (nproc, [*common, *overrides])]


def _qlora_references() -> list[tuple[int, list[str]]]:
    """One process with LoRA on the NF4 base and on the fp32 base (the qlora rows' and the lora rows' references)."""
    return [_adapter_runs(2, ["finetune.method=lora", *NF4])[0], _adapter_runs(2, ["finetune.method=lora"])[0]]


def worker_runs(test: str, params: dict) -> list[tuple[int, list[str]]]:
    """What each selected test asks the worker for (conftest.py batches them, one launch per rank count)."""
    if test == "test_pairwise_matrix_matches_single_process":
        return _pairwise_runs(params["index"])
    if test == "test_the_pairwise_comparison_fails_when_blocks_are_broken":
        return _pairwise_runs(FIRST_FP32)
    if test == "test_strategy_matches_single_process":
        return _strategy_runs(params["nproc"], params["overrides"], params["global_batch"], params["precision"])
    if test == "test_optimizer_in_backward_trains_like_the_step_after_backward":
        return _in_backward_runs(params["nproc"], params["overrides"], params["global_batch"])
    if test == "test_adapters_match_single_process":
        return _adapter_runs(params["nproc"], params["overrides"])
    if test == "test_qlora_trains_on_its_nf4_base_not_the_full_precision_one":
        return _qlora_references()
    if test == "test_qlora_under_tp_quantizes_each_shard_on_its_own":
        return [_qlora_references()[0], _adapter_runs(*QLORA_TP[1:])[0]]
    if test == "test_the_adapter_comparison_fails_when_the_adapters_are_broken":
        return _adapter_runs(*ADAPTER_CASES[6][1:])
    if test == "test_moe_blocks_match_single_process":
        return _moe_runs(params["nproc"], params["overrides"])
    if test == "test_the_aux_loss_row_fails_without_the_aux_loss":
        return [_moe_runs(2, ["model.moe.aux_loss_coef=0.1"])[0], _moe_runs(2, [])[0]]
    if test == "test_packed_documents_train_as_each_would_alone":
        return _packed_runs(params["nproc"], params["overrides"])
    if test == "test_the_packed_comparison_fails_when_documents_see_each_other":
        return [_packed_runs(1, [])[0], (1, [STEPS, *PACK, UNMASKED])]
    return []


def differences(name: str, ref: dict, got: dict, tol: tuple[float, float]) -> list[str]:
    """Where a run leaves the single process: the loss and gradient norm of every step, the validation loss, and
    every parameter's gradient after step 1 (||g - g_ref|| / ||g_ref||), each against its relative bound."""
    loss_tol, grad_tol = tol
    out = []
    for step, (a, b) in enumerate(zip(ref["losses"], got["losses"]), 1):
        if abs(b - a) > loss_tol * abs(a):
            out.append(f"{name}: loss at step {step} is {b}, single process {a}")
    for step, (a, b) in enumerate(zip(ref["grad_norms"], got["grad_norms"]), 1):
        if abs(b - a) > grad_tol * abs(a):
            out.append(f"{name}: grad norm at step {step} is {b}, single process {a}")
    a, b = ref["val_loss"], got["val_loss"]
    if abs(b - a) > loss_tol * abs(a):
        out.append(f"{name}: validation loss after the last step is {b}, single process {a}")
    if got["grads"].keys() != ref["grads"].keys():
        return [*out, f"{name}: parameters differ: {sorted(got['grads'].keys() ^ ref['grads'].keys())[:4]}"]
    for key, g in ref["grads"].items():
        # (an adapter's A is exactly zero at step 1: B starts at zero; it must be zero in the layout too)
        err = ((got["grads"][key] - g).norm() / g.norm()).item() if g.norm() > 0 else got["grads"][key].norm().item()
        if not err <= grad_tol:
            out.append(f"{name}: gradient of {key} off by {err:.2e} (relative)")
    return out


@pytest.mark.parametrize("name, nproc, overrides, global_batch, precision, tol", CASES, ids=[c[0] for c in CASES])
def test_strategy_matches_single_process(name, nproc, overrides, global_batch, precision, tol, worker):
    ref, got = (worker(*run) for run in _strategy_runs(nproc, overrides, global_batch, precision))
    assert len(got["losses"]) == len(ref["losses"]) == 3
    problems = differences(name, ref, got, tol)
    assert not problems, "\n".join(problems)


# optim.in_backward: no gradient accumulation and no clipping (both refused), so (id, processes, overrides, global
# batch); the reference is one process with the ordinary step after the backward, over the same global batch
IN_BACKWARD = [
    ("one_process", 1, ["training.micro_batch_size=4"], 4),
    ("fsdp_ac_full_loss_chunks", 2, ["parallel.data=fsdp", "parallel.ac=full", "training.loss_chunks=3"], 4),
    ("hsdp_2x2_adafactor", 4, ["parallel.data=hsdp", "parallel.dp_replicate=2", "optim.name=adafactor"], 8),
]


@pytest.mark.parametrize("name, nproc, overrides, global_batch", IN_BACKWARD, ids=[c[0] for c in IN_BACKWARD])
def test_optimizer_in_backward_trains_like_the_step_after_backward(name, nproc, overrides, global_batch, worker):
    """Each parameter stepped by its gradient hook gives the single-process losses, gradient norms and
    validation loss (fp32, 1e-5), and no gradient is left once the backward ends."""
    ref, got = (worker(*run) for run in _in_backward_runs(nproc, overrides, global_batch))
    assert got["grads"] == {}, f"{name}: gradients left after the backward: {sorted(got['grads'])[:3]}"
    assert ref["grads"], "the reference keeps its gradients until the step"
    for what in ("losses", "grad_norms"):
        for step, (a, b) in enumerate(zip(ref[what], got[what]), 1):
            assert abs(b - a) <= 1e-5 * abs(a), f"{name}: {what} at step {step} is {b}, single process {a}"
    a, b = ref["val_loss"], got["val_loss"]
    assert abs(b - a) <= 1e-5 * abs(a), f"{name}: validation loss after step 3 is {b}, single process {a}"


@pytest.mark.parametrize("name, nproc, overrides", ADAPTER_CASES, ids=[c[0] for c in ADAPTER_CASES])
def test_adapters_match_single_process(name, nproc, overrides, worker):
    """Adapters under a strategy train as on one process: losses, gradient norms and validation loss over five steps
    and every adapter parameter's gradient after step 1 (fp32, 1e-5); only adapters have gradients, and the frozen
    base leaves the run bitwise as it came (where DeepSpeed keeps no fp32 copy of it: the parameters themselves)."""
    ref, got = (worker(*run) for run in _adapter_runs(nproc, overrides))
    assert len(got["losses"]) == len(ref["losses"]) == 5
    problems = differences(name, ref, got, FP32)
    assert not problems, "\n".join(problems)
    trained = {k for k in ref["grads"]}
    assert trained and all(k.endswith(("lora_a.weight", "lora_b.weight", "magnitude")) for k in trained), trained
    assert sum(ref["grads"][k].norm() > 0 for k in trained if k.endswith("lora_b.weight")) == 4 * 7  # every B
    moved = [k for k in ref["params"] if k not in trained and not torch.equal(got["params"][k], ref["params"][k])]
    assert not moved, f"{name}: frozen base parameters differ from one process after 5 steps: {moved[:3]}"


def test_qlora_trains_on_its_nf4_base_not_the_full_precision_one(worker):
    """The NF4 rows compare like with like, and NF4 is really in the product: one process with LoRA on the NF4 base
    and on the fp32 base of the same draw differ at step 1 and in every B's gradient, beyond the rows' bound."""
    nf4, plain = (worker(*run) for run in _qlora_references())
    assert nf4["losses"][0] != plain["losses"][0]
    off = [d for d in differences("nf4 vs fp32 base", plain, nf4, FP32) if "lora_b.weight off by" in d]
    assert len(off) == 4 * 7, off  # every B's gradient beyond 1e-5


QLORA_TP = next(c for c in ADAPTER_CASES if c[0] == "qlora_tp")


def test_qlora_under_tp_quantizes_each_shard_on_its_own(worker):
    """The TP rows' reference is not the other NF4 rows' one: each TP rank quantizes its own rows or columns (its own
    64-element blocks and scale mean), so one process on whole-tensor NF4 weights differs from it in every B gradient
    beyond the rows' bound. A TP run that quantized whole weights and then split them would fail its parity row."""
    whole, per_shard = worker(*_qlora_references()[0]), worker(*_adapter_runs(*QLORA_TP[1:])[0])
    off = [d for d in differences("whole vs per shard", whole, per_shard, FP32) if "lora_b.weight off by" in d]
    assert len(off) == 4 * 7, off


def test_the_adapter_comparison_fails_when_the_adapters_are_broken(worker):
    """The comparison above fails where adapters are broken: one layer's B gradient zeroed (a frozen adapter), its
    magnitude's gradient scaled (a wrong reduction), and A trained at step 1 (B's zero start lost)."""
    ref, got = (worker(*run) for run in _adapter_runs(*ADAPTER_CASES[6][1:]))  # dora_fsdp_tp
    assert not differences("as run", ref, got, FP32)
    b, m, a = (f"layers.2.feed_forward.w2.{n}" for n in ("lora_b.weight", "magnitude", "lora_a.weight"))
    for broken in (
        {**got["grads"], b: 0 * got["grads"][b]},
        {**got["grads"], m: 1.001 * got["grads"][m]},
        {**got["grads"], a: got["grads"][a] + 1e-3 * got["grads"][b].norm()},
    ):
        assert len(differences("broken", ref, {**got, "grads": broken}, FP32)) == 1


# data.pack (docs/data.md): the built-in chat set's conversations packed into sequences of 513 tokens (at 129 most
# sequences would hold one: half the conversations are longer than 256 tokens); the reference is one process
# training each conversation alone in a sequence of its own with plain causal attention (parity_worker.py
# `unpacked`), the same conversations each step
PACK = [*PACK_DATA, "training.seq_len=512", "training.global_batch_size=8", "training.precision=fp32"]
PACKED = [
    ("one_process", 1, []),
    ("fsdp", 2, ["parallel.data=fsdp"]),
    ("tp", 2, ["parallel.tp=2"]),
    ("pp_1f1b", 2, ["parallel.pp=2", "parallel.pp_schedule=1f1b"]),
]
PACK_TOL = (1e-6, 1e-6)  # (fp32: losses and each parameter's gradient, relative)
# the gradient norms the runs log: torch's fp32 norm on the CPU (torch.nn.utils.get_total_norm) sums the squares of
# this 4096-row embedding's gradient with a relative error of up to 6e-5 (measured against the float64 norm of the
# same gradients), and the sharded runs sum them in other pieces
PACK_NORM_TOL = 2e-4


def _packed_runs(nproc: int, overrides: list[str]) -> list[tuple[int, list[str]]]:
    """(one process, each document alone; the row's layout on the packed sequences)."""
    return [(1, [STEPS, *PACK, UNPACK]), (nproc, [STEPS, *PACK, *overrides])]


@pytest.mark.parametrize("name, nproc, overrides", PACKED, ids=[c[0] for c in PACKED])
def test_packed_documents_train_as_each_would_alone(name, nproc, overrides, worker):
    """Packed conversations (each attending only to itself, its positions restarting, no target across two of them)
    train as the conversations alone: the losses, gradient norms and every parameter's gradient after step 1 within
    1e-6, under one process, FSDP, TP and a pipeline (its stages pass the documents on)."""
    ref, got = (worker(*run) for run in _packed_runs(nproc, overrides))
    per_sequence = [n for step in ref["documents_per_sequence"] for n in step]
    assert len(per_sequence) == 24 and sum(n > 1 for n in per_sequence) >= 8, per_sequence  # (packed, in truth)
    assert not [d for d in differences(f"packed {name}", ref, got, PACK_TOL) if "grad norm" not in d]
    assert not differences(f"packed {name}", {**ref, "grads": {}}, {**got, "grads": {}}, (1e-6, PACK_NORM_TOL))


def test_the_packed_comparison_fails_when_documents_see_each_other(worker):
    """The same comparison with the mask left out (the packed conversations attend across each other and their
    positions run on; their targets still stay apart) finds the gradients off."""
    ref, broken = worker(*_packed_runs(1, [])[0]), worker(1, [STEPS, *PACK, UNMASKED])
    found = differences("packed without its mask", ref, broken, PACK_TOL)
    assert sum("gradient of" in f for f in found) > 10, found


# MoE blocks (docs/moe.md) under the layouts they are built for, against one process with the same blocks: learned
# routing with the balancing bias moving every step (its counts all-reduced over the data-parallel ranks), and the
# forced worst case (every token to experts 0 and 1)
MOE_CASES = [
    ("ddp", 2, ["parallel.data=ddp"]),
    ("fsdp", 2, ["parallel.data=fsdp"]),
    ("hsdp_2x2", 4, ["parallel.data=hsdp", "parallel.dp_replicate=2"]),
    ("fsdp_ac_full", 2, ["parallel.data=fsdp", "parallel.ac=full"]),
    ("fsdp_first_experts", 2, ["parallel.data=fsdp", "model.moe.routing=first"]),
    # expert parallelism (parallel/expert.py): the experts split over the ep ranks, tokens exchanged by all-to-all
    ("ep2", 2, ["parallel.data=fsdp", "parallel.ep=2"]),
    ("ep2_fsdp2", 4, ["parallel.data=fsdp", "parallel.ep=2"]),
    ("ep4_8_experts", 4, ["parallel.data=fsdp", "parallel.ep=4", "model.moe.n_experts=8"]),
    ("ep2_hsdp_2x2_ac_full", 4, ["parallel.data=hsdp", "parallel.dp_replicate=2", "parallel.ep=2", "parallel.ac=full"]),
    ("ep2_first_experts", 2, ["parallel.data=fsdp", "parallel.ep=2", "model.moe.routing=first"]),
    # pipeline stages holding MoE blocks (their shapes given: no shape-inference forward to count), and each
    # stage's experts split over its own ep group
    ("pp2", 2, ["parallel.pp=2"]),
    ("ep2_x_pp2", 4, ["parallel.data=fsdp", "parallel.ep=2", "parallel.pp=2"]),
    # tensor parallelism on the dense parts: every TP rank routes the whole sequence with the whole router and
    # experts (the same gradients on each), with FSDP; and with the experts over ep 2 as well
    ("fsdp_tp2", 2, ["parallel.data=fsdp", "parallel.tp=2"]),
    ("ep2_x_tp2", 4, ["parallel.data=fsdp", "parallel.ep=2", "parallel.tp=2"]),
    # context parallelism: each rank routes its chunks of every sequence (the counts summed over cp too)
    ("cp2", 2, ["parallel.cp=2"]),
    # the sequence-level balance loss (DeepSeek-V3's), its gradient through a checkpointed block's recompute
    (
        "ep2_aux_loss_ac_full",
        2,
        ["parallel.data=fsdp", "parallel.ep=2", "parallel.ac=full", "model.moe.aux_loss_coef=0.1"],
    ),
    # Qwen3-MoE's attention (heads wider than dim / n_heads, RMS-normalized queries and keys) under expert parallelism
    ("ep2_qwen3_attention", 2, ["parallel.data=fsdp", "parallel.ep=2", "model.head_dim=32", "model.qk_norm=true"]),
]
MOE_COMMON = [*MOE, "model.moe.bias_update_rate=0.01", "training.global_batch_size=8", "training.precision=fp32"]


def _moe_runs(nproc: int, overrides: list[str]) -> list[tuple[int, list[str]]]:
    """(one process with the row's model: its MoE blocks, routing and attention; the row's layout)."""
    routing = [o for o in overrides if o.startswith("model.")]
    return [(1, [STEPS, *MOE_COMMON, *routing]), (nproc, [STEPS, *MOE_COMMON, *overrides])]


@pytest.mark.parametrize("name, nproc, overrides", MOE_CASES, ids=[c[0] for c in MOE_CASES])
def test_moe_blocks_match_single_process(name, nproc, overrides, worker):
    """The losses and gradient norms of 3 steps, the validation loss and every parameter's gradient after step 1
    (the experts' stacked weights and the router's included) within 1e-5 of one process, and the balancing bias
    after the last step equal: each rank's routing counts summed over the data-parallel ranks move it alike."""
    ref, got = (worker(*run) for run in _moe_runs(nproc, overrides))
    assert not differences(f"moe {name}", ref, got, FP32)
    assert any(".experts.w1" in k for k in got["grads"]) and any("router.gate" in k for k in got["grads"])
    # (the comparison sees a routing error: two experts' gradients swapped in one block are found)
    w1 = next(k for k in got["grads"] if k.endswith(".experts.w1"))
    swapped = {**got["grads"], w1: got["grads"][w1][[1, 0, *range(2, got["grads"][w1].shape[0])]]}
    found = differences("swapped", ref, {**got, "grads": swapped}, FP32)
    assert len(found) == 1 and f"gradient of {w1} off" in found[0], found
    biases = [k for k in ref["buffers"] if k.endswith("expert_bias")]
    assert biases and all(torch.equal(got["buffers"][k], ref["buffers"][k]) for k in biases), name
    if "first" not in name:  # (learned routing: the bias moved)
        assert any(ref["buffers"][k].abs().sum() > 0 for k in biases)


def test_the_aux_loss_row_fails_without_the_aux_loss(worker):
    """The aux-loss row's reference trains with the balance loss; without it (its coefficient 0) the gradients of the
    router and of what feeds it differ: the comparison would see a run that dropped the loss."""
    with_aux = worker(*_moe_runs(2, ["model.moe.aux_loss_coef=0.1"])[0])
    without = worker(*_moe_runs(2, [])[0])
    found = differences("no aux loss", with_aux, without, FP32)
    assert any("router.gate" in f for f in found) and len(found) > 10, found


@pytest.mark.parametrize("stage", ["zero1", "zero2", "zero3"])
def test_zero_matches_fsdp(stage, worker):
    """DeepSpeed's ZeRO and FSDP2 shard differently but must train the same recipe to the same numbers."""
    fsdp = worker(2, [STEPS, "parallel.data=fsdp", "training.global_batch_size=8", "training.precision=fp32"])
    zero = worker(2, [STEPS, f"parallel.data={stage}", "training.global_batch_size=8", "training.precision=fp32"])
    for step, (a, b) in enumerate(zip(fsdp["losses"], zero["losses"]), 1):
        assert abs(b - a) <= 1e-5 * abs(a), f"{stage}: loss at step {step} is {b}, fsdp {a}"


@pytest.mark.parametrize("index", range(len(PAIRWISE.runs)), ids=[r.name for r in PAIRWISE.runs])
def test_pairwise_matrix_matches_single_process(index, worker):
    """Each run of the pairwise matrix against one process: fp32 to 1e-5, 16-bit compute under BF16's bounds."""
    run = PAIRWISE.runs[index]
    ref, got = (worker(*r) for r in _pairwise_runs(index))
    assert len(got["losses"]) == len(ref["losses"]) == 2
    problems = differences(run.name, ref, got, FP32 if run.values["precision"] == "fp32" else BF16)
    assert not problems, "\n".join(problems)
    assert all(g.norm() > 0 for k, g in got["grads"].items() if k.startswith("layers.")), "a block has no gradient"


def test_the_pairwise_comparison_fails_when_blocks_are_broken(worker):
    """The comparison above can fail: the first fp32 pairwise run's gradients with one block's gradients zeroed (a
    frozen block) or scaled by 1.001 (a wrong reduction), and its step-2 loss nudged by 1e-4, are each caught."""
    ref, got = (worker(*r) for r in _pairwise_runs(FIRST_FP32))
    assert not differences("as run", ref, got, FP32)
    block = [k for k in got["grads"] if k.startswith("layers.1.")]
    frozen = {**got, "grads": {k: (0 * g if k in block else g) for k, g in got["grads"].items()}}
    assert len(differences("frozen", ref, frozen, FP32)) >= len(block)
    scaled = {**got, "grads": {k: (1.001 * g if k in block else g) for k, g in got["grads"].items()}}
    assert len(differences("scaled", ref, scaled, FP32)) == len(block)
    nudged = {**got, "losses": [got["losses"][0], got["losses"][1] * (1 + 1e-4)]}
    assert differences("nudged", ref, nudged, FP32) == [
        f"nudged: loss at step 2 is {nudged['losses'][1]}, single process {ref['losses'][1]}"
    ]


def test_the_pairwise_matrix_holds_every_pair_validation_accepts():
    """Every pair of values of two axes is in one of test_parity.py's rows or one pairwise run, or validation
    refuses it (each with its message); the runs are valid layouts of at most MAX_WORLD ranks."""
    from pairwise import MAX_WORLD

    held = set()
    for values in [dict(v) for v in SEEDS] + [r.values for r in PAIRWISE.runs]:
        held |= {frozenset(p) for p in itertools.combinations(values.items(), 2)}
    labels = {a: [v for v, _ in options] for a, options in AXES.items()}
    axes = list(AXES)
    for i, a in enumerate(axes):
        for b in axes[i + 1 :]:
            for x in labels[a]:
                for y in labels[b]:
                    pair = ((a, x), (b, y))
                    assert (frozenset(pair) in held) != (pair in PAIRWISE.refused), pair
                    assert pair not in PAIRWISE.refused or PAIRWISE.refused[pair], pair
    assert all(r.nproc <= MAX_WORLD for r in PAIRWISE.runs)
    assert PAIRWISE.pairs == len(held) + len(PAIRWISE.refused)
    # docs/strategies.md's command, in this process (it prints the matrix made above)
    import contextlib
    import io
    import runpy

    import pairwise

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        runpy.run_path(pairwise.__file__, run_name="__main__")
    assert out.getvalue().startswith(f"{PAIRWISE.pairs} pairs of values: ") and "refused:" in out.getvalue()
