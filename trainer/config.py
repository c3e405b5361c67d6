"""The one typed config tree, recipes, command-line overrides and validation.

A run's config is built in three layers (later wins):
  1. the schema below (every field's default, documented where it is declared),
  2. a YAML recipe from `recipes/` picked by `recipe=NAME` (a recipe may name a `base:` recipe it extends),
  3. dotted `key=value` tokens from the command line.
OmegaConf checks every key and type against the schema, so a typo fails with a suggestion.
`validate(cfg, world_size)` then returns every violation of the arithmetic at once, before any process
group starts; `derive()` computes the numbers a user should never set by hand (accumulation steps...).
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from parallel.plan import PP_SCHEDULES, n_stages  # noqa: F401  (PP_SCHEDULES: re-exported)

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"


class ConfigError(ValueError):
    """A config that must not start a run. `problems` lists every violation found."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid config ({len(self.problems)} problem{'s' * (len(self.problems) > 1)}):\n{lines}")


# ----------------------------------------------------------------------------------------------
# Schema


class Precision(StrEnum):
    fp32 = "fp32"  # everything in fp32
    bf16 = "bf16"  # fp32 master weights, bf16 compute (autocast); no loss scaling needed
    fp16 = "fp16"  # fp32 master weights, fp16 compute with a dynamic loss scaler


class DataSource(StrEnum):
    default = "default"  # tokens of this machine's Python standard library source, tokenizer trained on it
    tokens = "tokens"  # a directory made by launch/prepare_data.py (data.path)
    synthetic = "synthetic"  # uniformly random tokens, seeded: for benchmarks (the loss cannot fall)


class Schedule(StrEnum):
    cosine = "cosine"  # linear warmup, then cosine decay to min_lr_ratio * lr
    linear = "linear"  # linear warmup, then linear decay to min_lr_ratio * lr
    wsd = "wsd"  # warmup, stable at lr, then linear decay over the last decay_fraction of steps
    constant = "constant"  # linear warmup, then constant


class DataParallel(StrEnum):
    none = "none"  # no data parallelism (one process, or tp/pp alone)
    ddp = "ddp"  # torch DistributedDataParallel: full replicas, gradients all-reduced
    fsdp = "fsdp"  # FSDP2: parameters, gradients and optimizer state sharded over dp_shard ranks
    hsdp = "hsdp"  # FSDP2 on a (dp_replicate, dp_shard) mesh: sharded within a group, replicated across
    zero1 = "zero1"  # DeepSpeed ZeRO-1: optimizer state partitioned
    zero2 = "zero2"  # DeepSpeed ZeRO-2: optimizer state and gradients partitioned
    zero3 = "zero3"  # DeepSpeed ZeRO-3: optimizer state, gradients and parameters partitioned


class ACMode(StrEnum):
    none = "none"  # keep every activation
    full = "full"  # keep each checkpointed block's input only; recompute the block in backward
    selective = "selective"  # keep matmul and attention outputs, recompute the cheap ops (norms, SiLU, RoPE)


class Offload(StrEnum):
    none = "none"
    cpu = "cpu"  # fsdp/hsdp: shards of parameters, gradients and optimizer state in host memory;
    #              zero1/2/3: the optimizer state and step on the CPU (ZeRO-Offload, DeepSpeed's CPU Adam)


class WandbMode(StrEnum):
    disabled = "disabled"  # write nothing
    offline = "offline"  # write the run to run_dir/wandb; upload later with `wandb sync`
    online = "online"  # stream to the W&B server (needs WANDB_API_KEY and a network)


class RopeScalingType(StrEnum):
    none = "none"  # plain RoPE
    llama3 = "llama3"  # Llama-3.1's frequency scaling (long context): wavelengths past original/low_freq_factor divided by factor


@dataclass
class RopeScalingConfig:
    """RoPE frequency scaling (models/llama.py RopeScaling); every null keeps the flavor's value."""

    type: RopeScalingType | None = None  # none, llama3; null: the flavor's (1b and 3b use llama3, factor 32)
    factor: float | None = None  # how much longer the context is than in pre-training (Llama-3.1: 8)
    low_freq_factor: float | None = None  # wavelengths above original_max_seq_len / this are divided by factor (1)
    high_freq_factor: float | None = None  # wavelengths below original_max_seq_len / this are kept (4)
    original_max_seq_len: int | None = None  # the context the base frequencies were trained for (8192)


