"""The step above the subsystems: a loaded config checked against every subsystem's rules at once, and the numbers
derived from it and the world size (accumulation steps, the layout, the memory plan), before any process group
starts. Each subsystem states its own rules next to its code (`config_problems`); this module gathers them, and
states the training and logging sections' own.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from models.adapters import config_problems as adapter_problems
from models.adapters import nf4_layout_problems
from models.args import ConfigError, model_args_of
from models.llama import TP_SPLIT_DIM
from models.llama import config_problems as model_problems
from models.moe import config_problems as moe_problems
from optim import config_problems as optim_problems
from parallel.float8 import config_problems as float8_problems
from parallel.layout import config_dims, degenerate, layout_problems, n_stages
from parallel.plan import memory_plan
from parallel.zero import config_problems as zero_problems
from trainer.chat import config_problems as chat_problems
from trainer.checkpoint import config_problems as checkpoint_problems
from trainer.data import config_problems as data_problems
from trainer.profiling import config_problems as profile_problems


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
        g = self.micro_batch_size * self.accum_steps * self.dp_size
        state = (
            [
                "",
                "predicted memory per rank (parallel/plan.py; measured: logging.memory_breakdown=true)",
                self.memory.table(),
            ]
            if self.memory is not None
            else []
        )
        return "\n".join(
            [
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
            ]
        )


def banner(cfg: DictConfig, plan: Plan, args) -> list[str]:
    """The start-up lines: what this run is, as resolved (the layout the world size produced included)."""
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
        lines.append(
            f"predicted peak per rank (most loaded): {top.peak_bytes / gib:.3f} GiB of tensors at the "
            f"{top.phase} ({cats} GiB)"
            + (f"; {plan.memory.host_bytes_per_node / gib:.2f} GiB host memory per node" if top.host_bytes else "")
        )
    lines += [f"WARNING: {w}" for w in degenerate(str(cfg.parallel.data), plan.dims)]
    return lines


def parallel_dims(cfg: DictConfig, world_size: int):
    """(ParallelDims or None, problems) for the recipe's layout on `world_size` ranks."""
    return config_dims(cfg, world_size)


def pp_stages(cfg: DictConfig) -> int:
    """Pipeline stages in all: pp ranks x stages per rank (2 for looped and V schedules)."""
    return n_stages(cfg.parallel.pp_schedule, cfg.parallel.pp)


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def derive(
    cfg: DictConfig,
    world_size: int,
    *,
    capacity_gib: float | None = None,
    device: str | None = None,
    ranks_per_node: int = 8,
    expert_routing: str | float | None = None,
) -> Plan:
    args = model_args_of(cfg)
    t = cfg.training
    dims, problems = parallel_dims(cfg, world_size)
    if problems:
        raise ConfigError(problems)
    dp = dims.dp_size
    if device is None:
        device = "cuda" if t.device == "cuda" or (t.device == "auto" and _cuda_available()) else "cpu"
    return Plan(
        world_size=world_size,
        dp_size=dp,
        micro_batch_size=t.micro_batch_size,
        accum_steps=t.global_batch_size // (t.micro_batch_size * dp),
        tokens_per_step=t.global_batch_size * t.seq_len,
        params=args.num_params(),
        non_embedding_params=args.num_params(exclude_embedding=True),
        flops_per_token=args.flops_per_token(t.seq_len),
        dims=dims,
        memory=memory_plan(
            cfg,
            args,
            dims,
            device=device,
            capacity_gib=capacity_gib,
            ranks_per_node=ranks_per_node,
            expert_routing=expert_routing,
        ),
        optimizer=str(cfg.optim.name),
        strategy=str(cfg.parallel.data),
    )


