"""The LLaMA model: causality, deterministic complete initialization, parameter counts, RoPE, GQA."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.llama import FLAVORS, ModelArgs, RopeScaling, apply_rope, build_model, count_params, rope_frequencies

TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32, max_seq_len=64)


def _model(args=TINY, seed=0):
    m = build_model(args, device="meta")
    m.to_empty(device="cpu")
    m.init_weights(seed=seed)
    return m


def test_causal():
    """Changing token t never changes the logits at positions before t."""
    torch.manual_seed(0)
    m = _model()
    x = torch.randint(0, TINY.vocab_size, (2, 32))
    base = m(x)
    for t in (0, 5, 17, 31):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % TINY.vocab_size
        out = m(y)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, t], base[:, t])  # and the token itself does matter


def test_init_is_deterministic_and_complete():
    m = build_model(TINY, device="meta")
    m.to_empty(device="cpu")
    with torch.no_grad():  # poison everything, so any parameter or buffer init_weights skips shows up
        for t in [*m.parameters(), *m.buffers()]:
            t.fill_(float("nan"))
    m.init_weights(seed=3)
    for name, t in [*m.named_parameters(), *m.named_buffers()]:
        assert torch.isfinite(t).all(), f"{name} left uninitialized"
    again = _model(seed=3)
    other = _model(seed=4)
    for (name, a), b, c in zip(m.state_dict().items(), again.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs between two inits with the same seed"
        if not name.endswith("norm.weight"):
            assert not torch.equal(a, c), f"{name} does not depend on the seed"
    torch.testing.assert_close(m.rope_cos, again.rope_cos)


def test_counter_based_values_match_their_definition():
    """models/init.py's tensor code (int32 words, wrapping products, masked shifts) against the pure-Python
    definition, on both index widths and across the 2^31 / 2^32 boundaries."""
    from models.init import reference_uniform, uniform

    idx = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 7, 2**40 + 3]
    want = [reference_uniform(i, 5, "layers.0.w") for i in idx]
    assert uniform(torch.tensor(idx, dtype=torch.int64), 5, "layers.0.w").tolist() == want
    small = [i for i in idx if i < 2**31]
    assert uniform(torch.tensor(small, dtype=torch.int32), 5, "layers.0.w").tolist() == want[: len(small)]
    assert all(0.0 < u < 1.0 for u in want)


def test_counter_based_normal_is_normal():
    """Moments, a Kolmogorov-Smirnov distance against torch's own normal, no correlation between neighbours,
    and the truncation bounds."""
    from models.init import normal, uniform

    i = torch.arange(2_000_000, dtype=torch.int32)
    x = normal(i, 0, "w")
    assert abs(x.mean().item()) < 3e-3 and abs(x.std().item() - 1) < 3e-3
    assert abs((x**4).mean().item() - 3) < 0.05  # kurtosis of a normal
    grid = torch.linspace(-4, 4, 801)
    ref = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0)).sort().values
    ks = (torch.searchsorted(x.sort().values, grid) - torch.searchsorted(ref, grid)).abs().max().item() / i.numel()
    assert ks < 3e-3, ks
    u = uniform(i, 0, "w")
    assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1].item()) < 3e-3
    assert not torch.equal(normal(i[:100], 0, "w"), normal(i[:100], 0, "v"))  # the name keys the stream
    t = normal(i, 1, "w", 0.0, 0.5, lo=-1.0, hi=1.0)
    assert t.min().item() >= -1.0 and t.max().item() <= 1.0 and t.min().item() < -0.99


def test_a_slice_draws_the_values_of_the_full_tensor():
    """What makes every layout start from the same weights: the rows a shard holds, and a ZeRO-3 flat
    partition (padded past the end), get exactly the full tensor's values at those indices."""
    from models.init import fill_flat_partition, fill_normal

    full = torch.empty(37, 11)
    fill_normal(full, 2, "x", 0.0, 0.02, lo=-2.0, hi=2.0)
    flat = full.reshape(-1)
    for start in (0, 100, 396):
        part = torch.full((20,), float("nan"))
        fill_flat_partition(part, start, flat.numel(), 2, "x", 0.0, 0.02, lo=-2.0, hi=2.0)
        n = max(0, min(20, flat.numel() - start))
        assert torch.equal(part[:n], flat[start : start + n]) and torch.equal(part[n:], torch.zeros(20 - n))
    # a block of rows and columns (a TP shard of a QLoRA base, drawn before it is quantized), in row chunks too
    from models import init
    from models.init import normal_block

    for offset, local in (((0, 0), (37, 11)), ((5, 3), (20, 6)), ((36, 10), (1, 1))):
        block = normal_block(2, "x", (37, 11), offset, local, "cpu", mean=0.0, std=0.02, lo=-2.0, hi=2.0)
        assert torch.equal(block, full[offset[0] : offset[0] + local[0], offset[1] : offset[1] + local[1]])
    chunk, init._CHUNK = init._CHUNK, 13
    try:
        assert torch.equal(normal_block(2, "x", (37, 11), (1, 2), (30, 5), "cpu", mean=0.0, std=0.02), full[1:31, 2:7])
    finally:
        init._CHUNK = chunk