@dataclass
class ModelConfig:
    name: str = "llama"  # model family; only "llama" today
    flavor: str = "debug"  # debug, 1b, 3b, 7b, 8b, 13b, 70b (shapes in models/llama.py FLAVORS)
    # Optional changes to the flavor's shape (null keeps the flavor's value):
    dim: int | None = None  # model width D
    n_layers: int | None = None  # number of transformer blocks
    n_heads: int | None = None  # query heads; D must divide by it
    n_kv_heads: int | None = None  # key/value heads (grouped-query attention); n_heads must divide by it
    vocab_size: int | None = None  # must cover the tokenizer's vocabulary
    max_seq_len: int | None = None  # length of the RoPE table; training.seq_len must not exceed it
    tie_embeddings: bool | None = None  # share the input embedding and output projection
    ffn_hidden_dim: int | None = None  # SwiGLU hidden size; null: the flavor's rule (multiple_of, multiplier)
    norm_eps: float | None = None  # RMSNorm epsilon
    rope_theta: float | None = None  # RoPE base
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    attention: str = "auto"  # SDPA's kernel: auto (SDPA picks), flash, cudnn or efficient (CUDA only); a named one runs or the step fails
    expand_kv: bool | None = None  # repeat the kv heads to the query heads before attention (saves them so for backward); null: for cudnn and efficient, which need it



@dataclass
class DataConfig:
    source: DataSource = DataSource.default
    path: str | None = None  # for source=tokens: a directory with meta.json, train.bin, val.bin
    cache_dir: str | None = None  # where the default dataset is built once; null: $SHARDWISE_CACHE or ~/.cache/shardwise
    default_corpus_mb: float = 8.0  # how much standard-library source the default dataset reads (MiB)
    val_fraction: float = 0.05  # share of documents held out for validation (default dataset, prepare_data)


@dataclass
class TrainingConfig:
    steps: int = 200  # optimizer steps
    seq_len: int = 256  # tokens per sequence
    global_batch_size: int = 16  # sequences per optimizer step, summed over data-parallel ranks
    micro_batch_size: int = 4  # sequences per forward/backward on one rank; accumulation is derived
    precision: Precision = Precision.bf16
    seed: int = 0  # weights, data order and dropout-free RNG all follow from it
    device: str = "auto"  # auto (cuda if available, else cpu), cpu or cuda
    val_every: int = 50  # validate at step 0 and every this many steps (0: only after the last step)
    val_batches: int = 4  # global batches of held-out data per validation
    # the output projection and the loss over this many sequence chunks: the (tokens x vocab) fp32 logits are
    # never held whole, backward recomputes each chunk's (models/loss.py); 0: one nn.Linear and F.cross_entropy
    loss_chunks: int = 0
    # false: the parameters themselves are bf16, with no fp32 copy; the optimizer (adamw_bf16, adamw8bit) writes
    # each update back with stochastic rounding (needs precision=bf16)
    master_weights: bool = True
    # the blocks' linear layers in float8 through torchao (parallel/float8.py): none, tensorwise or rowwise scaling
    # (needs precision=bf16 and a GPU of compute capability >= 8.9)
    float8: str = "none"
    float8_emulate: bool = False  # torchao's float8 emulation (quantize to float8 and back, matmul in high precision): CPU tests


@dataclass
class AdafactorConfig:
    """Adafactor's own knobs (optim/adafactor.py); defaults are torch.optim.Adafactor's."""

    beta2_decay: float = -0.8  # the second-moment EMA decays with 1 - t^beta2_decay (paper eq. 8)
    eps1: float | None = None  # floor of the second-moment estimate; null: the dtype's machine epsilon
    eps2: float = 1.0e-3  # floor of RMS(param) in the parameter-scaled step size
    d: float = 1.0  # update clipping threshold: updates are scaled down to RMS <= d
    relative_step: bool = True  # step size min(lr, 1/sqrt(t)); false: lr itself
    scale_parameter: bool = True  # multiply the step by max(eps2, RMS(param))
    beta1: float | None = None  # EMA of the update (a first moment); null: none, saving a full-size state


