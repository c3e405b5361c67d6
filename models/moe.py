"""Mixture-of-Experts feed-forward blocks (docs/moe.md): a router, SwiGLU experts, optional shared experts, and the
auxiliary-loss-free load balancing of DeepSeek-V3.

Shape suffixes (the legend for this file): T tokens of the micro-batch (batch x sequence), D the model width, E
experts, K experts per token (top-k), F an expert's hidden width, R routed rows (T x K before any drop; a row is one
token's copy for one of its experts), ordered by expert.

The block's forward, step by step (`MoE.forward`):
1. `Router`: fp32 scores of every token for every expert (softmax or sigmoid of the gate), the K experts chosen from
   the scores plus the balancing bias (the bias only chooses: the weights are the scores), the K weights
   (renormalized to sum to 1 where `normalize`).
2. `dispatch`: the tokens' rows ordered by expert (a stable sort of the chosen experts), the rows each expert gets
   (`counts_E`), and with a capacity factor the rows past an expert's capacity dropped (counted).
3. `GroupedExperts`: each expert's SwiGLU on its rows, one grouped matmul per weight (`torch._grouped_mm`) where
   the device and torch version have it, or the reference loop over experts (fp32 everywhere): equal in the tests.
4. `combine`: each row's output times its weight, summed back into its token (dropped rows add nothing); plus the
   shared experts' output on every token.
The routing counts accumulate (training only: when the backward reaches the routing weights, so once per trained
forward) for the balancer (`balance`), which moves each expert's bias once per optimizer step.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.dtensor import local

SCORES = ("softmax", "sigmoid")
# routing for tests and the planner's checks: learned (the router's choice), round_robin (token t to experts
# t K .. t K + K - 1 mod E: every expert the same load), first (every token to experts 0 .. K - 1: the worst case)
ROUTINGS = ("learned", "round_robin", "first")


@dataclass(frozen=True)
class MoEArgs:
    """The MoE shape and behaviour, built from the config's model.moe section (`moe_args_of`)."""

    n_experts: int = 8
    top_k: int = 2
    expert_hidden: int | None = None  # each expert's SwiGLU width F; None: the dense block's
    n_shared_experts: int = 0  # shared experts (each F wide) every token passes through
    dense_layers: int = 0  # the first blocks keep the dense feed-forward (DeepSeek-V3: 3)
    score: str = "softmax"  # softmax (Mixtral, Qwen3-MoE) or sigmoid (DeepSeek-V3)
    normalize: bool = True  # the K weights of a token scaled to sum to 1
    capacity_factor: float | None = None  # None: dropless; else each expert takes ceil(cf x T x K / E) rows at most
    bias_update_rate: float = 1e-3  # the balancer's step (0: no auxiliary-loss-free balancing)
    aux_loss_coef: float = 0.0  # the sequence-level balance loss's weight (`sequence_balance_loss`; 0: none)
    routing: str = "learned"
    grouped_mm: str = "auto"  # auto (where it runs), true (or an error), false (the reference loop)


def moe_args_of(section) -> MoEArgs | None:
    """The model.moe config section (null or n_experts 0: a dense model) as MoEArgs."""
    if section is None or not section.get("n_experts"):
        return None
    fields = {k: section[k] for k in MoEArgs.__dataclass_fields__ if section.get(k) is not None}
    for key in ("score", "routing", "grouped_mm"):  # (a YAML true arrives as a bool, a string as itself)
        if key in fields:
            fields[key] = str(fields[key]).lower()
    return MoEArgs(**fields)


