"""Hugging Face interop: import a local `LlamaForCausalLM` (or `MixtralForCausalLM`) directory, export any checkpoint
to one.

    args, sd = from_hf("path/to/hf-llama")       # ModelArgs and our state dict (fp32)
    to_hf(sd, args, "path/to/out")                # config.json + model.safetensors that transformers loads

Names map one to one (`model.layers.3.self_attn.q_proj.weight` <-> `layers.3.attention.wq.weight`). The one
real difference is RoPE's layout: our attention rotates interleaved pairs (dims 2i, 2i+1 of each head, as
Meta's reference code), HF's rotates halves (dims i, i + hd/2). HF's conversion script permutes the rows of
wq and wk to go from one to the other; we apply that permutation and its inverse, so that logits agree.
Only `wq` and `wk` are permuted: V, O and the MLP do not see RoPE.

Mixtral (model_type "mixtral") is this LLaMA with every feed-forward an MoE block (models/moe.py: softmax scores,
top-k renormalized, no shared experts): `block_sparse_moe.gate.weight` is the router's gate and
`block_sparse_moe.experts.<e>.w1/w2/w3.weight` each expert's matrices, stacked into ours (the layout transformers
writes to disk, 4.x and 5.x alike, and what the export writes); transformers 5's in-memory names (`mlp.gate.weight`,
the fused `mlp.experts.gate_up_proj`, E x 2F x D: the gate's F rows then the up projection's, and
`mlp.experts.down_proj`) are read too. HF Mixtral has no routing bias: a checkpoint whose balancing bias moved is
refused on export (its routing would change).

`load_weights(trainer, path)` (checkpoint.init_from) starts a run from an HF directory, a .safetensors file
or a step-N checkpoint of any strategy, before the optimizer exists.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from models.args import model_args_of
from models.llama import ModelArgs, RopeScaling, args_from_record, build_model, canonical_name
from models.moe import MoEArgs
from parallel.zero import is_partitioned, load_full_into_partitions
from trainer.state import consolidated_state_dict, state_module

_BLOCK = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "self_attn.q_norm.weight": "attention.q_norm.weight",  # (Qwen3)
    "self_attn.k_norm.weight": "attention.k_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_ROOT = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}


def _halves_to_interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF row order (per head: first halves, then second halves) -> interleaved pairs (a 1-D weight: its elements,
    Qwen3's per-head query and key norms)."""
    if w.dim() == 1:
        return _halves_to_interleaved(w[:, None], heads)[:, 0]
    out, d = w.shape
    return w.view(heads, 2, out // heads // 2, d).transpose(1, 2).reshape(out, d)


def _interleaved_to_halves(w: torch.Tensor, heads: int) -> torch.Tensor:
    if w.dim() == 1:
        return _interleaved_to_halves(w[:, None], heads)[:, 0]
    out, d = w.shape
    return w.view(heads, out // heads // 2, 2, d).transpose(1, 2).reshape(out, d)


# HF config fields whose value changes the computation, and the values this LLaMA implements. Any other
# value is refused by name: loading it would run a different model under the same weights.
_IMPLEMENTED = {
    "model_type": ("llama", "mixtral", "qwen3", "qwen3_moe"),
    "decoder_sparse_step": (1,),  # Qwen3-MoE: every block past mlp_only_layers is MoE
    "router_jitter_noise": (0, 0.0),  # Mixtral: no noise on the router's logits
    "hidden_act": ("silu",),  # SwiGLU's gate
    "attention_bias": (False,),
    "mlp_bias": (False,),
    "pretraining_tp": (1,),  # Meta's sliced-matmul emulation of TP; the same math only at 1
    "attention_dropout": (0, 0.0),  # no dropout in shardwise's blocks
    "partial_rotary_factor": (1, 1.0),  # RoPE over every head dimension
    "sliding_window": (),  # full causal attention only: any window is refused (null is fine)
    "use_sliding_window": (False,),  # (Qwen3: a window only where this is true)
}
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope_of(c: dict) -> dict | None:
    """The RoPE scaling dict of a config (transformers <5: rope_scaling; >=5: rope_parameters)."""
    for key in ("rope_scaling", "rope_parameters"):
        if isinstance(c.get(key), dict):
            return c[key]
    return None


def unsupported_fields(c: dict) -> list[str]:
    """Every field of an HF LLaMA config whose value shardwise does not implement, with the value."""
    problems = [
        f"{k}={c[k]!r} (shardwise implements {' or '.join(map(repr, ok)) or 'null only'})"
        for k, ok in _IMPLEMENTED.items()
        if k in c
        and c[k] is not None
        and c[k] not in ok
        and not (k == "sliding_window" and c.get("use_sliding_window") is False)  # (Qwen3: a window never used)
    ]
    dense = c.get("mlp_only_layers") or []
    if c.get("model_type") == "qwen3_moe" and dense != list(range(len(dense))):
        problems.append(f"mlp_only_layers={dense} (shardwise implements the first k blocks dense: [0, ..., k-1])")
    heads, hidden = c.get("num_attention_heads"), c.get("hidden_size")
    qwen3 = c.get("model_type") in ("qwen3", "qwen3_moe")  # (their heads' width is their own: head_dim)
    if c.get("head_dim") is not None and heads and hidden and c["head_dim"] != hidden // heads and not qwen3:
        problems.append(
            f"head_dim={c['head_dim']} != hidden_size / num_attention_heads = {hidden}/{heads} = "
            f"{hidden // heads} (shardwise derives the head size from the width)"
        )
    rope = _rope_of(c)
    if rope:
        kind = rope.get("rope_type", rope.get("type"))
        if kind not in (None, "default", "llama3"):
            problems.append(f"rope_scaling rope_type={kind!r} (shardwise implements 'default' and 'llama3')")
        elif kind == "llama3":
            problems += [f"rope_scaling of type llama3 without {k}" for k in _LLAMA3_KEYS if k not in rope]
    return problems


def args_from_hf_config(c: dict) -> ModelArgs:
    problems = unsupported_fields(c)
    if problems:
        raise ValueError(
            f"this Hugging Face config has {len(problems)} setting(s) shardwise does not implement: "
            f"{'; '.join(problems)}"
        )
    scaling = _rope_of(c)
    rope = None
    if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3":
        rope = RopeScaling(
            factor=scaling["factor"],
            low_freq_factor=scaling["low_freq_factor"],
            high_freq_factor=scaling["high_freq_factor"],
            original_max_seq_len=scaling["original_max_position_embeddings"],
        )
    theta = c.get("rope_theta") or (scaling or {}).get("rope_theta") or 10000.0
    moe = None
    if c.get("model_type") == "mixtral":  # every block an MoE one (routed experts each intermediate_size wide)
        moe = MoEArgs(
            n_experts=c["num_local_experts"],
            top_k=c["num_experts_per_tok"],
            expert_hidden=c["intermediate_size"],
            score="softmax",
            normalize=True,
            bias_update_rate=0.0,
        )
    if c.get("model_type") == "qwen3_moe":  # the first len(mlp_only_layers) blocks dense, the rest MoE
        moe = MoEArgs(
            n_experts=c.get("num_experts") or c["num_local_experts"],  # (transformers 4 / 5 names)
            top_k=c["num_experts_per_tok"],
            expert_hidden=c["moe_intermediate_size"],
            dense_layers=len(c.get("mlp_only_layers") or []),
            score="softmax",
            normalize=bool(c.get("norm_topk_prob", False)),
            bias_update_rate=0.0,
        )
    qwen3 = c.get("model_type") in ("qwen3", "qwen3_moe")
    return ModelArgs(
        moe=moe,
        head_size=c.get("head_dim") if qwen3 else None,
        qk_norm=qwen3,
        dim=c["hidden_size"],
        n_layers=c["num_hidden_layers"],
        n_heads=c["num_attention_heads"],
        n_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
        vocab_size=c["vocab_size"],
        ffn_hidden_dim=c["intermediate_size"],
        norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=rope,
        max_seq_len=c.get("max_position_embeddings", 4096),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
    )


def model_overrides(args: ModelArgs) -> list[str]:
    """The model.* keys that give a run this shape (for messages: what to set to load a checkpoint)."""
    out = [
        f"model.dim={args.dim}",
        f"model.n_layers={args.n_layers}",
        f"model.n_heads={args.n_heads}",
        f"model.n_kv_heads={args.kv_heads}",
        f"model.vocab_size={args.vocab_size}",
        f"model.ffn_hidden_dim={args.ffn_hidden}",
        f"model.norm_eps={args.norm_eps}",
        f"model.rope_theta={args.rope_theta}",
        f"model.tie_embeddings={str(args.tie_embeddings).lower()}",
    ]
    if args.moe is not None:
        m = args.moe
        out += [
            f"model.moe.n_experts={m.n_experts}",
            f"model.moe.top_k={m.top_k}",
            f"model.moe.expert_hidden={args.expert_hidden}",
            f"model.moe.n_shared_experts={m.n_shared_experts}",
            f"model.moe.dense_layers={m.dense_layers}",
            f"model.moe.score={m.score}",
            f"model.moe.normalize={str(m.normalize).lower()}",
        ]
    r = args.rope_scaling
    if r is None:
        out.append("model.rope_scaling.type=none")
    else:
        out += [
            "model.rope_scaling.type=llama3",
            f"model.rope_scaling.factor={r.factor}",
            f"model.rope_scaling.low_freq_factor={r.low_freq_factor}",
            f"model.rope_scaling.high_freq_factor={r.high_freq_factor}",
            f"model.rope_scaling.original_max_seq_len={r.original_max_seq_len}",
        ]
    return out


# MoE blocks (Mixtral): HF's name within a block -> ours; the fused gate/up weight is split (`_moe_from_hf`)
_MOE_BLOCK = {
    "mlp.gate.weight": "feed_forward.router.gate.weight",
    "block_sparse_moe.gate.weight": "feed_forward.router.gate.weight",  # (transformers 4)
    "mlp.experts.down_proj": "feed_forward.experts.w2",
}
# one matrix per expert, as transformers writes them to disk: Mixtral's block_sparse_moe.experts.<e>.<w>.weight,
# Qwen3-MoE's mlp.experts.<e>.<gate|up|down>_proj.weight
_PER_EXPERT = {"w1": "w1", "w2": "w2", "w3": "w3", "gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def _rope_rows(name: str, args: ModelArgs) -> int | None:
    """The heads whose rows RoPE's layout permutes in our tensor `name` (wq, wk and Qwen3's q/k norms); None."""
    for suffix, heads in (("wq.weight", args.n_heads), ("wk.weight", args.kv_heads), ("_norm.weight", 1)):
        if name.endswith(suffix) and (suffix != "_norm.weight" or ".attention." in name):
            return heads
    return None


def _hf_to_ours(name: str) -> str | None:
    """Our name for an HF LLaMA / Mixtral tensor; '' for tensors that are not weights (RoPE tables); None: unknown.
    (The fused and per-expert MoE weights are handled by `_moe_from_hf`.)"""
    if name in _ROOT:
        return _ROOT[name]
    parts = name.split(".")
    rest = ".".join(parts[3:])
    if name.startswith("model.layers.") and rest in _BLOCK:
        return f"layers.{parts[2]}.{_BLOCK[rest]}"
    if name.startswith("model.layers.") and rest in _MOE_BLOCK:
        return f"layers.{parts[2]}.{_MOE_BLOCK[rest]}"
    return "" if name.endswith("rotary_emb.inv_freq") else None


def _fused_experts(key: str) -> str | None:
    """Our experts module (`layers.<i>.feed_forward.experts`) for transformers 5's fused gate/up tensor's name."""
    parts = key.split(".")
    if key.startswith("model.layers.") and ".".join(parts[3:]) == "mlp.experts.gate_up_proj":
        return f"layers.{parts[2]}.feed_forward.experts"
    return None


def _one_expert(key: str) -> tuple[str, int] | None:
    """(our stacked weight's name, the expert) for one expert's matrix on disk (`_PER_EXPERT`)."""
    parts = key.split(".")
    if (
        key.startswith("model.layers.")
        and len(parts) == 8
        and parts[3:5] in (["block_sparse_moe", "experts"], ["mlp", "experts"])
        and parts[6] in _PER_EXPERT
    ):
        return f"layers.{parts[2]}.feed_forward.experts.{_PER_EXPERT[parts[6]]}", int(parts[5])
    return None


def _moe_from_hf(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The experts' stacked weights of every MoE block, from transformers 5's fused `gate_up_proj` (split into w1,
    w3) or transformers 4's per-expert matrices (stacked); those HF tensors are taken out of `hf`."""
    out: dict[str, torch.Tensor] = {}
    per_expert: dict[str, dict[int, torch.Tensor]] = {}
    for name in list(hf):
        if (fused := _fused_experts(name)) is not None:
            w = hf.pop(name)
            F = w.shape[1] // 2
            out[f"{fused}.w1"], out[f"{fused}.w3"] = w[:, :F], w[:, F:]
        elif (one := _one_expert(name)) is not None:
            per_expert.setdefault(one[0], {})[one[1]] = hf.pop(name)
    for ours, experts in per_expert.items():
        out[ours] = torch.stack([experts[e] for e in sorted(experts)])
    return out


def hf_family(args: ModelArgs) -> str:
    """The HF model type this model exports as: Qwen3 (-MoE) with per-head query/key norms, else LLaMA or
    Mixtral."""
    if args.qk_norm:
        return "qwen3_moe" if args.moe is not None else "qwen3"
    if args.head_size is not None and args.head_size != args.dim // args.n_heads:
        raise ValueError(
            f"model.head_dim={args.head_size} without model.qk_norm has no Hugging Face form here (LLaMA and Mixtral "
            f"derive it: model.dim / model.n_heads = {args.dim // args.n_heads})"
        )
    return "mixtral" if args.moe is not None else "llama"


_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}


def hf_config(args: ModelArgs) -> dict:
    family = hf_family(args)
    c = {
        "architectures": [_ARCHITECTURES[family]],
        "model_type": family,
        "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "intermediate_size": args.ffn_hidden,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": args.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "head_dim": args.head_dim,
        "torch_dtype": "float32",
    }
    if family in ("qwen3", "qwen3_moe"):
        c.update(use_sliding_window=False, sliding_window=None)
    if args.moe is not None:
        c.update(_moe_config(args, family))
    if args.rope_scaling is not None:
        r = args.rope_scaling
        c["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": r.factor,
            "low_freq_factor": r.low_freq_factor,
            "high_freq_factor": r.high_freq_factor,
            "original_max_position_embeddings": r.original_max_seq_len,
        }
    return c


# MoEArgs fields a run chooses for itself, not the imported model's (init_from compares the rest)
MOE_TRAINING_FIELDS = ("bias_update_rate", "routing", "grouped_mm", "capacity_factor")


def _moe_config(args: ModelArgs, family: str) -> dict:
    """The MoE fields of an HF config (Mixtral's or Qwen3-MoE's); a model the family cannot express is refused by
    name."""
    m = args.moe
    mixtral = family == "mixtral"
    problems = [
        f"{what} (HF {family}: {want})"
        for what, bad, want in (
            (f"model.moe.dense_layers={m.dense_layers}", mixtral and m.dense_layers != 0, "every block MoE"),
            (f"model.moe.n_shared_experts={m.n_shared_experts}", m.n_shared_experts != 0, "no shared experts"),
            (f"model.moe.score={m.score}", m.score != "softmax", "softmax"),
            (f"model.moe.normalize={m.normalize}", mixtral and not m.normalize, "top-k weights renormalized"),
            (f"model.moe.capacity_factor={m.capacity_factor}", m.capacity_factor is not None, "dropless"),
        )
        if bad
    ]
    if problems:
        raise ValueError(f"this MoE model has no Hugging Face {family} form: {'; '.join(problems)}")
    if mixtral:
        return {
            "num_local_experts": m.n_experts,
            "num_experts_per_tok": m.top_k,
            "intermediate_size": args.expert_hidden,
            "router_jitter_noise": 0.0,
            "output_router_logits": False,
            "sliding_window": None,
        }
    return {
        "num_experts": m.n_experts,  # (transformers 4's name; 5 writes num_local_experts and reads either)
        "num_local_experts": m.n_experts,
        "num_experts_per_tok": m.top_k,
        "moe_intermediate_size": args.expert_hidden,
        "intermediate_size": args.ffn_hidden,
        "norm_topk_prob": m.normalize,
        "decoder_sparse_step": 1,
        "mlp_only_layers": list(range(m.dense_layers)),
        "output_router_logits": False,
    }


def from_hf(path: str | Path) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """(ModelArgs, our state dict in fp32) from a local HF LLaMA directory (config.json + *.safetensors)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: no config.json; not a Hugging Face model directory")
    args = args_from_hf_config(json.loads((path / "config.json").read_text()))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path}: no .safetensors files (convert .bin checkpoints with transformers first)")
    hf: dict[str, torch.Tensor] = {}
    for f in files:
        hf.update(load_file(str(f)))
    sd, unknown = _moe_from_hf(hf), []
    for name, w in hf.items():
        ours = _hf_to_ours(name)
        if ours is None:
            unknown.append(name)
        elif ours:
            if (heads := _rope_rows(ours, args)) is not None:
                w = _halves_to_interleaved(w, heads)
            sd[ours] = w
    if unknown:
        raise ValueError(f"{path}: tensors with no counterpart in our LLaMA: {unknown[:5]}")
    if args.tie_embeddings:
        sd.pop("output.weight", None)
    return args, {k: v.float().contiguous() for k, v in sd.items()}


def to_hf(sd: dict[str, torch.Tensor], args: ModelArgs, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write our (consolidated) state dict as an HF LLaMA directory that `from_pretrained` loads."""
    from safetensors.torch import save_file

    out = Path(out)
    config = hf_config(args)  # (a model with no HF form is refused before anything is written)
    inv_root = {v: k for k, v in _ROOT.items()}
    family = hf_family(args)
    router, experts = (
        ("block_sparse_moe.gate.weight", "block_sparse_moe.experts.{e}.{w}.weight")
        if family == "mixtral"
        else ("mlp.gate.weight", "mlp.experts.{e}.{w}.weight")
    )
    per_expert = (
        {"w1": "w1", "w2": "w2", "w3": "w3"}
        if family == "mixtral"
        else {
            "w1": "gate_proj",
            "w2": "down_proj",
            "w3": "up_proj",
        }
    )
    inv_block = {v: k for k, v in _BLOCK.items()} | {"feed_forward.router.gate.weight": router}
    hf = {}
    for name, w in sd.items():
        if name.endswith("router.expert_bias"):  # (HF Mixtral and Qwen3-MoE route without a bias)
            if w.abs().max() > 0:
                raise ValueError(
                    f"{name} moved (max |bias| {w.abs().max():.3g}): HF {_ARCHITECTURES[family]} has no routing "
                    "bias, so the exported model would route tokens to other experts; export a run trained with "
                    "model.moe.bias_update_rate=0"
                )
            continue
        if ".feed_forward.experts.w" in name:  # one matrix per expert, as transformers writes them to disk
            _, i, rest = name.split(".", 2)
            for e in range(w.shape[0]):
                hf[f"model.layers.{i}." + experts.format(e=e, w=per_expert[rest.rsplit(".", 1)[1]])] = w[e]
            continue
        if name in inv_root:
            if name == "output.weight" and args.tie_embeddings:
                continue
            hf[inv_root[name]] = w
            continue
        _, i, rest = name.split(".", 2)
        if (heads := _rope_rows(name, args)) is not None:
            w = _interleaved_to_halves(w, heads)
        hf[f"model.layers.{i}.{inv_block[rest]}"] = w
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.to(dtype).contiguous() for k, v in hf.items()}, str(out / "model.safetensors"), metadata={"format": "pt"}
    )
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def to_peft(model, args: ModelArgs, spec, out: str | Path, base: str = "") -> Path:
    """Write a model's LoRA/DoRA adapters (models/adapters.py) as a PEFT adapter directory: adapter_config.json and
    adapter_model.safetensors under PEFT's names (`base_model.model.model.layers.<i>.self_attn.q_proj.lora_A.weight`,
    `...lora_B.weight`, DoRA's `...lora_magnitude_vector`), which `peft.PeftModel.from_pretrained` loads onto the
    base `to_hf` wrote (`base`: its path, recorded as base_model_name_or_path). The rows of wq and wk are in HF's
    RoPE order there, so B's rows and the magnitudes of those two are permuted as their base weights are."""
    from safetensors.torch import save_file

    from models.adapters import AdapterLinear

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    inv_block = {v.removesuffix(".weight"): k.removesuffix(".weight") for k, v in _BLOCK.items()}
    tensors, targets = {}, set()
    for name, mod in model.named_modules():
        if not isinstance(mod, AdapterLinear):
            continue
        name = canonical_name(name)
        _, i, rest = name.split(".", 2)
        hf = inv_block[rest]
        targets.add(hf.rsplit(".", 1)[1])
        rows = {"attention.wq": args.n_heads, "attention.wk": args.kv_heads}.get(rest)
        a, b = mod.lora_a.weight.detach(), mod.lora_b.weight.detach()
        m = None if mod.magnitude is None else mod.magnitude.detach()
        if rows:
            b = _interleaved_to_halves(b, rows)
            m = None if m is None else _interleaved_to_halves(m.unsqueeze(1), rows).squeeze(1)
        prefix = f"base_model.model.model.layers.{i}.{hf}"
        tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = a, b
        if m is not None:
            tensors[f"{prefix}.lora_magnitude_vector"] = m
    save_file({k: v.float().contiguous() for k, v in tensors.items()}, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": sorted(targets),
        "use_dora": spec.kind == "dora",
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def load_full_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], ModelArgs | None]:
    """Full fp32 weights from an HF directory, a .safetensors file or a step-N checkpoint (any strategy)."""
    if path.is_dir() and (path / "config.json").is_file():
        args, sd = from_hf(path)
        return sd, args
    if path.is_file() and path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path)), None
    if path.is_dir():
        return consolidated_state_dict(path), None
    raise ValueError(
        f"checkpoint.init_from={path}: expected an HF directory, a .safetensors file or a step-N directory"
    )


