"""Tensor + sequence parallelism through DTensor `parallelize_module`, with the model's own plan."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from models.adapters import AdapterLinear


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, *, loss_parallel: bool) -> None:
    """Split every block and the root modules over `tp_mesh` as `model.tp_plan()` says.

    Communication per block (forward): an all-gather of the sequence before attention and before the MLP,
    a reduce-scatter after each row-parallel output projection; the same in reverse in backward. A linear that
    carries a LoRA/DoRA adapter (models/adapters.py) is split with its adapter (`adapter_style`).
    """
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    root_plan, block_plans = model.tp_plan(loss_parallel=loss_parallel)
    if root_plan:
        parallelize_module(model, tp_mesh, root_plan)
    for name, block in model.blocks.items():
        plan = {
            path: adapter_style(style) if isinstance(block.get_submodule(path), AdapterLinear) else style
            for path, style in block_plans[name].items()
        }
        parallelize_module(block, tp_mesh, plan)
    for name, p in model.named_parameters():  # (SequenceParallel's new parameters forget requires_grad=False)
        if name in frozen:
            p.requires_grad_(False)


# where each parameter of an adapted linear lives under TP, by (style, submodule name, parameter name): the base
# weight as the plain layer's; a column-parallel layer (output features split) splits B by output rows and DoRA's
# magnitude with them and keeps A whole (its input is the whole gathered activation); a row-parallel layer (input
# features split) splits A by input columns and keeps B and the magnitude whole (A's output is then a partial sum,
# reduced with the base's output)
_ADAPTER_PLACEMENTS = {
    "colwise": {
        ("", "weight"): Shard(0),
        ("", "bias"): Shard(0),
        ("", "magnitude"): Shard(0),
        ("lora_a", "weight"): Replicate(),
        ("lora_b", "weight"): Shard(0),
    },
    "rowwise": {
        ("", "weight"): Shard(1),
        ("", "bias"): Replicate(),
        ("", "magnitude"): Replicate(),
        ("lora_a", "weight"): Shard(1),
        ("lora_b", "weight"): Replicate(),
    },
}


def _adapter_partition(kind: str, src_data_rank):
    def partition(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        for pname, param in list(module.named_parameters(recurse=False)):
            placement = _ADAPTER_PLACEMENTS[kind][(name, pname)]
            dist = distribute_tensor(param, mesh, [placement], src_data_rank=src_data_rank)
            module.register_parameter(pname, nn.Parameter(dist, requires_grad=param.requires_grad))

    return partition


class _AdapterColwise(ColwiseParallel):
    def _partition_linear_fn(self, name, module, device_mesh):
        _adapter_partition("colwise", self.src_data_rank)(name, module, device_mesh)


class _AdapterRowwise(RowwiseParallel):
    def _partition_linear_fn(self, name, module, device_mesh):
        _adapter_partition("rowwise", self.src_data_rank)(name, module, device_mesh)


def adapter_style(style):
    """The same split for a linear with an adapter: torch's column/row-wise styles place only a plain linear's own
    `weight` and `bias` (and fail on an adapter's nested parameters); these place the adapter too."""
    for plain, adapted in ((ColwiseParallel, _AdapterColwise), (RowwiseParallel, _AdapterRowwise)):
        if type(style) is plain:
            out = adapted.__new__(adapted)
            out.__dict__.update(style.__dict__)
            return out
    raise ValueError(f"no tensor-parallel split of an adapted linear under {type(style).__name__}")


def keep_grads_sharded_like_params(model: nn.Module) -> None:
    """DTensor's embedding backward returns a *replicated* gradient for the vocab-sharded table: every
    TP rank would hold the full vocab x dim gradient (2 GB per rank for a 128k-vocab 8B model). Slice it
    back to the parameter's own placement as it is produced (Replicate -> Shard is a local slice).
    Call it on allocated parameters: `to_empty()` replaces the parameter objects and their hooks."""
    for p in model.parameters():
        if p.requires_grad and hasattr(p, "placements") and any(pl.is_shard() for pl in p.placements):
            placements = p.placements  # (a frozen base under adapters has no gradient to slice)
            p.register_hook(
                lambda g, placements=placements: (
                    g if g.placements == placements else g.redistribute(placements=placements)
                )
            )
