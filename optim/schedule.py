"""Learning-rate schedules as multipliers of the peak lr, for `torch.optim.lr_scheduler.LambdaLR`.

Step s (0-based) is the update about to be applied. Warmup ramps linearly from lr/warmup to lr over
`warmup` steps (never 0, which would waste the first step), then the chosen decay runs to the end.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def lr_multiplier(
    schedule: str, *, steps: int, warmup: int, min_ratio: float, decay_fraction: float
) -> Callable[[int], float]:
    def warm(s: int) -> float | None:
        return (s + 1) / warmup if s < warmup else None

    def cosine(s: int) -> float:
        w = warm(s)
        if w is not None:
            return w
        progress = (s - warmup) / max(1, steps - warmup)  # 0 -> 1 over the decay
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    def linear(s: int) -> float:
        w = warm(s)
        if w is not None:
            return w
        progress = (s - warmup) / max(1, steps - warmup)
        return 1 - (1 - min_ratio) * min(progress, 1.0)

    def wsd(s: int) -> float:
        # warmup-stable-decay (MiniCPM): hold the peak, then decay linearly over the last fraction
        w = warm(s)
        if w is not None:
            return w
        decay_steps = max(1, round(decay_fraction * steps))
        decay_start = max(warmup, steps - decay_steps)
        if s < decay_start:
            return 1.0
        return 1 - (1 - min_ratio) * min(1.0, (s - decay_start) / max(1, steps - decay_start))

    def constant(s: int) -> float:
        w = warm(s)
        return 1.0 if w is None else w

    table = {"cosine": cosine, "linear": linear, "wsd": wsd, "constant": constant}
    if schedule not in table:
        raise ValueError(f"optim.schedule={schedule}: unknown; known: {', '.join(table)}")
    return table[schedule]


def build_scheduler(optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    o = cfg.optim
    fn = lr_multiplier(
        str(o.schedule),
        steps=cfg.training.steps,
        warmup=o.warmup_steps,
        min_ratio=o.min_lr_ratio,
        decay_fraction=o.decay_fraction,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
