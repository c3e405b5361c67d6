"""Optimizers and learning-rate schedules. `build_optimizer(parts, cfg)` is the one entry point."""

from __future__ import annotations

import difflib
import functools

import torch
from torch import nn

from optim.schedule import build_scheduler, lr_multiplier

# optim.name choices; bytes of state per parameter are measured in docs/optimizers.md
OPTIMIZERS = ("adamw", "adamw_bf16", "adamw8bit", "adafactor")


def param_groups(
    parts: list[nn.Module],
    *,
    lr: float,
    weight_decay: float,
    decay_embeddings: bool = False,
    lr_multipliers: list | None = None,
) -> list[dict]:
    """Optimizer groups by (decayed?, lr multiplier), in order of first appearance.

    Weight decay goes to the matrices of linear layers; never to norms and biases (1-D), and to embedding
    tables only with `decay_embeddings`. `lr_multipliers` is a list of {pattern, scale}: the first fnmatch
    pattern matching a parameter's name (`layers.3.attention.wq.weight`, the same in every layout) scales
    its learning rate; the schedule then scales every group alike.
    """
    from fnmatch import fnmatchcase

    from models.llama import canonical_name

    rules = [(m["pattern"], float(m["scale"])) for m in (lr_multipliers or [])]
    groups: dict[tuple[bool, float], list] = {}
    seen = set()
    for part in parts:
        embeddings = {id(m.weight) for m in part.modules() if isinstance(m, nn.Embedding)}
        for name, p in part.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            name = canonical_name(name)
            ndim = len(getattr(p, "ds_shape", p.shape))  # a ZeRO-3 partitioned parameter's own shape is (0,)
            decay = ndim >= 2 and (decay_embeddings or id(p) not in embeddings)
            scale = next((sc for pat, sc in rules if fnmatchcase(name, pat)), 1.0)
            groups.setdefault((decay, scale), []).append(p)
    return [
        {"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr": lr * scale}
        for (decay, scale), ps in groups.items()
    ]


def build_optimizer(parts: list[nn.Module], cfg, *, device_type: str) -> torch.optim.Optimizer:
    """The optimizer over the parameters of this rank's model parts (one, or its pipeline stages); with
    optim.in_backward, one per parameter behind optim/in_backward.py's wrapper, stepped during the backward."""
    o = cfg.optim
    groups = param_groups(
        parts,
        lr=o.lr,
        weight_decay=o.weight_decay,
        decay_embeddings=o.decay_embeddings,
        lr_multipliers=o.lr_multipliers,
    )
    make = functools.partial(_optimizer, cfg, device_type=device_type)
    if o.in_backward:
        from optim.in_backward import InBackward

        return InBackward(groups, make)
    return make(groups)


def _optimizer(cfg, groups: list[dict], *, device_type: str) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "adafactor":
        from optim.adafactor import Adafactor

        a = o.adafactor
        return Adafactor(
            groups,
            lr=o.lr,
            beta2_decay=a.beta2_decay,
            eps=(a.eps1, a.eps2),
            d=a.d,
            relative_step=a.relative_step,
            scale_parameter=a.scale_parameter,
            beta1=a.beta1,
        )
    if o.name == "adamw_bf16":
        from optim.adamw_bf16 import AdamWBF16

        return AdamWBF16(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, seed=cfg.training.seed)
    if o.name == "adamw8bit":
        # torchao's block-wise 8-bit AdamW (optional extra `lowbit`): each state is int8 codes plus one scale
        # per 256 values; tensors under 4096 values (norms) keep fp32 states. Each parameter's update is a
        # torch.compile'd kernel (compiled once per shape). It keeps lr as a tensor, which LambdaLR fills.
        from torchao.optim import AdamW8bit

        return AdamW8bit(
            groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, bf16_stochastic_round=not cfg.training.master_weights
        )  # (bf16 parameters)
    if o.name != "adamw":
        raise ValueError(f"optim.name={o.name}: unknown optimizer; known: {', '.join(OPTIMIZERS)}")
    if str(cfg.parallel.data).startswith("zero") and str(cfg.parallel.offload) == "cpu":
        # ZeRO-Offload steps on the CPU with DeepSpeed's vectorized Adam (AdamW mode: decoupled decay);
        # its C++ op is compiled on first use
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, adamw_mode=True)
    # FSDP's CPU offload keeps the shards and their gradients on the host: the step runs there (foreach)
    on_host = str(cfg.parallel.data) in ("fsdp", "hsdp") and str(cfg.parallel.offload) == "cpu"
    fused = (device_type == "cuda" and not on_host) if o.fused is None else bool(o.fused)
    return torch.optim.AdamW(
        groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused or None, foreach=None if fused else True
    )


