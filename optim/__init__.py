"""Optimizers and learning-rate schedules. `build_optimizer(model, cfg)` is the one entry point."""

from __future__ import annotations

import torch
from torch import nn

from optim.schedule import build_scheduler, lr_multiplier


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay the matrices of linear layers; not norms, biases or embeddings (1-D or lookup tables)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.ndim < 2 or id(p) in embeddings else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg, *, device_type: str) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = param_groups(model, o.weight_decay)
    if o.name == "adafactor":
        from optim.adafactor import Adafactor

        a = o.adafactor
        return Adafactor(groups, lr=o.lr, beta2_decay=a.beta2_decay, eps=(a.eps1, a.eps2), d=a.d,
                         relative_step=a.relative_step, scale_parameter=a.scale_parameter, beta1=a.beta1)
    if o.name != "adamw":
        raise ValueError(f"optim.name={o.name}: unknown optimizer; known: adamw, adafactor")
    if str(cfg.parallel.data).startswith("zero") and str(cfg.parallel.offload) == "cpu":
        # ZeRO-Offload steps on the CPU with DeepSpeed's vectorized Adam (AdamW mode: decoupled decay);
        # its C++ op is compiled on first use
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, adamw_mode=True)
    fused = (device_type == "cuda") if o.fused is None else bool(o.fused)
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                             fused=fused or None, foreach=None if fused else True)


__all__ = ["build_optimizer", "build_scheduler", "lr_multiplier", "param_groups"]
