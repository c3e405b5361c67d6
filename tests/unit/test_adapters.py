"""models/adapters.py: LoRA and DoRA on a frozen base (issue 26's model side). At step 0 the adapted model computes
exactly what the base computes; only the adapters get gradients; a trained adapter merged into plain weights
computes what the adapted model computes; DoRA's magnitudes start at the base's row norms. Each check is shown
failing once on a broken adapter."""

from __future__ import annotations

import pytest
import torch

from models.adapters import AdapterLinear, AdapterSpec, adapter_parameters, apply_adapters
from models.llama import ModelArgs, build_model

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32, max_seq_len=64)
B, T = 2, 32


def _models(kind: str, rank: int = 4):
    """(the base model, the same base with adapters on every block linear), both initialized from seed 0."""
    base = build_model(ARGS)
    base.to_empty(device="cpu")
    base.init_weights(seed=0)
    adapted = build_model(ARGS)
    replaced = apply_adapters(adapted, AdapterSpec(kind=kind, rank=rank, alpha=2.0 * rank))
    adapted.to_empty(device="cpu")
    adapted.init_weights(seed=0)
    assert len(replaced) == 7 * ARGS.n_layers
    return base, adapted


def _batch():
    g = torch.Generator().manual_seed(1)
    return (torch.randint(0, ARGS.vocab_size, (B, T), generator=g) for _ in range(2))


