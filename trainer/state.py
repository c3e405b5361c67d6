"""A model's state across layouts: `state_module` gives a pipeline rank's parts the whole model's names (so DCP
reshards pipeline checkpoints like any other), `consolidated_state_dict` reads any strategy's checkpoint back into one
full state dict (launch/convert_checkpoint.py, HF export, checkpoint.init_from)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from models.llama import canonical_name
from trainer.integrity import damage


def state_module(parts: list[nn.Module]) -> nn.Module:
    """One module whose parameter names are the whole model's, over this rank's model parts.

    A pipeline rank holds one or more stages, each a pruned Transformer keeping the full model's names;
    gathering their children under one parent gives DCP the same keys as any other layout, so pipeline
    checkpoints reshard like all others. One part is returned as it is.
    """
    if len(parts) == 1:
        return parts[0]
    merged = nn.Module()
    layers = nn.ModuleDict()
    for part in parts:
        for name, child in part.named_children():
            if name == "layers":
                for k, block in child.items():
                    layers[k] = block
            elif child is not None:
                merged.add_module(name, child)
    merged.add_module("layers", layers)
    return merged


def consolidated_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The whole model's fp32 weights of a complete, verified step-N checkpoint (any strategy, any layout), keyed
    by canonical names: DCP checkpoints through torch's dcp_to_torch_save, DeepSpeed's through its zero_to_fp32."""
    if not (path / "COMPLETE").is_file():
        raise ValueError(f"{path} has no COMPLETE marker: its save did not finish; refusing to convert it")
    zero = bool(list(path.glob("*zero_pp_rank_*")) or list(path.glob("mp_rank_*_model_states.pt")))
    problems = damage(path, zero=zero)
    if problems:
        raise ValueError(f"{path} is damaged ({'; '.join(problems[:5])}); refusing to convert it")
    if list(path.glob("*zero_pp_rank_*")) or list(path.glob("mp_rank_*_model_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    else:
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(str(path), f"{tmp}/full.pt")
            sd = torch.load(f"{tmp}/full.pt", weights_only=False)["model"]
    # one tensor per name, fp32, contiguous, no shared storage (safetensors refuses aliases)
    return {canonical_name(k): v.detach().float().contiguous().clone() for k, v in sd.items()}
