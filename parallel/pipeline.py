"""Pipeline parallelism with `torch.distributed.pipelining`: stages cut from the model's block list.

Stage layout: with `pp` ranks and `v` stages per rank there are S = pp * v stages. Single-stage schedules
(gpipe, 1f1b) put stage r on rank r. Looped schedules (interleaved_1f1b) put stages r, r + pp, ... on
rank r. V-shaped schedules (zbv, dualpipev) put stages r and S - 1 - r on rank r, so rank 0 holds both
the first and the last stage.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (Schedule1F1B, ScheduleDualPipeV, ScheduleGPipe,
                                                    ScheduleInterleaved1F1B, ScheduleZBVZeroBubble)

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B,
             "zbv": ScheduleZBVZeroBubble, "dualpipev": ScheduleDualPipeV}
V_SHAPED = {"zbv", "dualpipev"}


def stages_per_rank(schedule: str) -> int:
    return 1 if schedule in ("gpipe", "1f1b") else 2


def stage_ids(schedule: str, pp_rank: int, pp: int) -> list[int]:
    v = stages_per_rank(schedule)
    if v == 1:
        return [pp_rank]
    if schedule in V_SHAPED:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(v)]


def split_blocks(n_blocks: int, n_stages: int) -> list[range]:
    """Contiguous block ranges, as even as possible; the first and last stages, which also hold the
    embedding and the output projection, are the ones that get fewer blocks when it does not divide."""
    base, extra = divmod(n_blocks, n_stages)
    sizes = [base] * n_stages
    middle_first = sorted(range(n_stages), key=lambda s: (s in (0, n_stages - 1), s))
    for s in middle_first[:extra]:
        sizes[s] += 1
    starts = [sum(sizes[:s]) for s in range(n_stages)]
    return [range(starts[s], starts[s] + sizes[s]) for s in range(n_stages)]


def split_model(model: nn.Module, schedule: str, pp_rank: int, pp: int) -> list[tuple[int, nn.Module]]:
    """(stage id, stage model) for each stage this rank holds; each a pruned copy of the meta model."""
    n_stages = pp * stages_per_rank(schedule)
    names = list(model.blocks.keys())
    ranges = split_blocks(len(names), n_stages)
    parts = []
    for sid in stage_ids(schedule, pp_rank, pp):
        part = copy.deepcopy(model)  # on the meta device: costs nothing
        part.keep_stage([names[i] for i in ranges[sid]], first=sid == 0, last=sid == n_stages - 1)
        parts.append((sid, part))
    return parts


class PipelineLoss:
    """The schedule's loss_fn: summed token cross-entropy of one microbatch over the global token count
    (set before every step), times the data-parallel gradient factor; the schedule must not rescale."""

    def __init__(self, loss_sum: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], scale: float):
        self.loss_sum, self.scale = loss_sum, scale
        self.n_tokens: torch.Tensor | None = None

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss_sum(output, target) / self.n_tokens * self.scale


def build_schedule(parts: list[tuple[int, nn.Module]], schedule: str, *, pp: int, n_microbatches: int,
                   device: torch.device, group, loss_fn: PipelineLoss):
    n_stages = pp * stages_per_rank(schedule)
    stages = [PipelineStage(m, sid, n_stages, device, group=group) for sid, m in parts]
    cls = SCHEDULES[schedule]
    # scale_grads=False: the loss is already normalized by the global token count
    if stages_per_rank(schedule) == 1:
        return cls(stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    return cls(stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
