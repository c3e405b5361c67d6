"""The layout of a run from its config alone, and its rules: the mesh degrees (`ParallelDims`), pipeline stages
and which rank holds them, microbatches, and every problem a layout can have, each named with its arithmetic.

Pure arithmetic: no process group, no torch.distributed, no tensor. The config checks (trainer/validate.py), the
dry run, `parallelize`, the memory plan (parallel/plan.py) and `launch/plan.py` read the same answers, so none of
them re-derives a degree. The tables here (ZeRO stages, pipeline schedules, stages per rank) exist once.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

ZERO_STAGES = {"zero1": 1, "zero2": 2, "zero3": 3}  # parallel.data -> DeepSpeed ZeRO stage


PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zbv", "dualpipev")


V_SHAPED = ("zbv", "dualpipev")  # rank r holds stages r and 2*pp - 1 - r (rank 0: the first and the last)


# DeepSpeed's buckets (elements): what shardwise writes into ds_config (parallel/zero.py)
DS_BUCKET_ELEMENTS = 50_000_000


PERSISTENCE_THRESHOLD = 100_000  # ZeRO-3: parameters with fewer elements stay gathered (fewer collectives)


def bucket_elements(n_params: int) -> int:
    """The reduce / all-gather / prefetch bucket: 50M elements, never more than the model has."""
    return min(DS_BUCKET_ELEMENTS, n_params)


def stages_per_rank(schedule: str) -> int:
    """Single-stage schedules (gpipe, 1f1b) hold one stage per rank; looped and V-shaped ones two."""
    return 1 if schedule in ("gpipe", "1f1b") else 2


def stage_ids(schedule: str, pp_rank: int, pp: int) -> list[int]:
    """The pipeline stages rank `pp_rank` holds."""
    if pp == 1:
        return [0]
    v = stages_per_rank(schedule)
    if v == 1:
        return [pp_rank]
    if schedule in V_SHAPED:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(v)]


def stage_owners(schedule: str, pp: int) -> dict[int, int]:
    """{stage id: the pipeline rank that holds it}."""
    return {sid: r for r in range(pp) for sid in stage_ids(schedule, r, pp)}


def n_stages(schedule: str, pp: int) -> int:
    """Pipeline stages in all: pp ranks x the schedule's stages per rank."""
    return pp * stages_per_rank(schedule) if pp > 1 else 1


def split_blocks(n_blocks: int, stages: int) -> list[range]:
    """Contiguous block ranges, as even as possible; the first and last stages, which also hold the
    embedding and the output projection, are the ones that get fewer blocks when it does not divide."""
    base, extra = divmod(n_blocks, stages)
    sizes = [base] * stages
    middle_first = sorted(range(stages), key=lambda s: (s in (0, stages - 1), s))
    for s in middle_first[:extra]:
        sizes[s] += 1
    starts = [sum(sizes[:s]) for s in range(stages)]
    return [range(starts[s], starts[s] + sizes[s]) for s in range(stages)]


def microbatches(global_batch: int, micro_batch: int, dp: int) -> int:
    """Micro-batches per rank per optimizer step: the accumulation steps, or the pipeline's microbatches."""
    return global_batch // (micro_batch * dp)


@dataclass(frozen=True)
class ParallelDims:
    """Parallel degrees; their product is the world size. Mesh order, outermost first:
    pp (slowest links are fine: one send per microbatch), dp_replicate, dp_shard, tp (innermost: the
    most communication, so neighbouring ranks, which on a GPU node share NVLink)."""

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1  # context parallel: the sequence split over these ranks (FSDP shards over dp_shard x cp)
    ep: int = 1  # expert parallel: an MoE block's experts split over these ranks, borrowed from dp_shard (not in
    #  the world size: dp_shard = (dp_shard / ep) x ep, the ep ranks innermost; parallel/expert.py)

    NAMES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp * self.tp * self.pp

    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    def describe(self) -> str:
        cp = f" x cp {self.cp}" if self.cp > 1 else ""
        ep = f" (ep {self.ep} of dp_shard)" if self.ep > 1 else ""
        return f"pp {self.pp} x dp_replicate {self.dp_replicate} x dp_shard {self.dp_shard}{ep}{cp} x tp {self.tp}"

    @property
    def expert_shard(self) -> int:
        """The ranks that shard one expert group's parameters with FSDP: dp_shard / ep (x cp)."""
        return self.dp_shard // self.ep * self.cp