def config_problems(cfg, moe: MoEArgs | None, n_layers: int) -> list[str]:
    """The model.moe section's rules, and the layouts MoE blocks are built and tested under: one process, DDP, FSDP2
    and HSDP (the experts are ordinary parameters of the block, sharded by FSDP like the rest), expert parallelism
    under FSDP2 or HSDP (parallel/expert.py), pipeline parallelism (with expert parallelism in each stage), tensor
    parallelism on the dense parts under FSDP or HSDP (with expert parallelism too), context parallelism (without
    it), with full AC. The others are refused by name until they are built."""
    if moe is None:
        ep = int(cfg.parallel.get("ep", 1))
        if ep > 1:
            return [
                f"parallel.ep={ep} splits MoE experts, and this model has none: "
                "set model.moe.n_experts or parallel.ep=1"
            ]
        return []
    problems = []
    if moe.top_k < 1 or moe.top_k > moe.n_experts:
        problems.append(f"model.moe.top_k={moe.top_k} must be in 1..model.moe.n_experts ({moe.n_experts})")
    if moe.score not in SCORES:
        problems.append(f"model.moe.score={moe.score}: unknown; known: {', '.join(SCORES)}")
    if moe.routing not in ROUTINGS:
        problems.append(f"model.moe.routing={moe.routing}: unknown; known: {', '.join(ROUTINGS)}")
    if moe.grouped_mm not in ("auto", "true", "false"):
        problems.append(f"model.moe.grouped_mm={moe.grouped_mm}: one of auto, true, false")
    if moe.capacity_factor is not None and moe.capacity_factor <= 0:
        problems.append(f"model.moe.capacity_factor={moe.capacity_factor} must be > 0 (or null: dropless)")
    if moe.bias_update_rate < 0:
        problems.append(f"model.moe.bias_update_rate={moe.bias_update_rate} must be >= 0 (0: no balancing)")
    if moe.aux_loss_coef < 0:
        problems.append(f"model.moe.aux_loss_coef={moe.aux_loss_coef} must be >= 0 (0: no auxiliary loss)")
    if moe.aux_loss_coef and int(cfg.parallel.pp) > 1:
        problems.append(
            f"model.moe.aux_loss_coef={moe.aux_loss_coef} with parallel.pp={cfg.parallel.pp}: not built (each stage's "
            "blocks would add their loss to the last stage's); set model.moe.aux_loss_coef=0 or parallel.pp=1"
        )
    if not 0 <= moe.dense_layers < n_layers:
        problems.append(
            f"model.moe.dense_layers={moe.dense_layers} must be in 0..model.n_layers - 1 ({n_layers - 1}): "
            "at least one block is MoE"
        )
    if moe.n_shared_experts < 0 or (moe.expert_hidden is not None and moe.expert_hidden < 1):
        problems.append("model.moe.n_shared_experts must be >= 0 and model.moe.expert_hidden >= 1 (or null)")
    p, t = cfg.parallel, cfg.training
    ep = int(p.get("ep", 1))
    if ep > 1 and moe.n_experts % ep:
        problems.append(
            f"parallel.ep={ep} must divide model.moe.n_experts({moe.n_experts}): every ep rank holds as many experts; "
            f"set parallel.ep to a divisor of {moe.n_experts}"
        )
    not_built = {
        # (the router's and experts' plain parameters beside TP's DTensors: only FSDP makes them all DTensors, which
        # the optimizer's foreach steps take together)
        f"parallel.tp with parallel.data={p.data}": int(p.tp) > 1 and str(p.data) not in ("fsdp", "hsdp"),
        # (FSDP2 wants the experts' FSDP mesh dims before their ep dim in the root mesh; with cp that mesh would be
        # expert_shard x cp, which lie on both sides of ep)
        "parallel.cp with parallel.ep": int(p.cp) > 1 and ep > 1,
        f"parallel.cp with model.moe.aux_loss_coef={moe.aux_loss_coef}": int(p.cp) > 1 and moe.aux_loss_coef > 0,
        f"parallel.data={p.data}": str(p.data).startswith("zero"),
        f"parallel.ac={p.ac}": str(p.ac) == "selective",
        "parallel.compile": bool(p.compile),
        "parallel.activation_offload": bool(p.activation_offload),
        f"training.float8={t.float8}": str(t.float8) != "none",
        f"finetune.method={cfg.finetune.method}": str(cfg.finetune.method) not in ("none", "full"),
        "optim.in_backward": bool(cfg.optim.in_backward),
    }
    for setting, on in not_built.items():
        if on:
            problems.append(
                f"model.moe with {setting}: not built yet for MoE blocks (built: one process, DDP, FSDP, HSDP, expert "
                "parallelism with FSDP or HSDP, pipeline parallelism, tensor parallelism with FSDP or HSDP, context "
                "parallelism without ep, full AC); remove it or set model.moe.n_experts=0"
            )
    return problems


