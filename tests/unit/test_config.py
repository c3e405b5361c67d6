"""Recipes load and validate; every typo, wrong type and rule violation gives the documented message."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.config import ConfigError, list_recipes, load_config
from trainer.validate import check, derive, validate


def _recipe_world_size(cfg) -> int:
    """The smallest world a recipe's layout runs on: the fixed degrees, and 2 for a "the rest" degree (the expert
    degree, at least, for a dp_shard that holds it)."""
    p = cfg.parallel
    data = str(p.data)
    rest = max(2, p.ep)
    dp = {
        "none": 1,
        "ddp": 2,
        "zero1": 2,
        "zero2": 2,
        "zero3": 2,
        "fsdp": p.dp_shard if p.dp_shard > 0 else rest,
        "hsdp": max(p.dp_replicate, 1) * (p.dp_shard if p.dp_shard > 0 else rest),
    }[data]
    return dp * p.tp * p.pp * p.cp


@pytest.mark.parametrize("recipe", list_recipes())
def test_every_recipe_loads_and_validates(recipe, tmp_path):
    cfg = load_config([f"recipe={recipe}", f"run_dir={tmp_path}"])
    assert validate(cfg, _recipe_world_size(cfg)) == []
    assert cfg.name == recipe


def test_every_config_key_is_documented():
    from omegaconf import OmegaConf

    from trainer.config import Config

    doc = (Path(__file__).resolve().parents[2] / "docs" / "config.md").read_text()

    def keys(node, prefix=""):
        for k, v in node.items():
            full = f"{prefix}{k}"
            if OmegaConf.is_dict(v):
                yield from keys(v, full + ".")
            else:
                yield full

    missing = [k for k in keys(OmegaConf.structured(Config)) if f"`{k}`" not in doc and f"`{k}`," not in doc]
    assert not missing, f"docs/config.md does not document: {missing}"


def test_base_recipe_is_extended_and_overrides_win(tmp_path):
    recipe = tmp_path / "child.yaml"
    recipe.write_text("base: llama_debug\ntraining: {steps: 7}\n")
    cfg = load_config([f"recipe={recipe}", "training.steps=9", "training.steps=11", "optim.lr=1e-3"])
    assert cfg.training.steps == 11  # the last override wins
    assert cfg.training.seq_len == 128  # from the base recipe
    assert cfg.optim.lr == 1e-3
    assert cfg.name == "child" and cfg.run_dir == "runs/child"


@pytest.mark.parametrize(
    "tokens, expected",
    [
        (["recipe=llama_debg"], ["unknown recipe", "Did you mean 'llama_debug'", "Known recipes:"]),
        (["training.stpes=3"], ["unknown key 'training.stpes'", "Did you mean: 'steps'"]),
        (["optimm.lr=1"], ["unknown key 'optimm'", "Did you mean: 'optim'"]),
        (["training.steps=abc"], ["training.steps", "'abc'", "could not be converted to Integer"]),
        (["training.precision=fp8"], ["training.precision", "'fp8'", "expected one of [fp32, bf16, fp16]"]),
        (["parallel.data=zero9"], ["parallel.data", "'zero9'", "expected one of"]),
        (["steps"], ["'steps': expected key=value"]),
    ],
)
def test_bad_input_messages(tokens, expected):
    with pytest.raises(ConfigError) as e:
        load_config(tokens)
    for fragment in expected:
        assert fragment in str(e.value), f"{fragment!r} not in:\n{e.value}"


def test_every_bad_override_is_reported_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(["training.stpes=3", "optim.lrr=1", "training.seed=x"])
    assert len(e.value.problems) == 3


# (overrides, world size, the fragments the one message must contain)
RULES = [
    (
        ["training.global_batch_size=16", "training.micro_batch_size=3"],
        1,
        "training.global_batch_size(16) must be divisible by training.micro_batch_size(3) * dp(1) = 3: 16 % 3 = 1",
    ),
    (
        ["parallel.data=ddp", "training.global_batch_size=12", "training.micro_batch_size=4"],
        2,
        "training.global_batch_size(12) must be divisible by training.micro_batch_size(4) * dp(2) = 8: 12 % 8 = 4",
    ),
    (["model.n_heads=8", "model.n_kv_heads=3"], 1, "model.n_kv_heads(3) must divide model.n_heads(8): 8 % 3 = 2"),
    (["model.dim=250", "model.n_heads=8"], 1, "model.n_heads(8) must divide model.dim(250): 250 % 8 = 2"),
    (
        ["model.dim=40", "model.n_heads=8", "model.n_kv_heads=8"],
        1,
        "head dim 5 (model.head_dim, else model.dim/model.n_heads = 40/8) must be even for RoPE",
    ),
    (["optim.lr=-1e-3"], 1, "optim.lr=-0.001 must be > 0"),
    (
        ["optim.warmup_steps=500", "training.steps=100"],
        1,
        "optim.warmup_steps(500) must be in [0, training.steps(100)]",
    ),
    (["training.seq_len=4096"], 1, "training.seq_len(4096) exceeds model.max_seq_len(1024)"),
    (["training.steps=0"], 1, "training.steps=0 must be >= 1"),
    (["optim.beta2=1.0"], 1, "optim.beta2=1.0 must be in [0, 1)"),
    (["model.vocab_size=1000"], 1, "the default dataset's tokenizer has 4096 tokens > model vocab_size 1000"),
    (["data.source=tokens"], 1, "data.source=tokens needs data.path"),
    (
        ["data.source=tokens", "data.path=/nonexistent/shardwise-data"],
        1,
        "data.path=/nonexistent/shardwise-data: no such directory",
    ),
    (
        [],
        2,
        "dp_replicate(1) * dp_shard(1) * tp(1) * pp(1) = 1 != WORLD_SIZE(2); parallel.data=none uses no "
        "data-parallel ranks",
    ),
    (
        ["parallel.data=hsdp", "parallel.dp_replicate=2", "parallel.dp_shard=2", "parallel.tp=2"],
        10,
        "dp_replicate(2) * dp_shard(2) * tp(2) * pp(1) = 8 != WORLD_SIZE(10)",
    ),
    (["parallel.data=fsdp", "parallel.tp=4"], 6, "WORLD_SIZE(6) is not divisible by tp(4) * pp(1) = 4"),
    (["parallel.data=fsdp", "parallel.tp=3"], 6, "parallel.tp(3) must divide model.n_heads(8): 8 % 3 = 2"),
    (
        ["parallel.data=fsdp", "parallel.tp=8", "training.global_batch_size=8", "training.micro_batch_size=8"],
        8,
        "parallel.tp(8) must divide model.n_kv_heads(4): 4 % 8 = 4",
    ),
    (["parallel.pp=8"], 8, "pipeline stages pp(8) x 1 per rank (1f1b) = 8 > model.n_layers(4)"),
    (
        ["parallel.pp=4", "parallel.pp_schedule=interleaved_1f1b"],
        4,
        "pipeline stages pp(4) x 2 per rank (interleaved_1f1b) = 8 > model.n_layers(4)",
    ),
    (
        ["parallel.pp=2", "training.global_batch_size=16", "training.micro_batch_size=16"],
        2,
        "pipeline microbatches = training.global_batch_size(16) / (training.micro_batch_size(16) * dp(1)) = 1 < 2 "
        "stages, which 1f1b needs",
    ),
    (
        ["parallel.pp=2", "parallel.pp_schedule=1f1c"],
        2,
        "parallel.pp_schedule=1f1c: unknown schedule; did you mean 1f1b?",
    ),
    (["parallel.data=ddp", "parallel.tp=2"], 4, "DDP cannot wrap tensor-parallel (DTensor) parameters"),
    (["parallel.data=ddp", "parallel.offload=cpu"], 2, "parallel.offload=cpu needs a sharded strategy"),
    (
        ["parallel.data=zero2", "parallel.offload_params=true"],
        2,
        "parallel.offload_params=true needs parallel.data=zero3",
    ),
    (["parallel.data=zero3", "parallel.tp=2"], 4, "shardwise runs DeepSpeed ZeRO as pure data parallelism"),
    (["parallel.data=zero1", "parallel.pp=2"], 4, "shardwise runs DeepSpeed ZeRO as pure data parallelism"),
    (["parallel.data=zero3", "optim.name=adafactor"], 2, "optim.name=adafactor with parallel.data=zero3 is refused"),
    (["parallel.data=zero2", "optim.name=adamw8bit"], 2, "optim.name=adamw8bit with parallel.data=zero2 is refused"),
    (["parallel.data=zero1", "optim.name=adamw_bf16"], 2, "optim.name=adamw_bf16 with parallel.data=zero1 is refused"),
    (["optim.name=adamw8bt"], 1, "optim.name=adamw8bt: unknown optimizer. Did you mean adamw8bit?"),
    (
        ["parallel.data=fsdp", "parallel.deepspeed.zero_optimization.stage=2"],
        2,
        "parallel.deepspeed sets ds_config keys",
    ),
    (
        ["parallel.data=fsdp", "parallel.dp_replicate=2"],
        4,
        "parallel.dp_replicate=2 replicates shards, which is parallel.data=hsdp",
    ),
    (["parallel.ac_every=0"], 1, "parallel.ac_every=0 must be >= 1"),
    (["logging.every=0"], 1, "logging.every=0 must be >= 1"),
    (["run_dir=/dev/null/run"], 1, "run_dir=/dev/null/run: cannot create or write there"),
    (["model.flavor=9b"], 1, "model.flavor=9b: unknown flavor"),
    # optim.in_backward: what an update inside the backward cannot do
    (
        ["optim.in_backward=true", "optim.max_grad_norm=1.0"],
        1,
        "optim.in_backward=true with optim.max_grad_norm=1.0: clipping by the global norm needs every gradient",
    ),
    (
        [
            "optim.in_backward=true",
            "optim.max_grad_norm=0",
            "training.global_batch_size=16",
            "training.micro_batch_size=4",
        ],
        1,
        "optim.in_backward=true with gradient accumulation: "
        "training.global_batch_size(16) != training.micro_batch_size(4) x dp(1) = 4",
    ),
    (
        ["optim.in_backward=true", "optim.max_grad_norm=0", "parallel.data=ddp"],
        2,
        "optim.in_backward=true with parallel.data=ddp: DDP's bucketed all-reduce",
    ),
    (
        ["optim.in_backward=true", "optim.max_grad_norm=0", "parallel.data=zero2"],
        2,
        "optim.in_backward=true with parallel.data=zero2: DeepSpeed runs its own step",
    ),
    (
        ["optim.in_backward=true", "optim.max_grad_norm=0", "parallel.data=fsdp", "parallel.tp=2"],
        4,
        "optim.in_backward=true with parallel.tp=2, parallel.pp=1: not built for tensor or pipeline",
    ),
    (
        ["optim.in_backward=true", "optim.max_grad_norm=0", "training.precision=fp16"],
        1,
        "optim.in_backward=true with training.precision=fp16: the loss scaler",
    ),
    (
        ["optim.in_backward=true", "optim.max_grad_norm=0", "numerics.on_nonfinite=skip"],
        1,
        "optim.in_backward=true with numerics.on_nonfinite=skip",
    ),
    (
        ["training.master_weights=false", "optim.name=adamw_bf16", "training.precision=fp32"],
        1,
        "training.master_weights=false with training.precision=fp32: parameters without fp32 masters",
    ),
    (
        ["training.master_weights=false", "optim.name=adamw"],
        1,
        "training.master_weights=false with optim.name=adamw: a bf16 parameter needs its update written back with "
        "stochastic rounding",
    ),
    (["parallel.cp=2", "training.seq_len=30"], 2, "training.seq_len(30) must be divisible by 2 x parallel.cp = 4"),
    (["parallel.cp=2", "parallel.data=ddp"], 2, "parallel.cp=2 with parallel.data=ddp: context parallelism shards"),
    (["parallel.cp=2", "parallel.data=zero3"], 2, "parallel.cp=2 with parallel.data=zero3"),
    (["parallel.cp_rotate=spiral"], 1, "parallel.cp_rotate=spiral: unknown; known: allgather, ring"),
    (["parallel.cp=0"], 1, "parallel.cp=0 must be >= 1"),
    (["parallel.cp=2", "parallel.data=fsdp"], 3, "WORLD_SIZE(3) is not divisible by tp(1) * pp(1) * cp(2) = 2"),
    (
        ["parallel.cp=2", "optim.in_backward=true", "optim.max_grad_norm=0"],
        2,
        "optim.in_backward=true with parallel.cp=2: not built for context parallelism",
    ),
    (
        ["training.master_weights=false", "optim.name=adamw_bf16", "parallel.data=zero2"],
        2,
        "training.master_weights=false with parallel.data=zero2, tp=1, pp=1: built for one process, fsdp and hsdp",
    ),
    (["profile.nvtx=true", "training.device=cpu"], 1, "profile.nvtx=true writes NVTX ranges, which are CUDA's"),
    (["model.attention=cudnn", "training.device=cpu"], 1, "model.attention=cudnn is a CUDA kernel and this run is on"),
    (
        ["model.attention=flashy"],
        1,
        "model.attention=flashy: unknown SDPA kernel; known: auto, flash, cudnn, efficient",
    ),
    (["model.attention=efficient", "model.expand_kv=false"], 1, "that kernel takes no grouped kv heads"),
    (["model.attention=flash", "parallel.cp=2"], 2, "model.attention=flash with parallel.cp=2: context parallelism"),
    (
        ["parallel.sac_matmuls=every_second", "parallel.ac=full"],
        1,
        "parallel.sac_matmuls=every_second chooses what selective AC keeps; it needs parallel.ac=selective (now full)",
    ),
    (["parallel.sac_matmuls=odd"], 1, "parallel.sac_matmuls=odd: unknown; known: all, every_second"),
    (
        ["training.float8=tensorwise", "training.device=cpu"],
        1,
        "training.float8=tensorwise: float8 matmuls need a CUDA GPU of compute capability >= 8.9",
    ),
    (
        ["training.float8=rowwise", "training.float8_emulate=true", "training.precision=fp32"],
        1,
        "training.float8=rowwise with training.precision=fp32: float8 matmuls run inside bf16 training",
    ),
    (
        ["training.float8=tensorwise", "training.float8_emulate=true", "parallel.tp=2"],
        2,
        "training.float8=tensorwise with parallel.tp=2: not built",
    ),
    (
        ["training.float8=tensorwise", "training.float8_emulate=true", "parallel.data=zero2"],
        2,
        "training.float8=tensorwise with parallel.data=zero2: not built for DeepSpeed's engine",
    ),
    (["training.float8=e4m3"], 1, "training.float8=e4m3: unknown; known: none, tensorwise, rowwise"),
    (["training.float8_emulate=true"], 1, "training.float8_emulate=true without training.float8"),
    (["data.pack=true", "data.source=synthetic"], 1, "data.pack=true: data.source=synthetic has no documents"),
    (["data.pack=true", "parallel.cp=2"], 2, "data.pack=true with parallel.cp=2: packed documents under context"),
    (["data.pack=true", "model.attention=flash"], 1, "data.pack=true with model.attention=flash: packed documents"),
    (
        ["data.pack=true", "parallel.activation_offload=true"],
        1,
        "data.pack=true with parallel.activation_offload=true: not built",
    ),
    # MoE blocks and expert parallelism (models/moe.py config_problems, parallel/layout.py resolve_dims)
    (["model.moe.n_experts=4", "model.moe.top_k=5"], 1, "model.moe.top_k=5 must be in 1..model.moe.n_experts (4)"),
    (["model.moe.n_experts=4", "model.moe.score=relu"], 1, "model.moe.score=relu: unknown; known: softmax, sigmoid"),
    (["model.moe.n_experts=4", "model.moe.dense_layers=99"], 1, "model.moe.dense_layers=99 must be in 0..model.n_"),
    (["model.moe.n_experts=4", "parallel.tp=2"], 2, "model.moe with parallel.tp with parallel.data=none: not built"),
    (["model.moe.n_experts=4", "parallel.data=zero2"], 2, "model.moe with parallel.data=zero2: not built yet"),
    (["parallel.data=fsdp", "parallel.ep=2"], 2, "parallel.ep=2 splits MoE experts, and this model has none"),
    (["model.moe.n_experts=4", "parallel.data=fsdp", "parallel.ep=3"], 3, "parallel.ep=3 must divide model.moe.n_e"),
    (
        ["model.moe.n_experts=4", "parallel.data=ddp", "parallel.ep=2"],
        2,
        "parallel.ep=2 borrows its ranks from dp_shard, which is 1 with parallel.data=ddp: set parallel.data=fsdp",
    ),
    (
        ["model.moe.n_experts=4", "parallel.data=hsdp", "parallel.dp_replicate=2", "parallel.ep=2"],
        2,
        "parallel.ep=2 borrows its ranks from dp_shard, which is 1 with parallel.data=hsdp: set parallel.dp_shard",
    ),
    (["parallel.ep=0"], 1, "parallel.ep=0 must be >= 1"),
    (
        ["model.moe.n_experts=4", "model.moe.aux_loss_coef=0.01", "parallel.pp=2"],
        2,
        "model.moe.aux_loss_coef=0.01 with parallel.pp=2: not built",
    ),
    (
        ["model.moe.n_experts=4", "parallel.data=fsdp", "parallel.ep=2", "parallel.cp=2"],
        4,
        "model.moe with parallel.cp with parallel.ep: not built yet",
    ),
    (
        ["model.moe.n_experts=4", "model.moe.aux_loss_coef=0.1", "parallel.cp=2"],
        2,
        "model.moe with parallel.cp with model.moe.aux_loss_coef=0.1: not built yet",
    ),
    (["model.moe.n_experts=4", "model.moe.aux_loss_coef=-1"], 1, "model.moe.aux_loss_coef=-1.0 must be >= 0"),
    (["model.qk_norm=true", "parallel.tp=2"], 2, "model.qk_norm=true with parallel.tp(2): not built"),
    (["model.head_dim=15"], 1, "head dim 15 (model.head_dim, else model.dim/model.n_heads"),
]


@pytest.mark.parametrize("overrides, world, fragment", RULES, ids=[r[2][:40] for r in RULES])
def test_validation_rules(overrides, world, fragment):
    cfg = load_config(["recipe=llama_debug", *overrides])
    problems = validate(cfg, world)
    assert any(fragment in p for p in problems), f"{fragment!r} not among {problems}"
    with pytest.raises(ConfigError):
        check(cfg, world)


def test_missing_token_file_is_named(tmp_path):
    (tmp_path / "meta.json").write_text('{"vocab_size": 100}')
    (tmp_path / "train.bin").write_bytes(b"\0" * 64)
    cfg = load_config(["recipe=llama_debug", "data.source=tokens", f"data.path={tmp_path}"])
    assert any("missing val.bin" in p for p in validate(cfg, 1))


def test_all_problems_are_reported_together():
    cfg = load_config(["recipe=llama_debug", "optim.lr=-1", "training.micro_batch_size=3", "logging.every=0"])
    assert len(validate(cfg, 1)) == 3


@pytest.mark.parametrize(
    "overrides, world, layout",
    [
        (["parallel.data=fsdp"], 4, (1, 4, 1, 1)),
        (["parallel.data=ddp"], 4, (4, 1, 1, 1)),
        (["parallel.data=hsdp", "parallel.dp_replicate=2"], 8, (2, 4, 1, 1)),
        (["parallel.data=hsdp", "parallel.dp_shard=2", "parallel.dp_replicate=-1"], 8, (4, 2, 1, 1)),
        (["parallel.data=fsdp", "parallel.tp=2", "parallel.pp=2"], 8, (1, 2, 2, 2)),
        (["parallel.tp=2"], 2, (1, 1, 2, 1)),
        (["parallel.data=fsdp", "parallel.ep=2", "model.moe.n_experts=4"], 4, (1, 4, 1, 1)),  # (ep within dp_shard)
    ],
)
def test_layouts_resolve(overrides, world, layout):
    cfg = load_config(
        ["recipe=llama_debug", "training.global_batch_size=32", "training.micro_batch_size=2", *overrides]
    )
    assert validate(cfg, world) == []
    d = derive(cfg, world).dims
    assert (d.dp_replicate, d.dp_shard, d.tp, d.pp) == layout


def test_derived_numbers():
    cfg = load_config(
        [
            "recipe=llama_debug",
            "parallel.data=ddp",
            "training.global_batch_size=32",
            "training.micro_batch_size=4",
            "training.seq_len=128",
        ]
    )
    plan = derive(cfg, 2)
    assert (plan.dp_size, plan.micro_batch_size, plan.accum_steps) == (2, 4, 4)
    assert plan.tokens_per_step == 32 * 128


def test_every_recipe_validates_at_the_world_size_its_header_names():
    """Each recipe's usage line (`--nnodes=A --nproc_per_node=B`, default 1 process) is a layout it accepts,
    and every recipe is listed in docs/recipes.md."""
    import re

    from trainer.config import RECIPE_DIR, ConfigError, load_config
    from trainer.validate import check

    docs = (RECIPE_DIR.parent / "docs" / "recipes.md").read_text()
    problems = []
    for path in sorted(RECIPE_DIR.glob("*.yaml")):
        text = path.read_text()
        nodes = re.search(r"--nnodes[= ](\d+)", text)
        procs = re.search(r"--nproc_per_node[= ](\d+)", text)
        world = (int(nodes.group(1)) if nodes else 1) * (int(procs.group(1)) if procs else 1)
        try:
            check(load_config([f"recipe={path.stem}", "run_dir=" + str(RECIPE_DIR.parent / "runs" / "x")]), world)
        except ConfigError as e:
            problems.append(f"{path.stem} at world {world}: {e}")
        stem = path.stem
        if f"`{stem}`" not in docs and f"`_{stem.rsplit('_', 1)[1]}`" not in docs:  # `llama_debug_zero1`, `_zero2`
            problems.append(f"{stem} is not listed in docs/recipes.md")
    assert not problems, "\n".join(problems)