def resolve_dims(
    data: str, *, dp_replicate: int, dp_shard: int, tp: int, pp: int, world_size: int, cp: int = 1, ep: int = 1
) -> tuple[ParallelDims | None, list[str]]:
    """Turn the recipe's degrees (with -1 meaning "the rest") into ParallelDims, or explain why not."""
    problems = []
    for key, v in (("tp", tp), ("pp", pp), ("cp", cp), ("ep", ep)):
        if v < 1:
            problems.append(f"parallel.{key}={v} must be >= 1")
    if dp_replicate == 0 or dp_replicate < -1 or dp_shard == 0 or dp_shard < -1:
        problems.append(
            f"parallel.dp_replicate({dp_replicate}) and parallel.dp_shard({dp_shard}) must be >= 1 "
            f"or -1 (the rest of the world)"
        )
    if problems:
        return None, problems
    replicated = ("none", "ddp", *ZERO_STAGES)
    if data in ("none", "fsdp") and dp_replicate not in (1, -1):
        problems.append(
            f"parallel.dp_replicate={dp_replicate} replicates shards, which is parallel.data=hsdp; "
            f"set parallel.data=hsdp or parallel.dp_replicate=1"
        )
    if data in replicated and dp_shard not in (1, -1):
        problems.append(
            f"parallel.dp_shard={dp_shard} shards parameters, which parallel.data={data} does not; "
            f"set parallel.data=fsdp (or hsdp) or parallel.dp_shard=-1"
        )
    if data == "hsdp" and dp_replicate == -1 and dp_shard == -1:
        problems.append("parallel.data=hsdp needs parallel.dp_replicate or parallel.dp_shard set (only one may be -1)")
    if problems:
        return None, problems

    fixed = tp * pp * cp
    named = f"tp({tp}) * pp({pp})" + (f" * cp({cp})" if cp > 1 else "")  # (cp named only when used)
    rest_of = lambda other: world_size // (fixed * other) if world_size % (fixed * other) == 0 else None  # noqa: E731
    if data == "none":
        rep, shard = 1, 1
    elif data in replicated:  # every rank outside tp/pp is a data-parallel rank
        rep, shard = rest_of(1), 1
        if rep is None:
            problems.append(f"WORLD_SIZE({world_size}) is not divisible by {named} = {fixed}")
        elif dp_replicate > 1 and dp_replicate != rep:
            problems.append(
                f"parallel.dp_replicate({dp_replicate}) != WORLD_SIZE({world_size}) / (tp({tp}) * "
                f"pp({pp})) = {rep}; for ddp leave parallel.dp_replicate at 1 or -1"
            )
    elif data == "fsdp":
        rep, shard = 1, (dp_shard if dp_shard > 0 else rest_of(1))
        if shard is None:
            problems.append(f"WORLD_SIZE({world_size}) is not divisible by {named} = {fixed}")
    else:  # hsdp
        rep, shard = dp_replicate, dp_shard
        if shard == -1:
            shard = rest_of(rep)
            if shard is None:
                problems.append(
                    f"WORLD_SIZE({world_size}) is not divisible by dp_replicate({rep}) * {named} = {rep * fixed}"
                )
        elif rep == -1:
            rep = rest_of(shard)
            if rep is None:
                problems.append(
                    f"WORLD_SIZE({world_size}) is not divisible by dp_shard({shard}) * {named} = {shard * fixed}"
                )
    if problems:
        return None, problems
    if ep > 1 and (data not in ("fsdp", "hsdp") or shard % ep):
        problems.append(
            f"parallel.ep={ep} borrows its ranks from dp_shard, which is {shard} with parallel.data={data}: "
            + (
                f"set parallel.dp_shard to a multiple of {ep}"
                if data in ("fsdp", "hsdp")
                else "set parallel.data=fsdp (or hsdp)"
            )
            + " or parallel.ep=1"
        )
        return None, problems
    dims = ParallelDims(dp_replicate=rep, dp_shard=shard, tp=tp, pp=pp, cp=cp, ep=ep)
    if dims.world_size != world_size:
        problems.append(
            f"dp_replicate({rep}) * dp_shard({shard}) * {named} = {dims.world_size} "
            f"!= WORLD_SIZE({world_size})"
            + (
                "; parallel.data=none uses no data-parallel ranks: "
                "set parallel.data=ddp or fsdp, or launch fewer processes"
                if data == "none"
                else ""
            )
        )
        return None, problems
    return dims, []