def is_moe_layer(moe: MoEArgs | None, layer_id: int) -> bool:
    return moe is not None and layer_id >= moe.dense_layers


# ----------------------------------------------------------------------------------------------
# Routing


class Router(nn.Module):
    """Scores (fp32) and the K chosen experts of each token; the balancing bias (a buffer, checkpointed) only
    chooses."""

    def __init__(self, dim: int, moe: MoEArgs):
        super().__init__()
        self.moe = moe
        self.gate = nn.Linear(dim, moe.n_experts, bias=False)
        self.register_buffer("expert_bias", torch.zeros(moe.n_experts, dtype=torch.float32))

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (weights_TK fp32, experts_TK int64, scores_TE fp32)."""
        m = self.moe
        with torch.autocast(x_TD.device.type, enabled=False):  # (the scores in fp32 under autocast too)
            logits_TE = F.linear(x_TD.float(), self.gate.weight.float())
        scores_TE = logits_TE.softmax(-1) if m.score == "softmax" else logits_TE.sigmoid()
        if m.routing == "learned":
            experts_TK = torch.topk(scores_TE.detach() + self.expert_bias, m.top_k, dim=-1).indices
        else:
            experts_TK = forced_experts(x_TD.shape[0], m.n_experts, m.top_k, m.routing, x_TD.device)
        weights_TK = scores_TE.gather(-1, experts_TK)
        if m.normalize:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
        return weights_TK, experts_TK, scores_TE


def sequence_balance_loss(scores_BSE: torch.Tensor, experts_BSK: torch.Tensor, coef: float) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss, averaged over the sequences: for each sequence,
    coef x sum over experts of f_i x P_i, where f_i = E / (K S) x the rows expert i got from the sequence's S tokens
    (1 for every expert when balanced) and P_i the mean over the tokens of its score normalized over the experts.
    Its gradient reaches the router through P only."""
    B, S, E = scores_BSE.shape
    K = experts_BSK.shape[-1]
    with torch.no_grad():
        f_BE = torch.zeros(B, E, device=scores_BSE.device).scatter_add_(
            1, experts_BSK.reshape(B, S * K), torch.ones(B, S * K, device=scores_BSE.device)
        ) * (E / (K * S))
    P_BE = (scores_BSE / scores_BSE.sum(-1, keepdim=True)).mean(1)
    return coef * (f_BE * P_BE).sum(-1).mean()


def _in_backward() -> bool:
    """Whether this runs inside a backward (a checkpointed block's recomputed forward)."""
    return torch._C._current_graph_task_id() != -1


def forced_experts(T: int, E: int, K: int, routing: str, device) -> torch.Tensor:
    """The experts (T, K) of a forced routing: round_robin spreads every K consecutive rows over the next experts
    (every expert gets T K / E rows when E divides T K); first sends every token to experts 0 .. K - 1."""
    k = torch.arange(K, device=device)
    if routing == "first":
        return k.expand(T, K).contiguous()
    return (torch.arange(T, device=device)[:, None] * K + k) % E


# ----------------------------------------------------------------------------------------------
# Dispatch and combine: no parameters, pure functions of the routing


@dataclass(frozen=True)
class Routed:
    """What `combine` needs of a `dispatch`: each kept row's token and weight position, the rows per expert."""

    token_R: torch.Tensor  # the token each kept row copies
    slot_R: torch.Tensor  # its position in the flattened (T, K) routing (token-major: t K + k)
    counts_E: torch.Tensor  # kept rows per expert (int64)
    dropped: torch.Tensor  # rows past an expert's capacity (a 0-d int64)


def capacity(T: int, moe: MoEArgs) -> int | None:
    """Rows one expert may take under a capacity factor (None: dropless)."""
    if moe.capacity_factor is None:
        return None
    return math.ceil(moe.capacity_factor * T * moe.top_k / moe.n_experts)


