"""Mixture-of-Experts blocks (models/moe.py): the block against the dense MLP and its own reference, dispatch and
combine on hand-worked routings, forced routings, the balancer, and counting under activation checkpointing."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from models.llama import FeedForward, ModelArgs, build_model
from models.moe import MoE, MoEArgs, balance, combine, dispatch, forced_experts, grouped_mm_runs, load_metrics

D, FE = 32, 64
ARGS = ModelArgs(dim=D, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=32, max_seq_len=32)


def _block(moe: MoEArgs, seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    block = MoE(D, FE, moe)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.3)
    return block


def _grads(module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    module.zero_grad()
    x = x.clone().requires_grad_()
    out = module(x)
    out.backward(torch.ones_like(out))  # (grad of a sum: every output counts)
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return out.detach(), {**grads, "input": x.grad.clone()}


def test_one_expert_with_top_1_is_the_dense_mlp_exactly():
    """E = 1, K = 1: the router's weight is 1 for every token, and the block is the dense SwiGLU with the same
    weights: the outputs and every gradient bitwise equal (the reference loop and the grouped matmul both)."""
    x = torch.randn(2, 8, D)
    dense = FeedForward(replace(ARGS, ffn_hidden_dim=FE))
    for grouped in ("false", "auto"):
        block = _block(MoEArgs(n_experts=1, top_k=1, grouped_mm=grouped))
        with torch.no_grad():
            dense.w1.weight.copy_(block.experts.w1[0])
            dense.w2.weight.copy_(block.experts.w2[0])
            dense.w3.weight.copy_(block.experts.w3[0])
        got, got_g = _grads(block, x)
        want, want_g = _grads(dense, x)
        assert torch.equal(got, want), grouped
        assert torch.equal(got_g["input"], want_g["input"])
        for w in ("w1", "w2", "w3"):
            assert torch.equal(got_g[f"experts.{w}"][0], want_g[f"{w}.weight"]), (grouped, w)
        assert torch.equal(got_g["router.gate.weight"], torch.zeros_like(got_g["router.gate.weight"]))


@pytest.mark.skipif(not grouped_mm_runs(torch.device("cpu"), torch.float32), reason="no torch._grouped_mm here")
def test_the_grouped_matmul_equals_the_reference_loop():
    """torch._grouped_mm against the loop over experts, fp32: outputs and every gradient within 1e-6, with an
    expert that gets no token (round-robin over 8 experts of 3 tokens x top-2: experts 6 and 7 get nothing), and a
    learned routing. A loop that swaps two experts' weights differs (the comparison can fail)."""
    x = torch.randn(1, 3, D)
    for routing in ("round_robin", "learned"):
        loop, grouped = (
            _block(MoEArgs(n_experts=8, top_k=2, routing=routing, grouped_mm=g)) for g in ("false", "true")
        )
        (a, ga), (b, gb) = _grads(loop, x), _grads(grouped, x)
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
        for name in ga:
            torch.testing.assert_close(gb[name], ga[name], rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():
        loop.experts.w1[[0, 1]] = loop.experts.w1[[1, 0]].clone()
    assert not torch.allclose(_grads(loop, x)[0], b, atol=1e-4)


def test_dispatch_and_combine_on_a_hand_worked_routing():
    """4 tokens, 3 experts, top-2: rows ordered by expert, in token order within one; expert 1 gets nothing;
    combine puts each row back weighted. With a capacity factor of 0.5 (capacity 2 rows an expert), expert 0's third
    row is dropped and counted."""
    moe = MoEArgs(n_experts=3, top_k=2)
    x = torch.arange(4.0)[:, None].expand(4, 2).contiguous()  # token t holds [t, t]
    experts = torch.tensor([[0, 2], [2, 0], [0, 2], [2, 2]])
    rows, routed = dispatch(x, experts, moe)
    assert rows[:, 0].tolist() == [0, 1, 2, 0, 1, 2, 3, 3] and routed.counts_E.tolist() == [3, 0, 5]
    weights = torch.tensor([[0.25, 0.75], [0.5, 0.5], [1.0, 0.0], [0.5, 0.5]])
    assert torch.equal(combine(rows, weights, routed, 4), x)  # (each token's weights sum to 1: itself back)
    rows, routed = dispatch(x, experts, replace(moe, capacity_factor=0.5))
    assert routed.counts_E.tolist() == [2, 0, 2] and int(routed.dropped) == 4
    assert rows[:, 0].tolist() == [0, 1, 0, 1]
    out = combine(rows, weights, routed, 4)
    assert out[:, 0].tolist() == [0.25 * 0 + 0.75 * 0, 1.0, 0.0, 0.0]


def test_forced_routings_are_balanced_or_all_on_the_first_experts():
    rr = forced_experts(12, 8, 2, "round_robin", "cpu")
    assert torch.bincount(rr.flatten(), minlength=8).tolist() == [3] * 8 and (rr[:, 0] != rr[:, 1]).all()
    first = forced_experts(5, 8, 2, "first", "cpu")
    assert first.tolist() == [[0, 1]] * 5


def test_the_balancer_moves_the_bias_towards_the_mean_and_counts_once_under_checkpointing():
    """Trained forwards count each token's experts once (when the backward reaches the routing weights), also under
    full activation checkpointing (its recomputed forward, inside the backward, is not counted again); evaluation,
    and a forward no backward follows, do not count. `balance` raises the bias of
    the experts below the mean load, lowers the others, restarts the counts and reports max / mean."""
    from torch.utils.checkpoint import checkpoint

    block = _block(MoEArgs(n_experts=4, top_k=2, routing="first", bias_update_rate=0.1))
    x = torch.randn(2, 5, D, requires_grad=True)
    checkpoint(block, x, use_reentrant=False).sum().backward()
    assert block.tokens_per_expert.tolist() == [10.0, 10.0, 0.0, 0.0]
    block.eval()
    block(x)
    block.train()
    block(x)  # (a training-mode forward no backward follows: a pipeline stage's shape inference runs one)
    assert block.tokens_per_expert.tolist() == [10.0, 10.0, 0.0, 0.0]
    learned = _block(MoEArgs(n_experts=4, top_k=2, bias_update_rate=0.1))  # (the bias moves under learned routing)
    learned.tokens_per_expert.copy_(block.tokens_per_expert)
    model = torch.nn.ModuleDict({"layers": torch.nn.ModuleDict({"1": torch.nn.ModuleDict({"feed_forward": learned})})})
    logs = load_metrics(balance([model]))
    assert learned.router.expert_bias.tolist() == pytest.approx([-0.1, -0.1, 0.1, 0.1])
    assert logs == {"moe/layers.1/max_over_mean": 2.0, "moe/layers.1/dropped": 0.0}
    assert learned.tokens_per_expert.sum() == 0
    balance([model])  # (no tokens since: nothing moves)
    assert learned.router.expert_bias.tolist() == pytest.approx([-0.1, -0.1, 0.1, 0.1])


def test_the_bias_only_chooses_experts():
    """A bias that changes no token's choice changes nothing of the output; one that moves every token to other
    experts changes the choice, not the weights' meaning (the weights stay the scores of the chosen experts)."""
    block = _block(MoEArgs(n_experts=4, top_k=1, normalize=False))
    x = torch.randn(6, D)
    weights, experts, _ = block.router(x)
    with torch.no_grad():
        block.router.expert_bias += 1e-9
    assert torch.equal(block.router(x)[1], experts)
    with torch.no_grad():
        block.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    w3, e3, _ = block.router(x)
    scores = F.linear(x, block.router.gate.weight).softmax(-1)
    assert (e3 == 3).all() and torch.allclose(w3[:, 0], scores[:, 3])


def test_an_moe_model_counts_its_parameters_and_names_them_as_it_builds_them():
    """ModelArgs' shapes (what the planner reads) are the built model's: names, shapes, total and active counts."""
    args = replace(ARGS, n_layers=3, moe=MoEArgs(n_experts=4, top_k=2, n_shared_experts=1, dense_layers=1))
    model = build_model(args)
    assert [(n, tuple(p.shape)) for n, p in model.named_parameters()] == args.param_shapes()
    assert sum(p.numel() for p in model.parameters()) == args.num_params()
    per_expert = 3 * args.dim * args.expert_hidden
    assert args.num_params() - args.num_params(active=True) == 2 * (4 - 2) * per_expert


def test_the_received_rows_are_put_in_expert_order_on_hand_worked_layouts():
    """parallel/expert.py `expert_major`: rows arrive per source rank, each source's rows per local expert; the
    experts take them per expert, every source's rows in rank order. Worked by hand: two sources, two local experts
    with counts [[2, 1], [0, 3]] arrive as a a b | c c c (a: expert 0's, b: expert 1's); expert-major is
    a a (rank 0's for expert 0), then b, c c c (expert 1: rank 0's, rank 1's)."""
    from parallel.expert import expert_major

    order = expert_major(torch.tensor([[2, 1], [0, 3]]))
    assert order.tolist() == [0, 1, 2, 3, 4, 5]  # (already expert-major: rank 1 sent expert 0 nothing)
    order = expert_major(torch.tensor([[1, 2], [3, 1]]))  # arrive: e0 | e1 e1 || e0 e0 e0 | e1
    assert order.tolist() == [0, 3, 4, 5, 1, 2, 6]
    assert expert_major(torch.tensor([[0, 0], [0, 0]])).tolist() == []  # no tokens at all
    assert expert_major(torch.tensor([[2, 3]])).tolist() == [0, 1, 2, 3, 4]  # one rank: nothing moves
    assert expert_major(torch.tensor([[2], [1], [2]])).tolist() == [0, 1, 2, 3, 4]  # one expert per rank
    # the inverse (what the combine uses) puts them back
    order = expert_major(torch.tensor([[1, 2], [3, 1]]))
    rows = torch.arange(7) * 10
    back = torch.empty_like(order)
    back[order] = torch.arange(7)
    assert torch.equal(rows[order][back], rows)


def test_the_planner_sizes_expert_parallel_rows_for_three_routings(tmp_path):
    """parallel/memory_terms.py: the worst case is every token of the ep group on one rank's experts (ep x min(K, L)
    / K), an observed max/mean is bounded by it, forced `first` routing is planned as the worst case; a capacity
    caps the rows a rank gets; the observed load is read from a run's metrics log."""
    import json

    from parallel.memory_terms import expert_load, moe_rows_per_token, worst_expert_load
    from trainer.config import load_config
    from trainer.metrics import observed_expert_load

    cfg = load_config(["recipe=llama_debug_moe"])
    moe = MoEArgs(n_experts=8, top_k=2)
    assert worst_expert_load(moe, 4) == 4.0  # (L = 2 experts per rank: both of a token's choices can be there)
    assert worst_expert_load(MoEArgs(n_experts=8, top_k=4), 4) == 2.0  # (4 choices, 2 on any one rank)
    assert expert_load(cfg, moe, 1, "worst") == 1.0  # (no expert parallelism: every expert is on the rank)
    assert expert_load(cfg, moe, 4, "balanced") == 1.0 and expert_load(cfg, moe, 4, 2.5) == 2.5
    assert expert_load(cfg, moe, 4, 9.0) == 4.0  # (an observed ratio beyond the worst case is the worst case)
    first = load_config(["recipe=llama_debug_moe", "model.moe.routing=first"])
    assert expert_load(first, moe, 4) == 4.0 and expert_load(cfg, moe, 4) == 1.0
    assert moe_rows_per_token(MoEArgs(n_experts=8, top_k=2, capacity_factor=1.5), 4.0) == 3.0
    log = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "moe/layers.1/max_over_mean": 1.7}, {"step": 2, "moe/layers.2/max_over_mean": 2.2}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert observed_expert_load(log) == 2.2
    log.write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")
    with pytest.raises(ValueError, match="no moe/<layer>/max_over_mean"):
        observed_expert_load(log)


