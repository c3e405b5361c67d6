"""The memory terms of one rank, each a named function whose docstring states its formula: the per-tensor
arithmetic (optimizer state, the storages a block saves for backward, the recompute under AC, context-parallel
attention's buffers) and, built from it, the terms of one pipeline rank at each moment of a step (model states,
gradients, FSDP's gathered parameters, activations, the loss's temporaries, a block's backward, the optimizer
step). parallel/plan.py assembles them into a step's moments and picks the peak.

Every term names the tensors it counts and the tracker category they fall in (`parallel.memory.CATEGORIES`, what
torch's MemTracker / FSDPMemTracker measure). Pure arithmetic, like parallel/layout.py.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace

from models.adapters import AdapterLinear, nf4_bytes, target_shapes
from models.adapters import spec_of as adapter_spec_of
from models.llama import TP_SPLIT_DIM
from parallel.layout import (
    PERSISTENCE_THRESHOLD,
    V_SHAPED,
    ZERO_STAGES,
    ParallelDims,
    bucket_elements,
    data_strategy,
    in_flight,
    microbatches,
    n_stages,
    reshards_after_forward,
    split_blocks,
    stage_ids,
)


@dataclass
class Term:
    name: str  # what it counts, e.g. "block activations x 4 blocks x 2 in flight"
    bytes: int
    category: str  # the tracker category it is measured in (parallel.memory.CATEGORIES), or "host"
    note: str = ""


SAVE_COMPUTE = ("fp32", "autocast", "mixed")  # how activations are stored (see _precision_mode)


# bytes per element of the update's temporaries, for one parameter (torch's foreach AdamW: the sqrt of the second
# moment; adamw_bf16: the fp32 copies of both moments, the noise and the rounding, 23 bytes, and with bf16
# parameters their fp32 copy and its own rounding, 31; measured with torch's MemTracker, torch 2.13)
UPDATE_TEMPORARY = {"adamw": (4, 4), "adamw_bf16": (23, 31)}


def _update_bytes(opt: str, elements: int, master_weights: bool) -> int:
    """The update's temporary for `elements` values: UPDATE_TEMPORARY[opt] bytes each (fp32 masters, or bf16)."""
    fp32, bf16 = UPDATE_TEMPORARY[opt]
    return (fp32 if master_weights else bf16) * elements