def test_init_statistics():
    m = _model(ModelArgs(dim=256, n_layers=2, n_heads=4, vocab_size=512, multiple_of=64))
    assert abs(m.tok_embeddings.weight.std().item() - 1.0) < 0.02
    assert abs(m.layers["0"].attention.wq.weight.std().item() - 0.02) < 0.002
    # residual-stream writers are scaled down with depth: 0.02 / sqrt(2 (layer + 1))
    assert abs(m.layers["1"].attention.wo.weight.std().item() - 0.02 / 2) < 0.001
    assert (m.layers["0"].attention_norm.weight == 1).all()


@pytest.mark.parametrize("flavor", list(FLAVORS))
def test_param_count_formula_matches_the_module(flavor):
    args = FLAVORS[flavor]
    assert count_params(build_model(args, device="meta")) == args.num_params()


def test_published_sizes():
    # Llama-3-8B has 8.03 B parameters, Llama-2-7B 6.74 B, Llama-3-70B 70.6 B, Llama-3.2-1B 1.24 B
    assert FLAVORS["8b"].num_params() == 8_030_261_248
    assert FLAVORS["7b"].num_params() == 6_738_415_616
    assert FLAVORS["70b"].num_params() == 70_553_706_496
    assert FLAVORS["1b"].num_params() == 1_235_814_400


def test_tied_embeddings_share_storage():
    m = _model(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=128, multiple_of=32, tie_embeddings=True))
    assert m.output.weight is m.tok_embeddings.weight
    assert count_params(m) == m.args.num_params()