@dataclass
class LrMultiplier:
    pattern: str = "*"  # fnmatch pattern over parameter names, e.g. "tok_embeddings.*" or "layers.*.feed_forward.*"
    scale: float = 1.0  # the matching parameters' learning rate is lr * scale (the first matching rule wins)


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw, adamw_bf16 (bf16 moments), adamw8bit (torchao) or adafactor (sharding-aware)
    lr: float = 3.0e-4  # peak learning rate
    weight_decay: float = 0.1  # decoupled; not applied to norms and (by default) embeddings
    decay_embeddings: bool = False  # also decay the embedding table(s)
    lr_multipliers: list[LrMultiplier] = field(default_factory=list)  # per-group learning rates by name pattern
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1.0e-8
    fused: bool | None = None  # fused AdamW kernel; null: on when training on CUDA
    schedule: Schedule = Schedule.cosine
    warmup_steps: int = 20  # linear warmup from lr/warmup_steps to lr
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    decay_fraction: float = 0.2  # wsd only: share of the steps spent decaying at the end
    max_grad_norm: float = 1.0  # clip the global gradient norm to this (0 disables clipping)
    in_backward: bool = False  # step each parameter inside the backward, as its gradient completes (needs max_grad_norm=0)
    adafactor: AdafactorConfig = field(default_factory=AdafactorConfig)


@dataclass
class ParallelConfig:
    data: DataParallel = DataParallel.none  # how data-parallel ranks hold the model
    dp_replicate: int = 1  # hsdp: replica groups; ddp: -1 or 1 (the data-parallel degree is the rest)
    dp_shard: int = -1  # fsdp/hsdp: ranks one copy is sharded over; -1: the rest of the world
    tp: int = 1  # tensor-parallel degree (Megatron-style column/row split + sequence parallel)
    pp: int = 1  # pipeline-parallel degree (ranks along the pipeline)
    pp_schedule: str = "1f1b"  # gpipe, 1f1b, interleaved_1f1b, zbv (zero bubble V), dualpipev
    cp: int = 1  # context-parallel degree: each sequence split over this many ranks (head and tail chunks), exact attention across them
    cp_rotate: str = "allgather"  # cp > 1: how each rank sees the other ranks' keys and values: allgather or ring
    ac: ACMode = ACMode.none  # activation checkpointing of the transformer blocks
    ac_every: int = 1  # ac=full: checkpoint every k-th block only (1: all blocks)
    sac_matmuls: str = "all"  # ac=selective: keep every matmul's output (all), or every_second: recompute the 2nd, 4th and 6th of a block's seven (wk, wo, w3), as torchtitan's op-level SAC does
    compile: bool = False  # torch.compile each transformer block
    reshard_after_forward: bool | None = None  # fsdp/hsdp: free gathered blocks after forward, gather again in backward; null: true except under pp
    accumulate_unsharded_grads: bool = False  # fsdp/hsdp: keep whole fp32 gradients over micro-batches, reduce-scatter once (+4 bytes x params per rank)
    offload: Offload = Offload.none  # keep model states in CPU memory (what moves depends on the strategy)
    offload_params: bool = False  # zero3 only: also keep the parameter partitions on the CPU (ZeRO-Infinity style)
    activation_offload: bool = False  # what the blocks save for backward goes to host memory in forward, back one block ahead (parallel/offload.py)
    activation_offload_min_bytes: int = 1048576  # activation_offload: storages smaller than this stay on the device
    deepspeed: dict[str, Any] = field(default_factory=dict)  # zero*: any ds_config keys, merged over the generated ones


class DamagedPolicy(StrEnum):
    fallback = "fallback"  # move it aside to step-N.damaged (kept) and resume from the newest one that verifies
    fail = "fail"  # stop with the damage named


@dataclass
class CheckpointConfig:
    every: int = 0  # save every this many steps, and after the last step (0: never)
    keep: int = 3  # complete checkpoints kept; older ones are deleted (never outside the checkpoint root)
    dir: str | None = None  # null: run_dir/checkpoints
    resume: bool = True  # start from the newest complete checkpoint in `dir` when there is one
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this, forever (0: none)
    async_save: bool = False  # periodic saves write in a background thread (own gloo group); final and preemption saves are synchronous
    preempt_flag: str | None = None  # a file whose appearance stops the run at the next step (null: run_dir/PREEMPT)
    init_from: str | None = None  # weights to start from when there is no checkpoint: an HF directory, a .safetensors file or a step-N directory
    on_damaged: DamagedPolicy = DamagedPolicy.fallback  # a checkpoint whose files fail their checksums: fall back or stop