def config_dims(cfg, world_size: int) -> tuple[ParallelDims | None, list[str]]:
    """`resolve_dims` of a config's parallel section on `world_size` ranks."""
    p = cfg.parallel
    return resolve_dims(
        str(p.data),
        dp_replicate=p.dp_replicate,
        dp_shard=p.dp_shard,
        tp=p.tp,
        pp=p.pp,
        cp=p.cp,
        ep=p.ep,
        world_size=world_size,
    )


def degenerate(data: str, dims: ParallelDims) -> list[str]:
    """Warnings for layouts the world size turned into something other than what the strategy name says."""
    out = []
    if data == "hsdp" and dims.dp_replicate == 1:
        out.append(f"parallel.data=hsdp with dp_replicate 1 is plain FSDP over {dims.dp_shard} rank(s)")
    if data == "hsdp" and dims.dp_shard * dims.cp == 1:
        out.append(
            f"parallel.data=hsdp with dp_shard 1 shards nothing: {dims.dp_replicate} full replicas (DDP "
            f"with FSDP's overheads); give it more ranks or set parallel.data=ddp"
        )
    if data == "fsdp" and dims.dp_shard * dims.cp == 1:
        out.append(
            "parallel.data=fsdp with dp_shard 1 shards nothing (every rank is used by tp/pp); "
            "give it more ranks, or set parallel.data=none"
        )
    if data in ("ddp", *ZERO_STAGES) and dims.dp_size == 1:
        out.append(f"parallel.data={data} with one data-parallel rank: nothing is replicated or partitioned")
    return out


CP_ROTATE = ("allgather", "ring")  # parallel/context.py


def data_strategy(cfg) -> str:
    """parallel.data as it runs: context parallelism shards the parameters with FSDP over dp_shard x cp, so
    `none` with cp > 1 is FSDP (parallel/__init__.py)."""
    data = str(cfg.parallel.data)
    return "fsdp" if data == "none" and cfg.parallel.cp > 1 else data


def _cp_problems(cfg) -> list[str]:
    """Context parallelism's rules (parallel/context.py)."""
    p, t = cfg.parallel, cfg.training
    if p.cp_rotate not in CP_ROTATE:
        return [f"parallel.cp_rotate={p.cp_rotate}: unknown; known: {', '.join(CP_ROTATE)}"]
    if p.cp <= 1:
        return []
    out = []
    if t.seq_len % (2 * p.cp):
        out.append(
            f"training.seq_len({t.seq_len}) must be divisible by 2 x parallel.cp = {2 * p.cp}: each rank holds "
            f"a head and a tail chunk of every sequence; set training.seq_len to a multiple of {2 * p.cp}"
        )
    if str(p.data) not in ("none", "fsdp", "hsdp"):
        out.append(
            f"parallel.cp={p.cp} with parallel.data={p.data}: context parallelism shards the parameters with "
            f"FSDP over dp_shard x cp (as torchtitan does); use parallel.data=fsdp, hsdp or none"
        )
    return out