def test_the_balancer_logs_each_ranks_load_under_expert_parallelism(tmp_path):
    """Under expert parallelism over 2 ranks (each holding 2 of 4 experts) the logs add the busiest rank's rows over
    the mean rank's: counts 6, 2, 0, 0 put 8 rows on rank 0 and none on rank 1 (2.0), while the busiest expert is
    3.0 x the mean; the planner's observed load reads the rank's ratio first."""
    import json

    from trainer.metrics import observed_expert_load

    block = _block(MoEArgs(n_experts=4, top_k=1, bias_update_rate=0.0))
    block.tokens_per_expert.copy_(torch.tensor([6.0, 2.0, 0.0, 0.0]))
    metrics = load_metrics(balance([block], ep=2))
    assert metrics == {"moe//max_over_mean": 3.0, "moe//dropped": 0.0, "moe//rank_max_over_mean": 2.0}, metrics
    block.tokens_per_expert.copy_(torch.tensor([6.0, 2.0, 0.0, 0.0]))
    assert "moe//rank_max_over_mean" not in load_metrics(balance([block]))  # (one rank holds every expert)
    log = tmp_path / "metrics.jsonl"
    log.write_text(json.dumps({"step": 1, **metrics}) + "\n")
    assert observed_expert_load(log) == 2.0


