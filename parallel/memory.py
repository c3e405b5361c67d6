"""What one rank actually holds: bytes of parameters, gradients and optimizer state in its local shards."""

from __future__ import annotations

import math

import torch

from parallel.dtensor import nbytes


def model_state_bytes(parts, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """{'params', 'grads', 'optim'} bytes this rank stores (DTensors count their local shard only;
    a tied parameter counts once; the optimizer's scalar step counters are left out)."""
    params = {id(p): p for part in parts for p in part.parameters()}.values()
    out = {"params": sum(nbytes(p) for p in params), "grads": sum(nbytes(p.grad) for p in params), "optim": 0}
    if optimizer is not None:
        for state in optimizer.state.values():
            for key, v in state.items():
                if torch.is_tensor(v) and key != "step":
                    out["optim"] += nbytes(v)
    return out


# ------------------------------------------------------------------------------------------------
# Prediction: the same quantities from the config alone, before any process group or allocation.

def tp_split_dims(model) -> dict[str, int]:
    """{module name: the weight dim tensor parallelism splits}, read from the model's own TP plan.

    Column-wise styles split a Linear's output features (dim 0); row-wise styles split a Linear's input
    features (dim 1) and an Embedding's vocabulary (dim 0). Modules the plan does not split (norms run
    sequence-parallel on replicated weights) are absent.
    """
    from torch import nn
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    root, block = model.tp_plan(loss_parallel=False)
    plans = [(name, style) for name, style in root.items()]
    plans += [(f"layers.{i}.{name}", style) for i in model.layers for name, style in block.items()]
    out = {}
    for name, style in plans:
        if isinstance(style, ColwiseParallel):
            out[name] = 0
        elif isinstance(style, RowwiseParallel):
            out[name] = 0 if isinstance(model.get_submodule(name), nn.Embedding) else 1
    return out


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def optimizer_state_bytes(name: str, shape: tuple[int, ...], *, adafactor_beta1: bool = False) -> int:
    """Bytes of optimizer state for one (local) tensor of this shape, as each optimizer allocates it."""
    n = math.prod(shape)
    if name == "adamw":
        return 8 * n
    if name == "adamw_bf16":
        return 4 * n
    if name == "adamw8bit":  # torchao: int8 codes + an fp32 scale per 256 values + two 256-entry code maps
        if n >= 4096 and n % 256 == 0:
            return 2 * (n + 4 * (n // 256) + 4 * 256)
        return 8 * n
    if name == "adafactor":
        factored = 4 * (shape[-2] + shape[-1]) if len(shape) >= 2 else 4 * n
        return factored + (4 * n if adafactor_beta1 else 0)
    raise ValueError(f"optim.name={name}: no state model")


def predict_model_state(cfg, world_size: int) -> list[dict[str, int]]:
    """Bytes of parameters, gradients, optimizer state (and, under ZeRO, the fp32 master partition) on
    each rank, predicted from the config: fp32 master parameters and gradients (bf16/fp16 compute
    copies are transient), each parameter's local shard as the strategy cuts it (TP per the model's
    plan, FSDP on dim 0 rounded up, pipeline stages per the schedule's split). Equal to what
    `model_state_bytes` measures for the native strategies (tests/distributed/test_memory_per_rank.py).
    """
    from models.llama import build_model, canonical_name
    from parallel.pipeline import split_model
    from trainer.config import model_args_of, parallel_dims

    dims, problems = parallel_dims(cfg, world_size)
    if problems:
        raise ValueError("; ".join(problems))
    p, o = cfg.parallel, cfg.optim
    model = build_model(model_args_of(cfg), device="meta")
    split = tp_split_dims(model) if dims.tp > 1 else {}
    data = str(p.data)
    by_stage = []  # every rank of a pipeline stage holds the same amounts (shards rounded up)
    for pp_rank in range(dims.pp):
        parts = [m for _, m in split_model(model, str(p.pp_schedule), pp_rank, dims.pp)] if dims.pp > 1 else [model]
        seen, shapes = set(), []
        for part in parts:
            for name, prm in part.named_parameters():
                name = canonical_name(name)
                if name in seen:
                    continue
                seen.add(name)
                shape = list(prm.shape)
                if (d := split.get(name.rsplit(".", 1)[0])) is not None:  # "layers.3.attention.wq"
                    shape[d] = _ceil(shape[d], dims.tp)
                if data in ("fsdp", "hsdp"):
                    shape[0] = _ceil(shape[0], dims.dp_shard)
                shapes.append(tuple(shape))
        numel = sum(math.prod(s) for s in shapes)
        if data.startswith("zero"):
            n_dp = dims.dp_size
            part_numel = _ceil(numel, n_dp)
            out = {"params": 4 * (part_numel if data == "zero3" else numel), "master": 4 * part_numel,
                   "grads": 4 * (numel if data == "zero1" else part_numel),
                   "optim": 8 * part_numel}  # AdamW's moments (the only optimizer allowed under ZeRO)
        else:
            out = {"params": 4 * numel, "grads": 4 * numel,
                   "optim": sum(optimizer_state_bytes(str(o.name), s, adafactor_beta1=o.adafactor.beta1 is not None)
                                for s in shapes)}
        by_stage.append(out)
    return [by_stage[rank // (world_size // dims.pp)] for rank in range(world_size)]