def dispatch(x_TD: torch.Tensor, experts_TK: torch.Tensor, moe: MoEArgs) -> tuple[torch.Tensor, Routed]:
    """The tokens' rows ordered by expert (stable: within an expert, in token order), and how to put them back.
    With a capacity factor, an expert's rows past its capacity are dropped (the earliest tokens kept)."""
    T, K = experts_TK.shape
    flat = experts_TK.flatten()
    slot_R = torch.argsort(flat, stable=True)
    counts_E = torch.bincount(flat, minlength=moe.n_experts)
    dropped = torch.zeros((), dtype=torch.int64, device=flat.device)
    cap = capacity(T, moe)
    if cap is not None:
        starts = torch.cumsum(counts_E, 0) - counts_E
        rank_R = torch.arange(len(slot_R), device=flat.device) - starts[flat[slot_R]]  # the row's place in its expert
        keep = rank_R < cap
        dropped = (~keep).sum()
        slot_R, counts_E = slot_R[keep], counts_E.clamp(max=cap)
    token_R = slot_R // K
    return x_TD[token_R], Routed(token_R, slot_R, counts_E, dropped)


def combine(y_RD: torch.Tensor, weights_TK: torch.Tensor, routed: Routed, T: int) -> torch.Tensor:
    """Each row's output times its weight, summed into its token (T, D), in the rows' dtype: the rows put back in
    token order (a dropped row's slot stays 0), then one weighted sum over each token's K slots. (Not index_add of
    the weighted rows: its backward keeps the weighted rows, one more R x D tensor.)"""
    K, D, R = weights_TK.shape[1], y_RD.shape[1], y_RD.shape[0]
    # each slot's row: the inverse of the dispatch's order, a dropped slot pointing at one zero row after the rows
    # (a gather keeps only its indices for the backward; index_copy and index_add would keep the rows too)
    row_S = torch.full((T * K,), R, dtype=torch.int64, device=y_RD.device)
    row_S[routed.slot_R] = torch.arange(R, device=y_RD.device)
    y_SD = torch.cat([y_RD, y_RD.new_zeros(1, D)])[row_S] if R < T * K else y_RD[row_S]
    return (y_SD.view(T, K, D) * weights_TK.to(y_RD.dtype)[..., None]).sum(1)


# ----------------------------------------------------------------------------------------------
# Experts


_GROUPED_OK: dict[tuple, bool] = {}