class NonFinite(StrEnum):
    raise_ = "raise"  # stop every rank with the step named
    skip = "skip"  # leave parameters and optimizer state untouched for that step, count it, go on


@dataclass
class NumericsConfig:
    on_nonfinite: NonFinite = NonFinite.raise_  # a NaN/Inf loss or gradient norm: raise or skip the step


@dataclass
class WandbConfig:
    mode: WandbMode = WandbMode.disabled
    project: str = "shardwise"
    entity: str | None = None  # team or user; null: your default entity
    run_name: str | None = None  # null: the config's name
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    every: int = 10  # log metrics every this many steps (and on the last step)
    console: bool = True  # one line per logging step on the logging rank
    progress: bool = True  # a progress bar with ETA on the logging rank, when stderr is a terminal
    jsonl: bool = True  # run_dir/metrics.jsonl, one JSON object per logging step
    tensorboard: bool = True  # run_dir/tensorboard
    wandb: WandbConfig = field(default_factory=WandbConfig)
    peak_tflops: float | None = None  # the accelerator's dense peak for MFU; null: detected for known GPUs
    sample_ids: bool = False  # run_dir/samples/rank-R.jsonl: the global sample indices each rank trained on per step
    memory_breakdown: bool = False  # track one step's memory per rank by category (torch's MemTracker) and log it
    memory_breakdown_step: int = 3  # the step to track (1-based; the last step when the run is shorter); step 3 is steady: DDP rebuilds its buckets in step 2


@dataclass
class ProfileConfig:
    steps: list[int] = field(default_factory=list)  # [start, end]: trace steps start..end (1-based) with torch.profiler
    memory_snapshot: bool = False  # CUDA: record allocator history over those steps (and dump it on an OOM)
    dir: str | None = None  # null: run_dir/profile
    nvtx: bool = False  # CUDA: NVTX ranges around data, forward, backward, optimizer step, log sync and checkpoint saves (Nsight Systems)


@dataclass
class HardwareConfig:
    world_size: int | None = None  # the ranks this recipe is written for: launch/plan.py's default world_size (null: 8)
    gpu_memory_gib: float | None = None  # the device memory it is sized for: launch/plan.py's default gpu_memory_gib (null: no verdict)


@dataclass
class Config:
    name: str = ""  # the run's name; empty: the recipe's name
    run_dir: str = "runs/${name}"  # everything the run writes lands here
    dry_run: bool = False  # print the resolved config and the derived numbers, then exit
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    numerics: NumericsConfig = field(default_factory=NumericsConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)  # what the recipe is sized for (launch/plan.py)


# ----------------------------------------------------------------------------------------------
# --help: the schema above, with its comments


def _comments(cls) -> dict[str, str]:
    """{field or member name: the comment written beside it (and on the comment lines right below)}."""
    import inspect
    import re

    out, last = {}, None
    for line in inspect.getsource(cls).splitlines()[1:]:
        m = re.match(r"^    (\w+)\s*(?::[^=#]*)?=[^#]*?(?:#\s?(.*))?$", line)
        if m and not line.lstrip().startswith("#"):
            last = m.group(1)
            out[last] = (m.group(2) or "").strip()
        elif last and re.match(r"^\s*#\s{2,}", line):  # a continuation, indented under the comment above
            out[last] = (out[last] + " " + line.strip().lstrip("#").strip()).strip()
        else:
            last = None
    return out


