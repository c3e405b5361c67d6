"""Hugging Face LLaMA interop: import a local `LlamaForCausalLM` directory, export any checkpoint to one.

    args, sd = from_hf("path/to/hf-llama")       # ModelArgs and our state dict (fp32)
    to_hf(sd, args, "path/to/out")                # config.json + model.safetensors that transformers loads

Names map one to one (`model.layers.3.self_attn.q_proj.weight` <-> `layers.3.attention.wq.weight`). The one
real difference is RoPE's layout: our attention rotates interleaved pairs (dims 2i, 2i+1 of each head, as
Meta's reference code), HF's rotates halves (dims i, i + hd/2). HF's conversion script permutes the rows of
wq and wk to go from one to the other; we apply that permutation and its inverse, so that logits agree.
Only `wq` and `wk` are permuted: V, O and the MLP do not see RoPE.

`load_weights(trainer, path)` (checkpoint.init_from) starts a run from an HF directory, a .safetensors file
or a step-N checkpoint of any strategy, before the optimizer exists.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from models.llama import ModelArgs, RopeScaling, canonical_name

_BLOCK = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_ROOT = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
         "lm_head.weight": "output.weight"}


def _halves_to_interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF row order (per head: first halves, then second halves) -> interleaved pairs."""
    out, d = w.shape
    return w.view(heads, 2, out // heads // 2, d).transpose(1, 2).reshape(out, d)


def _interleaved_to_halves(w: torch.Tensor, heads: int) -> torch.Tensor:
    out, d = w.shape
    return w.view(heads, out // heads // 2, 2, d).transpose(1, 2).reshape(out, d)


def args_from_hf_config(c: dict) -> ModelArgs:
    if c.get("model_type", "llama") != "llama":
        raise ValueError(f"model_type={c.get('model_type')}: only LLaMA checkpoints are supported")
    scaling = c.get("rope_scaling") or (c.get("rope_parameters") if isinstance(c.get("rope_parameters"), dict) else None)
    rope = None
    if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3":
        rope = RopeScaling(factor=scaling["factor"], low_freq_factor=scaling["low_freq_factor"],
                           high_freq_factor=scaling["high_freq_factor"],
                           original_max_seq_len=scaling["original_max_position_embeddings"])
    elif scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise ValueError(f"rope scaling {scaling} is not supported (only llama3)")
    theta = c.get("rope_theta") or (scaling or {}).get("rope_theta") or 10000.0
    return ModelArgs(dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                     n_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"], vocab_size=c["vocab_size"],
                     ffn_hidden_dim=c["intermediate_size"], norm_eps=c.get("rms_norm_eps", 1e-6),
                     rope_theta=float(theta), rope_scaling=rope, max_seq_len=c.get("max_position_embeddings", 4096),
                     tie_embeddings=bool(c.get("tie_word_embeddings", False)))


def hf_config(args: ModelArgs) -> dict:
    c = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
         "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
         "num_key_value_heads": args.kv_heads, "intermediate_size": args.ffn_hidden, "vocab_size": args.vocab_size,
         "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta, "max_position_embeddings": args.max_seq_len,
         "tie_word_embeddings": args.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
         "mlp_bias": False, "head_dim": args.head_dim, "torch_dtype": "float32"}
    if args.rope_scaling is not None:
        r = args.rope_scaling
        c["rope_scaling"] = {"rope_type": "llama3", "factor": r.factor, "low_freq_factor": r.low_freq_factor,
                             "high_freq_factor": r.high_freq_factor,
                             "original_max_position_embeddings": r.original_max_seq_len}
    return c


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
    sd, unknown = {}, []
    for name, w in hf.items():
        if name in _ROOT:
            sd[_ROOT[name]] = w
            continue
        parts = name.split(".")
        if name.startswith("model.layers.") and ".".join(parts[3:]) in _BLOCK:
            ours = f"layers.{parts[2]}.{_BLOCK['.'.join(parts[3:])]}"
            if ours.endswith("wq.weight"):
                w = _halves_to_interleaved(w, args.n_heads)
            elif ours.endswith("wk.weight"):
                w = _halves_to_interleaved(w, args.kv_heads)
            sd[ours] = w
        elif not name.endswith("rotary_emb.inv_freq"):
            unknown.append(name)
    if unknown:
        raise ValueError(f"{path}: tensors with no counterpart in our LLaMA: {unknown[:5]}")
    if args.tie_embeddings:
        sd.pop("output.weight", None)
    return args, {k: v.float().contiguous() for k, v in sd.items()}


def to_hf(sd: dict[str, torch.Tensor], args: ModelArgs, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write our (consolidated) state dict as an HF LLaMA directory that `from_pretrained` loads."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    inv_root = {v: k for k, v in _ROOT.items()}
    inv_block = {v: k for k, v in _BLOCK.items()}
    hf = {}
    for name, w in sd.items():
        if name in inv_root:
            if name == "output.weight" and args.tie_embeddings:
                continue
            hf[inv_root[name]] = w
            continue
        _, i, rest = name.split(".", 2)
        if name.endswith("wq.weight"):
            w = _interleaved_to_halves(w, args.n_heads)
        elif name.endswith("wk.weight"):
            w = _interleaved_to_halves(w, args.kv_heads)
        hf[f"model.layers.{i}.{inv_block[rest]}"] = w
    save_file({k: v.to(dtype).contiguous() for k, v in hf.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(args), indent=2))
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
        from trainer.checkpoint import consolidated_state_dict

        return consolidated_state_dict(path), None
    raise ValueError(f"checkpoint.init_from={path}: expected an HF directory, a .safetensors file or a step-N directory")


def load_weights(parts, cfg, path: Path) -> None:
    """Overwrite the (already sharded) model parts' weights with the full weights at `path`."""
    from dataclasses import asdict

    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from trainer.checkpoint import state_module
    from trainer.config import model_args_of

    sd, args = load_full_state_dict(path)
    ours = model_args_of(cfg)
    if args is not None:  # an HF directory says its shape: compare what defines the weights' values
        a, b = asdict(args), asdict(ours)
        a["ffn_hidden_dim"], b["ffn_hidden_dim"] = args.ffn_hidden, ours.ffn_hidden  # however each derives it
        ignored = ("multiple_of", "ffn_dim_multiplier", "max_seq_len")  # rules for the above; a table length
        differ = [f"{k}: {a[k]} there, {b[k]} here" for k in a if k not in ignored and a[k] != b[k]]
        if differ:
            raise ValueError(f"checkpoint.init_from={path}: its model differs from this run's ({'; '.join(differ)}); "
                             f"set the model.* keys to match")
    module = state_module(parts)
    shapes = {canonical_name(n): tuple(p.shape) for n, p in module.named_parameters()}
    missing = sorted(set(shapes) - set(sd))
    if missing:
        raise ValueError(f"checkpoint.init_from={path}: no weights for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    wrong = [f"{n}: {tuple(sd[n].shape)} vs {s}" for n, s in shapes.items() if tuple(sd[n].shape) != s]
    if wrong:
        raise ValueError(f"checkpoint.init_from={path}: shapes differ from this run's model: {wrong[:3]}")
    set_model_state_dict(module, {k: sd[k] for k in shapes}, options=StateDictOptions(full_state_dict=True, strict=False))