def test_the_layout_search_tries_the_expert_degrees():
    """trainer/search.py: an MoE model under FSDP or HSDP is tried with every ep that divides its dp_shard and its
    experts (1, FSDP alone, included); a dense model, DDP or ZeRO only with 1. A search of the debug MoE on 4 ranks
    ranks layouts with and without expert parallelism, each labelled."""
    from parallel.timing import gpu_hardware
    from trainer.config import load_config
    from trainer.search import expert_degrees, search

    moe = ModelArgs(moe=MoEArgs(n_experts=8, top_k=2))
    assert expert_degrees(moe, "fsdp", 8, 1) == [1, 2, 4, 8]
    assert expert_degrees(moe, "hsdp", 8, 2) == [1, 2, 4]  # (dp_shard 4)
    assert expert_degrees(ModelArgs(moe=MoEArgs(n_experts=6, top_k=2)), "fsdp", 4, 1) == [1, 2]
    assert expert_degrees(moe, "ddp", 8, 1) == [1] and expert_degrees(ModelArgs(), "fsdp", 8, 1) == [1]
    cfg = load_config(["recipe=llama_debug_moe", "training.global_batch_size=16"])
    result = search(cfg, 4, capacity_gib=80, hw=gpu_hardware(80, "bf16"), max_pp=1)
    eps = {c.keys.get("parallel.ep", 1) for c in result.fits}
    assert eps == {1, 2, 4}, eps
    assert any("(ep 4)" in c.layout for c in result.fits)


