"""Each rank holds exactly the bytes of model state its strategy promises (fp32, AdamW).

The tiny model of the parity suite: D=64, 4 blocks, 4 query / 2 kv heads of 16, SwiGLU hidden
64 * ceil(int(2*4*64/3)=170 / 64) = 192, vocabulary 256. Counted by hand:
  one block: wq 64*64 + wk 64*32 + wv 64*32 + wo 64*64 = 12,288; MLP 3*64*192 = 36,864; 2 norms 128
             -> 49,280
  4 blocks 197,120 + final norm 64 + embedding 256*64 = 16,384 + output 16,384 -> P = 229,952
Every dim-0 size (64, 32, 192, 256) divides by 2 and 4, so FSDP shards are exactly P/N. Under TP every
matrix is split in two and the 9 norm vectors (576 values) are replicated. Pipeline stage 0 holds the
embedding and blocks 0-1, stage 1 blocks 2-3, the final norm and the output.
AdamW keeps two fp32 moments per parameter; gradients match the parameters.
"""

from __future__ import annotations

import importlib.util

import pytest
from conftest import PARITY_STEPS

from models.llama import ModelArgs

ARGS = ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=64)
P = 229_952
BLOCK = 49_280
NORMS = 4 * 128 + 64
EMB = 256 * 64
FP32_8 = ["training.global_batch_size=8", "training.precision=fp32"]  # (as test_parity.py asks: the same runs)


def test_hand_count_matches_the_model():
    assert ARGS.num_params() == P and ARGS.ffn_hidden == 192


# (id, processes, overrides, parameters (numel) held by each rank)
LAYOUTS = [
    ("none", 1, [], [P]),
    ("ddp", 2, ["parallel.data=ddp"], [P, P]),  # full replicas
    ("fsdp_2", 2, ["parallel.data=fsdp"], [P // 2] * 2),  # 1/N each (ZeRO-3)
    ("fsdp_4", 4, ["parallel.data=fsdp"], [P // 4] * 4),
    ("hsdp_2x2", 4, ["parallel.data=hsdp", "parallel.dp_replicate=2"], [P // 2] * 4),  # 1/shard-group size
    ("tp_2", 2, ["parallel.tp=2"], [(P - NORMS) // 2 + NORMS] * 2),
    ("fsdp_2_tp_2", 4, ["parallel.data=fsdp", "parallel.tp=2"], [((P - NORMS) // 2 + NORMS) // 2] * 4),
    ("pp_2", 2, ["parallel.pp=2"], [EMB + 2 * BLOCK, 2 * BLOCK + 64 + EMB]),
    (
        "pp_2_fsdp_2",
        4,
        ["parallel.data=fsdp", "parallel.pp=2"],  # mesh (pp, dp): ranks 0,1 stage 0
        [(EMB + 2 * BLOCK) // 2] * 2 + [(2 * BLOCK + 64 + EMB) // 2] * 2,
    ),
]


def worker_runs(test: str, params: dict) -> list[tuple[int, list[str]]]:
    """What each selected test asks the worker for (conftest.py batches them, one launch per rank count)."""
    if test == "test_bytes_per_rank_equal_the_formula":
        return [(params["nproc"], [PARITY_STEPS, *params["overrides"], *FP32_8])]
    if test == "test_planner_predicts_each_optimizers_state_bytes":
        from test_lowbit_sharded import WIDE

        if params["optimizer"] == "adamw8bit" and importlib.util.find_spec("torchao") is None:
            return []
        return [(2, [*WIDE, f"optim.name={params['optimizer']}", "parallel.data=fsdp"])]
    return []


@pytest.mark.parametrize("name, nproc, overrides, params", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_bytes_per_rank_equal_the_formula(name, nproc, overrides, params, worker):
    held = worker(nproc, [PARITY_STEPS, *overrides, *FP32_8])["bytes_per_rank"]  # test_parity's runs
    assert len(held) == nproc
    for rank, (h, numel) in enumerate(zip(held, params)):
        want = {"params": 4 * numel, "grads": 4 * numel, "optim": 8 * numel}  # fp32: 4 + 4 + 2 x 4 bytes
        assert h == want, f"{name} rank {rank}: holds {h}, the formula says {want}"
    # the planner (dry_run) predicts the same bytes from the config alone
    assert predicted(overrides, nproc) == held, f"{name}: predicted {predicted(overrides, nproc)}, held {held}"


def predicted(overrides: list[str], nproc: int) -> list[dict]:
    from conftest import TINY

    from models.args import model_args_of
    from parallel.memory_terms import model_states
    from trainer.config import load_config
    from trainer.validate import parallel_dims

    cfg = load_config([*TINY, *overrides, "training.precision=fp32"])
    return model_states(cfg, model_args_of(cfg), parallel_dims(cfg, nproc)[0])


@pytest.mark.parametrize("optimizer", ["adafactor", "adamw_bf16", "adamw8bit"])
def test_planner_predicts_each_optimizers_state_bytes(optimizer, worker):
    """Measured under FSDP on 2 ranks, 128 wide (the runs of test_lowbit_sharded, shared via the cache)."""
    if optimizer == "adamw8bit":
        pytest.importorskip("torchao")
    from test_lowbit_sharded import WIDE

    overrides = [*WIDE, f"optim.name={optimizer}", "parallel.data=fsdp"]
    held = worker(2, overrides)["bytes_per_rank"]
    assert predicted(overrides, 2) == held


# ZeRO (fp32 model): DeepSpeed keeps the module's own fp32 parameters *and* an fp32 master partition
# (ZeRO paper: 4 bytes of fp32 master weights among the 12 of optimizer state). Gradients: ZeRO-1 holds
# full gradients until the accumulation boundary, ZeRO-2/3 only their partition.
ZERO = [
    ("zero1", {"params": P, "master": P // 2, "grads": P, "optim": 2 * P // 2}),
    ("zero2", {"params": P, "master": P // 2, "grads": P // 2, "optim": 2 * P // 2}),
    ("zero3", {"params": P // 2, "master": P // 2, "grads": P // 2, "optim": 2 * P // 2}),
]


@pytest.mark.parametrize("stage, numel", ZERO, ids=[z[0] for z in ZERO])
def test_zero_bytes_per_rank_equal_the_zero_formulas(stage, numel, worker):
    held = worker(2, [PARITY_STEPS, f"parallel.data={stage}", *FP32_8])
    for rank, h in enumerate(held["bytes_per_rank"]):
        want = {k: 4 * v for k, v in numel.items()}
        assert h == want, f"{stage} rank {rank}: holds {h}, the ZeRO formula says {want}"
    assert predicted([f"parallel.data={stage}"], 2) == held["bytes_per_rank"]


def test_docs_zero_table_is_these_formulas():
    """docs/zero.md's measured table is the ZeRO formulas above at P = 229,952, which the test above holds the
    measured bytes to: the docs cannot drift from what the worker measured."""
    from helpers import REPO

    page = (REPO / "docs" / "zero.md").read_text()
    for stage, numel in ZERO:
        b = {k: f"{4 * v:,}" for k, v in numel.items()}
        row = f"| {stage} | {b['params']}"
        assert row in page and all(b[k] in page[page.index(row) :].split("\n", 1)[0] for k in b), stage
