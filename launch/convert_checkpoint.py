"""Consolidate a checkpoint (any strategy) into one fp32 safetensors file of the full model.

    python launch/convert_checkpoint.py runs/x/checkpoints/step-200 --out model.safetensors
    python launch/convert_checkpoint.py runs/x/checkpoints/step-200 --hf hf-model/   # a transformers directory
    python launch/convert_checkpoint.py runs/lora/checkpoints/step-200 --peft adapter/  # a PEFT adapter directory

An adapter run's checkpoint (finetune.method=lora/dora) holds only the adapters: --peft writes them as a PEFT
adapter directory (for `peft.PeftModel.from_pretrained` on the base), --hf and --out the merged model, built from
the base's original weights (checkpoint.init_from, its checksum checked; or the seed's draw).

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
    p.add_argument("--peft", type=Path, help="an adapter run's checkpoint: write its adapters as a PEFT directory")
    a = p.parse_args(argv)
    if not a.out and not a.hf and not a.peft:
        p.error("nothing to write: give --out FILE.safetensors, --hf DIR and/or --peft DIR")
    if not a.checkpoint.is_dir():
        p.error(f"{a.checkpoint}: no such checkpoint directory")
    import json

    record = json.loads((a.checkpoint / "train_state.json").read_text()).get("finetune", {"method": "full"})
    if a.peft and record["method"] == "full":
        p.error(f"--peft: {a.checkpoint} holds a full model (finetune.method=full), not adapters; use --hf or --out")
    try:
        if record["method"] == "full":
            sd = consolidated_state_dict(a.checkpoint)
        else:
            from trainer.hf import adapted_model, merged_state_dict

            model, args, spec, base = adapted_model(a.checkpoint)
            sd = merged_state_dict(model)
    except ValueError as e:
        p.error(str(e))
    if a.peft:
        from trainer.hf import to_peft

        to_peft(model, args, spec, a.peft, base=base.get("path", ""))
        print(f"wrote {a.peft}: PEFT {spec.kind} adapters, rank {spec.rank}, on {', '.join(spec.targets)}")
        if not a.hf and not a.out:
            return 0
    if a.hf:
        import torch

        from models.llama import args_from_record
        from trainer.hf import to_hf

        args = args_from_record(json.loads((a.checkpoint / "train_state.json").read_text())["model"])
        try:
            to_hf(sd, args, a.hf, dtype=getattr(torch, a.dtype))
        except ValueError as e:
            p.error(str(e))
        kind = "MixtralForCausalLM" if args.moe is not None else "LlamaForCausalLM"
        print(f"wrote {a.hf}: a {kind} directory ({a.dtype})")
        if not a.out:
            return 0
    from safetensors.torch import save_file

    a.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(a.out), metadata={"source": str(a.checkpoint), "format": "shardwise-fp32"})
    print(f"wrote {a.out}: {len(sd)} tensors, {sum(v.numel() for v in sd.values()):,} parameters (fp32)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
