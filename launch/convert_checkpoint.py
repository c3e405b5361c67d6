"""Consolidate a checkpoint (any strategy) into one fp32 safetensors file of the full model.

    python launch/convert_checkpoint.py runs/x/checkpoints/step-200 --out model.safetensors

Works on native checkpoints (torch DCP shards from any layout) and on DeepSpeed ZeRO checkpoints (it
gathers the fp32 master partitions with DeepSpeed's own zero_to_fp32). Runs on one process, on the CPU.
Parameter names are the model's own (`layers.3.attention.wq.weight`), whatever wrappers training used.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch


def consolidated_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from models.llama import canonical_name

    if not (path / "COMPLETE").is_file():
        raise ValueError(f"{path} has no COMPLETE marker: its save did not finish; refusing to convert it")
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


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="a step-N directory")
    p.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    a = p.parse_args(argv)
    if not a.checkpoint.is_dir():
        p.error(f"{a.checkpoint}: no such checkpoint directory")
    try:
        sd = consolidated_state_dict(a.checkpoint)
    except ValueError as e:
        p.error(str(e))
    from safetensors.torch import save_file

    a.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(a.out), metadata={"source": str(a.checkpoint), "format": "shardwise-fp32"})
    print(f"wrote {a.out}: {len(sd)} tensors, {sum(v.numel() for v in sd.values()):,} parameters (fp32)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
