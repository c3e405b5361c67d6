"""`Parallelized`: what `parallelize()` hands the trainer, the model parts this rank holds with their layout and the
three calls a training step makes (backward, step, the optimizer attached), and the global gradient norm. The
DeepSpeed adapter (parallel/zero.py) is a subclass that overrides those calls."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.tensor.parallel import loss_parallel

from models.dtensor import full
from parallel.layout import ParallelDims
from parallel.pipeline import PipelineLoss, forward_only


@dataclass
class Parallelized:
    parts: list[nn.Module]  # the model parts this rank holds: the whole model, or its pipeline stages
    model: nn.Module  # what a non-pipelined step calls (the DDP wrapper, or parts[0])
    dims: ParallelDims
    mesh: dict | None  # named sub-meshes: pp, dp_replicate, dp_shard, tp, hsdp, dp (None on one process)
    # the gradient of the global-mean loss is the SUM over data-parallel ranks; DDP and FSDP average,
    # so the loss is multiplied by this factor before backward
    grad_reduction_scale: float
    no_sync: Callable[[], contextlib.AbstractContextManager]  # skip gradient sync on non-final micro-batches
    autocast_dtype: torch.dtype | None  # autocast compute dtype when FSDP's mixed precision does not cast
    loss_parallel: bool  # logits arrive split over the vocabulary (TP without PP)
    schedule: object | None = None  # the pipeline schedule (pp > 1)
    pipeline_loss: PipelineLoss | None = None
    has_first_stage: bool = True
    has_last_stage: bool = True
    notes: list[str] = field(default_factory=list)  # what was decided, for the log
    optimizer: torch.optim.Optimizer | None = None
    manages_precision: bool = False  # DeepSpeed casts and loss-scales itself: no autocast, no GradScaler
    stage_parts: list = field(default_factory=list)  # pipeline: (stage id, module) of this rank's stages
    pp_schedule: str = "1f1b"
    device: torch.device | None = None
    activation_offload: object | None = None  # parallel/offload.py's ActivationOffload, when on
    cp_positions: torch.Tensor | None = None  # parallel.cp > 1: the token positions of each sequence this rank holds
    # DDP: the gradients are views into its all-reduce buckets, which it keeps between steps anyway; zeroed in place
    # instead of dropped, every micro-batch accumulates into the buckets (dropped, the micro-batches under no_sync
    # build gradients of their own, copied into the buckets at the last one: a second gradient-sized buffer)
    zero_grads_in_place: bool = False

    def group(self, axis: str):
        """The process group of one mesh axis ("dp", "tp", "pp"), or None on one process."""
        return None if self.mesh is None else self.mesh[axis].get_group()

    @property
    def dp_rank(self) -> int:
        return 0 if self.mesh is None else self.mesh["dp"].get_local_rank()

    @property
    def pp_rank(self) -> int:
        return 0 if self.mesh is None else self.mesh["pp"].get_local_rank()

    def forward_only(self, inputs, targets, n_microbatches: int, loss_sum, documents=None) -> torch.Tensor:
        """Pipeline validation: the summed loss of the microbatches (nonzero on the last stage's rank); `documents`
        (data.pack) go to every stage."""
        return forward_only(
            self.stage_parts,
            self.pp_schedule,
            pp=self.dims.pp,
            group=self.group("pp"),
            device=self.device,
            inputs=inputs if self.has_first_stage else None,
            targets=targets if self.has_last_stage else None,
            n_microbatches=n_microbatches,
            loss_sum=loss_sum,
            documents=documents,
        )

    def parameters(self):
        for part in self.parts:
            yield from part.parameters()

    # -- the three calls the training step makes; the DeepSpeed adapter (parallel/zero.py) overrides them

    overflowed: bool = False  # the last step was skipped by a loss-scale overflow (fp16; counted, not an error)

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def run_files(self) -> dict[str, str]:
        """Files this strategy writes into run_dir (name -> text), once every check has passed."""
        return {}

    def loss_scale(self, scaler=None) -> float | None:
        """The dynamic loss scale under fp16 (a host sync: call it on logging steps only); None otherwise."""
        return float(scaler.get_scale()) if scaler is not None else None

    def backward(self, loss: torch.Tensor, *, last_micro: bool, scaler=None) -> None:
        """Backward of one micro-batch's (already normalized and DP-scaled) loss."""
        with loss_parallel() if self.loss_parallel else contextlib.nullcontext():
            (scaler.scale(loss) if scaler is not None else loss).backward()

    def step(self, max_norm: float, scaler=None, apply=None) -> torch.Tensor:
        """Clip and apply the accumulated gradients; returns the pre-clip global norm (on the device).
        `apply(norm) -> bool`, when given, may veto the update (the gradients are dropped)."""
        if scaler is not None:
            scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        norm = clip_grad_norm(self, max_norm)
        if apply is not None and not apply(norm):
            if scaler is not None:
                scaler.update()  # the unscale recorded an overflow, or not; keep the scaler's books
            self.optimizer.zero_grad(set_to_none=not self.zero_grads_in_place)
            return norm
        if scaler is not None:
            scaler.step(self.optimizer)  # skips the update when gradients overflowed
            scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=not self.zero_grads_in_place)
        return norm


def clip_grad_norm(par: Parallelized, max_norm: float) -> torch.Tensor:
    """Global gradient norm over every parameter of every rank (DTensor shards and pipeline stages),
    then clip to `max_norm`. Returns the norm before clipping, as a plain tensor on the device."""
    params = [p for p in par.parameters() if p.grad is not None]
    by_mesh: dict = {}  # (expert parallelism: the experts' DTensors live on another mesh than the rest's)
    for p in params:
        by_mesh.setdefault(getattr(p.grad, "device_mesh", None), []).append(p)
    # (DTensors: the partial norms reduced)
    norms = [full(torch.nn.utils.get_total_norm([p.grad for p in g], norm_type=2.0)) for g in by_mesh.values()]
    norm = norms[0] if len(norms) == 1 else torch.stack(norms).norm() if norms else torch.nn.utils.get_total_norm([])
    if par.dims.pp > 1:  # each stage saw only its own parameters: add the squares over the pipeline
        sq = norm**2
        torch.distributed.all_reduce(sq, group=par.group("pp"))
        norm = sq.sqrt()
    for group in by_mesh.values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm)
    return norm
