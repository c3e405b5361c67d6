"""torch's pipeline schedules over shardwise's stages (parallel/pipeline.py cuts them): the schedule table, the stage
that reduce-scatters FSDP gradients after every microbatch, and `build_schedule`. Imported only when pp > 1:
`torch.distributed.pipelining` imports dynamo, half a second of every process start that a run without a pipeline
need not pay."""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    PipelineScheduleSingle,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleZBVZeroBubble,
)

from parallel.layout import PP_SCHEDULES, n_stages, stages_per_rank
from parallel.pipeline import PipelineLoss

# torch releases whose schedules' step() can be told not to keep every microbatch's output for a merged one
STEP_RETURNS_OUTPUTS = "return_outputs" in inspect.signature(PipelineScheduleSingle.step).parameters

SCHEDULES = dict(
    zip(
        PP_SCHEDULES,
        (ScheduleGPipe, Schedule1F1B, ScheduleInterleaved1F1B, ScheduleZBVZeroBubble, ScheduleDualPipeV),
        strict=True,
    )
)


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