def layout_problems(cfg, args, world_size: int) -> list[str]:
    """The parallel section's arithmetic: degrees, divisibility, stages and microbatches, the combinations that
    cannot work (trainer/validate.py::validate collects every subsystem's rules)."""
    p, t = cfg.parallel, cfg.training
    dims, problems = config_dims(cfg, max(world_size, 1))
    dp = dims.dp_size if dims else 1
    problems += _cp_problems(cfg)
    problems += _tp_problems(cfg, args)
    problems += _pp_problems(cfg, args, dp)
    problems += _ac_problems(cfg)
    problems += _offload_problems(cfg)
    if p.compile and p.tp > 1 and p.ac != "none":
        problems.append(
            "parallel.compile=true with parallel.tp > 1 and activation checkpointing fails in torch "
            "(a compiled checkpoint-wrapped block under TP); drop one of the three"
        )
    if cfg.optim.in_backward:
        problems += _in_backward_problems(cfg, dp)
    if t.global_batch_size >= 1 and t.micro_batch_size >= 1:
        per_step = t.micro_batch_size * dp
        if t.global_batch_size % per_step:
            problems.append(
                f"training.global_batch_size({t.global_batch_size}) must be divisible by "
                f"training.micro_batch_size({t.micro_batch_size}) * dp({dp}) = {per_step}: "
                f"{t.global_batch_size} % {per_step} = {t.global_batch_size % per_step}"
            )
    return problems


def _tp_problems(cfg, args) -> list[str]:
    """Tensor parallelism: the heads split evenly, no tied table, no DDP over DTensors."""
    p = cfg.parallel
    problems = []
    if p.tp > 1:
        for what, n in (("model.n_heads", args.n_heads), ("model.n_kv_heads", args.kv_heads)):
            if n % p.tp:
                problems.append(f"parallel.tp({p.tp}) must divide {what}({n}): {n} % {p.tp} = {n % p.tp}")
        if args.tie_embeddings:
            problems.append(
                "parallel.tp > 1 with model.tie_embeddings=true is not supported (the embedding and the "
                "output projection would be split twice); set model.tie_embeddings=false"
            )
        if args.qk_norm:
            problems.append(
                f"model.qk_norm=true with parallel.tp({p.tp}): not built (the head norms' weights would have to be "
                "replicated DTensors beside the split heads); use FSDP, pipeline or context parallelism for this model"
            )
        if p.data == "ddp":
            problems.append(
                f"parallel.data=ddp with parallel.tp({p.tp}): DDP cannot wrap tensor-parallel "
                f"(DTensor) parameters; use parallel.data=fsdp or hsdp with tp"
            )
    return problems


