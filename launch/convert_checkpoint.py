"""Consolidate a checkpoint (any strategy) into one fp32 safetensors file of the full model.

    python launch/convert_checkpoint.py runs/x/checkpoints/step-200 --out model.safetensors
    python launch/convert_checkpoint.py runs/x/checkpoints/step-200 --hf hf-model/   # a transformers directory

Works on native checkpoints (torch DCP shards from any layout) and on DeepSpeed ZeRO checkpoints (it
gathers the fp32 master partitions with DeepSpeed's own zero_to_fp32). Runs on one process, on the CPU.
Parameter names are the model's own (`layers.3.attention.wq.weight`), whatever wrappers training used.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.state import consolidated_state_dict  # noqa: E402


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="a step-N directory")
    p.add_argument("--out", type=Path, help="the .safetensors file to write")
    p.add_argument("--hf", type=Path, help="write a Hugging Face LLaMA directory (config.json + model.safetensors)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="for --hf")
    a = p.parse_args(argv)
    if not a.out and not a.hf:
        p.error("nothing to write: give --out FILE.safetensors and/or --hf DIR")
    if not a.checkpoint.is_dir():
        p.error(f"{a.checkpoint}: no such checkpoint directory")
    try:
        sd = consolidated_state_dict(a.checkpoint)
    except ValueError as e:
        p.error(str(e))
    if a.hf:
        import json

        import torch

        from models.llama import ModelArgs, RopeScaling
        from trainer.hf import to_hf

        state = json.loads((a.checkpoint / "train_state.json").read_text())
        m = dict(state["model"])
        m["rope_scaling"] = RopeScaling(**m["rope_scaling"]) if m.get("rope_scaling") else None
        to_hf(sd, ModelArgs(**m), a.hf, dtype=getattr(torch, a.dtype))
        print(f"wrote {a.hf}: a LlamaForCausalLM directory ({a.dtype})")
        if not a.out:
            return 0
    from safetensors.torch import save_file

    a.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(a.out), metadata={"source": str(a.checkpoint), "format": "shardwise-fp32"})
    print(f"wrote {a.out}: {len(sd)} tensors, {sum(v.numel() for v in sd.values()):,} parameters (fp32)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