def test_rope_rotates_pairs_and_keeps_norms():
    args = TINY
    inv = rope_frequencies(args)
    pos = torch.arange(args.max_seq_len, dtype=torch.float32)
    cos, sin = torch.outer(pos, inv).cos(), torch.outer(pos, inv).sin()
    x = torch.randn(1, 8, 2, args.head_dim)
    y = apply_rope(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    # the same rotation as a complex multiply of interleaved pairs (Meta's reference formulation)
    xc = torch.view_as_complex(x.reshape(1, 8, 2, -1, 2))
    ref = torch.view_as_real(xc * torch.polar(torch.ones_like(cos[:8]), torch.outer(pos[:8], inv))[None, :, None])
    torch.testing.assert_close(y, ref.flatten(3))
    # relative position: <R_m q, R_n k> depends only on m - n
    q, k = torch.randn(args.head_dim), torch.randn(args.head_dim)
    qs = apply_rope(q.expand(1, 64, 1, -1).contiguous(), cos, sin)[0, :, 0]
    ks = apply_rope(k.expand(1, 64, 1, -1).contiguous(), cos, sin)[0, :, 0]
    torch.testing.assert_close(qs[10] @ ks[7], qs[40] @ ks[37], rtol=1e-4, atol=1e-4)


def test_llama3_rope_scaling():
    base = ModelArgs(dim=4096, n_heads=32, rope_theta=500000.0)
    scaled = ModelArgs(dim=4096, n_heads=32, rope_theta=500000.0, rope_scaling=RopeScaling(factor=8.0))
    f0, f1 = rope_frequencies(base), rope_frequencies(scaled)
    wavelen = 2 * math.pi / f0
    high = wavelen < 8192 / 4.0  # short wavelengths are untouched
    low = wavelen > 8192 / 1.0  # long ones are divided by the factor
    torch.testing.assert_close(f1[high], f0[high])
    torch.testing.assert_close(f1[low], f0[low] / 8.0)
    mid = ~(high | low)
    assert mid.any() and ((f1[mid] < f0[mid]) & (f1[mid] > f0[mid] / 8.0)).all()


def test_grouped_query_attention_equals_repeated_kv_heads():
    """GQA with 2 kv heads equals multi-head attention whose k/v weights repeat each kv head."""
    gqa = _model()
    mha_args = ModelArgs(**{**TINY.__dict__, "n_kv_heads": 4})
    mha = _model(mha_args)
    mha.load_state_dict(
        {
            **gqa.state_dict(),
            **{
                k: gqa.state_dict()[k]
                .view(2, TINY.head_dim, -1)
                .repeat_interleave(2, dim=0)
                .reshape(4 * TINY.head_dim, -1)
                for k in gqa.state_dict()
                if k.endswith(("wk.weight", "wv.weight"))
            },
        }
    )
    x = torch.randint(0, TINY.vocab_size, (2, 16))
    torch.testing.assert_close(gqa(x), mha(x), rtol=1e-5, atol=1e-5)


def test_loss_at_init_is_near_uniform():
    m = _model(ModelArgs(dim=128, n_layers=2, n_heads=4, vocab_size=1024, multiple_of=32))
    x = torch.randint(0, 1024, (4, 32))
    loss = F.cross_entropy(m(x).flatten(0, 1), x.flatten())
    assert abs(loss.item() - math.log(1024)) < 1.0


def test_expanded_kv_heads_and_a_named_kernel_give_the_grouped_result():
    """model.expand_kv repeats the kv heads before SDPA (what cuDNN and the memory-efficient kernel need); with the
    flash kernel named, the logits and every gradient are those of the grouped-head default."""
    from dataclasses import replace

    x = torch.randint(0, TINY.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    out = {}
    for name, args in {"grouped": TINY, "expanded": replace(TINY, attention="flash", expand_kv=True)}.items():
        m = _model(args)
        assert m.layers["0"].attention.expand_kv == (name == "expanded")
        logits = m(x)
        logits.float().pow(2).mean().backward()
        out[name] = logits.detach(), {n: p.grad for n, p in m.named_parameters()}
    torch.testing.assert_close(out["expanded"][0], out["grouped"][0], rtol=1e-5, atol=1e-6)
    for n, g in out["grouped"][1].items():
        torch.testing.assert_close(out["expanded"][1][n], g, rtol=1e-4, atol=1e-6, msg=n)
    assert replace(TINY, attention="cudnn").kv_expanded and not replace(TINY, attention="flash").kv_expanded


def _shrunk(flavor: str) -> ModelArgs:
    """The flavor at 256 wide, 2 blocks, a 4096-token vocabulary: its other choices kept (tied embeddings, GQA, the
    feed-forward sizing, RoPE scaling). The initial logits' scale does not depend on the width (the output is drawn
    at std dim^-0.5 over a unit-RMS input), so the shrunk copy starts where the full shape does."""
    from dataclasses import replace

    a = FLAVORS[flavor]
    kv = None if a.n_kv_heads is None else min(a.n_kv_heads, 4)
    return replace(a, dim=256, n_layers=2, n_heads=4, n_kv_heads=kv, vocab_size=4096, max_seq_len=64)


@pytest.mark.parametrize("flavor", sorted(FLAVORS))
def test_every_shape_starts_near_ln_vocab(flavor):
    """Step 0's loss on uniform tokens is about ln V (logits of unit variance: ln V + 1/2 at most) for every shape,
    tied or not. A tied table drawn at the embedding's std 1 started the tied shapes (1b, 3b) at about 64."""
    args = _shrunk(flavor)
    m = _model(args)
    x = torch.randint(0, args.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = F.cross_entropy(m(x)[:, :-1].flatten(0, 1), x[:, 1:].flatten()).item()
    ln_v = math.log(args.vocab_size)
    assert ln_v - 0.1 <= loss <= ln_v + 0.6, (
        f"{flavor} (tied: {args.tie_embeddings}): step-0 loss {loss:.2f}, ln V {ln_v:.2f}"
    )


def test_packed_documents_train_as_each_would_alone():
    """Three documents packed into one sequence (the padding after them a fourth): each one's loss and every
    parameter's gradient equal those of the documents run alone (fp32): each attends only to its own earlier tokens
    and its positions restart at 0 (models/llama.py `document_mask`). Without the mask (causal over the whole
    sequence, positions running on) the later documents' losses and the gradients differ."""
    model = _model()
    gen = torch.Generator().manual_seed(0)
    lengths, T = [5, 9, 7], 24
    docs = [torch.randint(0, TINY.vocab_size, (n,), generator=gen) for n in lengths]
    packed = torch.cat([*docs, torch.zeros(T - sum(lengths), dtype=torch.long)])[None]
    documents = torch.cat([torch.full((n,), i) for i, n in enumerate([*lengths, T - sum(lengths)])])[None]

    def run(losses_of):
        model.zero_grad()
        losses = losses_of()
        sum(losses).backward()
        return torch.stack(losses).detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    def packed_losses(mask: bool):
        logits, out, start = model(packed, documents=documents if mask else None)[0], [], 0
        for n in lengths:  # (each document's own next-token targets: none crosses into the next one)
            out.append(
                F.cross_entropy(logits[start : start + n - 1], packed[0, start + 1 : start + n], reduction="sum")
            )
            start += n
        return out

    alone = run(lambda: [F.cross_entropy(model(d[None])[0, :-1], d[1:], reduction="sum") for d in docs])
    together = run(lambda: packed_losses(True))
    torch.testing.assert_close(together[0], alone[0], rtol=1e-6, atol=1e-6)
    for name, g in alone[1].items():
        torch.testing.assert_close(together[1][name], g, rtol=1e-5, atol=1e-6, msg=name)
    crosstalk = run(lambda: packed_losses(False))
    assert torch.equal(crosstalk[0][0], together[0][0])  # (the first document sees nothing before it either way)
    assert not torch.allclose(crosstalk[0][1:], alone[0][1:], rtol=1e-4)
    assert not torch.allclose(crosstalk[1]["layers.0.attention.wq.weight"], alone[1]["layers.0.attention.wq.weight"])


def test_the_flex_block_mask_attends_as_the_dense_mask_does():
    """CUDA's packed attention (FlexAttention over a BlockMask, models/llama.py `flex_attend`) against the CPU's dense
    additive mask: the same outputs for documents of uneven lengths and grouped kv heads (forward only: torch has no
    FlexAttention backward on the CPU; the GPU checks run its backward). A block mask that ignores the documents
    (causal over the whole sequence) gives other outputs."""
    from models.llama import document_mask, flex_attend

    gen = torch.Generator().manual_seed(0)
    documents = torch.tensor([[0] * 20 + [1] * 37 + [2] * 7, [0] * 64])
    q = torch.randn(2, 4, 64, 16, generator=gen)
    k, v = (torch.randn(2, 2, 64, 16, generator=gen) for _ in range(2))
    positions, dense = document_mask(documents, torch.float32, "dense")
    positions_flex, block = document_mask(documents, torch.float32, "flex")
    assert torch.equal(positions, positions_flex) and positions[0, 20] == 0 and positions[0, 56] == 36
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True)
    torch.testing.assert_close(flex_attend(q, k, v, block), want, rtol=1e-5, atol=1e-5)
    whole = document_mask(torch.zeros_like(documents), torch.float32, "flex")[1]
    assert not torch.allclose(flex_attend(q, k, v, whole)[0], want[0], atol=1e-3)
