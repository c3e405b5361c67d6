"""Expert parallelism: each MoE block's experts split over the `ep` ranks, its tokens' rows sent to the rank holding
their expert and the outputs sent back, by all-to-all with variable splits (docs/moe.md).

Shape suffixes, as in models/moe.py: R rows of this rank's tokens ordered by (global) expert, E experts, P ranks of
the ep group, L = E / P experts per rank (rank p holds experts p L .. p L + L - 1), G rows this rank's experts get
from the group. Received rows arrive source-major ((source rank, local expert) blocks); the experts want them
expert-major ((local expert, source rank)): `expert_major` is that permutation, a pure function of the counts.

The experts' three stacked weights become DTensors split on dim 0 (the expert) over `ep`; FSDP2 then splits each
on dim 1 over the rest of dp_shard (`expert_shard`, x dp_replicate for HSDP) and reduces their gradients there,
divided by the whole data-parallel degree (the gradients of one expert already sum the tokens of its ep group).
A checkpoint stores every expert whole (DCP's global tensors), so a run resumes under another ep degree or without
expert parallelism.

The exchange hooks the experts module (torch's `distribute_module`: a forward pre-hook dispatches, a forward hook
combines), so models/moe.py runs the same forward with and without expert parallelism: the experts see their own
rows and counts either way. The all-to-all is torch's differentiable `all_to_all_single_autograd` (its backward is
the all-to-all with the splits swapped); gloo and NCCL both run it with uneven splits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_module, distribute_tensor

from models.moe import GroupedExperts


def expert_major(counts_PL: torch.Tensor) -> torch.Tensor:
    """The order that turns rows received source-major (for each source rank p, its rows for each local expert l:
    counts_PL[p, l] of them) into expert-major (for each l, every source's rows in rank order): index i of the
    result is the source-major position of the i-th expert-major row. Its inverse (argsort) puts them back."""
    P, L = counts_PL.shape
    flat = counts_PL.flatten()
    starts_PL = (torch.cumsum(flat, 0) - flat).view(P, L)  # each block's first row, source-major
    sizes = counts_PL.t().flatten()  # the blocks in expert-major order
    firsts = starts_PL.t().flatten()
    within = torch.arange(int(sizes.sum()), device=counts_PL.device) - torch.repeat_interleave(
        torch.cumsum(sizes, 0) - sizes, sizes
    )
    return torch.repeat_interleave(firsts, sizes) + within


@dataclass(frozen=True)
class Exchange:
    """One forward's splits: rows this rank sends to each rank (`send`), receives from each (`recv`), the
    expert-major order of the received rows (`order`) and each local expert's received rows (`counts_L`)."""

    send: list[int]
    recv: list[int]
    order: torch.Tensor
    counts_L: torch.Tensor


def plan_exchange(counts_E: torch.Tensor, group, ep: int) -> Exchange:
    """The splits of one dispatch: this rank's rows per expert all-to-all'd (each rank learns what every rank sends
    its experts), then the rows per rank both ways (host integers: the all-to-all needs them)."""
    counts_PL = counts_E.view(ep, -1)
    got_PL = funcol.all_to_all_single(counts_PL.flatten(), None, None, group).view(ep, -1)
    send, recv = counts_PL.sum(1).tolist(), got_PL.sum(1).tolist()
    return Exchange(send, recv, expert_major(got_PL), got_PL.sum(0))


class _Dispatcher:
    """The pre-hook and hook of one experts module (state between them: the current forward's `Exchange`; a
    checkpointed block's recompute makes a new one, the backward's all-to-alls keep their own splits)."""

    def __init__(self, ep: int):
        self.ep = ep
        self.exchange: Exchange | None = None

    def dispatch(self, module: nn.Module, inputs, mesh: DeviceMesh):
        x_RD, counts_E = inputs
        group = mesh.get_group()
        ex = plan_exchange(counts_E, group, self.ep)
        self.exchange = ex
        got_GD = funcol.all_to_all_single_autograd(x_RD, ex.recv, ex.send, group)
        return got_GD[ex.order], ex.counts_L

    def combine(self, module: nn.Module, y_GD: torch.Tensor, mesh: DeviceMesh):
        ex, self.exchange = self.exchange, None
        back = torch.empty_like(ex.order)
        back[ex.order] = torch.arange(len(ex.order), device=ex.order.device)
        return funcol.all_to_all_single_autograd(y_GD[back], ex.send, ex.recv, mesh.get_group())


def _split_experts(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
    for pname, p in list(module.named_parameters(recurse=False)):
        module.register_parameter(pname, nn.Parameter(distribute_tensor(p, mesh, [Shard(0)]), p.requires_grad))


def apply_ep(model: nn.Module, ep_mesh: DeviceMesh) -> int:
    """Split every MoE block's experts over `ep_mesh` (still on the meta device) and hook their exchange; returns
    how many experts modules were split."""
    n = 0
    for module in model.modules():
        if isinstance(module, GroupedExperts):
            d = _Dispatcher(ep_mesh.size())
            distribute_module(module, ep_mesh, _split_experts, input_fn=d.dispatch, output_fn=d.combine)
            n += 1
    return n


def expert_modules(model: nn.Module) -> list[nn.Module]:
    """The experts modules whose weights are split over an ep mesh (FSDP shards them apart from their block)."""
    return [m for m in model.modules() if isinstance(m, GroupedExperts) and hasattr(m.w1, "placements")]