def _trained(adapted) -> torch.Tensor:
    """Three AdamW steps on the adapters (lr 1e-2); returns the batch's tokens."""
    tokens, targets = _batch()
    opt = torch.optim.AdamW(adapter_parameters(adapted).values(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(adapted(tokens).flatten(0, 1), targets.flatten()).backward()
        opt.step()
    return tokens


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_step_0_is_the_base_model_exactly(kind):
    base, adapted = _models(kind)
    tokens, _ = _batch()
    with torch.no_grad():
        assert torch.equal(adapted(tokens), base(tokens))
        # the check can fail: a nonzero B changes the output
        for mod in adapted.modules():
            if isinstance(mod, AdapterLinear):
                mod.lora_b.weight.fill_(1e-3)
        assert not torch.equal(adapted(tokens), base(tokens))


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_only_the_adapters_get_gradients(kind):
    _, adapted = _models(kind)
    tokens, targets = _batch()
    loss = torch.nn.functional.cross_entropy(adapted(tokens).flatten(0, 1), targets.flatten())
    loss.backward()
    trainable = adapter_parameters(adapted)
    assert set(trainable) == {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert len(trainable) == 7 * ARGS.n_layers * (3 if kind == "dora" else 2)
    for name, p in adapted.named_parameters():
        if name in trainable:
            # at step 0 B = 0, so A's gradient (through B) is zero; B's and m's are not
            assert p.grad is not None and (name.endswith("lora_a.weight") or p.grad.abs().sum() > 0), name
        else:
            assert p.grad is None, f"{name}: the base is frozen"


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_a_trained_adapter_merges_into_plain_weights(kind):
    """Three AdamW steps on the adapters, then each AdapterLinear's merged weight put into the base model: the same
    logits (fp32, 1e-5). The comparison fails on a merge that leaves the adapter out."""
    base, adapted = _models(kind)
    tokens = _trained(adapted)
    merged = {
        f"{name}.weight": mod.merged_weight() for name, mod in adapted.named_modules() if isinstance(mod, AdapterLinear)
    }
    with torch.no_grad():
        want = adapted(tokens)
        unmerged = base(tokens)
        state = base.state_dict()
        state.update(merged)
        base.load_state_dict(state, strict=True)
        torch.testing.assert_close(base(tokens), want, rtol=1e-5, atol=1e-5)
        assert (unmerged - want).abs().max() > 1e-3  # the adapters changed the model: the check can fail


def test_dora_magnitudes_start_at_the_base_row_norms():
    _, adapted = _models("dora")
    for mod in adapted.modules():
        if isinstance(mod, AdapterLinear):
            torch.testing.assert_close(mod.magnitude, torch.linalg.vector_norm(mod.weight, dim=1), rtol=0, atol=0)


def test_adapter_draws_are_the_same_in_every_build():
    """A is drawn from the counter-based generator (models/init.py): two builds hold the same values."""
    _, a = _models("lora")
    _, b = _models("lora")
    for (n, p), (_, q) in zip(adapter_parameters(a).items(), adapter_parameters(b).items(), strict=True):
        assert torch.equal(p, q), n
    first = next(p for n, p in adapter_parameters(a).items() if n.endswith("lora_a.weight"))
    assert first.std() > 0.5 * first.shape[1] ** -0.5


@pytest.mark.parametrize(
    "spec, message",
    [
        (dict(kind="qlora", rank=4, alpha=8), "adapter kind 'qlora'"),
        (dict(kind="lora", rank=0, alpha=8), "adapter rank 0 must be >= 1"),
        (dict(kind="lora", rank=4, alpha=8, targets=("wq", "output")), "adapter targets ['output']"),
    ],
)
def test_bad_specs_are_refused_by_name(spec, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        AdapterSpec(**spec)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_peft_loads_the_exported_adapter_to_the_same_logits(kind, tmp_path):
    """trainer/hf.py: the base exported with `to_hf`, the trained adapter with `to_peft`; transformers builds the base,
    peft (`PeftModel.from_pretrained`) puts the adapter on it, and the logits are shardwise's adapted model's (fp32,
    1e-5). The comparison can fail: the base alone is more than 1e-3 away."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from trainer.hf import to_hf, to_peft

    spec = AdapterSpec(kind=kind, rank=4, alpha=8.0)
    base, adapted = _models(kind)
    tokens = _trained(adapted)
    to_hf({k: v for k, v in base.state_dict().items() if "rope" not in k}, ARGS, tmp_path / "base")
    to_peft(adapted, ARGS, spec, tmp_path / "adapter", base=str(tmp_path / "base"))
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        plain = hf(tokens).logits
        tuned = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
        got, want = tuned(tokens).logits, adapted.eval()(tokens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (plain - want).abs().max() > 1e-3


def test_an_nf4_base_stores_what_the_planner_counts_and_computes_with_its_dequantized_values():
    """QLoRA's base (torchao NF4): the bytes it stores are models/adapters.py `nf4_bytes` (the planner's count: about
    0.52 bytes per weight), the adapted layer computes its dequantized weight's product plus the adapter, and
    `unquantized` names a base that is plain again (the check after wrapping, shown failing)."""
    pytest.importorskip("torchao")
    from models.adapters import nf4_bytes, quantize_nf4, unquantized
    from models.dtensor import nbytes

    torch.manual_seed(0)
    w = torch.randn(128, 256) * 0.02
    q = quantize_nf4(w, 16)
    assert nbytes(q) == nf4_bytes(w.numel(), 16) and nbytes(q) / w.numel() < 0.53
    back = q.to(torch.float32)
    assert 0 < ((back - w).norm() / w.norm()).item() < 0.12  # 4 bits: close, not equal
    layer = AdapterLinear(256, 128, AdapterSpec("lora", 4, 8.0))
    torch.nn.init.normal_(layer.lora_a.weight)
    torch.nn.init.normal_(layer.lora_b.weight)
    layer.weight = torch.nn.Parameter(q, requires_grad=False)
    x = torch.randn(3, 256)
    adapter = 2.0 * (x @ layer.lora_a.weight.T) @ layer.lora_b.weight.T
    want = x @ back.T + adapter
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    # the comparison can fail: with the full-precision base instead of the NF4 one, or without the adapter
    for wrong in (x @ w.T + adapter, x @ back.T):
        assert not torch.allclose(layer(x), wrong, rtol=1e-5, atol=1e-5)
    model = torch.nn.ModuleDict({"a": layer, "b": AdapterLinear(8, 8, AdapterSpec("lora", 2, 4.0))})
    assert unquantized([model]) == ["b"]


def test_a_tp_split_nf4_base_computes_its_dequantized_product_in_bf16_too():
    """A TP shard of a QLoRA base (a DTensor holding NF4): forward x W^T and backward grad W with the dequantized
    weight, in fp32 and in bf16, where DTensor's `.to(bf16)` returns the undequantized tensor and torchao's NF4 `mm`
    would compute grad W^T (a square weight: silently wrong, which torchao's own `linear_nf4` is shown to do here).
    On a one-rank mesh: the dispatch is DTensor's whatever the ranks."""
    pytest.importorskip("torchao")
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard

    from models.adapters import _linear_nf4, _nf4, quantize_nf4

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        torch.manual_seed(0)
        q = quantize_nf4(torch.randn(64, 64), 8)
        w = DTensor.from_local(q, mesh, [Shard(0)], run_check=False, shape=q.shape, stride=q.stride())
        for dtype in (torch.float32, torch.bfloat16):
            back = q.get_original_weight().to(dtype)
            x = torch.randn(5, 64, dtype=dtype, requires_grad=True)
            grad = torch.randn(5, 64, dtype=dtype)

            def run(linear, x=x, grad=grad):
                x.grad = None
                y = linear(DTensor.from_local(x, mesh, [Replicate()], run_check=False), w).full_tensor()
                y.backward(grad)
                return y.detach(), x.grad.clone()

            y, gx = run(_linear_nf4)
            torch.testing.assert_close(y, x.detach() @ back.T, rtol=0, atol=0)
            torch.testing.assert_close(gx, grad @ back, rtol=0, atol=0)
            if dtype == torch.bfloat16:  # the check can fail: torchao's linear on the DTensor transposes the backward
                _, wrong = run(_nf4().linear_nf4)
                assert not torch.allclose(wrong, grad @ back) and torch.allclose(wrong, grad @ back.T)
    finally:
        dist.destroy_process_group()
