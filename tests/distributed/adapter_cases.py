"""The adapter parity rows (tests/distributed/test_parity.py), in a module of their own so that docs/finetune.md's table
(tests/unit/test_finetune_docs.py) reads the same list."""

# LoRA and DoRA on a frozen base (models/adapters.py) under every strategy that holds them, over five steps: the
# reference is one process with the same adapters. A's gradient after step 1 is exactly zero everywhere (B starts
# at zero), so step 1 compares B's (and DoRA's magnitudes); A trains from step 2 on, which the losses of steps 3-5
# and the validation loss see. (id, processes, overrides), global batch 8, fp32
ADAPTER_STEPS = "training.steps=5"
NF4 = ["finetune.quantize_base=true", "finetune.nf4_scaler_block=8"]  # (the tiny model's weights: 32 x 64 blocks)
ADAPTER_CASES = [
    ("lora_ddp", 2, ["finetune.method=lora", "parallel.data=ddp"]),
    ("lora_fsdp", 2, ["finetune.method=lora", "parallel.data=fsdp"]),
    ("dora_fsdp", 2, ["finetune.method=dora", "parallel.data=fsdp"]),
    ("lora_hsdp_2x2", 4, ["finetune.method=lora", "parallel.data=hsdp", "parallel.dp_replicate=2"]),
    ("lora_tp", 2, ["finetune.method=lora", "parallel.tp=2"]),
    ("dora_tp", 2, ["finetune.method=dora", "parallel.tp=2"]),
    ("dora_fsdp_tp", 4, ["finetune.method=dora", "parallel.data=fsdp", "parallel.tp=2"]),
    ("lora_pp", 2, ["finetune.method=lora", "parallel.pp=2"]),
    ("dora_pp_fsdp", 4, ["finetune.method=dora", "parallel.pp=2", "parallel.data=fsdp", "parallel.ac=full"]),
    ("lora_pp_tp", 4, ["finetune.method=lora", "parallel.pp=2", "parallel.tp=2"]),
    ("lora_cp_2", 2, ["finetune.method=lora", "parallel.cp=2"]),
    ("dora_tp_cp_2x2", 4, ["finetune.method=dora", "parallel.tp=2", "parallel.cp=2", "parallel.cp_rotate=ring"]),
    ("lora_zero1", 2, ["finetune.method=lora", "parallel.data=zero1"]),
    ("lora_zero2", 2, ["finetune.method=lora", "parallel.data=zero2"]),
    ("lora_zero3", 2, ["finetune.method=lora", "parallel.data=zero3"]),
    # QLoRA: the reference is one process on the same NF4 weights (quantized whole, then split by FSDP)
    ("qlora_fsdp", 2, ["finetune.method=lora", *NF4, "parallel.data=fsdp"]),
    ("qdora_fsdp_4", 4, ["finetune.method=dora", *NF4, "parallel.data=fsdp", "parallel.ac=full"]),
    ("qlora_hsdp_2x2", 4, ["finetune.method=lora", *NF4, "parallel.data=hsdp", "parallel.dp_replicate=2"]),
    ("qlora_pp_fsdp", 4, ["finetune.method=lora", *NF4, "parallel.pp=2", "parallel.data=fsdp"]),
    ("qlora_cp_2", 2, ["finetune.method=lora", *NF4, "parallel.cp=2"]),
    # QLoRA under TP quantizes each rank's shard on its own: the reference is one process on a plain base holding
    # those shards' dequantized values (parity_worker.py `nf4_like_tp_reference`)
    ("qlora_tp", 2, ["finetune.method=lora", *NF4, "parallel.tp=2"]),
    ("qdora_fsdp_tp", 4, ["finetune.method=dora", *NF4, "parallel.data=fsdp", "parallel.tp=2"]),
]