__all__ = ["OPTIMIZERS", "build_optimizer", "build_scheduler", "lr_multiplier", "param_groups"]


def config_problems(cfg, args) -> list[str]:
    """The optim section's rules (trainer/validate.py::validate collects every subsystem's)."""
    from models.args import installed

    o, t = cfg.optim, cfg.training
    problems: list[str] = []
    if o.name not in OPTIMIZERS:
        close = difflib.get_close_matches(o.name, OPTIMIZERS, n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        problems.append(f"optim.name={o.name}: unknown optimizer.{hint} Known: {', '.join(OPTIMIZERS)}")
    if o.name == "adamw8bit":
        if not installed("torchao"):
            problems.append("optim.name=adamw8bit needs torchao, which is not installed: pip install -e '.[lowbit]'")
    if o.name == "adafactor":
        a = o.adafactor
        if a.beta2_decay > 0:
            problems.append(f"optim.adafactor.beta2_decay={a.beta2_decay} must be <= 0")
        if a.d < 1:
            problems.append(f"optim.adafactor.d={a.d} must be >= 1")
        if a.beta1 is not None and not 0 <= a.beta1 < 1:
            problems.append(f"optim.adafactor.beta1={a.beta1} must be in [0, 1) or null")
    if not o.lr > 0:
        problems.append(f"optim.lr={o.lr} must be > 0")
    if o.lr_multipliers:
        from fnmatch import fnmatchcase

        from models.llama import build_model, canonical_name

        names = [canonical_name(n) for n, _ in build_model(args, device="meta").named_parameters()]
        for rule in o.lr_multipliers:
            if not rule.scale > 0:
                problems.append(f"optim.lr_multipliers: scale {rule.scale} for '{rule.pattern}' must be > 0")
            if not any(fnmatchcase(n, rule.pattern) for n in names):
                problems.append(
                    f"optim.lr_multipliers: pattern '{rule.pattern}' matches no parameter; names look "
                    f"like {names[1]} or {names[0]}"
                )
    if o.weight_decay < 0:
        problems.append(f"optim.weight_decay={o.weight_decay} must be >= 0")
    for key in ("beta1", "beta2"):
        if not 0 <= o[key] < 1:
            problems.append(f"optim.{key}={o[key]} must be in [0, 1)")
    if o.eps <= 0:
        problems.append(f"optim.eps={o.eps} must be > 0")
    if o.warmup_steps < 0 or o.warmup_steps > t.steps:
        problems.append(
            f"optim.warmup_steps({o.warmup_steps}) must be in [0, training.steps({t.steps})]: set "
            f"optim.warmup_steps={max(0, min(t.steps, o.warmup_steps))} or less (a short run: "
            f"optim.warmup_steps=0), or raise training.steps"
        )
    if not 0 <= o.min_lr_ratio <= 1:
        problems.append(f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    if not 0 < o.decay_fraction <= 1:
        problems.append(f"optim.decay_fraction={o.decay_fraction} must be in (0, 1]")
    if o.max_grad_norm < 0:
        problems.append(f"optim.max_grad_norm={o.max_grad_norm} must be >= 0 (0 disables clipping)")
    return problems
