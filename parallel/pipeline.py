"""Pipeline parallelism with `torch.distributed.pipelining`: stages cut from the model's block list.

Stage layout: with `pp` ranks and `v` stages per rank there are S = pp * v stages. Single-stage schedules
(gpipe, 1f1b) put stage r on rank r. Looped schedules (interleaved_1f1b) put stages r, r + pp, ... on
rank r. V-shaped schedules (zbv, dualpipev) put stages r and S - 1 - r on rank r, so rank 0 holds both
the first and the last stage.

Validation does not go through the schedule: torch's `schedule.eval()` replays the training action list
without backward, which the zero-bubble V schedules cannot do (their actions split backward into input and
weight parts: "can't steal_bwd_input if this stage doesn't have backward"). `forward_only` instead walks the
stages in order with point-to-point sends, one microbatch at a time: the same forward for every schedule.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleZBVZeroBubble,
)

from parallel.layout import PP_SCHEDULES, n_stages, split_blocks, stage_ids, stage_owners, stages_per_rank

SCHEDULES = dict(
    zip(
        PP_SCHEDULES,
        (ScheduleGPipe, Schedule1F1B, ScheduleInterleaved1F1B, ScheduleZBVZeroBubble, ScheduleDualPipeV),
        strict=True,
    )
)


def split_model(model: nn.Module, schedule: str, pp_rank: int, pp: int) -> list[tuple[int, nn.Module]]:
    """(stage id, stage model) for each stage this rank holds; each a pruned copy of the meta model."""
    total = n_stages(schedule, pp)
    names = list(model.blocks.keys())
    ranges = split_blocks(len(names), total)
    parts = []
    for sid in stage_ids(schedule, pp_rank, pp):
        part = copy.deepcopy(model)  # on the meta device: costs nothing
        part.keep_stage([names[i] for i in ranges[sid]], first=sid == 0, last=sid == total - 1)
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


_DTYPE_CODES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _send(t: torch.Tensor, dst: int, group) -> None:
    """Send a tensor of any shape and float dtype: a fixed-size header (dtype, ndim, shape), then the data."""
    header = torch.zeros(8, dtype=torch.int64)
    header[0], header[1] = _DTYPE_CODES.index(t.dtype), t.dim()
    header[2 : 2 + t.dim()] = torch.tensor(t.shape)
    dist.send(header.to(t.device), group_dst=dst, group=group)
    dist.send(t.contiguous(), group_dst=dst, group=group)


def _recv(src: int, group, device: torch.device) -> torch.Tensor:
    header = torch.zeros(8, dtype=torch.int64, device=device)
    dist.recv(header, group_src=src, group=group)
    header = header.tolist()
    out = torch.empty(header[2 : 2 + header[1]], dtype=_DTYPE_CODES[header[0]], device=device)
    dist.recv(out, group_src=src, group=group)
    return out


@torch.no_grad()
def forward_only(
    parts: list[tuple[int, nn.Module]],
    schedule: str,
    *,
    pp: int,
    group,
    device: torch.device,
    inputs: torch.Tensor | None,
    targets: torch.Tensor | None,
    n_microbatches: int,
    loss_sum: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Summed loss of (n_microbatches * mb, T) inputs through the pipeline, forward only; nonzero only on the
    rank holding the last stage. Every pipeline rank calls it; `inputs` matter on the first stage's rank and
    `targets` on the last's.

    Microbatch m visits stages 0..S-1 in order; each rank runs its own stages in (microbatch, stage) order,
    receiving a stage's input from the previous stage's rank and sending its output on. Every transfer goes
    from an earlier (m, s) to a later one, so blocking sends cannot deadlock.
    """
    owners = stage_owners(schedule, pp)
    last = len(owners) - 1
    mine = dict(parts)
    me = owners[min(mine)]
    total = torch.zeros((), device=device)
    in_chunks = inputs.chunk(n_microbatches) if inputs is not None else [None] * n_microbatches
    tgt_chunks = targets.chunk(n_microbatches) if targets is not None else [None] * n_microbatches
    for m in range(n_microbatches):
        h = None
        for sid in range(len(owners)):
            if sid not in mine:
                h = None
                continue
            if sid == 0:
                h = in_chunks[m]
            elif owners[sid - 1] != me:
                h = _recv(owners[sid - 1], group, device)
            h = mine[sid](h)
            if sid == last:
                total += loss_sum(h, tgt_chunks[m])
            elif owners[sid + 1] != me:
                _send(h, owners[sid + 1], group)
    return total


class ShardedGradStage(PipelineStage):
    """A stage whose FSDP gradients are reduce-scattered after every microbatch's backward.

    torch's stage turns FSDP's gradient sync off for every microbatch but the last (`backward_maybe_with_nosync`),
    so each rank accumulates its stage's gradients unsharded in fp32 between microbatches (llama13b_pp_fsdp:
    24.2 GiB of a 55.6 GiB peak), then reduce-scatters once. This stage keeps the sync on: each microbatch's
    gradients are reduce-scattered into the sharded gradients as its backward ends (FSDP's own accumulation,
    as without pipelining), for (microbatches - 1) more reduce-scatters per step. Only for the full backward
    of the single-stage and looped schedules: the V schedules split backward into input and weight passes,
    where FSDP's post-backward hook comes before the weight gradients exist; they keep torch's way, and so does
    `parallel.accumulate_unsharded_grads=true`."""

    def backward_maybe_with_nosync(self, backward_type, bwd_kwargs: dict, last_backward: bool = False):
        if backward_type != "full" or not isinstance(self.submod, FSDPModule):
            return super().backward_maybe_with_nosync(backward_type, bwd_kwargs, last_backward)
        sub = self.submod
        keep = type(sub).set_requires_gradient_sync
        sub.set_requires_gradient_sync = lambda requires, *, recurse=True: keep(sub, True, recurse=recurse)
        try:  # the stage's own bookkeeping, with the sync left on
            return super().backward_maybe_with_nosync(backward_type, bwd_kwargs, last_backward)
        finally:
            del sub.set_requires_gradient_sync


def build_schedule(
    parts: list[tuple[int, nn.Module]],
    schedule: str,
    *,
    pp: int,
    n_microbatches: int,
    device: torch.device,
    group,
    loss_fn: PipelineLoss,
    stage_shapes=None,
    sync_each_microbatch: bool = True,
):
    def shapes(sid):  # given, the stage skips its shape-inference round trip (trainer/simulate.py)
        if stage_shapes is None:
            return {}
        inp, out = stage_shapes(sid)
        return {"input_args": (inp,), "output_args": (out,)}

    stage_cls = ShardedGradStage if sync_each_microbatch else PipelineStage
    stages = [stage_cls(m, sid, n_stages(schedule, pp), device, group=group, **shapes(sid)) for sid, m in parts]
    cls = SCHEDULES[schedule]
    # scale_grads=False: the loss is already normalized by the global token count
    if stages_per_rank(schedule) == 1:
        return cls(stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    return cls(stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
