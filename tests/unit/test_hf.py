"""Hugging Face LLaMA interop against a tiny LlamaForCausalLM built here with transformers (no download)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from models.llama import build_model  # noqa: E402
from trainer.hf import from_hf, to_hf  # noqa: E402


def tiny_hf(tmp_path, *, tie=False, kv=2):
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv,
        vocab_size=256,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initializes norms to 1: make them informative
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    return model


@pytest.mark.parametrize("tie, kv", [(False, 2), (True, 4)], ids=["gqa", "tied_mha"])
def test_hf_model_loads_with_equal_logits_and_exports_back(tie, kv, tmp_path):
    hf = tiny_hf(tmp_path, tie=tie, kv=kv)
    args, sd = from_hf(tmp_path / "hf")
    assert args.ffn_hidden == 160 and args.kv_heads == kv and args.tie_embeddings == tie
    ours = build_model(args, device="cpu")
    ours.init_weights(0)
    missing, unexpected = ours.load_state_dict(sd, strict=False)
    assert not unexpected and all(m == "output.weight" for m in missing) and (tie or not missing)
    if tie:
        assert ours.output.weight is ours.tok_embeddings.weight
    ours.eval()
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(tokens).logits
        got = ours(tokens)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    # and back: our export loads into transformers with the same logits
    to_hf({k: v for k, v in ours.state_dict().items() if "rope" not in k}, args, tmp_path / "out")
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, want, rtol=0, atol=1e-5)


def test_without_the_qk_permutation_the_logits_differ(tmp_path):
    """The permutation is what makes them agree (guards against a test that would pass anyway)."""
    from trainer import hf as hf_mod

    hf = tiny_hf(tmp_path)
    args, sd = from_hf(tmp_path / "hf")
    for k in [k for k in sd if k.endswith(("wq.weight", "wk.weight"))]:
        heads = args.n_heads if "wq" in k else args.kv_heads
        sd[k] = hf_mod._interleaved_to_halves(sd[k], heads)  # undo it
    ours = build_model(args, device="cpu")
    ours.init_weights(0)
    ours.load_state_dict(sd, strict=False)
    tokens = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        # seen: 3.4e-3, over 300x the 1e-5 the permuted weights agree to
        assert (ours.eval()(tokens) - hf(tokens).logits).abs().max() > 1e-3


LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def _save_hf(tmp_path, name="hf", **overrides):
    cfg = transformers.LlamaConfig(
        **{
            **dict(
                hidden_size=64,
                intermediate_size=160,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=256,
                max_position_embeddings=128,
                rms_norm_eps=1e-5,
                rope_theta=10000.0,
            ),
            **overrides,
        }
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / name, safe_serialization=True)
    return model


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"head_dim": 32}, "head_dim=32 != hidden_size / num_attention_heads = 64/4 = 16"),
        ({"attention_bias": True}, "attention_bias=True"),
        ({"mlp_bias": True}, "mlp_bias=True"),
        (
            {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}},
            "rope_type='yarn'",
        ),
        ({"sliding_window": 16}, "sliding_window=16 (shardwise implements null only)"),
    ],
    ids=["gelu", "head_dim", "attention_bias", "mlp_bias", "yarn", "sliding_window"],
)
def test_hf_configs_shardwise_does_not_implement_are_refused_by_name(overrides, named, tmp_path):
    _save_hf(tmp_path, **overrides)
    with pytest.raises(ValueError, match="does not implement") as e:
        from_hf(tmp_path / "hf")
    assert named in str(e.value)


def test_llama31_rope_scaling_imports_trains_from_init_from_and_exports(tmp_path):
    """An HF Llama-3.1-style model (rope_type llama3) gives the same logits past the original context,
    starts a run with checkpoint.init_from and the model.rope_scaling keys, and exports with them."""
    import json
    import subprocess
    import sys

    from helpers import REPO, read_jsonl, run_train

    hf = _save_hf(tmp_path, rope_scaling=dict(LLAMA31_ROPE))  # transformers adds to the dict it is given
    args, sd = from_hf(tmp_path / "hf")
    assert args.rope_scaling is not None and args.rope_scaling.factor == 8.0
    ours = build_model(args, device="cpu")
    ours.init_weights(0)
    ours.load_state_dict(sd, strict=False)
    tokens = torch.randint(0, 256, (2, 96), generator=torch.Generator().manual_seed(3))  # 3x the original 32
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(tokens), hf(tokens).logits, rtol=0, atol=1e-5)

    keys = [
        "model.dim=64",
        "model.n_layers=2",
        "model.n_heads=4",
        "model.n_kv_heads=2",
        "model.vocab_size=256",
        "model.ffn_hidden_dim=160",
        "model.max_seq_len=128",
    ]
    base = [
        "recipe=llama_debug",
        *keys,
        "data.source=synthetic",
        "training.seq_len=64",
        "training.steps=1",
        "training.global_batch_size=2",
        "training.micro_batch_size=2",
        "training.precision=fp32",
        "optim.warmup_steps=0",
        "logging.tensorboard=false",
        "logging.wandb.mode=disabled",
        "checkpoint.every=1",
        f"checkpoint.init_from={tmp_path / 'hf'}",
    ]
    # without the rope keys the run is refused before it starts, and told what to set
    refused = run_train([*base, f"run_dir={tmp_path / 'refused'}"], check=False, timeout=120)
    assert refused.returncode == 2 and "model.rope_scaling.type=llama3" in refused.stderr
    assert "rope_scaling: None there" not in refused.stderr and "Traceback" not in refused.stderr
    rope = [
        "model.rope_scaling.type=llama3",
        "model.rope_scaling.factor=8",
        "model.rope_scaling.low_freq_factor=1",
        "model.rope_scaling.high_freq_factor=4",
        "model.rope_scaling.original_max_seq_len=32",
    ]
    run = tmp_path / "run"
    proc = run_train([*base, *rope, "training.val_every=1", f"run_dir={run}"], timeout=180)
    assert "initialized the weights from" in proc.stdout
    # the starting validation loss is the HF model's own on the same batches
    val0 = next(r["val/loss"] for r in read_jsonl(run / "metrics.jsonl") if r.get("step") == 0 and "val/loss" in r)
    assert 0 < val0 < 10
    out = tmp_path / "exported"
    conv = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch" / "convert_checkpoint.py"),
            str(run / "checkpoints" / "step-1"),
            "--hf",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert conv.returncode == 0, conv.stderr
    exported = json.loads((out / "config.json").read_text())["rope_scaling"]
    assert exported == LLAMA31_ROPE, exported
    transformers.LlamaForCausalLM.from_pretrained(out)  # transformers loads what was exported
    args2, _ = from_hf(out)
    assert args2.rope_scaling == args.rope_scaling


@pytest.mark.parametrize(
    "source_layers, target_layers, named",
    [
        (4, 3, "9 weight(s) with no place in this run's model: layers.3."),
        (3, 4, "no weights for 9 parameter(s) of this run's model: layers.3."),
    ],
)
def test_init_from_with_other_layers_is_refused_with_the_names(source_layers, target_layers, named, tmp_path):
    from safetensors.torch import save_file

    from models.llama import model_args
    from trainer.config import load_config
    from trainer.validate import validate

    src = build_model(
        model_args("debug", dim=64, n_layers=source_layers, n_heads=4, n_kv_heads=2, vocab_size=256), device="cpu"
    )
    src.init_weights(0)
    save_file({k: v for k, v in src.state_dict().items() if "rope" not in k}, str(tmp_path / "w.safetensors"))
    cfg = load_config(
        [
            "recipe=llama_debug",
            "model.dim=64",
            f"model.n_layers={target_layers}",
            "model.n_heads=4",
            "model.n_kv_heads=2",
            "model.vocab_size=256",
            "data.source=synthetic",
            f"checkpoint.init_from={tmp_path / 'w.safetensors'}",
            f"run_dir={tmp_path / 'run'}",
        ]
    )
    problems = [p for p in validate(cfg, 1) if "init_from" in p]
    assert len(problems) == 1 and named in problems[0], problems


def _equal_logits_both_ways(hf, args, sd, kind, out):
    """Our model with the imported weights gives the HF model's logits (1e-5), and our export loads into `kind` with
    them; returns (our model, the tokens, the HF logits)."""
    ours = build_model(args, device="cpu")
    ours.init_weights(0)
    missing, unexpected = ours.load_state_dict(sd, strict=False)
    assert not unexpected and all(m.endswith("router.expert_bias") for m in missing), missing
    ours.eval()
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(tokens).logits
        torch.testing.assert_close(ours(tokens), want, rtol=0, atol=1e-5)
        to_hf({k: v for k, v in ours.state_dict().items() if "rope" not in k}, args, out)
        torch.testing.assert_close(kind.from_pretrained(out).eval()(tokens).logits, want, rtol=0, atol=1e-5)
    return ours, tokens, want


def tiny_mixtral(tmp_path, name="mixtral"):
    from helpers import tiny_mixtral as build

    return build(tmp_path / name)


def test_mixtral_loads_with_equal_logits_and_exports_back(tmp_path):
    """A tiny HF Mixtral (4 experts, top-2, in every block) imports as MoE blocks with the same logits, and our export
    loads back into transformers with them; the experts' fused gate/up weight split the other way round (w1 and w3
    swapped) changes the logits, so the comparison sees the split."""
    hf = tiny_mixtral(tmp_path)
    args, sd = from_hf(tmp_path / "mixtral")
    assert args.moe.n_experts == 4 and args.moe.top_k == 2 and args.expert_hidden == 48 and args.moe.dense_layers == 0
    assert sd["layers.1.feed_forward.experts.w1"].shape == (4, 48, 64)
    ours, tokens, want = _equal_logits_both_ways(hf, args, sd, transformers.MixtralForCausalLM, tmp_path / "out")
    with torch.no_grad():
        swapped = dict(sd)
        for i in range(2):
            w1, w3 = f"layers.{i}.feed_forward.experts.w1", f"layers.{i}.feed_forward.experts.w3"
            swapped[w1], swapped[w3] = sd[w3], sd[w1]
        ours.load_state_dict(swapped, strict=False)
        assert (ours(tokens) - want).abs().max() > 1e-3
    # a moved balancing bias has no HF form: refused, nothing written
    moved = {k: v for k, v in ours.state_dict().items() if "rope" not in k}
    moved["layers.0.feed_forward.router.expert_bias"] = torch.tensor([0.1, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="HF MixtralForCausalLM has no routing bias"):
        to_hf(moved, args, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_mixtral_weights_are_read_in_slices_from_the_fused_and_the_per_expert_layouts(tmp_path):
    """The sharded load's reader (trainer/hf.py TensorReader, what checkpoint.init_from uses under FSDP and expert
    parallelism) gives every tensor and any block of the experts' stacked weights as from_hf does, from the files
    transformers writes (one matrix per expert) and from transformers 5's in-memory names (gate and up fused)."""
    import json

    from safetensors.torch import load_file, save_file

    from trainer.hf import TensorReader

    tiny_mixtral(tmp_path)
    _, sd = from_hf(tmp_path / "mixtral")
    # the file save_pretrained wrote holds one matrix per expert; the same weights in transformers 5's in-memory
    # names, the experts' gate and up matrices fused into one E x 2F x D tensor
    saved = load_file(str(tmp_path / "mixtral" / "model.safetensors"))
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in saved
    old = tmp_path / "fused"
    old.mkdir()
    (old / "config.json").write_text((tmp_path / "mixtral" / "config.json").read_text())
    tensors = {k.replace("block_sparse_moe.gate", "mlp.gate"): v for k, v in saved.items() if ".experts." not in k}
    for i in range(2):
        w = {
            n: torch.stack([saved[f"model.layers.{i}.block_sparse_moe.experts.{e}.{n}.weight"] for e in range(4)])
            for n in ("w1", "w2", "w3")
        }
        tensors[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([w["w1"], w["w3"]], dim=1)
        tensors[f"model.layers.{i}.mlp.experts.down_proj"] = w["w2"]
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(old / "model.safetensors"))
    assert json.loads((old / "config.json").read_text())["model_type"] == "mixtral"
    _, sd4 = from_hf(old)
    assert sd4.keys() == sd.keys() and all(torch.equal(sd4[k], sd[k]) for k in sd)
    for path in (tmp_path / "mixtral", old):
        read = TensorReader(path)
        assert all(torch.equal(read(k), sd[k]) for k in sd if "rope" not in k)
        for w in ("w1", "w2", "w3"):
            name = f"layers.1.feed_forward.experts.{w}"
            want = sd[name][1:3, 4:14, 8:28]
            assert torch.equal(read.slice(name, (1, 4, 8), (2, 10, 20)), want), (path.name, w)