def _ceil(a: int, b: int) -> int:
    """ceil(a / b) for positive integers: the larger shard of a dimension split b ways."""
    return -(-a // b)


def optimizer_state_bytes(name: str, shape: tuple[int, ...], *, adafactor_beta1: bool = False) -> int:
    """Bytes of optimizer state for one (local) tensor of this shape, as each optimizer allocates it
    (the scalar step counters apart: `step_counter_bytes`)."""
    n = math.prod(shape)
    if name == "adamw":
        return 8 * n
    if name == "adamw_bf16":
        return 4 * n
    if name == "adamw8bit":  # torchao: int8 codes + an fp32 scale per 256 values + two 256-entry code maps
        if n >= 4096 and n % 256 == 0:
            return 2 * (n + 4 * (n // 256) + 4 * 256)
        return 8 * n
    if name == "adafactor":
        factored = 4 * (shape[-2] + shape[-1]) if len(shape) >= 2 else 4 * n
        return factored + (4 * n if adafactor_beta1 else 0)
    raise ValueError(f"optim.name={name}: no state model")


STEP_COUNTER_BYTES = {"adamw": 4, "adamw_bf16": 4, "adamw8bit": 4, "adafactor": 4}  # one fp32 scalar per tensor


@dataclass
class _Param:
    name: str
    full: tuple[int, ...]
    tp: tuple[int, ...]  # after the TP split (the FSDP unit's unsharded shape)
    local: tuple[int, ...]  # what this rank stores (after FSDP's dim-0 split)
    unit: str  # the FSDP unit: "root" or the block index
    decay: bool  # in the weight-decayed optimizer group (matrices, not embeddings unless decay_embeddings)
    trainable: bool = True  # False: a frozen base under adapters (finetune): no gradient, no optimizer state
    nf4: int = 0  # QLoRA: an NF4 base weight, its scaler block (models/adapters.py `nf4_bytes`); 0: plain


@functools.lru_cache(maxsize=64)
def _named_shapes(args, *, tied_copy: bool) -> tuple[tuple[str, tuple[int, ...], str, str], ...]:
    """(name, shape, FSDP unit: a block index or "root", module path) of every parameter of `args`' model, with the
    last stage's own output table where `tied_copy` (a tied model split over pipeline stages). Cached: a layout
    search asks for the same model's shapes for every candidate and stage."""
    shapes = args.param_shapes()
    if tied_copy:  # the last stage's output projection holds its own copy
        shapes.append(("output.weight", (args.vocab_size, args.dim)))
    out = []
    for name, shape in shapes:
        if name.startswith("layers."):
            out.append((name, tuple(shape), name.split(".")[1], name.split(".", 2)[2].rsplit(".", 1)[0]))
        else:
            out.append((name, tuple(shape), "root", name.rsplit(".", 1)[0]))
    return tuple(out)


def _params_of_rank(args, cfg, dims: ParallelDims, pp_rank: int) -> tuple[list[_Param], list[int], bool, bool, int]:
    """This pipeline rank's parameters, its block indices, whether it holds the first / last stage, and parts."""
    p = cfg.parallel
    sched, data = str(p.pp_schedule), data_strategy(cfg)
    total = n_stages(sched, dims.pp)
    mine = stage_ids(sched, pp_rank, dims.pp)
    ranges = split_blocks(args.n_layers, total)
    blocks = {i for s in mine for i in ranges[s]}
    first, last = 0 in mine, total - 1 in mine
    out, decay_embeddings = [], bool(cfg.optim.decay_embeddings)
    adapters = adapter_spec_of(cfg)
    quantized = {m for m, _ in target_shapes(args, adapters.targets)} if adapters and adapters.nf4 else set()
    for name, shape, unit, module in _named_shapes(args, tied_copy=args.tie_embeddings and last and not first):
        keep = (int(unit) in blocks) if unit != "root" else (first if module == "tok_embeddings" else last)
        if not keep:
            continue
        tp_shape = list(shape)
        if dims.tp > 1 and (d := TP_SPLIT_DIM.get(module)) is not None:
            tp_shape[d] = _ceil(tp_shape[d], dims.tp)
        local = list(tp_shape)
        if dims.ep > 1 and module.endswith("feed_forward.experts"):  # (parallel/expert.py) split by expert over ep,
            tp_shape[0] = local[0] = shape[0] // dims.ep  # then FSDP's dim 1 over the rest of dp_shard
            local[1] = _ceil(local[1], dims.expert_shard)
        elif data in ("fsdp", "hsdp"):
            local[0] = _ceil(local[0], dims.dp_shard * dims.cp)
        decay = len(shape) >= 2 and (decay_embeddings or module != "tok_embeddings")
        nf4 = int(cfg.finetune.nf4_scaler_block) if adapters and adapters.nf4 and module in quantized else 0
        out.append(_Param(name, tuple(shape), tuple(tp_shape), tuple(local), unit, decay, not adapters, nf4))
    for i in sorted(blocks) if adapters else ():  # finetune: A (rank x in), B (out x rank), DoRA's m: trainable
        for module, (n_out, n_in) in target_shapes(args, adapters.targets):
            parts = [("lora_a.weight", (adapters.rank, n_in)), ("lora_b.weight", (n_out, adapters.rank))]
            if adapters.kind == "dora":  # the magnitude per output feature (1-D: no weight decay)
                parts.append(("magnitude", (n_out,)))
            # under TP (parallel/tensor.py) a column-parallel layer splits B's rows and the magnitude, a row-parallel
            # one A's columns; FSDP then splits dim 0 of what each rank holds
            colwise = TP_SPLIT_DIM.get(module) == 0
            for part, shape in parts:
                tp_shape = list(shape)
                d = 1 if part == "lora_a.weight" and not colwise else 0 if part != "lora_a.weight" and colwise else None
                if dims.tp > 1 and d is not None:
                    tp_shape[d] = _ceil(tp_shape[d], dims.tp)
                local = list(tp_shape)
                if data in ("fsdp", "hsdp"):
                    local[0] = _ceil(local[0], dims.dp_shard * dims.cp)
                name = f"layers.{i}.{module}.{part}"
                out.append(_Param(name, shape, tuple(tp_shape), tuple(local), str(i), len(shape) == 2, True))
    return out, sorted(blocks), first, last, len(mine)


def adapter_saved_per_token(r) -> float:
    """What the adapters add to a block's saved tensors, per token (AC none): each wrapped linear's B saves its input,
    A's output (rank x the activation bytes); A saves the layer's input (under autocast its own cast) where the
    frozen base no longer does. DoRA also keeps each layer's unscaled output (out features x the activation bytes)
    for the magnitude's gradient. Measured with saved-tensor hooks, 2026-12-07."""
    if r.adapters is None:
        return 0.0
    act = 4 if r.mode == "fp32" else 2
    per = act * r.adapters.rank * len(r.adapters.targets)  # (A's output is whole on every TP rank)
    if r.adapters.kind == "dora":  # the unscaled output, saved for the magnitude's gradient
        per += act * _dora_outputs(r)
    return per


def _dora_outputs(r) -> int:
    """DoRA's output features per token that one rank scales: under TP a column-parallel layer's share of its
    outputs, a row-parallel layer's whole (partial-sum) output."""
    return sum(
        _ceil(n_out, r.dims.tp) if TP_SPLIT_DIM.get(module) == 0 else n_out
        for module, (n_out, _) in target_shapes(r.args, r.adapters.targets)
    )


def adapter_saved_per_block(r) -> float:
    """DoRA's per-layer vectors a block keeps for backward, whatever the tokens: the scale m / ||W'|| and its
    parts, measured as 8 bytes per output feature in fp32 and 6 under autocast (an fp32 and a 16-bit copy)."""
    if r.adapters is None or r.adapters.kind != "dora":
        return 0.0
    return (8 if r.mode == "fp32" else 6) * _dora_outputs(r)


def _precision_mode(cfg) -> str:
    """How compute tensors are stored: fp32; `autocast` (bf16/fp16 autocast over fp32 parameters: the residual
    stream and the norms stay fp32, every linear casts its input and weight); `mixed` (the parameters themselves
    are cast for compute: FSDP's param_dtype, DeepSpeed's bf16/fp16 module: every activation in 2 bytes)."""
    if str(cfg.training.precision) == "fp32":
        return "fp32"
    if not cfg.training.master_weights:  # the parameters are stored in bf16 (no cast, no fp32 copy)
        return "mixed"
    return "mixed" if data_strategy(cfg) in ("fsdp", "hsdp", *ZERO_STAGES) else "autocast"


SELECTIVE_EVERY_SECOND = "selective_every_second"  # ac=selective with sac_matmuls=every_second, as the formulas see it


def ac_mode(cfg) -> str:
    """parallel.ac as the formulas take it: none, full, selective, or selective_every_second."""
    p = cfg.parallel
    ac = str(p.ac)
    return SELECTIVE_EVERY_SECOND if ac == "selective" and str(p.sac_matmuls) == "every_second" else ac


@dataclass(frozen=True)
class RoutedMoE:
    """An MoE block as the planner sizes one rank's share of it (every other field read from `moe`, the model's
    MoEArgs): under expert parallelism over `ep` ranks, `load` is the rows this rank's experts receive relative to
    balanced routing (`expert_load`)."""

    moe: object
    ep: int = 1
    load: float = 1.0

    def __getattr__(self, name: str):
        return getattr(self.moe, name)


# the routings the planner sizes expert parallelism for (plan.py prints all three)
EXPERT_LOADS = ("balanced", "observed", "worst")


def worst_expert_load(moe, ep: int) -> float:
    """The most rows one rank's experts can receive, relative to balanced routing: every token of the ep group
    choosing this rank's L = E / ep experts (K of them, or all L when K > L): ep x min(K, L) / K. The forced routing
    `first` is exactly this case for rank 0."""
    L = moe.n_experts // ep
    return ep * min(moe.top_k, L) / moe.top_k


def expert_load(cfg, moe, ep: int, routing: str | float | None = None) -> float:
    """The `load` one rank's experts are sized for: 1.0 balanced (the default, and forced round_robin), the worst
    case (`worst_expert_load`; what forced `first` routing is), or an observed max/mean tokens per expert (a float:
    trainer/metrics.py `observed_expert_load` of a run's log), which bounds a rank's load (a rank's L experts carry
    at most L x the busiest one) and is itself bounded by the worst case."""
    if ep <= 1:
        return 1.0
    if routing is None:
        routing = "worst" if str(cfg.model.moe.routing) == "first" else "balanced"
    if routing == "worst":
        return worst_expert_load(moe, ep)
    if routing == "balanced":
        return 1.0
    return min(max(float(routing), 1.0), worst_expert_load(moe, ep))


def moe_rows_per_token(moe, load: float = 1.0) -> float:
    """Routed rows per token of an MoE block that one rank's experts compute: top_k dropless x `load` (without expert
    parallelism every expert is on the rank, so only the total counts: load 1), at most capacity_factor x top_k
    with a capacity (each source rank sends an expert at most its capacity)."""
    cap = moe.capacity_factor
    return moe.top_k * (min(load, cap) if cap else load)


def moe_ffn_tensors(args, mode: str) -> list[float]:
    """Per token, what an MoE feed-forward (models/moe.py) saves for backward: the router's fp32 input (a copy of a
    16-bit one; under autocast the fp32 norm output itself), its scores (E fp32), chosen experts (K int64), and the
    weights before normalizing with their sum; the rows' tokens and each slot's row (int64); per routed row its input
    (cast to the compute dtype), the SwiGLU gate, silu(gate), up and product (F each); per slot its output and its
    weight (in the compute dtype); and the shared experts' dense SwiGLU (n_shared x F). Measured with saved-tensor
    hooks on one block (2026-12-07) before the tracker checked the sum. Under expert parallelism (`RoutedMoE`) the
    rows' tensors are those this rank's experts receive (x the routing's load), and two int64 indices per received
    row put them in expert order and back."""
    m, D, Fe = args.moe, args.dim, args.expert_hidden
    rho = moe_rows_per_token(m)  # (rows this rank's tokens send)
    ep, load = getattr(m, "ep", 1), getattr(m, "load", 1.0)
    got = moe_rows_per_token(m, load) if ep > 1 else rho  # rows this rank's experts compute
    out = 4 if mode == "fp32" else 2
    router_in = [] if mode == "fp32" else [4 * D]  # (fp32: the norm output, counted as the block's MLP input)
    router = [*router_in, 4 * m.n_experts, 8 * m.top_k, 4 * m.top_k + 4]
    if getattr(m, "aux_loss_coef", 0):  # the sequence balance loss: each token's score sum (measured with the hooks)
        router.append(4)
    # the rows' tokens, each slot's row, the rows' input, gate, silu(gate), up, product; every slot's output (K of
    # them: a dropped row's slot is a zero) and the normalized weights in that dtype
    rows = [8 * rho, 8 * m.top_k, out * D * got, *([out * Fe * got] * 4), out * D * m.top_k, out * m.top_k]
    if ep > 1:  # parallel/expert.py: the received rows put in expert order and back (an int64 index each)
        rows += [8 * got, 8 * got]
    shared = []
    if m.n_shared_experts:
        Fs = m.n_shared_experts * Fe
        lin = 4 if mode == "fp32" else 2
        casts = [lin * D] * (2 if mode == "autocast" else 0)  # (autocast: w1's and w3's copies of the input)
        shared = [*casts, *([out * Fs] * 4)]
    input_ = [4 * D] if mode == "fp32" else [2 * D] if mode == "mixed" else []  # the norm output (shared, router)
    return input_ + router + rows + shared


def block_saved_tensors(
    args, *, ac: str, mode: str, tp: int, device: str = "cuda", frozen: bool = False, layer: int | None = None
) -> list[float]:
    """Per token of the micro-batch (averaged over the sequence), the bytes of each storage one block saves for
    backward, as this model's ops run: RMSNorm saves its input, the normalized input and 1/rms; the linears their
    input (under autocast each linear its own cast copy); RoPE's outputs q and k; SDPA q, k, v (k and v repeated to
    the query heads under model.expand_kv), its output and the fp32 log-sum-exp; SwiGLU the gate and up outputs,
    silu(gate) and the product. Under TP with sequence parallelism the residual stream and the norms are split over
    the sequence (1/tp), the linears' gathered inputs are whole (D per token), heads and hidden units are split
    (1/tp). (Activation offloading moves them storage by storage: parallel/offload.py.)"""
    D, H = args.dim, args.n_heads
    Q, K, F = H * args.head_dim, args.kv_heads * args.head_dim, args.ffn_hidden
    t = tp
    if mode == "fp32":
        res, lin, out = 4, 4, 4  # bytes: residual stream / norms, linear inputs, linear outputs
    elif mode == "autocast":
        res, lin, out = 4, 2, 2
    else:
        res, lin, out = 2, 2, 2
    if ac == "full":
        return [res * D / t]  # the block's input only
    if ac.startswith("selective"):  # saved: the input, every matmul's output, SDPA's outputs; the rest is recomputed
        # under TP the row-parallel matmuls (wo, w2) are recomputed and their reduce-scattered outputs saved
        rows = [out * D / t] * 2 if t > 1 else [out * D] * 2
        if ac == SELECTIVE_EVERY_SECOND:  # wk, wo and w3 recomputed (under TP wo's reduce-scattered output is kept)
            return [
                res * D / t,
                out * Q / t,
                out * K / t,
                out * Q / t,
                out * F / t,
                4 * H / t,
                *(rows if t > 1 else rows[:1]),
            ]
        return [
            res * D / t,
            out * Q / t,
            out * K / t,
            out * K / t,
            out * Q / t,
            out * F / t,
            out * F / t,
            4 * H / t,
            *rows,
        ]
    norms = 2 * _norm_tensors(D, mode, t, device, frozen)  # two RMSNorms
    casts = 3 if mode == "autocast" else 1  # autocast casts the shared input once per linear (wq, wk, wv)
    # rope(q), rope(k), v, SDPA out, lse; with model.expand_kv SDPA saves the keys and values repeated to the query
    # heads instead (repeat_interleave's backward saves nothing)
    kv = Q if args.kv_expanded else K
    attention = [out * Q / t, out * kv / t, out * kv / t, out * Q / t, 4 * H / t]
    if args.qk_norm:  # (Qwen3) the head norms of the queries and keys: what an RMSNorm saves, 1/rms per head
        res = 2 if mode == "mixed" and device != "cpu" else 4
        attention += [res * Q / t, res * Q / t, 4 * H / t, res * K / t, res * K / t, 4 * args.kv_heads / t]
    if args.moe is not None and (layer is None or args.is_moe(layer)):  # (None: the largest block, an MoE one)
        return norms + [lin * D] * casts + attention + moe_ffn_tensors(args, mode)
    gathered = [lin * D] * (casts + (2 if mode == "autocast" else 1))  # inputs of wq/wk/wv and w1/w3
    mlp = [out * F / t] * 4  # gate, silu(gate), up, product
    return norms + gathered + attention + mlp


def blocks_by_ac(cfg, n_blocks: int) -> dict[str, int]:
    """How many of a stage's `n_blocks` run under each AC mode: parallel.ac_every=k checkpoints the blocks whose
    index in the stage is a multiple of k (parallel/activation.py apply_ac; full AC only), the rest keep
    everything."""
    ac, k = ac_mode(cfg), int(cfg.parallel.ac_every)
    if ac != "full" or k <= 1:
        return {ac: n_blocks}
    checkpointed = -(-n_blocks // k)
    return {"full": checkpointed, "none": n_blocks - checkpointed}


def offloaded_storages(cfg, args, tp: int, ac: str | None = None, device: str = "cuda") -> list[float]:
    """parallel.activation_offload: per token of the micro-batch, the bytes of each of a block's saved storages that
    go to the host (parallel/offload.py): those of at least activation_offload_min_bytes. Selective AC keeps its
    chosen outputs in the checkpoint's own cache, out of the hooks' reach, so only the block input moves, eager or
    compiled (measured: tests/distributed/test_memory_plan.py's compile_activation_offload rows)."""
    p = cfg.parallel
    if not p.activation_offload:
        return []
    ac = ac or ac_mode(cfg)  # (`ac`: of one kind of block, under parallel.ac_every)
    saved = block_saved_tensors(args, ac=ac, mode=_precision_mode(cfg), tp=tp, device=device)
    movable = saved[:1] if ac.startswith("selective") else saved
    mb_tokens = cfg.training.micro_batch_size * cfg.training.seq_len // max(p.cp, 1)
    return [b for b in movable if b * mb_tokens >= p.activation_offload_min_bytes]


def offloaded_per_token(cfg, args, tp: int, ac: str | None = None, device: str = "cuda") -> float:
    """The bytes per token of the micro-batch one block sends to the host: the sum of `offloaded_storages`."""
    return sum(offloaded_storages(cfg, args, tp, ac, device))


PINNED_ROUNDING = "pinned host memory's power-of-two rounding (torch's CachingHostAllocator)"


def pinned_bytes(nbytes: float) -> int:
    """What torch's pinned host allocator takes for a request of `nbytes` on a CUDA machine: the next power of two
    (ATen's CachingHostAllocator rounds every request with PowerOf2Ceil before cudaHostAlloc and keeps the block for
    reuse). A 96 MiB storage holds 128 MiB of host memory."""
    n = int(round(nbytes))
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def cp_attention_bytes(cfg, args, dims: ParallelDims) -> float:
    """What parallel/context.py's attention holds in a block's backward beyond the saved activations: allgather,
    every rank's keys and values (the whole sequence) and an fp32 gradient buffer for each; ring, this block
    and the one arriving, and the travelling fp32 gradients (the one held, the one arriving); both, the fp32
    query gradient and one kernel call's keys and values expanded to the query heads."""
    t = cfg.training
    mode = _precision_mode(cfg)
    compute = 4 if mode == "fp32" else 2
    kv = args.kv_heads * args.head_dim / dims.tp  # per token, keys (or values)
    local = t.micro_batch_size * t.seq_len // dims.cp
    if str(cfg.parallel.cp_rotate) == "allgather":
        held = dims.cp * local * 2 * kv * (compute + 4)
    else:
        held = local * 2 * kv * (2 * compute + 2 * 4)
    q = args.n_heads * args.head_dim / dims.tp
    expanded = (local // 2) * 2 * q * compute  # one chunk's keys and values at the query heads
    return held + local * q * 4 + expanded


def block_activation_bytes(
    args, *, ac: str, mode: str, tp: int, device: str = "cuda", frozen: bool = False, layer: int | None = None
) -> float:
    """Bytes one block saves for backward, per token of the micro-batch: `block_saved_tensors` summed (of block
    `layer`; None: the largest, an MoE block where the model has them)."""
    return sum(block_saved_tensors(args, ac=ac, mode=mode, tp=tp, device=device, frozen=frozen, layer=layer))


def _norm_tensors(D: int, mode: str, tp: int, device: str = "cuda", frozen: bool = False) -> list[float]:
    """Per token, what one RMSNorm saves: its input, the normalized input and 1/rms in the residual dtype (under
    tensor parallelism on the sequence-sharded input). On the CPU, 16-bit inputs (`mixed`: FSDP's or DeepSpeed's
    16-bit parameters) take torch's composite rms_norm, which upcasts: it saves the fp32 copy of the input, the
    fp32 normalized input and 1/rms (measured: 9 norms x 4 x (D + 1) bytes per token more than 2-byte copies, the
    whole gap of FSDP, HSDP, ZeRO-1/2/3 and PP at launch/compare.py's defaults, 2026-12-07). (Four fp32 copies of
    the input were measured here under FSDP's bf16 parameters with TP while FSDP cast the blocks' inputs, the RoPE
    tables among them, to 16 bits; the blocks no longer cast their inputs.)"""
    res = 2 if mode == "mixed" and device != "cpu" else 4
    if frozen:  # a frozen norm weight (a base under adapters) needs no normalized input for its gradient
        return [res * D / tp, res / tp]
    return [res * D / tp, res * D / tp, res / tp]


def _norm_bytes(D: int, mode: str, tp: int, device: str = "cuda", frozen: bool = False) -> float:
    """Per token, one RMSNorm's saved bytes: `_norm_tensors` summed."""
    return sum(_norm_tensors(D, mode, tp, device, frozen))


def block_recompute_bytes(
    args, *, ac: str, mode: str, tp: int, device: str = "cuda", frozen: bool = False
) -> tuple[float, float]:
    """Per token, (activations, gradient temporaries) a block adds during its own backward: under AC its
    forward recomputed (what the un-checkpointed block saves, less what it kept), and the gradients of its
    output and of the MLP's gate and up projections."""
    res, g = (4, 4) if mode == "fp32" else (4, 2) if mode == "autocast" else (2, 2)
    temps = res * args.dim / tp + g * 2 * args.ffn_hidden / tp
    if args.moe is not None:  # (the largest block: an MoE one; its routed rows' and shared experts' gradients)
        m = args.moe
        rows = moe_rows_per_token(m, getattr(m, "load", 1.0))
        temps = res * args.dim + g * (
            rows * (args.dim + 2 * args.expert_hidden) + 2 * m.n_shared_experts * args.expert_hidden
        )
    if ac == "none":
        return 0.0, temps
    everything = block_activation_bytes(args, ac="none", mode=mode, tp=tp, device=device, frozen=frozen)
    if ac == "full":
        recomputed = everything - block_activation_bytes(
            args, ac="full", mode=mode, tp=tp, device=device, frozen=frozen
        )
    else:  # selective: the kept matmul and attention outputs are reused, not made again
        D, H = args.dim, args.n_heads
        Q, K, F = H * args.head_dim, args.kv_heads * args.head_dim, args.ffn_hidden
        out = 4 if mode == "fp32" else 2
        # input, v, SDPA out, gate, up (every_second: recomputed); lse
        shared = res * D / tp + out * (Q + K + (F if ac == SELECTIVE_EVERY_SECOND else 2 * F)) / tp + 4 * H / tp
        recomputed = everything - shared
    return max(recomputed, 0.0), temps


# DeepSpeed 0.19's reduce buckets (reduce_bucket_size elements of the gradient dtype each), by ZeRO stage. Stages 1
# and 2 (stage_1_and_2.py): two (overlap_comm double-buffers them), allocated by `setup_buckets` at a backward's
# first reduced gradient and freed by `_release_ipg_buffers` at its end, with stage 2's gradient partition
# (`grads_in_partition`): they exist during the blocks' backward, not while the loss's backward holds the logits'
# temporaries, nor at the optimizer step. Stage 3 (stage3.py): one, allocated when the optimizer is built and kept.
_DS_BUCKETS = {1: 2, 2: 2, 3: 1}


def _ds_setting(cfg, key: str, default: int) -> int:
    """A zero_optimization value of the ds_config: the recipe's parallel.deepspeed override, else ours."""
    zero = (cfg.parallel.deepspeed or {}).get("zero_optimization") or {}
    return int(zero.get(key, default))


def _model_states(cfg, params: list[_Param], dims: ParallelDims) -> dict[str, int]:
    """Bytes of parameters, gradients (all of the step's), optimizer state and (ZeRO) fp32 master copies that
    one rank of this pipeline stage stores, wherever they live (device or, offloaded, host)."""
    data, o = data_strategy(cfg), cfg.optim
    n_local = sum(math.prod(q.local) for q in params)
    if data in ZERO_STAGES:
        stage, compute = ZERO_STAGES[data], 4 if str(cfg.training.precision) == "fp32" else 2
        part = _ceil(n_local, dims.dp_size)
        # DeepSpeed keeps the module in the compute dtype, an fp32 master partition and AdamW's moments over it;
        # ZeRO-1 holds whole gradients until the boundary, ZeRO-2/3 only their partition. A frozen base under
        # adapters is kept (ZeRO-3: partitioned) but has no master, gradient or moments
        n_train = sum(math.prod(q.local) for q in params if q.trainable)
        t_part = _ceil(n_train, dims.dp_size)
        return {
            "params": compute * (part if stage == 3 else n_local),
            "master": 4 * t_part,
            "grads": compute * (n_train if stage == 1 else t_part),
            "optim": 8 * t_part,
        }
    beta1, name = o.adafactor.beta1 is not None, str(o.name)
    width = 4 if cfg.training.master_weights else 2  # training.master_weights=false: bf16 parameters and gradients
    trained = [q for q in params if q.trainable]  # (a frozen base under adapters: neither gradient nor state)
    # a frozen base is stored in the 16-bit compute dtype (parallel/__init__.py: no master for what never steps)
    frozen = 2 if str(cfg.training.precision) != "fp32" else width
    return {
        "params": sum(_param_bytes(q, width if q.trainable else frozen) for q in params),
        "grads": width * sum(math.prod(q.local) for q in trained),
        "optim": sum(optimizer_state_bytes(name, q.local, adafactor_beta1=beta1) for q in trained),
    }


# torchao 0.18's NF4Tensor.get_original_weight holds, at its peak, both halves of the codes as int64 (4 + 4 bytes
# per element), their bf16 values, those scaled, and the stacked result (1 + 1 + 1 + 1 + 2): 14 bytes per element of
# the weight, measured with torch's MemTracker around linear_nf4's forward and backward (2026-12-07, fp32 and bf16)
NF4_DEQUANT_BYTES = 14


def _param_bytes(q: _Param, width: int) -> int:
    """What a rank stores for one parameter: its local elements x `width`, or a QLoRA base in NF4."""
    n = math.prod(q.local)
    return nf4_bytes(n, q.nf4) if q.nf4 else width * n


def load_host_bytes(cfg, args, dims: ParallelDims) -> int:
    """checkpoint.init_from: a rank's host memory at the peak of reading the weights (trainer/hf.py load_weights):
    one tensor at a time, read from the file (up to 4 bytes per element) and converted to fp32 (4 more): the
    largest slice this rank holds (its FSDP/TP block; the whole tensor under ZeRO-3, whose partitions are filled
    from whole tensors, and for a QLoRA base its TP shard, quantized whole before FSDP splits it, with its bf16
    copy: 2 more)."""
    if not cfg.checkpoint.init_from:
        return 0
    zero3 = data_strategy(cfg) == "zero3"
    largest = 0
    for pp_rank in range(dims.pp):
        for q in _params_of_rank(args, cfg, dims, pp_rank)[0]:
            if q.name.endswith(AdapterLinear.ADAPTER_NAMES):  # (adapters are not read: they start from the seed)
                continue
            n = math.prod(q.full if zero3 else q.tp if q.nf4 else q.local)
            largest = max(largest, (10 if q.nf4 else 8) * n)
    return largest


def model_states(cfg, args, dims: ParallelDims) -> list[dict[str, int]]:
    """`_model_states` of every rank, in rank order (ranks are pipeline-major: pp is the outermost mesh axis)."""
    per_stage = [_model_states(cfg, _params_of_rank(args, cfg, dims, r)[0], dims) for r in range(dims.pp)]
    per = dims.world_size // dims.pp
    return [per_stage[rank // per] for rank in range(dims.world_size)]


# ------------------------------------------------------------------------------------------------
# The terms of one pipeline rank, moment by moment (parallel/plan.py assembles them)


@dataclass(frozen=True)
class RankShape:
    """What every term of one pipeline rank reads, derived once from the config, the model and the layout."""

    cfg: object
    args: object
    dims: ParallelDims
    pp_rank: int
    device: str
    data: str  # parallel.data as resolved (data_strategy)
    ac: str  # ac_mode: none, full, selective, selective_every_second
    mode: str  # _precision_mode: fp32, autocast, mixed
    params: list  # this rank's _Params
    first: bool  # holds the first pipeline stage (the embedding)
    last: bool  # holds the last stage (the output projection and the loss)
    n_parts: int  # model parts (stages) this rank holds
    mb_tokens: int  # tokens of one micro-batch on this rank: micro_batch_size x seq_len / cp
    n_micro: int  # micro-batches per step
    flying: dict  # {stage id: microbatches in flight} at the rank's fullest moment (in_flight)
    ranges: list  # the blocks of every stage
    offload: bool  # parallel.offload=cpu on a device (on CPU the host is the device)
    states: dict  # _model_states: params, grads, optim (and master) bytes

    @property
    def adapters(self):
        """The run's adapter spec (models/adapters.py) or None (full training)."""
        return adapter_spec_of(self.cfg)

    @property
    def fsdp(self) -> bool:
        return self.data in ("fsdp", "hsdp")

    @property
    def zero(self) -> bool:
        return self.data in ZERO_STAGES

    @property
    def compute(self) -> int:  # bytes of a compute-dtype element
        return 4 if self.mode == "fp32" else 2

    @property
    def last_stage(self) -> int:
        return n_stages(str(self.cfg.parallel.pp_schedule), self.dims.pp) - 1

    @functools.cached_property
    def local_elements(self) -> int:
        """Elements of the parameters this rank stores (after the TP and FSDP splits)."""
        return sum(math.prod(q.local) for q in self.params)

    def tp_elements(self, unit=None) -> int:
        """Elements of this rank's parameters after the TP split, before FSDP's (of one FSDP unit, or all)."""
        return sum(math.prod(q.tp) for q in self.params if unit is None or q.unit == unit)

    @functools.cached_property
    def per_block(self) -> int:
        """The largest block's parameter elements after the TP split (what FSDP gathers for one block)."""
        per_unit: dict[str, int] = {}
        for q in self.params:
            if q.unit != "root":
                per_unit[q.unit] = per_unit.get(q.unit, 0) + math.prod(q.tp)
        return max(per_unit.values(), default=0)

    @functools.cached_property
    def gathered_block_bytes(self) -> int:
        """What FSDP gathers for the largest block: its parameters in the compute dtype, a QLoRA base in NF4 (FSDP2
        gathers torchao's NF4 parts: 4-bit codes and scales)."""
        per_unit: dict[str, int] = {}
        for q in self.params:
            if q.unit != "root":
                n = math.prod(q.tp)
                per_unit[q.unit] = per_unit.get(q.unit, 0) + (nf4_bytes(n, q.nf4) if q.nf4 else self.compute * n)
        return max(per_unit.values(), default=0)

    @functools.cached_property
    def grads_per_block(self) -> int:
        """The largest block's trainable elements after the TP split (its unsharded gradient under FSDP): per_block,
        or under adapters only theirs (a frozen base has no gradient to reduce)."""
        per_unit: dict[str, int] = {}
        for q in self.params:
            if q.unit != "root" and q.trainable:
                per_unit[q.unit] = per_unit.get(q.unit, 0) + math.prod(q.tp)
        return max(per_unit.values(), default=0)


def rank_shape(
    cfg, args, dims: ParallelDims, pp_rank: int, *, device: str, expert_routing: str | float | None = None
) -> RankShape:
    """The `RankShape` of pipeline rank `pp_rank`: its parameters (`_params_of_rank`), stages, micro-batch tokens
    (micro_batch_size x seq_len / cp), microbatches in flight (`in_flight`) and model states (`_model_states`)."""
    t, sched = cfg.training, str(cfg.parallel.pp_schedule)
    params, _, first, last, n_parts = _params_of_rank(args, cfg, dims, pp_rank)
    n_micro = microbatches(t.global_batch_size, t.micro_batch_size, dims.dp_size)
    if args.moe is not None and dims.ep > 1:  # (the blocks' routed rows: this rank's share under expert parallelism)
        load = expert_load(cfg, args.moe, dims.ep, expert_routing)
        args = replace(args, moe=RoutedMoE(args.moe, ep=dims.ep, load=load))
    return RankShape(
        cfg=cfg,
        args=args,
        dims=dims,
        pp_rank=pp_rank,
        device=device,
        data=data_strategy(cfg),
        ac=ac_mode(cfg),
        mode=_precision_mode(cfg),
        params=params,
        first=first,
        last=last,
        n_parts=n_parts,
        mb_tokens=t.micro_batch_size * t.seq_len // dims.cp,
        n_micro=n_micro,
        flying=in_flight(sched, dims.pp, pp_rank, n_micro),
        ranges=split_blocks(args.n_layers, n_stages(sched, dims.pp)),
        offload=str(cfg.parallel.offload) == "cpu" and device != "cpu",
        states=_model_states(cfg, params, dims),
    )


def model_state_terms(r: RankShape) -> tuple[list[Term], list[Term]]:
    """(the states every moment holds, ZeRO-3's gathered parameters in use). Plain and FSDP: the parameters
    (4 or 2 bytes x local elements) and the optimizer state with its step counters (`optimizer_state_bytes`).
    DeepSpeed: the module in the compute dtype (its partition under ZeRO-3, plus the persisted small parameters),
    the fp32 master partition (4 x n / dp), AdamW's moments over it (8 x n / dp), and its reduce buckets
    (`_DS_BUFFERS` x reduce_bucket_size x gradient bytes); ZeRO-3's gathered parameters in use are
    min(n_local - persisted, stage3_max_live_parameters) x compute bytes. Always: the RoPE tables,
    parts x 2 x max_seq_len x head_dim / 2 x 4 bytes. Offloaded states are counted as host memory."""
    cfg, args, t, dims, ms = r.cfg, r.args, r.cfg.training, r.dims, r.states
    compute, opt = r.compute, str(cfg.optim.name)
    n_local = r.local_elements
    states: list[Term] = []
    gathered_zero: list[Term] = []
    if r.zero:
        stage = ZERO_STAGES[r.data]
        states.append(
            Term(
                f"parameters ({'partition' if stage == 3 else 'whole model'}, {compute}-byte)",
                ms["params"],
                "params",
                "DeepSpeed casts the module to the compute dtype" if compute == 2 else "",
            )
        )
        states.append(Term("fp32 master partition", ms["master"], "host" if r.offload else "master"))
        states.append(Term("AdamW moments over the partition", ms["optim"], "host" if r.offload else "optim"))
        if stage == 3:
            threshold = _ds_setting(cfg, "stage3_param_persistence_threshold", PERSISTENCE_THRESHOLD)
            small = sum(math.prod(q.full) for q in r.params if math.prod(q.full) < threshold)
            states.append(
                Term(f"persisted parameters (< {threshold:,} elements, kept gathered)", compute * small, "params")
            )
        bucket = _ds_setting(cfg, "reduce_bucket_size", bucket_elements(args.num_params()))
        if stage == 3:
            live = min(n_local - small, _ds_setting(cfg, "stage3_max_live_parameters", bucket))
            gathered_zero = [
                Term(
                    f"gathered parameters in use (up to stage3_max_live_parameters = {live:,})",
                    compute * live,
                    "params",
                )
            ]
        if stage == 3:
            states += deepspeed_buckets(r)
    else:
        what = "shards" if r.fsdp else ("TP shards" if dims.tp > 1 else "whole stage" if dims.pp > 1 else "whole model")
        kind = "fp32" if t.master_weights else "bf16 (no fp32 masters)"
        if r.adapters is not None:  # (parallel/__init__.py: a frozen base in the compute dtype, or NF4)
            base = "NF4 and " if r.adapters.nf4 else ""
            kind = f"adapters' fp32 and the frozen base's {base}{'fp32' if t.precision == 'fp32' else t.precision}"
        host = r.offload and r.fsdp
        states.append(Term(f"{kind} parameters ({what})", ms["params"], "host" if host else "params"))
        if host and r.device == "cuda":  # FSDP2's CPUOffloadPolicy pins each parameter's shard
            states.append(Term(PINNED_ROUNDING + ": the parameter shards", _pinned_shards(r, "params"), "host"))
        states.append(
            Term(
                f"optimizer state ({opt}, with its step counters)",
                ms["optim"] + STEP_COUNTER_BYTES[opt] * sum(q.trainable for q in r.params),
                "host" if host else "optim",
            )
        )
    hd = args.head_dim
    states.append(Term("RoPE tables (cos, sin)", r.n_parts * 2 * args.max_seq_len * (hd // 2) * 4, "buffers"))
    return states, gathered_zero


def deepspeed_buckets(r: RankShape) -> list[Term]:
    """DeepSpeed's reduce buckets (`_DS_BUCKETS`): n x reduce_bucket_size x the gradient's bytes (2 in bf16/fp16,
    4 in fp32). ZeRO-3 keeps its one from the start (a state); ZeRO-1/2's two, with ZeRO-2's gradient partition
    (`_model_states`' grads), exist from a backward's first reduced gradient to the end of the step's last backward
    (`in_backward_buffers`; at the loss's backward when accumulating: `deepspeed_buckets_at_loss`)."""
    stage = ZERO_STAGES[r.data]
    grad_bytes = 2 if r.compute == 2 else 4
    bucket = _ds_setting(r.cfg, "reduce_bucket_size", bucket_elements(r.args.num_params()))
    n = _DS_BUCKETS[stage]
    return [
        Term(
            f"DeepSpeed reduce buckets: {n} x {bucket:,} elements x {grad_bytes} bytes",
            n * bucket * grad_bytes,
            "temporaries",
            "kept from the start" if stage == 3 else "from the backward's first reduced gradient to its end",
        )
    ]


def deepspeed_buckets_at_loss(r: RankShape) -> list[Term]:
    """ZeRO-1/2's reduce buckets at the loss's backward: there only when accumulating (an earlier micro-batch's
    backward of the step made them, and DeepSpeed frees them at the end of the step's last one); measured on
    llama_debug at 4 ranks, 2 micro-batches each: 124.40 MiB with them, to the byte."""
    if r.zero and ZERO_STAGES[r.data] < 3 and r.n_micro > max(r.flying.values()):
        return deepspeed_buckets(r)
    return []


def in_backward_buffers(r: RankShape) -> list[Term]:
    """What DeepSpeed allocates for the gradients' reduction in the backward. ZeRO-1/2: the reduce buckets, at the
    first reduced gradient, freed at the backward's end, and under ZeRO-2 the gradient partition (unless
    accumulation already holds it: `gradients_at_loss`). ZeRO-3: a reduced bucket's copy (`postscale_gradients`
    multiplies the averaged bucket out of place), up to one bucket x the gradient's bytes."""
    if not r.zero:
        return []
    if ZERO_STAGES[r.data] == 3:
        (kept,) = deepspeed_buckets(r)
        return [Term("ZeRO-3's reduce: the averaged bucket's copy (postscale_gradients)", kept.bytes, "temporaries")]
    terms = deepspeed_buckets(r)
    if ZERO_STAGES[r.data] == 2 and r.n_micro <= max(r.flying.values()):
        terms.append(Term("gradient partition (DeepSpeed's grads_in_partition)", r.states["grads"], "grads"))
    return terms


def _pinned_shards(r: RankShape, state: str) -> int:
    """The `pinned_bytes` rounding of one state ("params" or "grads", `_model_states`' bytes) held shard by shard
    in pinned host memory: sum over this rank's parameters of pinned_bytes(w x local elements) - w x local
    elements, w the state's bytes per element."""
    n_local = r.local_elements
    width = r.states[state] // n_local if n_local else 0
    return sum(pinned_bytes(width * math.prod(q.local)) - width * math.prod(q.local) for q in r.params)


def _pinned_grads(r: RankShape) -> list[Term]:
    """FSDP2's CPU offload on a GPU copies each reduced gradient shard to the host with non_blocking=True, into
    pinned memory (not when a post-accumulate hook steps in the backward: optim.in_backward)."""
    if not (r.offload and r.fsdp and r.device == "cuda") or r.cfg.optim.in_backward:
        return []
    return [Term(PINNED_ROUNDING + ": the gradient shards", _pinned_shards(r, "grads"), "host")]


def gradients_at_loss(r: RankShape) -> list[Term]:
    """The gradients standing when the last micro-batch's backward starts: none without accumulation (or while
    every micro-batch is still in flight); with it, all of the step's gradients as the rank holds them
    (`_model_states`' grads), or under FSDP's accumulate_unsharded_grads (and the V schedules' split backward)
    4 bytes x the rank's TP-split elements, unsharded. DeepSpeed ZeRO-2/3 keep their gradient partition
    allocated from the first step. DDP's gradients are views into its all-reduce buckets, zeroed in place after each
    step (parallel/parallelized.py): all of them stand the whole step, with or without accumulation."""
    if r.data == "ddp":
        return [Term("gradients (views into DDP's all-reduce buckets, kept between steps)", r.states["grads"], "grads")]
    p, dims = r.cfg.parallel, r.dims
    grads_where = "host" if r.offload and r.fsdp else "grads"
    terms: list[Term] = []
    if r.n_micro > max(r.flying.values()):  # gradients of earlier micro-batches exist at the peak
        # (under pipelining the V schedules' split backward keeps torch's unsharded accumulation: parallel/pipeline.py)
        if r.fsdp and (p.accumulate_unsharded_grads or (dims.pp > 1 and str(p.pp_schedule) in V_SHAPED)):
            terms.append(
                Term(
                    "unsharded fp32 gradients accumulated over micro-batches",
                    4 * r.tp_elements(),
                    "unsharded_grads",
                    "reduce-scattered once, after the last micro-batch",
                )
            )
        elif not r.zero or ZERO_STAGES[r.data] == 1:
            terms.append(Term("gradients accumulated over micro-batches", r.states["grads"], grads_where))
            terms += _pinned_grads(r)
    if r.zero and ZERO_STAGES[r.data] == 3:  # ZeRO-3's gradient partition: allocated with the optimizer, kept
        terms = [Term("gradient partition (DeepSpeed's grad_partitions_flat_buffer, kept)", r.states["grads"], "grads")]
    elif r.zero and ZERO_STAGES[r.data] == 2 and r.n_micro > max(r.flying.values()):  # earlier micro-batches'
        terms = [Term("gradient partition (DeepSpeed's, holding earlier micro-batches')", r.states["grads"], "grads")]
    return terms


def fsdp_gathered(r: RankShape) -> tuple[list[Term], list[Term]]:
    """FSDP's gathered parameters in the compute dtype at (the loss's backward, a block's backward): the output
    unit (final norm, output projection; the embedding too when tied) is kept gathered from its forward into its
    backward; in a block's backward that block and the prefetched next, 2 x compute x per_block. With
    reshard_after_forward off every unit stays gathered: compute x the rank's TP-split elements at both."""
    if not r.fsdp:
        return [], []
    args = r.args
    at_loss: list[Term] = []
    at_block: list[Term] = []
    head = sum(
        math.prod(q.tp)
        for q in r.params
        if q.unit == "root" and (args.tie_embeddings or not q.name.startswith("tok_embeddings"))
    )
    if r.last:
        at_loss.append(
            Term(
                "gathered output projection and final norm (kept from forward into backward)",
                r.compute * head,
                "gathered_params",
            )
        )
    if reshards_after_forward(r.cfg):
        at_block.append(
            Term(
                "gathered blocks: the one in backward and the prefetched next",
                2 * r.gathered_block_bytes,
                "gathered_params",
            )
        )
    else:  # reshard_after_forward off (the default under pipelining): every unit stays gathered
        kept = Term(
            "gathered parameters: all of this rank's (reshard_after_forward off)",
            sum(nf4_bytes(math.prod(q.tp), q.nf4) if q.nf4 else r.compute * math.prod(q.tp) for q in r.params),
            "gathered_params",
        )
        at_loss[:] = [kept]
        at_block.append(kept)
    return at_loss, at_block


@dataclass(frozen=True)
class BlockActivations:
    """The (block, microbatch) pairs a rank holds by AC kind, and what offloading moves of each."""

    pairs: dict  # {AC kind: (block, microbatch) pairs held}
    storages_of: dict  # {AC kind: `offloaded_storages` of one block of that kind, bytes per token each}
    held: str  # "stage s: blocks x microbatches", for the terms' names
    # {AC kind: bytes per token to add to pairs x the largest block's}: an MoE model's dense blocks save less
    smaller: dict = field(default_factory=dict)

    @property
    def moved_of(self) -> dict:
        """{AC kind: bytes per token one block of that kind sends to the host}."""
        return {kind: sum(storages) for kind, storages in self.storages_of.items()}

    @property
    def count(self) -> int:
        return sum(self.pairs.values())

    @property
    def moved(self) -> float:
        return max(self.moved_of.values(), default=0.0)


def _autocast_copied(q: _Param) -> bool:
    """Whether autocast makes a 16-bit copy of this parameter for a matmul: a trainable matrix (an MoE block's
    stacked experts too), not a norm, not a frozen base (stored 16-bit), not an MoE router (fp32 by design)."""
    return len(q.full) >= 2 and q.trainable and not q.name.endswith("router.gate.weight")


def block_activations(r: RankShape) -> BlockActivations:
    """The (block, microbatch) pairs a rank holds, by AC kind (`blocks_by_ac` x microbatches in flight of each
    stage), and per kind the storages one block sends to the host (`offloaded_storages`)."""
    pairs: dict[str, int] = {}
    for sid, n in r.flying.items():
        for kind, count in blocks_by_ac(r.cfg, len(r.ranges[sid])).items():
            pairs[kind] = pairs.get(kind, 0) + count * n
    held = ", ".join(f"stage {sid}: {len(r.ranges[sid])} x {n}" for sid, n in r.flying.items())
    storages_of = {kind: offloaded_storages(r.cfg, r.args, r.dims.tp, ac=kind, device=r.device) for kind in pairs}
    smaller: dict[str, float] = {}
    if r.args.moe is not None and ac_mode(r.cfg) == "none":  # (full AC keeps a block's input only, dense or not)
        frozen = r.adapters is not None
        saved = functools.partial(block_activation_bytes, r.args, ac="none", mode=r.mode, tp=r.dims.tp, device=r.device)
        largest = saved(frozen=frozen)
        smaller["none"] = sum(
            n * (saved(frozen=frozen, layer=block) - largest) for sid, n in r.flying.items() for block in r.ranges[sid]
        )
    return BlockActivations(pairs=pairs, storages_of=storages_of, held=held, smaller=smaller)


def activation_terms(r: RankShape, b: BlockActivations) -> tuple[list[Term], list[Term]]:
    """(activations, pipeline buffers). The blocks' saved tensors: sum over AC kinds of
    (block_activation_bytes - offloaded_per_token) x pairs x mb_tokens on the device, the moved part as host;
    autocast's 2-byte weight copies of the blocks that are not checkpointed (2 x their matrix elements, scaled by
    the share of plain blocks under ac_every; none under float8, whose Float8Linear saves the weight itself);
    under pipelining the stage outputs kept for backward (boundary x microbatches in flight of non-last stages)
    and the receive buffers (boundary x one per microbatch of every stage that receives), where the boundary is
    one microbatch's hidden state, 4 (2 when mixed) x D / tp x mb_tokens."""
    args, dims, t = r.args, r.dims, r.cfg.training
    ac, mode, pairs = r.ac, r.mode, b.pairs
    frozen = r.adapters is not None
    blk = {
        kind: block_activation_bytes(args, ac=kind, mode=mode, tp=dims.tp, device=r.device, frozen=frozen)
        for kind in pairs
    }
    kinds = " and ".join(f"{pairs[k]} under {k} AC" for k in pairs) if len(pairs) > 1 else f"{ac} AC"
    acts = [
        Term(
            f"block activations ({kinds}), blocks x microbatches in flight: {b.held}"
            + (" (what offloading leaves on the device)" if b.moved else ""),
            int(sum((blk[k] - b.moved_of[k]) * pairs[k] + b.smaller.get(k, 0.0) for k in pairs) * r.mb_tokens),
            "activations",
        )
    ]
    if b.moved:
        acts.append(
            Term(
                f"offloaded block activations (parallel.activation_offload): {b.held}",
                int(sum(b.moved_of[k] * pairs[k] for k in pairs) * r.mb_tokens),
                "host",
            )
        )
        if r.device == "cuda":  # each storage goes to its own pinned buffer (parallel/offload.py)
            extra = sum(
                pairs[k] * sum(pinned_bytes(x * r.mb_tokens) - round(x * r.mb_tokens) for x in b.storages_of[k])
                for k in pairs
            )
            if extra:
                acts.append(Term(PINNED_ROUNDING + ": the offloaded activations' storages", int(extra), "host"))
    if r.adapters is not None and pairs.get("none"):  # LoRA's saved tensors (AC none: config_problems)
        acts.append(
            Term(
                f"{r.adapters.kind.upper()} adapters' saved tensors (A's output"
                + ("; the unscaled outputs and the scales)" if r.adapters.kind == "dora" else ")"),
                int((adapter_saved_per_token(r) * r.mb_tokens + adapter_saved_per_block(r)) * pairs["none"]),
                "activations",
            )
        )
    float8 = str(t.float8) != "none"
    plain = b.count and pairs.get("full", 0) < b.count  # some blocks not checkpointed
    if mode == "autocast" and plain and not float8:  # autocast's weight casts, saved for backward by each linear
        # of a block that is not checkpointed (one copy: autocast caches them for its region, and a pipeline step
        # runs in one region; under ac_every the share of the blocks that keep everything)
        share = 1.0 - pairs.get("full", 0) / b.count if ac == "full" else 1.0
        # (an NF4 base is dequantized into a temporary per product, not cast by autocast, and a frozen base is
        # already 16-bit: no copy kept of either)
        w = share * sum(math.prod(q.tp) for q in r.params if q.unit != "root" and _autocast_copied(q))
        acts.append(Term("autocast's 2-byte copies of the block weights", int(2 * w), "activations"))
    if r.cfg.data.get("pack", False):
        acts.append(packed_documents_term(r))
    boundary = (4 if mode != "mixed" else 2) * args.dim / dims.tp * r.mb_tokens  # one microbatch's hidden state
    pipeline: list[Term] = []
    if dims.pp > 1:
        recv = sum(r.n_micro for sid in r.flying if sid != 0) + sum(
            r.n_micro for sid in r.flying if sid != r.last_stage
        )
        pipeline.append(
            Term(
                f"pipeline receive buffers: {recv} (activations into a stage, gradients into its "
                f"output; one per microbatch, kept)",
                int(recv * boundary),
                "other",
            )
        )
        sent = sum(n for sid, n in r.flying.items() if sid != r.last_stage)
        acts.append(
            Term(
                f"stage outputs kept for their backward ({sent} microbatches in flight)",
                int(sent * boundary),
                "activations",
            )
        )
    return acts, pipeline


FLEX_BLOCK = 128  # FlexAttention's default tile (torch.nn.attention.flex_attention: _DEFAULT_SPARSE_BLOCK_SIZE)


def packed_documents_term(r: RankShape) -> Term:
    """data.pack (models/llama.py `document_mask`): what each micro-batch in flight holds from its forward to the end
    of its backward, once for all blocks (and once per stage under pipelining: each stage builds its own): the
    documents (int64 per token), the RoPE angles of each token's own position (cos and sin, fp32, head_dim / 2 each)
    and the mask. On the CPU the mask is dense: T x T elements per sequence in the attention's dtype (an additive
    mask, shared by the blocks; SDPA saves it, not a copy). On CUDA it is FlexAttention's BlockMask: per sequence four
    int32 tables of (T / 128)^2 tiles (the key tiles of each query tile, full and partial, and their transposes for the
    backward) and four int32 counts per tile row."""
    t, args = r.cfg.training, r.args
    seq, mb = int(t.seq_len), int(t.micro_batch_size)
    per_token = 8 + 2 * 4 * args.head_dim // 2
    if r.device == "cpu":
        mask, how = r.compute * mb * seq * seq, f"a dense {seq} x {seq} additive mask per sequence"
    else:
        tiles = -(-seq // FLEX_BLOCK)
        mask, how = 4 * mb * (4 * tiles * tiles + 4 * tiles), f"FlexAttention's block mask ({tiles} x {tiles} tiles)"
    n = sum(r.flying.values()) if r.dims.pp > 1 else 1
    return Term(
        f"packed documents (data.pack): {how}, each token's document and RoPE angles; x {n} micro-batch(es) in flight",
        int(n * (mask + per_token * r.mb_tokens)),
        "activations",
    )


def loss_terms(r: RankShape) -> tuple[list[Term], list[Term]]:
    """(the loss's saved activations, its backward's temporaries), on the last stage only. Whole logits: per
    token the final norm's tensors, the output projection's input, the fp32 log-softmax (4 x V / tp under
    loss_parallel) and the targets, x the last stage's microbatches in flight; temporaries 2 (3 under
    loss_parallel) x 4 x V_local x mb_tokens. training.loss_chunks=c (models/loss.py): the norm, the output input,
    the log-sum-exp and the targets per token; the temporaries of one chunk's logits (4 + compute bytes x V_local
    x tokens / c), the hidden states' gradient, and the weight gradient's copies. Under autocast, the output
    projection's 2-byte copy."""
    if not r.last:
        return [], []
    args, dims, t, mode, compute = r.args, r.dims, r.cfg.training, r.mode, r.compute
    loss_parallel = dims.tp > 1 and dims.pp == 1
    v_local = _ceil(args.vocab_size, dims.tp) if loss_parallel else args.vocab_size
    acts: list[Term] = []
    chunks = int(t.loss_chunks)
    res = 4 if mode != "mixed" else 2  # the final norm's output, saved in its own dtype
    if chunks:  # models/loss.py: the projection and the loss chunk by chunk, the logits never whole
        final = _norm_bytes(args.dim, mode, dims.tp, r.device, r.adapters is not None) + res * args.dim + 4 + 8
        acts.append(
            Term(
                f"final norm, output input, log-sum-exp, targets (loss over {chunks} chunks)",
                int(final * r.mb_tokens),
                "activations",
            )
        )
    else:
        lin = 4 if mode == "fp32" else 2
        final = (
            _norm_bytes(args.dim, mode, dims.tp, r.device, r.adapters is not None) + lin * args.dim + 4 * v_local + 8
        )
        n_last = r.flying[r.last_stage]
        acts.append(
            Term(
                f"final norm, output input, fp32 log-softmax, targets x {n_last} in flight",
                int(final * r.mb_tokens * n_last),
                "activations",
            )
        )
        if dims.pp > 1:  # (unpipelined, the logits are freed once the loss has its log-softmax)
            acts.append(
                Term(
                    f"the last stage's output, the logits, kept by torch's pipeline stage for its backward x {n_last}",
                    int(r.compute * v_local * r.mb_tokens * n_last),
                    "activations",
                )
            )
    out_q = next(q for q in r.params if q.name in ("output.weight", "tok_embeddings.weight"))
    if mode == "autocast" and out_q.trainable:  # (a frozen output projection is stored 16-bit: nothing to copy)
        acts.append(Term("autocast's copy of the output projection", 2 * math.prod(out_q.tp), "activations"))
    if chunks:
        ct = _ceil(r.mb_tokens, chunks)
        w_loc = v_local * args.dim
        chunk = 4 * v_local * ct + (compute * v_local * ct if compute < 4 else 0)  # fp32 logits, their cast
        extra = {"fp32": 0, "autocast": 2 * w_loc + 2 * args.dim * ct, "mixed": 6 * w_loc}[mode]
        if not out_q.trainable:  # a frozen output projection (adapters): no weight gradient, no 16-bit copy
            extra = {"fp32": 0, "autocast": 2 * args.dim * ct, "mixed": 0}[mode]
        if r.device == "cpu":  # torch's CPU matmul against the transposed weight copies it (seen by the tracker;
            extra += compute * w_loc  # cuBLAS reads it transposed)
        temps = Term(
            f"one chunk's logits gradient (fp32 and its {compute}-byte copy), the hidden states' gradient, "
            f"the per-token loss scale, the weight gradient's fp32 accumulation",
            int(chunk + (res * args.dim + 4) * r.mb_tokens + extra),
            "temporaries",
        )
    else:
        # loss_parallel's backward (DTensor's decomposed log-softmax and masked NLL) holds one fp32 logit-sized
        # tensor more than the fused kernel's (measured on the tracker: 18 vs 14 bytes per local logit with the
        # 16-bit logits and the saved output)
        n_temps = 3 if loss_parallel else 2
        temps = Term(
            f"log-softmax gradient temporaries ({n_temps} x fp32 logits{', loss_parallel' if loss_parallel else ''})",
            n_temps * 4 * v_local * r.mb_tokens,
            "temporaries",
        )
    return acts, [temps]


def block_backward_terms(r: RankShape, b: BlockActivations) -> list[Term]:
    """What the backward of a stage's last block adds to the saved activations: the offloaded storages back on the
    device (moved x mb_tokens x up to 2 blocks), under AC its recomputed forward (`block_recompute_bytes`; none when
    ac_every leaves the last block plain) with autocast's weight copies again, its gradient temporaries, context
    parallel attention's buffers (`cp_attention_bytes`), and FSDP's unsharded block gradient (6 x per_block with a
    16-bit compute dtype: the gradient and its fp32 copy) and reduce-scatter output, 4 x per_block / (dp_shard x
    cp)."""
    cfg, args, dims, p, ac, mode = r.cfg, r.args, r.dims, r.cfg.parallel, r.ac, r.mode
    terms: list[Term] = []
    extra, temps = block_recompute_bytes(
        args, ac=ac, mode=mode, tp=dims.tp, device=r.device, frozen=r.adapters is not None
    )
    if (
        ac == "full"
        and int(p.ac_every) > 1
        and not any((len(r.ranges[sid]) - 1) % int(p.ac_every) == 0 for sid in r.flying)
    ):
        # the stage's last block keeps everything: nothing recomputed here, and a checkpointed block's
        # recompute comes after the last block's activations are freed (a smaller sum than this one)
        extra = 0.0
    if b.moved:  # the block in backward came back from the host, and the one before it is coming
        back = min(2, max(len(r.ranges[sid]) for sid in r.flying))
        terms.append(
            Term(
                f"offloaded activations back on the device: {back} block(s) (the one in backward, "
                f"the prefetched one before it)",
                int(b.moved * r.mb_tokens * back),
                "activations",
            )
        )
    if extra:
        extra += adapter_saved_per_token(r) + adapter_saved_per_block(r) / r.mb_tokens  # (its adapters' too)
        terms.append(Term("the checkpointed block's recomputed forward", int(extra * r.mb_tokens), "activations"))
        if mode == "autocast" and ac == "full" and str(cfg.training.float8) == "none":  # the weights cast again
            w = max(
                (
                    sum(math.prod(q.tp) for q in r.params if q.unit == u and _autocast_copied(q))
                    for u in {q.unit for q in r.params}
                    if u != "root"
                ),
                default=0,
            )
            terms.append(Term("autocast's copies of the recomputed block's weights", 2 * w, "activations"))
    terms.append(Term("the block's gradient temporaries (output, gate, up)", int(temps * r.mb_tokens), "temporaries"))
    if nf4 := max((math.prod(q.tp) for q in r.params if q.nf4), default=0):
        terms.append(
            Term(
                "NF4 dequantization of the largest base weight (torchao unpacks the 4-bit codes into int64 indices "
                f"and bf16 values: {NF4_DEQUANT_BYTES} bytes per element, measured)",
                NF4_DEQUANT_BYTES * nf4,
                "temporaries",
            )
        )
    if dims.cp > 1:
        terms.append(
            Term(
                f"context-parallel attention's backward ({p.cp_rotate}): keys and values of "
                f"{'every rank' if p.cp_rotate == 'allgather' else 'two ranks'}, their fp32 "
                f"gradients, the fp32 query gradient",
                int(cp_attention_bytes(cfg, args, dims)),
                "temporaries",
            )
        )
    if r.fsdp and r.compute == 2 and dims.pp == 1:  # (their fp32 copy and reduce-scatter: `fsdp_reduce_terms`)
        terms.append(Term("the block's unsharded gradients in the compute dtype", 2 * r.grads_per_block, "temporaries"))
    elif r.fsdp:
        if r.compute == 2:  # under pipelining the stage reduce-scatters after its backward (parallel/pipeline.py)
            terms.append(
                Term(
                    "the block's unsharded gradients in the compute dtype and their fp32 copy for the reduce-scatter",
                    6 * r.grads_per_block,
                    "temporaries",
                )
            )
        terms.append(_reduce_scatter_output(r))
    return terms


def _reduce_scatter_output(r: RankShape) -> Term:
    return Term(
        "the reduce-scatter's output (the block's fp32 gradient shard)",
        4 * _ceil(r.grads_per_block, r.dims.dp_shard * r.dims.cp),
        "temporaries",
    )


def fsdp_reduce_terms(r: RankShape, b: BlockActivations, acts: list[Term]) -> list[Term] | None:
    """FSDP with 16-bit compute parameters, the last block's reduce-scatter, a moment of its own: the block's
    backward is over (its recomputed forward, gradient temporaries and saved activations are freed) and its
    unsharded gradients (2 x per_block) stand with their fp32 copy (4 x per_block, FSDP reduces in fp32) and the
    reduce-scatter's output (4 x per_block / (dp_shard x cp)). `acts`: the activations held through the backward,
    less here one block's (of the last block's AC kind). None where there is no such moment (fp32 reduces the
    gradients as they are; under pipelining, whose stages reduce-scatter after the stage's backward, these stay
    in the block's backward, as measured there)."""
    if not (r.fsdp and r.compute == 2 and b.count and r.dims.pp == 1):
        return None
    p = r.cfg.parallel
    last_plain = (
        r.ac == "full"
        and int(p.ac_every) > 1
        and any((len(r.ranges[sid]) - 1) % int(p.ac_every) != 0 for sid in r.flying)
    )
    kind = "none" if last_plain else r.ac
    one = block_activation_bytes(r.args, ac=kind, mode=r.mode, tp=r.dims.tp, device=r.device)
    freed = int((one - b.moved_of.get(kind, 0.0)) * r.mb_tokens)
    held = [
        Term(t.name + " (less the last block's, freed by its backward)", max(t.bytes - freed, 0), t.category)
        if i == 0
        else t
        for i, t in enumerate(acts)
    ]
    return [
        *held,
        Term("the block's unsharded gradients in the compute dtype", 2 * r.grads_per_block, "temporaries"),
        Term("their fp32 copy for the reduce-scatter", 4 * r.grads_per_block, "temporaries"),
        _reduce_scatter_output(r),
    ]


def in_backward_terms(r: RankShape) -> list[Term]:
    """optim.in_backward (optim/in_backward.py): at a block's backward one of its parameters is being stepped: its
    gradient (not under FSDP, whose reduce-scatter output is already counted) and the update's temporary
    (`UPDATE_TEMPORARY` x the largest block parameter's elements)."""
    t, opt = r.cfg.training, str(r.cfg.optim.name)
    largest = max((math.prod(q.local) for q in r.params if q.unit != "root"), default=0)
    during = (
        []
        if r.fsdp
        else [
            Term(
                "one block parameter's gradient, until its hook steps it (largest)",
                (4 if t.master_weights else 2) * largest,
                "grads",
            )
        ]
    )
    if opt in UPDATE_TEMPORARY:
        during.append(
            Term(
                f"{opt}'s update temporary, one block parameter at a time in the backward (largest)",
                _update_bytes(opt, largest, t.master_weights),
                _step_where(r),
            )
        )
    return during


def _step_where(r: RankShape) -> str:
    """Where the optimizer steps: on the host under FSDP's CPU offload, else on the device."""
    return "host" if r.offload and r.fsdp else "optim"  # FSDP's CPU offload steps on the host


def optimizer_step_terms(r: RankShape) -> list[Term]:
    """What the optimizer step adds to the states: every gradient (`_model_states`' grads; none when stepped in the
    backward) and the update's largest temporary: torch's AdamW the sqrt of the second moment of the largest
    parameter group (4 bytes x its elements), adamw_bf16 `UPDATE_TEMPORARY` x the largest parameter. DeepSpeed's
    update runs inside its own partitions (counted with its buffers)."""
    o, t, opt = r.cfg.optim, r.cfg.training, str(r.cfg.optim.name)
    terms: list[Term] = []
    if not o.in_backward:
        terms.append(
            Term("gradients (all, this rank's shards)", r.states["grads"], "host" if r.offload and r.fsdp else "grads")
        )
        terms += _pinned_grads(r)
    if r.zero or o.in_backward:
        return terms
    if opt == "adamw":
        groups: dict[bool, int] = {}
        for q in r.params:
            if q.trainable:
                groups[q.decay] = groups.get(q.decay, 0) + math.prod(q.local)
        terms.append(
            Term(
                "AdamW's update temporary (sqrt of the second moment, largest group)",
                4 * max(groups.values(), default=0),
                _step_where(r),
            )
        )
    elif opt == "adamw_bf16":  # one parameter at a time
        largest_any = max((math.prod(q.local) for q in r.params), default=0)
        terms.append(
            Term(
                "adamw_bf16's update temporary (fp32 moments, the rounding noise; largest parameter)",
                _update_bytes(opt, largest_any, t.master_weights),
                _step_where(r),
            )
        )
    return terms


def expert_exchange_bytes(cfg, args, dims: ParallelDims) -> int:
    """Bytes one rank sends by all-to-all in a step under expert parallelism, balanced routing (the rows for its own
    experts stay): per MoE block and micro-batch the dispatch (the rows, in the residual stream's dtype) and the
    combine (the experts' outputs, in the compute dtype), each again in backward, and the forward's pair once more
    under full AC (the recompute). Pipeline stages: the most loaded one's blocks."""
    if args.moe is None or dims.ep <= 1:
        return 0
    t, mode = cfg.training, _precision_mode(cfg)
    n_micro = microbatches(t.global_batch_size, t.micro_batch_size, dims.dp_size)
    stages = n_stages(str(cfg.parallel.pp_schedule), dims.pp)
    blocks = max(len(r) for r in split_blocks(args.n_layers, stages)) * (stages // max(dims.pp, 1))
    moe_share = sum(args.is_moe(i) for i in range(args.n_layers)) / args.n_layers
    rows = t.micro_batch_size * t.seq_len // dims.cp * moe_rows_per_token(args.moe) * (dims.ep - 1) / dims.ep
    dispatch, combine = (4 if mode in ("fp32", "autocast") else 2), (4 if mode == "fp32" else 2)
    passes = 3 if ac_mode(cfg) == "full" else 2  # forward, backward (and the recompute's forward)
    per_block = rows * args.dim * (dispatch + combine) * passes
    return int(per_block * blocks * moe_share * n_micro)