def help_text(section: str | None = None) -> str:
    """Every key of the schema (or of one section) with its type, default and comment."""
    import dataclasses
    import typing

    top = {f.name: f for f in dataclasses.fields(Config)}
    nested = [n for n, f in top.items() if f.default_factory is not dataclasses.MISSING]
    if section is not None and section not in top:
        close = difflib.get_close_matches(section, list(top), n=1)
        raise ConfigError(f"--help {section}: no such section{f'; did you mean {close[0]}?' if close else ''} "
                          f"Sections: {', '.join(nested)}")
    lines: list[str] = []

    def walk(cls, prefix: str, default_obj) -> None:
        hints = typing.get_type_hints(cls)
        comments = _comments(cls)
        for f in dataclasses.fields(cls):
            value = getattr(default_obj, f.name)
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.", value)
                continue
            choices = []
            if isinstance(tp, type) and issubclass(tp, StrEnum):
                member_notes = _comments(tp)
                choices = [f"      {m.value:<10} {member_notes.get(m.name, '')}".rstrip() for m in tp]
                type_name = " | ".join(m.value for m in tp)
            else:
                type_name = str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")
            shown = json.dumps(value.value if isinstance(value, StrEnum) else value)
            lines.append(f"  {prefix}{f.name}  ({type_name}, default {shown})")
            if comments.get(f.name):
                lines.append(f"      {comments[f.name]}")
            lines.extend(choices)

    default = Config()
    for name in ([section] if section else list(top)):
        if name in nested:
            lines.append(f"{name}:")
            walk(typing.get_type_hints(Config)[name], f"{name}.", getattr(default, name))
        else:
            tp = typing.get_type_hints(Config)[name]
            lines.append(f"  {name}  ({getattr(tp, '__name__', tp)}, default {json.dumps(getattr(default, name))})")
            if _comments(Config).get(name):
                lines.append(f"      {_comments(Config)[name]}")
    head = [usage(), "", "Keys (set any with key=value; `--help SECTION` shows one section):", ""]
    return "\n".join((head if section is None else []) + lines)


def usage() -> str:
    return (f"usage: python launch/train.py recipe=NAME [key=value ...]     (or under torchrun)\n"
            f"       python launch/train.py --help [SECTION]\n"
            f"recipes: {', '.join(list_recipes())}\n"
            f"example: python launch/train.py recipe=llama_debug training.steps=50 optim.lr=1e-3")


# ----------------------------------------------------------------------------------------------
# Recipes and overrides


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def _recipe_path(name: str) -> Path:
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"recipe={name}: no such file")
        return path
    path = RECIPE_DIR / f"{name}.yaml"
    if not path.is_file():
        known = list_recipes()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"recipe={name}: unknown recipe.{hint} Known recipes: {', '.join(known)}")
    return path


def _recipe_chain(name: str, seen: tuple[str, ...] = ()) -> list[dict]:
    """The recipe and its bases, base first. YAML is loaded safely: recipes hold data, never code."""
    path = _recipe_path(name)
    if str(path) in seen:
        raise ConfigError(f"recipe={name}: 'base' chain loops: {' -> '.join(seen + (str(path),))}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"recipe {path}: not valid YAML{at}: {what}; fix the file (recipes are YAML mappings of "
                          f"the keys `--help` lists)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path}: expected a mapping at the top level, got {type(data).__name__}")
    base = data.pop("base", None)
    chain = _recipe_chain(str(base), seen + (str(path),)) if base else []
    return chain + [data]


def _explain(err: OmegaConfBaseException, source: str) -> str:
    key = getattr(err, "full_key", None) or "?"
    first = str(err).splitlines()[0]
    if isinstance(err, ConfigKeyError):
        return f"{source}: unknown key '{key}'. {first.split('. ', 1)[-1] if 'Did you mean' in first else ''}".rstrip()
    if isinstance(err, ValidationError):
        return f"{source}: {key}: {first}"
    return f"{source}: {first}"


def load_config(argv: list[str]) -> DictConfig:
    """`['recipe=NAME', 'a.b=c', ...]` -> a typed, merged config. Raises ConfigError on any typo."""
    recipe = "llama_debug"
    overrides: list[str] = []
    for tok in argv:
        if "=" not in tok:
            raise ConfigError(f"'{tok}': expected key=value (for example recipe=llama_debug or optim.lr=1e-3)")
        if tok.startswith("recipe="):
            recipe = tok.split("=", 1)[1]
        else:
            overrides.append(tok)
    cfg = OmegaConf.structured(Config)
    for layer in _recipe_chain(recipe):
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as e:
            raise ConfigError(_explain(e, f"recipe {recipe}")) from None
    problems = []
    for tok in overrides:  # one at a time, so that every bad token is reported and named
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([tok]))
        except OmegaConfBaseException as e:
            problems.append(_explain(e, f"override '{tok}'"))
    if problems:
        raise ConfigError(problems)
    if not cfg.name:
        cfg.name = Path(recipe).stem
    return cfg