def _pp_problems(cfg, args, dp: int) -> list[str]:
    """Pipeline parallelism: the schedule known, a block per stage, microbatches enough to fill the
    pipeline, and what its strategies and AC modes cannot do."""
    p, t = cfg.parallel, cfg.training
    problems = []
    if p.pp > 1 and p.data == "ddp":
        problems.append(
            f"parallel.data=ddp with parallel.pp({p.pp}) is not supported; use parallel.data=fsdp (or none) with pp"
        )
    if p.pp_schedule not in PP_SCHEDULES:
        close = difflib.get_close_matches(p.pp_schedule, PP_SCHEDULES, n=1)
        problems.append(
            f"parallel.pp_schedule={p.pp_schedule}: unknown schedule"
            f"{f'; did you mean {close[0]}?' if close else ''} Known: {', '.join(PP_SCHEDULES)}"
        )
    elif p.pp > 1:
        stages = n_stages(p.pp_schedule, p.pp)
        per_rank = stages_per_rank(p.pp_schedule)
        if stages > args.n_layers:
            problems.append(
                f"pipeline stages pp({p.pp}) x {per_rank} per rank ({p.pp_schedule}) = {stages} "
                f"> model.n_layers({args.n_layers}): every stage needs at least one block"
            )
        if (
            t.global_batch_size >= 1
            and t.micro_batch_size >= 1
            and t.global_batch_size % (t.micro_batch_size * dp) == 0
        ):
            n_micro = t.global_batch_size // (t.micro_batch_size * dp)
            if p.pp_schedule != "gpipe" and n_micro < stages:
                problems.append(
                    f"pipeline microbatches = training.global_batch_size({t.global_batch_size}) / "
                    f"(training.micro_batch_size({t.micro_batch_size}) * dp({dp})) = {n_micro} < {stages} stages, "
                    f"which {p.pp_schedule} needs to fill the pipeline; lower training.micro_batch_size or raise "
                    f"training.global_batch_size"
                )
    if p.pp > 1 and args.tie_embeddings:
        problems.append(
            f"model.tie_embeddings=true with parallel.pp={p.pp}: the tied table would be the first stage's embedding "
            f"and the last stage's output, two copies whose gradients nothing sums (the stages would train them "
            f"apart); set model.tie_embeddings=false for a pipeline (the tied shapes 1b and 3b fit without one), "
            f"or parallel.pp=1"
        )
    if p.pp > 1 and p.pp_schedule in V_SHAPED and p.ac == "selective":
        problems.append(
            f"parallel.ac=selective with parallel.pp_schedule={p.pp_schedule}: that schedule splits each "
            f"backward into an input-gradient and a weight-gradient pass, and torch's selective "
            f'checkpointing allows one backward per checkpointed region ("Trying to backward an extra '
            f'time"); use parallel.ac=full, or pp_schedule=1f1b or interleaved_1f1b'
        )
    if p.pp > 1 and p.pp_schedule in V_SHAPED and p.compile:
        problems.append(
            f"parallel.compile=true with parallel.pp_schedule={p.pp_schedule}: that schedule's split backward (input "
            f"gradients with the graph retained, then weight gradients) fails in compiled blocks (AOT autograd's "
            f"donated buffers), and with those turned off the gradients came out 1e-3 away from one process (the "
            f"pairwise parity matrix, tests/distributed/test_parity.py); use pp_schedule=1f1b or interleaved_1f1b, "
            f"or parallel.compile=false"
        )
    return problems


def _ac_problems(cfg) -> list[str]:
    """Activation checkpointing's own keys."""
    p = cfg.parallel
    problems = []
    if p.ac_every < 1:
        problems.append(f"parallel.ac_every={p.ac_every} must be >= 1")
    if str(p.sac_matmuls) not in ("all", "every_second"):
        problems.append(f"parallel.sac_matmuls={p.sac_matmuls}: unknown; known: all, every_second")
    elif str(p.sac_matmuls) != "all" and str(p.ac) != "selective":
        problems.append(
            f"parallel.sac_matmuls={p.sac_matmuls} chooses what selective AC keeps; it needs "
            f"parallel.ac=selective (now {p.ac})"
        )
    return problems


def _offload_problems(cfg) -> list[str]:
    """What moves to host memory, and the DeepSpeed keys, each with the strategy that can do it."""
    p = cfg.parallel
    problems = []
    zero = str(p.data) in ZERO_STAGES
    if p.offload == "cpu" and p.data not in ("fsdp", "hsdp") and not zero:
        problems.append(
            f"parallel.offload=cpu needs a sharded strategy (fsdp, hsdp, zero1, zero2, zero3), "
            f"not parallel.data={p.data}"
        )
    if p.activation_offload_min_bytes < 0:
        problems.append(
            f"parallel.activation_offload_min_bytes={p.activation_offload_min_bytes} must be >= 0 (0 "
            f"offloads every saved tensor of the blocks)"
        )
    if p.offload_params and p.data != "zero3":
        problems.append(
            f"parallel.offload_params=true needs parallel.data=zero3 (only ZeRO-3 partitions the "
            f"parameters; with fsdp, parallel.offload=cpu already offloads them), not {p.data}"
        )
    if p.deepspeed and not zero:
        problems.append(
            f"parallel.deepspeed sets ds_config keys, which only the DeepSpeed strategies "
            f"(zero1, zero2, zero3) read; parallel.data={p.data}"
        )
    return problems