def test_the_sequence_balance_loss_on_a_hand_worked_routing():
    """models/moe.py `sequence_balance_loss`, DeepSeek-V3's: per sequence coef x sum_i f_i P_i, f_i = E / (K S) x the
    rows expert i got, P_i the mean normalized score; 1 x coef when the rows and the scores are balanced. One sequence
    of 2 tokens, 2 experts, top-1, both tokens on expert 0 with scores (0.9, 0.1) and (0.7, 0.3): f = (2, 0), P =
    (0.8, 0.2), so 1.6 x coef; the gradient reaches the scores (the router), not the choices."""
    from models.moe import sequence_balance_loss

    scores = torch.tensor([[[0.9, 0.1], [0.7, 0.3]]], requires_grad=True)
    loss = sequence_balance_loss(scores, torch.tensor([[[0], [0]]]), 0.5)
    assert loss.item() == pytest.approx(0.5 * 1.6)
    loss.backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0
    balanced = sequence_balance_loss(
        torch.full((3, 4, 2), 0.5), torch.tensor([[0], [1], [0], [1]]).expand(3, 4, 1), 1.0
    )
    assert balanced.item() == pytest.approx(1.0)
    # a block trains with it only where asked, and a checkpointed recompute does not hand it over twice
    from models.moe import take_aux_losses

    block = _block(MoEArgs(n_experts=4, top_k=2, aux_loss_coef=0.1))
    x = torch.randn(2, 5, D, requires_grad=True)
    block(x).sum().backward()
    assert take_aux_losses([block]) is not None and take_aux_losses([block]) is None
    block.eval()
    block(x)
    assert take_aux_losses([block]) is None