def to_container(cfg: DictConfig) -> dict:
    """A plain dict with interpolations resolved and enums as strings (for JSON, W&B and YAML)."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def save_resolved(cfg: DictConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(to_container(cfg), sort_keys=False))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Derived numbers and validation


def model_args_of(cfg: DictConfig):
    """The model shape: the flavor with the recipe's changes applied (models/llama.py args_from_config)."""
    from models.llama import args_from_config

    try:
        return args_from_config(cfg.model)
    except ValueError as e:
        raise ConfigError(str(e)) from None


@dataclass(frozen=True)
class Plan:
    """Numbers derived from the config and the world size; never configured by hand."""

    world_size: int
    dp_size: int  # data-parallel ranks: each sees global_batch_size / dp_size sequences per step
    micro_batch_size: int
    accum_steps: int  # micro-batches per rank per optimizer step
    tokens_per_step: int  # global_batch_size x seq_len
    params: int
    non_embedding_params: int
    flops_per_token: int
    dims: object = None  # parallel.plan.ParallelDims
    memory: object = None  # parallel.plan.MemoryPlan: every term of every rank's memory at the step's peak
    optimizer: str = "adamw"
    strategy: str = "none"

    def describe(self) -> str:
        from parallel.plan import degenerate

        g = self.micro_batch_size * self.accum_steps * self.dp_size
        state = ["", "predicted memory per rank (parallel/plan.py; measured: logging.memory_breakdown=true)",
                 self.memory.table()] if self.memory is not None else []
        return "\n".join([
            f"world size            {self.world_size}",
            f"layout                dp_replicate {self.dims.dp_replicate} x dp_shard {self.dims.dp_shard} x "
            f"tp {self.dims.tp} x pp {self.dims.pp}",
            f"data-parallel ranks   {self.dp_size}",
            f"global batch          {g} sequences = micro-batch {self.micro_batch_size} x accumulation "
            f"{self.accum_steps} x dp {self.dp_size}",
            f"tokens per step       {self.tokens_per_step:,}",
            f"parameters            {self.params:,} ({self.params / 1e9:.3f} B)",
            f"  without embedding   {self.non_embedding_params:,}",
            f"FLOPs per token       {self.flops_per_token:,} ({self.flops_per_token / 1e9:.2f} GFLOP)",
            f"FLOPs per step        {self.flops_per_token * self.tokens_per_step:.3e}",
            *(f"warning               {w}" for w in degenerate(self.strategy, self.dims)),
            *state,
        ])


def banner(cfg: DictConfig, plan: Plan, args) -> list[str]:
    """The start-up lines: what this run is, as resolved (the layout the world size produced included)."""
    from parallel.plan import degenerate

    gib = 2**30
    lines = [
        f"model {cfg.model.name} {cfg.model.flavor}: {plan.params:,} parameters ({plan.params / 1e6:.2f} M); "
        f"strategy {cfg.parallel.data}; precision {cfg.training.precision}; world {plan.world_size}; "
        f"optimizer {cfg.optim.name}",
        f"layout {plan.dims.describe()}; global batch {cfg.training.global_batch_size} = micro-batch "
        f"{plan.micro_batch_size} x accumulation {plan.accum_steps} x dp {plan.dp_size}; AC {cfg.parallel.ac}",
    ]
    if plan.memory is not None:
        top = plan.memory.most_loaded
        cats = ", ".join(f"{k} {v / gib:.3f}" for k, v in top.by_category().items() if v)
        lines.append(f"predicted peak per rank (most loaded): {top.peak_bytes / gib:.3f} GiB of tensors at the "
                     f"{top.phase} ({cats} GiB)" + (f"; {plan.memory.host_bytes_per_node / gib:.2f} GiB host memory "
                                                    f"per node" if top.host_bytes else ""))
    lines += [f"WARNING: {w}" for w in degenerate(str(cfg.parallel.data), plan.dims)]
    return lines


def parallel_dims(cfg: DictConfig, world_size: int):
    """(ParallelDims or None, problems) for the recipe's layout on `world_size` ranks."""
    from parallel.plan import resolve_dims

    p = cfg.parallel
    return resolve_dims(str(p.data), dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, tp=p.tp, pp=p.pp, cp=p.cp,
                        world_size=world_size)