def grouped_mm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` computes here (torch 2.13 on the CPU, bf16 on Hopper GPUs; older torch has it on
    CUDA only): tried once per (device kind, dtype) on a small problem against the loop, forward and backward."""
    key = (device.type, dtype)
    if key not in _GROUPED_OK:
        # in a thread of its own: outside the caller's autocast, and outside the saved-tensor hooks of a checkpointed
        # block whose forward asked (its recomputation would not repeat the probe: torch would see fewer tensors)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:
            _GROUPED_OK[key] = pool.submit(_grouped_mm_probe, device, dtype).result()
    return _GROUPED_OK[key]


def _grouped_mm_probe(device: torch.device, dtype: torch.dtype) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        g = torch.Generator(device=device).manual_seed(0)  # (not the global generator: the run's draws stay the same)
        x = torch.randn(24, 16, device=device, dtype=dtype, generator=g).requires_grad_()
        w = torch.randn(2, 16, 16, device=device, dtype=dtype, generator=g).requires_grad_()
        y = torch._grouped_mm(x, w, offs=torch.tensor([8, 24], device=device, dtype=torch.int32))
        y.backward(torch.ones_like(y))
        ref = torch.cat([x[:8] @ w[0], x[8:] @ w[1]])
        return bool(torch.allclose(y.float(), ref.float(), rtol=2e-2, atol=2e-2))
    except (RuntimeError, NotImplementedError):
        return False


class GroupedExperts(nn.Module):
    """E SwiGLU experts as three stacked weights: w1_EFD and w3_EFD (gate and up), w2_EDF (down). Under expert
    parallelism (parallel/expert.py) each rank holds E / ep of them and is called with its received rows and counts."""

    def __init__(self, dim: int, hidden: int, moe: MoEArgs):
        super().__init__()
        E = moe.n_experts
        self.moe = moe
        self.w1 = nn.Parameter(torch.empty(E, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(E, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(E, hidden, dim))

    def forward(self, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Each expert's SwiGLU on its consecutive rows (counts_E of them, in expert order)."""
        dtype = torch.get_autocast_dtype(x_RD.device.type) if torch.is_autocast_enabled(x_RD.device.type) else None
        x = x_RD if dtype is None else x_RD.to(dtype)
        # (under expert parallelism the weights are DTensors split over the ep ranks: these experts are the local ones)
        w1, w2, w3 = (local(w) if dtype is None else local(w).to(dtype) for w in (self.w1, self.w2, self.w3))
        if self._grouped(x):
            offs = torch.cumsum(counts_E, 0).to(torch.int32)
            with torch.autocast(x.device.type, enabled=False):
                h = F.silu(torch._grouped_mm(x, w1.transpose(-2, -1), offs=offs))
                h = h * torch._grouped_mm(x, w3.transpose(-2, -1), offs=offs)
                return torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs)
        outs = []
        for e, rows in enumerate(torch.split(x, counts_E.tolist())):  # (the reference: one expert at a time)
            outs.append((F.silu(rows @ w1[e].t()) * (rows @ w3[e].t())) @ w2[e].t())
        return torch.cat(outs) if outs else x.new_zeros(0, x.shape[1])

    def _grouped(self, x: torch.Tensor) -> bool:
        mode = self.moe.grouped_mm
        if mode == "false":
            return False
        runs = grouped_mm_runs(x.device, x.dtype)
        if mode == "true" and not runs:
            raise RuntimeError(
                f"model.moe.grouped_mm=true: torch._grouped_mm does not run on {x.device.type} in {x.dtype} with "
                f"torch {torch.__version__}; set model.moe.grouped_mm=auto"
            )
        return runs


class MoE(nn.Module):
    """The MoE feed-forward block (the module docstring walks its forward). `tokens_per_expert` accumulates the
    routing counts of the steps since the last `balance` (training only; not state)."""

    def __init__(self, dim: int, hidden: int, moe: MoEArgs, shared: nn.Module | None = None):
        super().__init__()
        self.moe = moe
        self.router = Router(dim, moe)
        self.experts = GroupedExperts(dim, hidden, moe)
        self.shared = shared  # a dense SwiGLU n_shared_experts x F wide, or None
        self.register_buffer("tokens_per_expert", torch.zeros(moe.n_experts, dtype=torch.float32), persistent=False)
        self.register_buffer("dropped_tokens", torch.zeros((), dtype=torch.float32), persistent=False)
        self.aux_loss: torch.Tensor | None = None  # this forward's sequence balance loss (model.moe.aux_loss_coef)

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """The balancing bias and the counts at 0 (models/llama.py `init_weights`: built on the meta device, the
        buffers hold whatever memory `to_empty` gave them)."""
        for b in (self.router.expert_bias, self.tokens_per_expert, self.dropped_tokens):
            if not b.is_meta:
                b.zero_()

    @torch.no_grad()
    def _count(self, counts_E: torch.Tensor, dropped: torch.Tensor, grad: torch.Tensor) -> None:
        self.tokens_per_expert += counts_E
        self.dropped_tokens += dropped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        x_TD = x.reshape(B * S, D)
        weights_TK, experts_TK, scores_TE = self.router(x_TD)
        if self.moe.aux_loss_coef and self.training and torch.is_grad_enabled():
            aux = sequence_balance_loss(scores_TE.view(B, S, -1), experts_TK.view(B, S, -1), self.moe.aux_loss_coef)
            # (read by `take_aux_losses`; a checkpoint's recompute, inside the backward, computes it again, as
            # checkpointing needs the same saved tensors, and drops it)
            self.aux_loss = None if _in_backward() else aux
        x_RD, routed = dispatch(x_TD, experts_TK, self.moe)
        # counted when the backward reaches the routing weights: once per trained forward; not for a checkpoint's
        # recompute (it runs inside the backward), nor a forward no backward follows (a pipeline stage's shape
        # inference runs one with gradients on, on real data or zeros; validation; sampling)
        if self.training and weights_TK.requires_grad and not _in_backward():
            weights_TK.register_hook(functools.partial(self._count, routed.counts_E.float(), routed.dropped.float()))
        y_RD = self.experts(x_RD, routed.counts_E)
        out_TD = combine(y_RD, weights_TK, routed, B * S)
        if self.shared is not None:
            out_TD = out_TD + self.shared(x_TD).to(out_TD.dtype)
        return out_TD.reshape(B, S, D)


# ----------------------------------------------------------------------------------------------
# Balancing (auxiliary-loss-free, DeepSeek-V3)


def moe_blocks(model: nn.Module) -> list[tuple[str, MoE]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


def take_aux_losses(parts: list[nn.Module]) -> torch.Tensor | None:
    """The sum of the MoE blocks' sequence balance losses of the last forward (each taken once: a checkpointed
    block's recompute inside the backward sets its own, which nothing reads), or None without any."""
    losses = []
    for part in parts:
        for _, m in moe_blocks(part):
            if m.aux_loss is not None:
                losses.append(m.aux_loss)
                m.aux_loss = None
    return torch.stack(losses).sum() if losses else None


@torch.no_grad()
def balance(parts: list[nn.Module], all_reduce=None, ep: int = 1) -> dict[str, torch.Tensor]:
    """Once per optimizer step: the routing counts since the last call, summed over the data-parallel ranks by
    `all_reduce(tensor)` (in place), move each expert's bias by the rate towards the mean load (up for an expert
    below it, down above it, as DeepSeek-V3); the counts restart. Returns each MoE block's load for the logs, on the
    device (no host synchronization here): {"moe/<layer>": (max / mean tokens per expert, 1.0 balanced; the share of
    rows dropped; under expert parallelism over `ep` ranks, the busiest rank's rows over the mean rank's, each rank
    holding E / ep consecutive experts)}."""
    blocks = [(name, m) for part in parts for name, m in moe_blocks(part)]
    if not blocks:
        return {}
    counts = torch.stack([torch.cat([m.tokens_per_expert, m.dropped_tokens[None]]) for _, m in blocks])
    if all_reduce is not None:
        all_reduce(counts)
    logs = {}
    for (name, m), row in zip(blocks, counts):
        load, dropped = row[:-1], row[-1]
        mean = load.mean()
        if m.moe.bias_update_rate and m.moe.routing == "learned":  # (no tokens: the sign is 0, nothing moves)
            m.router.expert_bias += m.moe.bias_update_rate * torch.sign(mean - load)
        layer = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "").split(".feed_forward")[0]
        ranks = load.view(ep, -1).sum(1)
        logs[f"moe/{layer}"] = torch.stack(
            [
                load.max() / mean.clamp_min(1e-9),
                dropped / (load.sum() + dropped).clamp_min(1),
                ranks.max() / ranks.mean().clamp_min(1e-9),
                torch.tensor(float(ep), device=load.device),
            ]
        )
        m.tokens_per_expert.zero_()
        m.dropped_tokens.zero_()
    return logs


def load_metrics(logs: dict[str, torch.Tensor]) -> dict[str, float]:
    """`balance`'s logs as metrics (one host synchronization): moe/<layer>/max_over_mean, moe/<layer>/dropped and,
    under expert parallelism, moe/<layer>/rank_max_over_mean."""
    if not logs:
        return {}
    values = torch.stack(list(logs.values())).tolist()
    out = {}
    for key, (ratio, dropped, rank_ratio, ep) in zip(logs, values):
        out[f"{key}/max_over_mean"], out[f"{key}/dropped"] = ratio, dropped
        if ep > 1:
            out[f"{key}/rank_max_over_mean"] = rank_ratio
    return out
