"""Pipeline parallelism with `torch.distributed.pipelining`: stages cut from the model's block list.

Stage layout: with `pp` ranks and `v` stages per rank there are S = pp * v stages. Single-stage schedules
(gpipe, 1f1b) put stage r on rank r. Looped schedules (interleaved_1f1b) put stages r, r + pp, ... on
rank r. V-shaped schedules (zbv, dualpipev) put stages r and S - 1 - r on rank r, so rank 0 holds both
the first and the last stage.

Validation does not go through the schedule: torch's `schedule.eval()` replays the training action list
without backward, which the zero-bubble V schedules cannot do (their actions split backward into input and
weight parts: "can't steal_bwd_input if this stage doesn't have backward"). `forward_only` instead walks the
stages in order with point-to-point sends, one microbatch at a time: the same forward for every schedule.

torch's schedules and stages (`torch.distributed.pipelining`, which imports dynamo: half a second of every start)
live in parallel/schedules.py, imported by `parallelize` only when pp > 1.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from parallel.layout import n_stages, split_blocks, stage_ids, stage_owners


def static_stage_shapes(cfg, args, dims):
    """stage id -> (input, output) example tensors of that pipeline stage (meta tensors: shapes and dtypes only),
    which spare torch's stages their shape inference: a forward (and on the last stage a backward) of zeros or of
    the first microbatch before the first step. Given for the simulation (fake tensors) and for MoE models (whose
    routing counts would take the inference's tokens for trained ones); neither has TP or CP here (the boundary is
    the whole (micro-batch, sequence, width) hidden state)."""

    mb, T = cfg.training.micro_batch_size, cfg.training.seq_len
    # between stages travels the residual stream: fp32, except where the parameters themselves are 16-bit
    mixed = str(cfg.training.precision) != "fp32" and str(cfg.parallel.data) in ("fsdp", "hsdp")
    hidden_dtype = (
        torch.bfloat16
        if mixed and str(cfg.training.precision) == "bf16"
        else (torch.float16 if mixed else torch.float32)
    )
    last = n_stages(str(cfg.parallel.pp_schedule), dims.pp) - 1
    tokens = torch.empty(mb, T, dtype=torch.int64, device="meta")
    # (requires_grad: the stage reads from its example output whether a gradient comes back for it)
    hidden = torch.empty(mb, T, args.dim, dtype=hidden_dtype, device="meta", requires_grad=True)
    logits_dtype = (
        hidden_dtype
        if mixed or str(cfg.training.precision) == "fp32"
        else (torch.bfloat16 if str(cfg.training.precision) == "bf16" else torch.float16)
    )
    logits = torch.empty(mb, T, args.vocab_size, dtype=logits_dtype, device="meta", requires_grad=True)
    return lambda sid: (tokens if sid == 0 else hidden, logits if sid == last else hidden)


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
    documents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed loss of (n_microbatches * mb, T) inputs through the pipeline, forward only; nonzero only on the
    rank holding the last stage. Every pipeline rank calls it; `inputs` matter on the first stage's rank and
    `targets` on the last's; `documents` (packed data, every rank's) on every stage.

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
    doc_chunks = documents.chunk(n_microbatches) if documents is not None else [None] * n_microbatches
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
            h = mine[sid](h) if doc_chunks[m] is None else mine[sid](h, documents=doc_chunks[m])
            if sid == last:
                total += loss_sum(h, tgt_chunks[m])
            elif owners[sid + 1] != me:
                _send(h, owners[sid + 1], group)
    return total