def _writable_dir(path: Path) -> bool:
    """Whether `path` exists as a writable directory or could be created. Tried for real (a temporary
    directory made and removed at once): permission bits say yes to root even under /proc."""
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
    Each subsystem states its own rules; this collects them (the training, device and logging sections are here)."""
    try:
        args = model_args_of(cfg)
    except ConfigError as e:
        return e.problems
    t = cfg.training
    on_cpu = t.device == "cpu" or (t.device == "auto" and not torch.cuda.is_available())
    # what only a GPU has, refused where the run would be on the CPU (a dry run, launch/plan.py among them, may plan
    # a GPU run from a machine without one)
    runs_on_cpu = t.device == "cpu" or (on_cpu and not cfg.dry_run)
    problems = model_problems(args, cfg.model.name)
    problems += moe_problems(cfg, args.moe, args.n_layers)
    problems += _training_problems(cfg, args)
    problems += _device_problems(cfg, args, runs_on_cpu=runs_on_cpu)
    problems += float8_problems(cfg, runs_on_cpu=runs_on_cpu)
    problems += layout_problems(cfg, args, world_size)
    problems += zero_problems(cfg, on_cpu=on_cpu)
    problems += optim_problems(cfg, args)
    problems += data_problems(cfg, args)
    if str(cfg.data.source) == "chat":
        problems += chat_problems(cfg)
    problems += checkpoint_problems(cfg)
    problems += profile_problems(cfg, runs_on_cpu=runs_on_cpu)
    problems += _logging_problems(cfg)
    problems += adapter_problems(cfg)
    if not problems and cfg.finetune.quantize_base:  # (the layout is valid: its FSDP split is known)
        dims, _ = parallel_dims(cfg, world_size)
        problems += nf4_layout_problems(cfg, args, dims, TP_SPLIT_DIM)
    return problems


def _training_problems(cfg: DictConfig, args) -> list[str]:
    """The training section: lengths, the loss in chunks, parameters without fp32 masters."""
    t = cfg.training
    problems = []
    for key in ("steps", "seq_len", "global_batch_size", "micro_batch_size", "val_batches"):
        if t[key] < 1:
            problems.append(f"training.{key}={t[key]} must be >= 1")
    if t.val_every < 0:
        problems.append(f"training.val_every={t.val_every} must be >= 0 (0 validates only at the last step)")
    if t.samples_every < 0 or t.sample_prompts < 1 or t.sample_tokens < 1:
        problems.append(
            f"training.samples_every={t.samples_every}, training.sample_prompts={t.sample_prompts}, "
            f"training.sample_tokens={t.sample_tokens}: samples_every must be >= 0 (0: none), the others >= 1"
        )
    elif t.samples_every:
        p = cfg.parallel
        if t.sample_tokens >= t.seq_len:
            problems.append(
                f"training.sample_tokens({t.sample_tokens}) must be < training.seq_len({t.seq_len}): a prompt and its "
                "completion fit one sequence"
            )
        if str(cfg.data.source) != "chat":
            problems.append(
                f"training.samples_every={t.samples_every} with data.source={cfg.data.source}: the prompts are "
                "held-out conversations' first turns; use data.source=chat, or training.samples_every=0"
            )
        for key, value in (("parallel.pp", p.pp), ("parallel.cp", p.cp)):
            if value > 1:
                problems.append(
                    f"training.samples_every={t.samples_every} with {key}={value}: greedy decoding runs the whole "
                    f"model on every rank (not built through a pipeline or over sequence shards); set {key}=1 or "
                    "training.samples_every=0"
                )
    if t.seq_len > args.max_seq_len:
        problems.append(
            f"training.seq_len({t.seq_len}) exceeds model.max_seq_len({args.max_seq_len}); "
            f"raise model.max_seq_len or shorten the sequences"
        )
    if t.device not in ("auto", "cpu", "cuda"):
        problems.append(f"training.device={t.device} must be one of auto, cpu, cuda")
    if t.loss_chunks < 0:
        problems.append(f"training.loss_chunks={t.loss_chunks} must be >= 0 (0: the loss over whole logits)")
    elif t.loss_chunks > t.micro_batch_size * t.seq_len >= 1:
        problems.append(
            f"training.loss_chunks({t.loss_chunks}) exceeds the tokens of a micro-batch "
            f"(training.micro_batch_size({t.micro_batch_size}) x training.seq_len({t.seq_len}) = "
            f"{t.micro_batch_size * t.seq_len}); use at most that many"
        )
    if not t.master_weights:
        p = cfg.parallel
        if str(t.precision) != "bf16":
            problems.append(
                f"training.master_weights=false with training.precision={t.precision}: parameters "
                f"without fp32 masters are stored in bf16; set training.precision=bf16"
            )
        if cfg.optim.name not in ("adamw_bf16", "adamw8bit"):
            problems.append(
                f"training.master_weights=false with optim.name={cfg.optim.name}: a bf16 parameter "
                f"needs its update written back with stochastic rounding (rounding to nearest drops "
                f"updates under half a bf16 ulp), which adamw_bf16 and adamw8bit do; set "
                f"optim.name=adamw_bf16 or adamw8bit"
            )
        if str(p.data) not in ("none", "fsdp", "hsdp") or p.tp > 1 or p.pp > 1:
            problems.append(
                f"training.master_weights=false with parallel.data={p.data}, tp={p.tp}, pp={p.pp}: built "
                f"for one process, fsdp and hsdp (DeepSpeed keeps its own fp32 partitions); use one "
                f"of those with tp=1, pp=1, or training.master_weights=true"
            )
    if t.loss_chunks and cfg.parallel.pp > 1:
        problems.append(
            f"training.loss_chunks={t.loss_chunks} with parallel.pp={cfg.parallel.pp}: the last pipeline "
            f"stage computes its loss outside the stage module (torch's schedule), where the output "
            f"projection's weight is not gathered; set training.loss_chunks=0 under pipelining"
        )
    return problems


def _device_problems(cfg: DictConfig, args, *, runs_on_cpu: bool) -> list[str]:
    """The device asked for exists here, and the attention kernel named runs on it."""
    t = cfg.training
    problems = []
    if t.device == "cuda" and not torch.cuda.is_available():
        problems.append(
            f"training.device=cuda, but this machine has no CUDA device this torch can use (torch "
            f"{torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); use training.device=auto "
            f"or cpu"
        )
    if args.attention in ("cudnn", "efficient") and runs_on_cpu:
        problems.append(
            f"model.attention={args.attention} is a CUDA kernel and this run is on the CPU; use "
            f"model.attention=auto or flash there"
        )
    if t.deterministic and args.attention == "cudnn":
        problems.append(
            "model.attention=cudnn with training.deterministic=true: torch's deterministic mode excludes the cuDNN "
            "attention kernel; use model.attention=flash, efficient or auto"
        )
    if args.attention != "auto" and cfg.parallel.cp > 1:
        problems.append(
            f"model.attention={args.attention} with parallel.cp={cfg.parallel.cp}: context parallelism "
            f"calls its own attention kernels (parallel/context.py); leave model.attention=auto"
        )
    return problems


def _wandb_host() -> str:
    from urllib.parse import urlparse

    return urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"


def _wandb_key() -> bool:
    """Whether W&B has an API key here: WANDB_API_KEY, or the ~/.netrc entry `wandb login` writes (read, not sent)."""
    import netrc

    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(os.environ.get("NETRC") or None).authenticators(_wandb_host()) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _logging_problems(cfg: DictConfig) -> list[str]:
    """The logging and hardware sections, and the run directory (writable, unless this is a dry run)."""
    problems = []
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
    if cfg.logging.wandb.mode == "online" and not cfg.dry_run and not _wandb_key():
        host = _wandb_host()
        problems.append(
            f"logging.wandb.mode=online: no W&B API key here (WANDB_API_KEY is unset and ~/.netrc has no {host} "
            f"entry); run `wandb login` or set WANDB_API_KEY, or log offline (logging.wandb.mode=offline) and "
            f"`wandb sync` the run later"
        )
    if not cfg.dry_run and not _writable_dir(Path(cfg.run_dir)):
        problems.append(f"run_dir={cfg.run_dir}: cannot create or write there; choose another run_dir")
    return problems


def check(cfg: DictConfig, world_size: int) -> Plan:
    """Raise ConfigError with every problem, or return the derived plan."""
    problems = validate(cfg, world_size)
    if problems:
        raise ConfigError(problems)
    return derive(cfg, world_size)