def pp_stages(cfg: DictConfig) -> int:
    """Pipeline stages in all: pp ranks x stages per rank (2 for looped and V schedules)."""
    return n_stages(cfg.parallel.pp_schedule, cfg.parallel.pp)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def derive(cfg: DictConfig, world_size: int, *, capacity_gib: float | None = None, device: str | None = None,
           ranks_per_node: int = 8) -> Plan:
    args = model_args_of(cfg)
    t = cfg.training
    dims, problems = parallel_dims(cfg, world_size)
    if problems:
        raise ConfigError(problems)
    from parallel.plan import memory_plan

    dp = dims.dp_size
    if device is None:
        device = "cuda" if t.device == "cuda" or (t.device == "auto" and _cuda_available()) else "cpu"
    return Plan(world_size=world_size, dp_size=dp, micro_batch_size=t.micro_batch_size,
                accum_steps=t.global_batch_size // (t.micro_batch_size * dp), tokens_per_step=t.global_batch_size * t.seq_len,
                params=args.num_params(), non_embedding_params=args.num_params(exclude_embedding=True),
                flops_per_token=args.flops_per_token(t.seq_len), dims=dims,
                memory=memory_plan(cfg, args, dims, device=device, capacity_gib=capacity_gib,
                                   ranks_per_node=ranks_per_node),
                optimizer=str(cfg.optim.name), strategy=str(cfg.parallel.data))


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # e.g. blocked with sys.modules[module] = None
        return False


def _writable_dir(path: Path) -> bool:
    """Whether `path` exists as a writable directory or could be created. Tried for real (a temporary
    directory made and removed at once): permission bits say yes to root even under /proc."""
    import tempfile

    p = path.expanduser().absolute()
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        return False
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".shardwise-probe-", dir=p))
    except OSError:
        return False
    return True