def tiny_qwen3(tmp_path, moe: bool, name="qwen3"):
    common = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # (wider than 64 / 4, as Qwen3's are)
        vocab_size=256,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
    )
    if moe:  # the first block dense, then 4 experts top-2 (weights not renormalized: norm_topk_prob false)
        cfg = transformers.Qwen3MoeConfig(
            **common, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0]
        )
        model = transformers.Qwen3MoeForCausalLM(cfg)
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in n else p.normal_(0, 0.1)
    model.eval().save_pretrained(tmp_path / name, safe_serialization=True)
    return model


@pytest.mark.parametrize("moe", [True, False], ids=["qwen3_moe", "qwen3"])
def test_qwen3_loads_with_equal_logits_and_exports_back(moe, tmp_path):
    """Tiny HF Qwen3 and Qwen3-MoE (heads 32 wide at width 64, RMS-normalized queries and keys; the MoE one's first
    block dense): the same logits here, and back in transformers from our export; the sharded load's reader gives
    every tensor (the head norms in our RoPE order). Without the head norms' RoPE permutation the logits differ."""
    from trainer import hf as hf_mod

    hf = tiny_qwen3(tmp_path, moe)
    args, sd = from_hf(tmp_path / "qwen3")
    assert args.head_dim == 32 and args.qk_norm and (args.moe is not None) == moe
    if moe:
        assert args.moe.dense_layers == 1 and not args.moe.normalize and args.expert_hidden == 24
    kind = transformers.Qwen3MoeForCausalLM if moe else transformers.Qwen3ForCausalLM
    ours, tokens, want = _equal_logits_both_ways(hf, args, sd, kind, tmp_path / "out")
    with torch.no_grad():
        read = hf_mod.TensorReader(tmp_path / "qwen3")
        assert all(torch.equal(read(k), sd[k]) for k in sd)
        unpermuted = {
            k: (hf_mod._interleaved_to_halves(v, 1) if "_norm" in k and ".attention." in k else v)
            for k, v in sd.items()
        }
        ours.load_state_dict(unpermuted, strict=False)
        assert (ours(tokens) - want).abs().max() > 1e-3
