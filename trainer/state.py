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


def adapted_model(path: Path):
    """An adapter run's step-N checkpoint as a whole model on the CPU: (the model with its adapters loaded, its
    ModelArgs, the AdapterSpec, the base's record from train_state.json). The base is rebuilt from its source:
    the original weights of checkpoint.init_from (never a quantized copy), or the draw of training.seed."""
    import json

    from models.adapters import AdapterSpec, apply_adapters, init_adapters
    from models.llama import ModelArgs, RopeScaling, build_model

    state = json.loads((path / "train_state.json").read_text())
    record = state.get("finetune", {"method": "full"})
    if record["method"] == "full":
        raise ValueError(f"{path} holds a full model, not adapters (train_state.json: finetune.method=full)")
    m = dict(state["model"])
    m["rope_scaling"] = RopeScaling(**m["rope_scaling"]) if m.get("rope_scaling") else None
    args = ModelArgs(**m)
    spec = AdapterSpec(record["method"], record["rank"], record["alpha"], 0.0, tuple(record["targets"]))
    model = build_model(args, device="cpu")
    apply_adapters(model, spec)
    base = record["base"]
    if base["source"] == "seed":
        model.init_weights(seed=base["seed"])
    else:
        from trainer.checkpoint import weights_checksum
        from trainer.hf import load_full_state_dict

        source = Path(base["path"])
        if not source.exists() or weights_checksum(source) != base["checksum"]:
            raise ValueError(
                f"{path}: its base {source} is {'missing' if not source.exists() else 'not the file it trained on'}"
                " (train_state.json records its xxh3-128 checksum); the adapters need that base"
            )
        sd, _ = load_full_state_dict(source)
        model.load_state_dict(sd, strict=False)
        init_adapters(model)
    adapters = consolidated_state_dict(path)
    missing, unexpected = model.load_state_dict(adapters, strict=False)
    frozen = {canonical_name(n) for n, p in model.named_parameters() if not p.requires_grad}
    if unexpected or set(missing) - frozen:
        raise ValueError(f"{path}: adapters that do not fit ({sorted(set(missing) - frozen)[:3]} {unexpected[:3]})")
    return model, args, spec, base


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's weights that compute what `model` (with adapters) computes: every adapted linear's weight
    merged (models/adapters.py `merged_weight`), every other weight as it is, fp32."""
    from models.adapters import AdapterLinear

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, AdapterLinear):
            out[f"{canonical_name(name)}.weight"] = mod.merged_weight().float().contiguous()
    for name, p in model.named_parameters():
        name = canonical_name(name)
        if not name.endswith(AdapterLinear.ADAPTER_NAMES) and name not in out:
            out[name] = p.detach().float().contiguous().clone()
    return out