def validate(cfg: DictConfig, world_size: int) -> list[str]:
    """Every violation at once, each naming the settings and showing the arithmetic. [] means runnable.
    Each subsystem states its own rules; this collects them (the training and logging sections are here)."""
    from models.llama import config_problems as model_problems
    from optim import config_problems as optim_problems
    from parallel.float8 import config_problems as float8_problems
    from parallel.plan import layout_problems
    from parallel.zero import config_problems as zero_problems
    from trainer.checkpoint import config_problems as checkpoint_problems
    from trainer.data import config_problems as data_problems
    from trainer.profiling import config_problems as profile_problems

    t = cfg.training
    try:
        args = model_args_of(cfg)
    except ConfigError as e:
        return e.problems
    problems = model_problems(args, cfg.model.name)
    # training lengths and batch arithmetic
    for key in ("steps", "seq_len", "global_batch_size", "micro_batch_size", "val_batches"):
        if t[key] < 1:
            problems.append(f"training.{key}={t[key]} must be >= 1")
    if t.val_every < 0:
        problems.append(f"training.val_every={t.val_every} must be >= 0 (0 validates only at the last step)")
    if t.seq_len > args.max_seq_len:
        problems.append(f"training.seq_len({t.seq_len}) exceeds model.max_seq_len({args.max_seq_len}); "
                        f"raise model.max_seq_len or shorten the sequences")
    if t.device not in ("auto", "cpu", "cuda"):
        problems.append(f"training.device={t.device} must be one of auto, cpu, cuda")
    if t.loss_chunks < 0:
        problems.append(f"training.loss_chunks={t.loss_chunks} must be >= 0 (0: the loss over whole logits)")
    elif t.loss_chunks > t.micro_batch_size * t.seq_len >= 1:
        problems.append(f"training.loss_chunks({t.loss_chunks}) exceeds the tokens of a micro-batch "
                        f"(training.micro_batch_size({t.micro_batch_size}) x training.seq_len({t.seq_len}) = "
                        f"{t.micro_batch_size * t.seq_len}); use at most that many")
    if not t.master_weights:
        p = cfg.parallel
        if str(t.precision) != "bf16":
            problems.append(f"training.master_weights=false with training.precision={t.precision}: parameters "
                            f"without fp32 masters are stored in bf16; set training.precision=bf16")
        if cfg.optim.name not in ("adamw_bf16", "adamw8bit"):
            problems.append(f"training.master_weights=false with optim.name={cfg.optim.name}: a bf16 parameter "
                            f"needs its update written back with stochastic rounding (rounding to nearest drops "
                            f"updates under half a bf16 ulp), which adamw_bf16 and adamw8bit do; set "
                            f"optim.name=adamw_bf16 or adamw8bit")
        if str(p.data) not in ("none", "fsdp", "hsdp") or p.tp > 1 or p.pp > 1:
            problems.append(f"training.master_weights=false with parallel.data={p.data}, tp={p.tp}, pp={p.pp}: built "
                            f"for one process, fsdp and hsdp (DeepSpeed keeps its own fp32 partitions); use one "
                            f"of those with tp=1, pp=1, or training.master_weights=true")
    if t.loss_chunks and cfg.parallel.pp > 1:
        problems.append(f"training.loss_chunks={t.loss_chunks} with parallel.pp={cfg.parallel.pp}: the last pipeline "
                        f"stage computes its loss outside the stage module (torch's schedule), where the output "
                        f"projection's weight is not gathered; set training.loss_chunks=0 under pipelining")
    import torch

    on_cpu = t.device == "cpu" or (t.device == "auto" and not torch.cuda.is_available())
    if t.device == "cuda" and not torch.cuda.is_available():
        problems.append(f"training.device=cuda, but this machine has no CUDA device this torch can use (torch "
                        f"{torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); use training.device=auto "
                        f"or cpu")
    # what only a GPU has, refused where the run would be on the CPU (a dry run, launch/plan.py among them, may plan
    # a GPU run from a machine without one)
    runs_on_cpu = t.device == "cpu" or (on_cpu and not cfg.dry_run)
    if args.attention in ("cudnn", "efficient") and runs_on_cpu:
        problems.append(f"model.attention={args.attention} is a CUDA kernel and this run is on the CPU; use "
                        f"model.attention=auto or flash there")
    if args.attention != "auto" and cfg.parallel.cp > 1:
        problems.append(f"model.attention={args.attention} with parallel.cp={cfg.parallel.cp}: context parallelism "
                        f"calls its own attention kernels (parallel/context.py); leave model.attention=auto")
    problems += float8_problems(cfg, runs_on_cpu=runs_on_cpu)
    problems += layout_problems(cfg, args, world_size)
    problems += zero_problems(cfg, on_cpu=on_cpu)
    problems += optim_problems(cfg, args)
    problems += data_problems(cfg, args)
    problems += checkpoint_problems(cfg)
    problems += profile_problems(cfg, runs_on_cpu=runs_on_cpu)

    # logging and output
    if cfg.logging.every < 1:
        problems.append(f"logging.every={cfg.logging.every} must be >= 1")
    if cfg.logging.memory_breakdown_step < 1:
        problems.append(f"logging.memory_breakdown_step={cfg.logging.memory_breakdown_step} must be >= 1")
    hw = cfg.hardware
    if hw.world_size is not None and hw.world_size < 1:
        problems.append(f"hardware.world_size={hw.world_size} must be >= 1 (or null)")
    if hw.gpu_memory_gib is not None and hw.gpu_memory_gib <= 0:
        problems.append(f"hardware.gpu_memory_gib={hw.gpu_memory_gib} must be > 0 (or null)")
    if cfg.logging.peak_tflops is not None and cfg.logging.peak_tflops <= 0:
        problems.append(f"logging.peak_tflops={cfg.logging.peak_tflops} must be > 0 (or null to detect it)")
    if not cfg.dry_run and not _writable_dir(Path(cfg.run_dir)):
        problems.append(f"run_dir={cfg.run_dir}: cannot create or write there; choose another run_dir")
    return problems


def check(cfg: DictConfig, world_size: int) -> Plan:
    """Raise ConfigError with every problem, or return the derived plan."""
    problems = validate(cfg, world_size)
    if problems:
        raise ConfigError(problems)
    return derive(cfg, world_size)


def to_yaml(cfg: DictConfig) -> str:
    return yaml.safe_dump(to_container(cfg), sort_keys=False)


__all__ = ["Config", "ConfigError", "Plan", "load_config", "validate", "check", "derive", "list_recipes",
           "save_resolved", "to_container", "to_yaml", "model_args_of", "parallel_dims", "pp_stages", "Precision",
           "DataSource", "Schedule", "DataParallel", "ACMode", "Offload", "WandbMode", "PP_SCHEDULES", "banner",
           "DamagedPolicy"]