def source_shapes(path: Path) -> tuple[ModelArgs | None, dict[str, tuple[int, ...]]]:
    """(the source's model shape when it says one, {our name: shape}) of an init_from source, read without
    loading any weights: an HF directory's config and safetensors headers, a .safetensors file's header, or
    a step-N checkpoint's train_state.json. Raises ValueError for anything else."""
    from safetensors import safe_open

    def header(f: Path) -> dict[str, tuple[int, ...]]:
        try:
            with safe_open(str(f), framework="pt") as st:
                return {k: tuple(st.get_slice(k).get_shape()) for k in st.keys()}
        except Exception as e:  # not a safetensors file
            raise ValueError(f"{f}: not a readable .safetensors file ({type(e).__name__}: {e})") from None

    if path.is_dir() and (path / "config.json").is_file():
        try:
            config = json.loads((path / "config.json").read_text())
        except ValueError as e:
            raise ValueError(f"{path}/config.json is not JSON ({e})") from None
        args = args_from_hf_config(config)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{path}: no .safetensors files (convert .bin checkpoints with transformers first)")
        read = TensorReader(path)  # (our names, MoE experts stacked from HF's fused or per-expert tensors)
        shapes = {name: read.shape(name) for name in read.names()}
        for f in files:
            for name in header(f):
                if _hf_to_ours(name) is None and _fused_experts(name) is None and _one_expert(name) is None:
                    shapes[f"(HF) {name}"] = ()
        if args.tie_embeddings:
            shapes.pop("output.weight", None)
        return args, shapes
    if path.is_file() and path.suffix == ".safetensors":
        return None, header(path)
    if path.is_dir() and (path / "train_state.json").is_file():
        try:
            args = args_from_record(json.loads((path / "train_state.json").read_text())["model"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}/train_state.json is unreadable ({type(e).__name__}: {e})") from None
        model = build_model(args, device="meta")
        return args, {canonical_name(n): tuple(p.shape) for n, p in model.named_parameters()}
    raise ValueError(
        f"{path} is not an HF model directory (config.json + *.safetensors), a .safetensors file or "
        f"a shardwise step-N checkpoint directory"
    )


def init_from_problems(cfg, path: Path, source_args: ModelArgs | None, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Why the weights at `path` cannot start this run's model: every name without a place in the model
    (and the reverse) and every shape that differs, with the model.* keys to set when the source says its
    shape. Empty: every weight has exactly one place."""
    from dataclasses import asdict

    ours = model_args_of(cfg)
    model = build_model(ours, device="meta")
    want = {canonical_name(n): tuple(p.shape) for n, p in model.named_parameters()}
    have = dict(shapes)
    if ours.tie_embeddings:
        have.pop("output.weight", None)  # a tied table may be saved under both names
    problems = []
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    wrong = [f"{n}: {have[n]} there, {want[n]} here" for n in sorted(set(want) & set(have)) if have[n] != want[n]]
    if missing:
        problems.append(
            f"no weights for {len(missing)} parameter(s) of this run's model: "
            f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}"
        )
    if extra:
        problems.append(
            f"{len(extra)} weight(s) with no place in this run's model: "
            f"{', '.join(extra[:6])}{' ...' if len(extra) > 6 else ''}"
        )
    if wrong:
        problems.append(f"{len(wrong)} shape(s) differ: {'; '.join(wrong[:4])}{' ...' if len(wrong) > 4 else ''}")
    if source_args is not None:
        a, b = asdict(source_args), asdict(ours)
        a["ffn_hidden_dim"], b["ffn_hidden_dim"] = source_args.ffn_hidden, ours.ffn_hidden  # however each derives it
        a["n_kv_heads"], b["n_kv_heads"] = source_args.kv_heads, ours.kv_heads
        ignored = ("multiple_of", "ffn_dim_multiplier", "max_seq_len")  # rules for the above; a table length
        for m in (a, b):  # MoE: how a run routes and balances is its own (the shape and the scores are the model's)
            if m["moe"] is not None:
                m["moe"] = {k: v for k, v in m["moe"].items() if k not in MOE_TRAINING_FIELDS}
        if all(x.moe and not x.moe.dense_layers and not x.moe.n_shared_experts for x in (ours, source_args)):
            ignored += ("ffn_hidden_dim",)  # (every block MoE, no shared expert: the dense width is not used)
        differ = [f"{k}: {a[k]} there, {b[k]} here" for k in a if k not in ignored and a[k] != b[k]]
        if differ:
            problems.append(f"its model differs from this run's ({'; '.join(differ)})")
    if problems:
        fix = (
            f"; set the model.* keys to match: {' '.join(model_overrides(source_args))}"
            if source_args is not None
            else ""
        )
        return [f"checkpoint.init_from={path}: {'; '.join(problems)}{fix}"]
    return []


class TensorReader:
    """One tensor at a time from local weights, by our name, fp32: an HF directory's safetensors files (HF names
    mapped, wq/wk rows into our RoPE order), a .safetensors file of ours, or (whole, once) a step-N checkpoint. A
    QLoRA base is read like this, each weight quantized before the next is read."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path, self.index, self.full, self.args = Path(path), {}, None, None
        if (self.path / "config.json").is_file():
            self.args = args_from_hf_config(json.loads((self.path / "config.json").read_text()))
            experts: dict[str, dict[int, tuple]] = {}
            for f in sorted(self.path.glob("*.safetensors")):
                with safe_open(str(f), framework="pt") as h:
                    for key in h.keys():
                        if ours := _hf_to_ours(key):
                            self.index[ours] = (f, key)
                        elif (fused := _fused_experts(key)) is not None:  # (an MoE block's gate/up, transformers 5)
                            for half, w in enumerate(("w1", "w3")):
                                self.index[f"{fused}.{w}"] = (f, key, half)
                        elif (one := _one_expert(key)) is not None:  # (transformers 4: one matrix per expert)
                            experts.setdefault(one[0], {})[one[1]] = (f, key)
            for ours, per in experts.items():
                self.index[ours] = [per[e] for e in sorted(per)]
        elif self.path.is_file() and self.path.suffix == ".safetensors":
            with safe_open(str(self.path), framework="pt") as h:
                self.index = {key: (self.path, key) for key in h.keys()}
        else:
            self.full, _ = load_full_state_dict(self.path)

    def names(self) -> list[str]:
        return list(self.full) if self.full is not None else list(self.index)

    def __contains__(self, name: str) -> bool:
        return name in (self.full if self.full is not None else self.index)

    def __getitem__(self, name: str) -> torch.Tensor:  # (a mapping to ZeRO-3's partition fill: one tensor at a time)
        return self(name)

    def slice(self, name: str, offset: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
        """The block [offset, offset + shape) of `name` in our layout, fp32, reading only the rows and columns it
        covers from the file (safetensors' lazy slices); wq/wk rows in our RoPE order come from whole heads of HF's."""
        if self.full is not None:
            return self.full[name][tuple(slice(o, o + n) for o, n in zip(offset, shape))].float().contiguous()
        from safetensors import safe_open

        entry = self.index[name]
        if len(entry) != 2:  # an MoE block's experts: part of a fused gate/up tensor, or one file tensor per expert
            return self._experts_slice(entry, offset, shape)
        f, key = entry
        rows = _rope_rows(name, self.args) if self.args is not None else None  # (HF's RoPE layout)
        with safe_open(str(f), framework="pt") as h:
            sl = h.get_slice(key)
            r0, r1 = offset[0], offset[0] + shape[0]
            cols = tuple(slice(o, o + n) for o, n in zip(offset[1:], shape[1:]))  # (an MoE block's: 3-D)
            if not rows:
                w = sl[(slice(r0, r1), *cols)]
            else:  # rows of whole heads, reordered, then the ones asked for
                hd = sl.get_shape()[0] // rows
                h0, h1 = r0 // hd, -(-r1 // hd)
                w = _halves_to_interleaved(sl[(slice(h0 * hd, h1 * hd), *cols)], h1 - h0)[r0 - h0 * hd : r1 - h0 * hd]
        return w.float().contiguous()

    @staticmethod
    def _experts_slice(entry, offset: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
        from safetensors import safe_open

        block = [slice(o, o + n) for o, n in zip(offset, shape)]
        if isinstance(entry, tuple):  # (file, key, 0 for w1 or 1 for w3): rows of one half of gate_up_proj's dim 1
            f, key, half = entry
            with safe_open(str(f), framework="pt") as h:
                sl = h.get_slice(key)
                F = sl.get_shape()[1] // 2
                block[1] = slice(block[1].start + half * F, block[1].stop + half * F)
                return sl[tuple(block)].float().contiguous()
        out = []
        for f, key in entry[block[0]]:  # (one 2-D matrix per expert)
            with safe_open(str(f), framework="pt") as h:
                out.append(h.get_slice(key)[tuple(block[1:])])
        return torch.stack(out).float().contiguous()

    def shape(self, name: str) -> tuple[int, ...]:
        if self.full is not None:
            return tuple(self.full[name].shape)
        from safetensors import safe_open

        entry = self.index[name]
        if isinstance(entry, list):  # one matrix per expert
            with safe_open(str(entry[0][0]), framework="pt") as h:
                return (len(entry), *h.get_slice(entry[0][1]).get_shape())
        with safe_open(str(entry[0]), framework="pt") as h:
            have = tuple(h.get_slice(entry[1]).get_shape())
        return (have[0], have[1] // 2, *have[2:]) if len(entry) == 3 else have

    def __call__(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The whole tensor (`slice` over all of it); `shape`: the model's, checked."""
        have = self.shape(name)
        if shape is not None and have != tuple(shape):
            raise ValueError(f"{self.path}: {name} is {have}, the model's is {tuple(shape)}")
        return self.slice(name, (0,) * len(have), have)


def load_weights(parts, cfg, path: Path) -> int:
    """Overwrite the (already sharded) model parts' weights with the weights at `path`, each rank reading only the
    slices it holds (a DTensor shard's rows and columns; ZeRO-3's partitions one whole tensor at a time), so that no
    rank holds the whole model in host memory. A QLoRA base was read and quantized while the model was built.
    Returns the host memory this rank grew by at the load's peak (bytes, from the process's peak resident set: an
    upper bound)."""
    import math
    import resource

    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from models.adapters import is_nf4

    args, shapes = source_shapes(path)
    problems = init_from_problems(cfg, path, args, shapes)
    if problems:  # validation checked this before the process group started; the files changed since
        raise ValueError(problems[0])
    before = _resident_bytes()
    read = TensorReader(path)
    nf4 = {canonical_name(n) for part in parts for n, p in part.named_parameters() if is_nf4(p)}
    if is_partitioned(parts):  # ZeRO-3, built partitioned: each rank copies its slice of every tensor
        load_full_into_partitions(parts[0], read)
    else:
        module = state_module(parts)
        with torch.no_grad():
            # (adapters on the base, models/adapters.py, are not in the source: they keep their own start)
            for n, p in module.named_parameters():
                name = canonical_name(n)
                if name not in read or name in nf4:
                    continue
                if hasattr(p, "placements"):  # a DTensor (FSDP2, TP): this rank's block of the full tensor
                    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
                    local = p.to_local()
                else:
                    shape, offset, local = tuple(p.shape), (0,) * p.dim(), p
                if math.prod(shape):
                    local.copy_(read.slice(name, tuple(offset), tuple(shape)))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # (KiB on Linux)
    return max(0, peak - before)


def _resident_bytes() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def adapted_model(path: Path):
    """An adapter run's step-N checkpoint as a whole model on the CPU: (the model with its adapters loaded, its
    ModelArgs, the AdapterSpec, the base's record from train_state.json). The base is rebuilt from its source:
    the original weights of checkpoint.init_from (never a quantized copy), or the draw of training.seed."""
    import json

    from models.adapters import AdapterSpec, apply_adapters, init_adapters
    from trainer.integrity import weights_checksum

    state = json.loads((path / "train_state.json").read_text())
    record = state.get("finetune", {"method": "full"})
    if record["method"] == "full":
        raise ValueError(f"{path} holds a full model, not adapters (train_state.json: finetune.method=full)")
    args = args_from_record(state["model"])
    spec = AdapterSpec(record["method"], record["rank"], record["alpha"], 0.0, tuple(record["targets"]))
    model = build_model(args, device="cpu")
    apply_adapters(model, spec)
    base = record["base"]
    if base["source"] == "seed":
        model.init_weights(seed=base["seed"])
    else:
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


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
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