def _in_backward_problems(cfg, dp: int) -> list[str]:
    """What optim.in_backward=true cannot do (optim/in_backward.py says why), each with its fix."""
    p, t, o = cfg.parallel, cfg.training, cfg.optim
    problems = []
    if str(p.data) not in ("none", "fsdp", "hsdp"):
        why = (
            "DDP's bucketed all-reduce finishes after the gradient hooks fire"
            if p.data == "ddp"
            else "DeepSpeed runs its own step over its flat partitions"
        )
        problems.append(
            f"optim.in_backward=true with parallel.data={p.data}: {why}; use parallel.data=fsdp "
            f"(or none on one process), or optim.in_backward=false"
        )
    if p.cp > 1:
        problems.append(
            f"optim.in_backward=true with parallel.cp={p.cp}: not built for context parallelism (its "
            f"gradient norm would need the context-parallel ranks' squares too); set parallel.cp=1 or "
            f"optim.in_backward=false"
        )
    if p.tp > 1 or p.pp > 1:
        problems.append(
            f"optim.in_backward=true with parallel.tp={p.tp}, parallel.pp={p.pp}: not built for tensor or "
            f"pipeline parallelism (a pipeline stage's backward runs once per microbatch); set both to 1 "
            f"or optim.in_backward=false"
        )
    if o.max_grad_norm > 0:
        problems.append(
            f"optim.in_backward=true with optim.max_grad_norm={o.max_grad_norm}: clipping by the global "
            f"norm needs every gradient before the first update, and in-backward updates each one as it "
            f"completes; set optim.max_grad_norm=0 (the norm is still measured and logged)"
        )
    if t.global_batch_size >= 1 and t.micro_batch_size >= 1 and t.global_batch_size != t.micro_batch_size * dp:
        problems.append(
            f"optim.in_backward=true with gradient accumulation: training.global_batch_size"
            f"({t.global_batch_size}) != training.micro_batch_size({t.micro_batch_size}) x dp({dp}) = "
            f"{t.micro_batch_size * dp}, and the first micro-batch's backward would already update; set "
            f"training.micro_batch_size={t.global_batch_size // max(dp, 1)} (or global_batch_size="
            f"{t.micro_batch_size * dp}), or optim.in_backward=false"
        )
    if str(t.precision) == "fp16":
        problems.append(
            "optim.in_backward=true with training.precision=fp16: the loss scaler unscales and checks "
            "every gradient before the step; use training.precision=bf16"
        )
    if str(cfg.numerics.on_nonfinite) == "skip":
        problems.append(
            "optim.in_backward=true with numerics.on_nonfinite=skip: the update has happened when the "
            "norm is known, so a step cannot be skipped; use numerics.on_nonfinite=raise"
        )
    return problems


def in_flight(schedule: str, pp: int, pp_rank: int, n_micro: int) -> dict[int, int]:
    """{stage id: microbatches whose activations it holds} at the moment its pipeline rank holds the most, as
    torch's schedules order the work (a microbatch counts from its forward until its full backward, or its
    weight backward in the zero-bubble schedules). tests/unit/test_memory_plan.py checks these closed forms
    against the action lists torch's schedule classes compute."""
    mine = stage_ids(schedule, pp_rank, pp)
    if pp == 1:
        return {0: 1}
    r = pp_rank
    if schedule == "gpipe":  # every forward before any backward
        return {mine[0]: n_micro}
    if schedule == "1f1b":  # a warm-up of pp - rank forwards, then one forward per backward
        return {mine[0]: min(pp - r, n_micro)}
    if schedule == "interleaved_1f1b":  # stages r and r + pp
        first, second = (2 * pp - 1 - 2 * r, pp) if r < pp / 2 else (pp, 2 * (pp - r) - 1)
    elif schedule == "zbv":  # V: stages r and 2 pp - 1 - r
        first, second = 2 * pp - 1 - r, r + 1
    else:  # dualpipev
        first, second = 2 * pp - r, r + 1
    return {mine[0]: min(first, n_micro), mine[1]: min(second, n_micro)}


def reshards_after_forward(cfg) -> bool:
    """parallel.reshard_after_forward resolved: null frees gathered blocks after forward, except under pipeline
    parallelism, where every microbatch would gather every block again (torchtitan's default too)."""
    value = cfg.parallel.reshard_after_forward
    return cfg.parallel.pp == 1 if value is None else bool(value)
