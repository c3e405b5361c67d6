"""The plan of a run from its config alone: the layout (mesh degrees, pipeline stages, microbatches) and the
bytes every rank will hold, term by term, at the peak of a training step.

Pure arithmetic: no process group, no torch.distributed, no tensor allocated, nothing from trainer/. The
config checks, the dry run, `parallelize`, `launch/plan.py` and the tests read the same numbers, so the
prediction cannot drift from what the trainer builds. The tables here (ZeRO stages, pipeline schedules,
stages per rank, microbatch count) exist once.

How the memory model is built (docs/memory.md has the formulas with their derivation): every term names
the tensors it counts and the tracker category they fall in (`parallel.memory.CATEGORIES`, what torch's
MemTracker / FSDPMemTracker measure). A step's peak is the largest of three moments:
  A. the loss's backward starts on the last micro-batch: every saved activation of the micro-batches in
     flight, the fp32 log-softmax and two logit-sized gradient temporaries, the gradients accumulated so far;
  B. the backward of the micro-batch's last block: (under AC) its forward recomputed on top of the others'
     saved tensors, its gradient temporaries, FSDP's gathered blocks and reduce-scatter buffers;
  C. the optimizer step: every gradient, the states, and the largest temporary of the update.
The activation formulas count the tensors autograd saves for this model's ops as torch runs them (SwiGLU's
four hidden-size tensors, RMSNorm's input, normalized input and 1/rms, SDPA's output and log-sum-exp, the
casts autocast makes for every linear), checked against the tracker by tests/distributed/test_memory_plan.py.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field

# ------------------------------------------------------------------------------------------------
# The tables

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

    NAMES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp * self.tp * self.pp

    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    def describe(self) -> str:
        cp = f" x cp {self.cp}" if self.cp > 1 else ""
        return f"pp {self.pp} x dp_replicate {self.dp_replicate} x dp_shard {self.dp_shard}{cp} x tp {self.tp}"


def resolve_dims(data: str, *, dp_replicate: int, dp_shard: int, tp: int, pp: int, world_size: int,
                 cp: int = 1) -> tuple[ParallelDims | None, list[str]]:
    """Turn the recipe's degrees (with -1 meaning "the rest") into ParallelDims, or explain why not."""
    problems = []
    for key, v in (("tp", tp), ("pp", pp), ("cp", cp)):
        if v < 1:
            problems.append(f"parallel.{key}={v} must be >= 1")
    if dp_replicate == 0 or dp_replicate < -1 or dp_shard == 0 or dp_shard < -1:
        problems.append(f"parallel.dp_replicate({dp_replicate}) and parallel.dp_shard({dp_shard}) must be >= 1 "
                        f"or -1 (the rest of the world)")
    if problems:
        return None, problems
    replicated = ("none", "ddp", *ZERO_STAGES)
    if data in ("none", "fsdp") and dp_replicate not in (1, -1):
        problems.append(f"parallel.dp_replicate={dp_replicate} replicates shards, which is parallel.data=hsdp; "
                        f"set parallel.data=hsdp or parallel.dp_replicate=1")
    if data in replicated and dp_shard not in (1, -1):
        problems.append(f"parallel.dp_shard={dp_shard} shards parameters, which parallel.data={data} does not; "
                        f"set parallel.data=fsdp (or hsdp) or parallel.dp_shard=-1")
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
            problems.append(f"parallel.dp_replicate({dp_replicate}) != WORLD_SIZE({world_size}) / (tp({tp}) * "
                            f"pp({pp})) = {rep}; for ddp leave parallel.dp_replicate at 1 or -1")
    elif data == "fsdp":
        rep, shard = 1, (dp_shard if dp_shard > 0 else rest_of(1))
        if shard is None:
            problems.append(f"WORLD_SIZE({world_size}) is not divisible by {named} = {fixed}")
    else:  # hsdp
        rep, shard = dp_replicate, dp_shard
        if shard == -1:
            shard = rest_of(rep)
            if shard is None:
                problems.append(f"WORLD_SIZE({world_size}) is not divisible by dp_replicate({rep}) * {named} = "
                                f"{rep * fixed}")
        elif rep == -1:
            rep = rest_of(shard)
            if rep is None:
                problems.append(f"WORLD_SIZE({world_size}) is not divisible by dp_shard({shard}) * {named} = "
                                f"{shard * fixed}")
    if problems:
        return None, problems
    dims = ParallelDims(dp_replicate=rep, dp_shard=shard, tp=tp, pp=pp, cp=cp)
    if dims.world_size != world_size:
        problems.append(f"dp_replicate({rep}) * dp_shard({shard}) * {named} = {dims.world_size} "
                        f"!= WORLD_SIZE({world_size})" + ("; parallel.data=none uses no data-parallel ranks: "
                                                          "set parallel.data=ddp or fsdp, or launch fewer processes"
                                                          if data == "none" else ""))
        return None, problems
    return dims, []


def degenerate(data: str, dims: ParallelDims) -> list[str]:
    """Warnings for layouts the world size turned into something other than what the strategy name says."""
    out = []
    if data == "hsdp" and dims.dp_replicate == 1:
        out.append(f"parallel.data=hsdp with dp_replicate 1 is plain FSDP over {dims.dp_shard} rank(s)")
    if data == "hsdp" and dims.dp_shard * dims.cp == 1:
        out.append(f"parallel.data=hsdp with dp_shard 1 shards nothing: {dims.dp_replicate} full replicas (DDP "
                   f"with FSDP's overheads); give it more ranks or set parallel.data=ddp")
    if data == "fsdp" and dims.dp_shard * dims.cp == 1:
        out.append("parallel.data=fsdp with dp_shard 1 shards nothing (every rank is used by tp/pp); "
                   "give it more ranks, or set parallel.data=none")
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
        out.append(f"training.seq_len({t.seq_len}) must be divisible by 2 x parallel.cp = {2 * p.cp}: each rank holds "
                   f"a head and a tail chunk of every sequence; set training.seq_len to a multiple of {2 * p.cp}")
    if str(p.data) not in ("none", "fsdp", "hsdp"):
        out.append(f"parallel.cp={p.cp} with parallel.data={p.data}: context parallelism shards the parameters with "
                   f"FSDP over dp_shard x cp (as torchtitan does); use parallel.data=fsdp, hsdp or none")
    return out


def layout_problems(cfg, args, world_size: int) -> list[str]:
    """The parallel section's arithmetic: degrees, divisibility, stages and microbatches, the combinations that
    cannot work (trainer/config.py::validate collects every subsystem's rules)."""
    p, t = cfg.parallel, cfg.training
    dims, problems = resolve_dims(str(p.data), dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, tp=p.tp, pp=p.pp,
                                  cp=p.cp, world_size=max(world_size, 1))
    dp = dims.dp_size if dims else 1
    problems += _cp_problems(cfg)
    if p.tp > 1:
        for what, n in (("model.n_heads", args.n_heads), ("model.n_kv_heads", args.kv_heads)):
            if n % p.tp:
                problems.append(f"parallel.tp({p.tp}) must divide {what}({n}): {n} % {p.tp} = {n % p.tp}")
        if args.tie_embeddings:
            problems.append("parallel.tp > 1 with model.tie_embeddings=true is not supported (the embedding and the "
                            "output projection would be split twice); set model.tie_embeddings=false")
        if p.data == "ddp":
            problems.append(f"parallel.data=ddp with parallel.tp({p.tp}): DDP cannot wrap tensor-parallel "
                            f"(DTensor) parameters; use parallel.data=fsdp or hsdp with tp")
    if p.pp > 1 and p.data == "ddp":
        problems.append(f"parallel.data=ddp with parallel.pp({p.pp}) is not supported; use parallel.data=fsdp "
                        f"(or none) with pp")
    if p.pp_schedule not in PP_SCHEDULES:
        close = difflib.get_close_matches(p.pp_schedule, PP_SCHEDULES, n=1)
        problems.append(f"parallel.pp_schedule={p.pp_schedule}: unknown schedule"
                        f"{f'; did you mean {close[0]}?' if close else ''} Known: {', '.join(PP_SCHEDULES)}")
    elif p.pp > 1:
        stages = n_stages(p.pp_schedule, p.pp)
        per_rank = stages_per_rank(p.pp_schedule)
        if stages > args.n_layers:
            problems.append(f"pipeline stages pp({p.pp}) x {per_rank} per rank ({p.pp_schedule}) = {stages} "
                            f"> model.n_layers({args.n_layers}): every stage needs at least one block")
        if t.global_batch_size >= 1 and t.micro_batch_size >= 1 and t.global_batch_size % (t.micro_batch_size * dp) == 0:
            n_micro = t.global_batch_size // (t.micro_batch_size * dp)
            if p.pp_schedule != "gpipe" and n_micro < stages:
                problems.append(
                    f"pipeline microbatches = training.global_batch_size({t.global_batch_size}) / "
                    f"(training.micro_batch_size({t.micro_batch_size}) * dp({dp})) = {n_micro} < {stages} stages, "
                    f"which {p.pp_schedule} needs to fill the pipeline; lower training.micro_batch_size or raise "
                    f"training.global_batch_size")
    if p.pp > 1 and p.pp_schedule in V_SHAPED and p.ac == "selective":
        problems.append(f"parallel.ac=selective with parallel.pp_schedule={p.pp_schedule}: that schedule splits each "
                        f"backward into an input-gradient and a weight-gradient pass, and torch's selective "
                        f"checkpointing allows one backward per checkpointed region (\"Trying to backward an extra "
                        f"time\"); use parallel.ac=full, or pp_schedule=1f1b or interleaved_1f1b")
    if p.ac_every < 1:
        problems.append(f"parallel.ac_every={p.ac_every} must be >= 1")
    if str(p.sac_matmuls) not in ("all", "every_second"):
        problems.append(f"parallel.sac_matmuls={p.sac_matmuls}: unknown; known: all, every_second")
    elif str(p.sac_matmuls) != "all" and str(p.ac) != "selective":
        problems.append(f"parallel.sac_matmuls={p.sac_matmuls} chooses what selective AC keeps; it needs "
                        f"parallel.ac=selective (now {p.ac})")
    zero = str(p.data) in ZERO_STAGES
    if p.offload == "cpu" and p.data not in ("fsdp", "hsdp") and not zero:
        problems.append(f"parallel.offload=cpu needs a sharded strategy (fsdp, hsdp, zero1, zero2, zero3), "
                        f"not parallel.data={p.data}")
    if p.activation_offload_min_bytes < 0:
        problems.append(f"parallel.activation_offload_min_bytes={p.activation_offload_min_bytes} must be >= 0 (0 "
                        f"offloads every saved tensor of the blocks)")
    if p.offload_params and p.data != "zero3":
        problems.append(f"parallel.offload_params=true needs parallel.data=zero3 (only ZeRO-3 partitions the "
                        f"parameters; with fsdp, parallel.offload=cpu already offloads them), not {p.data}")
    if p.deepspeed and not zero:
        problems.append(f"parallel.deepspeed sets ds_config keys, which only the DeepSpeed strategies "
                        f"(zero1, zero2, zero3) read; parallel.data={p.data}")
    if p.compile and p.tp > 1 and p.ac != "none":
        problems.append("parallel.compile=true with parallel.tp > 1 and activation checkpointing fails in torch "
                        "(a compiled checkpoint-wrapped block under TP); drop one of the three")
    if cfg.optim.in_backward:
        problems += _in_backward_problems(cfg, dp)
    if t.global_batch_size >= 1 and t.micro_batch_size >= 1:
        per_step = t.micro_batch_size * dp
        if t.global_batch_size % per_step:
            problems.append(
                f"training.global_batch_size({t.global_batch_size}) must be divisible by "
                f"training.micro_batch_size({t.micro_batch_size}) * dp({dp}) = {per_step}: "
                f"{t.global_batch_size} % {per_step} = {t.global_batch_size % per_step}")
    return problems


# ------------------------------------------------------------------------------------------------
# Memory: every term per rank

GIB = 2**30
# Device memory no tensor accounts for: the CUDA context and kernels (~0.5 GiB), NCCL's buffers and the
# caching allocator's fragmentation. A stated constant (docs/memory.md) until a GPU run measures it: the
# planner's peak is what the tracker measures, and the fit test adds this reserve to it.
DEVICE_RESERVE_BYTES = {"cuda": 2 * GIB, "cpu": 0}
SAVE_COMPUTE = ("fp32", "autocast", "mixed")  # how activations are stored (see _precision_mode)


@dataclass
class Term:
    name: str  # what it counts, e.g. "block activations x 4 blocks x 2 in flight"
    bytes: int
    category: str  # the tracker category it is measured in (parallel.memory.CATEGORIES), or "host"
    note: str = ""


@dataclass
class RankMemory:
    """One pipeline rank's bytes at the moment of its peak (every rank of a stage holds the same)."""

    pp_rank: int
    stages: list[int]
    phase: str  # the moment of the peak: "loss backward", "block recompute" or "optimizer step"
    terms: list[Term]
    phases: dict[str, int] = field(default_factory=dict)  # the device total at each moment
    moments: dict[str, list[Term]] = field(default_factory=dict)  # every moment's terms (the peak's is `terms`)

    @property
    def peak_bytes(self) -> int:
        return sum(t.bytes for t in self.terms if t.category != "host")

    @property
    def host_bytes(self) -> int:
        """Host memory at its own peak moment (under FSDP's offload the step, with every gradient shard there)."""
        return max((sum(t.bytes for t in terms if t.category == "host") for terms in (self.moments or {}).values()),
                   default=sum(t.bytes for t in self.terms if t.category == "host"))

    def by_category(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.terms:
            if t.category != "host":
                out[t.category] = out.get(t.category, 0) + t.bytes
        return out


@dataclass
class MemoryPlan:
    ranks: list[RankMemory]  # one per pipeline rank
    reserve_bytes: int  # DEVICE_RESERVE_BYTES of the device
    capacity_bytes: int | None  # the device memory to fit in (None: not asked)
    ranks_per_node: int  # for host memory per node (offload)
    warnings: list[str] = field(default_factory=list)  # where the prediction is known to be short

    @property
    def most_loaded(self) -> RankMemory:
        return max(self.ranks, key=lambda r: r.peak_bytes)

    @property
    def peak_bytes(self) -> int:
        return self.most_loaded.peak_bytes

    def most_loaded_rank(self, dims: ParallelDims) -> int:
        """The global rank of the first rank of the most loaded pipeline stage (pp is the outermost axis)."""
        return self.most_loaded.pp_rank * (dims.world_size // dims.pp)

    @property
    def host_bytes_per_node(self) -> int:
        return max(r.host_bytes for r in self.ranks) * self.ranks_per_node

    def verdict(self) -> str | None:
        if self.capacity_bytes is None:
            return None
        need = self.peak_bytes + self.reserve_bytes
        if need <= self.capacity_bytes:
            return f"fits: {need / GIB:.2f} of {self.capacity_bytes / GIB:.2f} GiB ({self.capacity_bytes - need:,} bytes to spare)"
        return f"does not fit by {(need - self.capacity_bytes) / GIB:.2f} GiB ({need / GIB:.2f} > {self.capacity_bytes / GIB:.2f} GiB)"

    def to_json(self) -> dict:
        top = self.most_loaded
        return {
            "peak_bytes": self.peak_bytes, "reserve_bytes": self.reserve_bytes, "capacity_bytes": self.capacity_bytes,
            "fits": None if self.capacity_bytes is None else self.peak_bytes + self.reserve_bytes <= self.capacity_bytes,
            "warnings": self.warnings,
            "most_loaded_pp_rank": top.pp_rank, "host_bytes_per_node": self.host_bytes_per_node,
            "ranks": [{"pp_rank": r.pp_rank, "stages": r.stages, "phase": r.phase, "peak_bytes": r.peak_bytes,
                       "host_bytes": r.host_bytes, "by_category": r.by_category(), "phases": r.phases,
                       "terms": [t.__dict__ for t in r.terms]} for r in self.ranks],
        }

    def table(self) -> str:
        """Per pipeline rank: every term, the peak, and the verdict."""
        lines = []
        for r in self.ranks:
            tag = " (most loaded)" if r is self.most_loaded and len(self.ranks) > 1 else ""
            where = f"pipeline rank {r.pp_rank}, stages {r.stages}" if len(self.ranks) > 1 else "every rank"
            lines.append(f"{where}{tag}: peak at the {r.phase}")
            for t in r.terms:
                lines.append(f"  {t.category:<16} {_fmt_bytes(t.bytes):>12}  {t.name}" + (f"  ({t.note})" if t.note else ""))
            lines.append(f"  {'peak':<16} {_fmt_bytes(r.peak_bytes):>12}  tensor bytes per rank on the device"
                         + (f"; {_fmt_bytes(r.host_bytes)} in host memory" if r.host_bytes else ""))
        lines.append(f"device reserve     {_fmt_bytes(self.reserve_bytes):>12}  CUDA context, NCCL, allocator "
                     f"fragmentation (a stated constant; docs/memory.md)")
        if self.host_bytes_per_node:
            lines.append(f"host memory        {_fmt_bytes(self.host_bytes_per_node):>12}  per node of "
                         f"{self.ranks_per_node} ranks (offloaded states and activations)")
        if (v := self.verdict()) is not None:
            lines.append(f"verdict            {v}")
        lines += [f"warning            {w}" for w in self.warnings]
        return "\n".join(lines)


def _fmt_bytes(n: int) -> str:
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.2f} MiB"
    return f"{n / 2**10:.1f} KiB"


# bytes per element of the update's temporaries, for one parameter (torch's foreach AdamW: the sqrt of the second
# moment; adamw_bf16: the fp32 copies of both moments, the noise and the rounding, 23 bytes, and with bf16
# parameters their fp32 copy and its own rounding, 31; measured with torch's MemTracker, torch 2.13)
UPDATE_TEMPORARY = {"adamw": (4, 4), "adamw_bf16": (23, 31)}


def _update_bytes(opt: str, elements: int, master_weights: bool) -> int:
    fp32, bf16 = UPDATE_TEMPORARY[opt]
    return (fp32 if master_weights else bf16) * elements


def _in_backward_problems(cfg, dp: int) -> list[str]:
    """What optim.in_backward=true cannot do (optim/in_backward.py says why), each with its fix."""
    p, t, o = cfg.parallel, cfg.training, cfg.optim
    problems = []
    if str(p.data) not in ("none", "fsdp", "hsdp"):
        why = ("DDP's bucketed all-reduce finishes after the gradient hooks fire" if p.data == "ddp" else
               "DeepSpeed runs its own step over its flat partitions")
        problems.append(f"optim.in_backward=true with parallel.data={p.data}: {why}; use parallel.data=fsdp "
                        f"(or none on one process), or optim.in_backward=false")
    if p.cp > 1:
        problems.append(f"optim.in_backward=true with parallel.cp={p.cp}: not built for context parallelism (its "
                        f"gradient norm would need the context-parallel ranks' squares too); set parallel.cp=1 or "
                        f"optim.in_backward=false")
    if p.tp > 1 or p.pp > 1:
        problems.append(f"optim.in_backward=true with parallel.tp={p.tp}, parallel.pp={p.pp}: not built for tensor or "
                        f"pipeline parallelism (a pipeline stage's backward runs once per microbatch); set both to 1 "
                        f"or optim.in_backward=false")
    if o.max_grad_norm > 0:
        problems.append(f"optim.in_backward=true with optim.max_grad_norm={o.max_grad_norm}: clipping by the global "
                        f"norm needs every gradient before the first update, and in-backward updates each one as it "
                        f"completes; set optim.max_grad_norm=0 (the norm is still measured and logged)")
    if t.global_batch_size >= 1 and t.micro_batch_size >= 1 and t.global_batch_size != t.micro_batch_size * dp:
        problems.append(f"optim.in_backward=true with gradient accumulation: training.global_batch_size"
                        f"({t.global_batch_size}) != training.micro_batch_size({t.micro_batch_size}) x dp({dp}) = "
                        f"{t.micro_batch_size * dp}, and the first micro-batch's backward would already update; set "
                        f"training.micro_batch_size={t.global_batch_size // max(dp, 1)} (or global_batch_size="
                        f"{t.micro_batch_size * dp}), or optim.in_backward=false")
    if str(t.precision) == "fp16":
        problems.append("optim.in_backward=true with training.precision=fp16: the loss scaler unscales and checks "
                        "every gradient before the step; use training.precision=bf16")
    if str(cfg.numerics.on_nonfinite) == "skip":
        problems.append("optim.in_backward=true with numerics.on_nonfinite=skip: the update has happened when the "
                        "norm is known, so a step cannot be skipped; use numerics.on_nonfinite=raise")
    return problems


def _ceil(a: int, b: int) -> int:
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


def _params_of_rank(args, cfg, dims: ParallelDims, pp_rank: int) -> tuple[list[_Param], list[int], bool, bool, int]:
    """This pipeline rank's parameters, its block indices, whether it holds the first / last stage, and parts."""
    from models.llama import TP_SPLIT_DIM

    p = cfg.parallel
    sched, data = str(p.pp_schedule), data_strategy(cfg)
    total = n_stages(sched, dims.pp)
    mine = stage_ids(sched, pp_rank, dims.pp)
    ranges = split_blocks(args.n_layers, total)
    blocks = {i for s in mine for i in ranges[s]}
    first, last = 0 in mine, total - 1 in mine
    shapes = args.param_shapes()
    if args.tie_embeddings and last and not first:  # the last stage's output projection holds its own copy
        shapes.append(("output.weight", (args.vocab_size, args.dim)))
    out, decay_embeddings = [], bool(cfg.optim.decay_embeddings)
    for name, shape in shapes:
        if name.startswith("layers."):
            unit, module = name.split(".")[1], name.split(".", 2)[2].rsplit(".", 1)[0]
            keep = int(unit) in blocks
        else:
            unit, module = "root", name.rsplit(".", 1)[0]
            keep = first if module == "tok_embeddings" else last
        if not keep:
            continue
        tp_shape = list(shape)
        if dims.tp > 1 and (d := TP_SPLIT_DIM.get(module)) is not None:
            tp_shape[d] = _ceil(tp_shape[d], dims.tp)
        local = list(tp_shape)
        if data in ("fsdp", "hsdp"):
            local[0] = _ceil(local[0], dims.dp_shard * dims.cp)
        decay = len(shape) >= 2 and (decay_embeddings or module != "tok_embeddings")
        out.append(_Param(name, tuple(shape), tuple(tp_shape), tuple(local), unit, decay))
    return out, sorted(blocks), first, last, len(mine)


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


def block_saved_tensors(args, *, ac: str, mode: str, tp: int) -> list[float]:
    """Per token of the micro-batch (averaged over the sequence), the bytes of each storage one block saves for
    backward, as this model's ops run: RMSNorm saves its input, the normalized input and 1/rms; the linears their
    input (under autocast each linear its own cast copy); RoPE's outputs q and k; SDPA q, k, v (k and v repeated to
    the query heads under model.expand_kv), its output and the fp32 log-sum-exp; SwiGLU the gate and up outputs, silu(gate) and the product. Under TP with sequence
    parallelism the residual stream and the norms are split over the sequence (1/tp), the linears' gathered inputs
    are whole (D per token), heads and hidden units are split (1/tp). (Activation offloading moves them storage by
    storage: parallel/offload.py.)"""
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
            return [res * D / t, out * Q / t, out * K / t, out * Q / t, out * F / t, 4 * H / t,
                    *(rows if t > 1 else rows[:1])]
        return [res * D / t, out * Q / t, out * K / t, out * K / t, out * Q / t, out * F / t,
                out * F / t, 4 * H / t, *rows]
    norms = 2 * _norm_tensors(D, mode, t)  # two RMSNorms
    casts = 3 if mode == "autocast" else 1  # autocast casts the shared input once per linear (wq, wk, wv)
    gathered = [lin * D] * (casts + (2 if mode == "autocast" else 1))  # inputs of wq/wk/wv and w1/w3
    # rope(q), rope(k), v, SDPA out, lse; with model.expand_kv SDPA saves the keys and values repeated to the query
    # heads instead (repeat_interleave's backward saves nothing)
    kv = Q if args.kv_expanded else K
    attention = [out * Q / t, out * kv / t, out * kv / t, out * Q / t, 4 * H / t]
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


def offloaded_per_token(cfg, args, tp: int, ac: str | None = None) -> float:
    """parallel.activation_offload: per token of the micro-batch, the bytes of a block's saved storages that go to
    the host (parallel/offload.py): those of at least activation_offload_min_bytes. Eager selective AC keeps its
    chosen outputs in the checkpoint's own cache, out of the hooks' reach, so only the block input moves (a
    compiled block saves them as its graph's outputs, which the hooks see)."""
    p = cfg.parallel
    if not p.activation_offload:
        return 0.0
    ac = ac or ac_mode(cfg)  # (`ac`: of one kind of block, under parallel.ac_every)
    saved = block_saved_tensors(args, ac=ac, mode=_precision_mode(cfg), tp=tp)
    movable = saved[:1] if ac.startswith("selective") and not p.compile else saved
    mb_tokens = cfg.training.micro_batch_size * cfg.training.seq_len // max(p.cp, 1)
    return sum(b for b in movable if b * mb_tokens >= p.activation_offload_min_bytes)


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


def block_activation_bytes(args, *, ac: str, mode: str, tp: int) -> float:
    """Bytes one block saves for backward, per token of the micro-batch: `block_saved_tensors` summed."""
    return sum(block_saved_tensors(args, ac=ac, mode=mode, tp=tp))


def _norm_tensors(D: int, mode: str, tp: int) -> list[float]:
    """Per token, what one RMSNorm saves: its input, the normalized input and 1/rms in the residual dtype (under
    tensor parallelism on the sequence-sharded input). (Four fp32 copies of the input were measured here under
    FSDP's bf16 parameters with TP while FSDP cast the blocks' inputs, the RoPE tables among them, to 16 bits; the
    blocks no longer cast their inputs, and the tracker measures the plain three.)"""
    res = 2 if mode == "mixed" else 4
    return [res * D / tp, res * D / tp, res / tp]


def _norm_bytes(D: int, mode: str, tp: int) -> float:
    return sum(_norm_tensors(D, mode, tp))


def block_recompute_bytes(args, *, ac: str, mode: str, tp: int) -> tuple[float, float]:
    """Per token, (activations, gradient temporaries) a block adds during its own backward: under AC its
    forward recomputed (what the un-checkpointed block saves, less what it kept), and the gradients of its
    output and of the MLP's gate and up projections."""
    res, g = (4, 4) if mode == "fp32" else (4, 2) if mode == "autocast" else (2, 2)
    temps = res * args.dim / tp + g * 2 * args.ffn_hidden / tp
    if ac == "none":
        return 0.0, temps
    everything = block_activation_bytes(args, ac="none", mode=mode, tp=tp)
    if ac == "full":
        recomputed = everything - block_activation_bytes(args, ac="full", mode=mode, tp=tp)  # the input is kept
    else:  # selective: the kept matmul and attention outputs are reused, not made again
        D, H = args.dim, args.n_heads
        Q, K, F = H * args.head_dim, args.kv_heads * args.head_dim, args.ffn_hidden
        out = 4 if mode == "fp32" else 2
        # input, v, SDPA out, gate, up (every_second: recomputed); lse
        shared = res * D / tp + out * (Q + K + (F if ac == SELECTIVE_EVERY_SECOND else 2 * F)) / tp + 4 * H / tp
        recomputed = everything - shared
    return max(recomputed, 0.0), temps


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


# DeepSpeed's bucket-sized buffers held at the peak, by (ZeRO stage, compute bytes): the double-buffered
# reduce buckets of overlap_comm (the gradient partition of stages 2 and 3 is a term of its own). Measured
# with the tracker on CPU (tests/distributed/test_memory_plan.py keeps it true).
_DS_BUFFERS = {(1, 4): 2, (1, 2): 2, (2, 4): 2, (2, 2): 2, (3, 4): 2, (3, 2): 2}


def reshards_after_forward(cfg) -> bool:
    """parallel.reshard_after_forward resolved: null frees gathered blocks after forward, except under pipeline
    parallelism, where every microbatch would gather every block again (torchtitan's default too)."""
    value = cfg.parallel.reshard_after_forward
    return cfg.parallel.pp == 1 if value is None else bool(value)


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
        # ZeRO-1 holds whole gradients until the boundary, ZeRO-2/3 only their partition
        return {"params": compute * (part if stage == 3 else n_local), "master": 4 * part,
                "grads": compute * (n_local if stage == 1 else part), "optim": 8 * part}
    beta1, name = o.adafactor.beta1 is not None, str(o.name)
    width = 4 if cfg.training.master_weights else 2  # training.master_weights=false: bf16 parameters and gradients
    return {"params": width * n_local, "grads": width * n_local,
            "optim": sum(optimizer_state_bytes(name, q.local, adafactor_beta1=beta1) for q in params)}


def model_states(cfg, args, dims: ParallelDims) -> list[dict[str, int]]:
    """`_model_states` of every rank, in rank order (ranks are pipeline-major: pp is the outermost mesh axis)."""
    per_stage = [_model_states(cfg, _params_of_rank(args, cfg, dims, r)[0], dims) for r in range(dims.pp)]
    per = dims.world_size // dims.pp
    return [per_stage[rank // per] for rank in range(dims.world_size)]


def memory_plan(cfg, args, dims: ParallelDims, *, device: str = "cpu", capacity_gib: float | None = None,
                ranks_per_node: int = 8) -> MemoryPlan:
    """Every term of every pipeline rank's memory at the peak of a step (module docstring)."""
    ranks = [_rank_memory(cfg, args, dims, r, device=device) for r in range(dims.pp)]
    warnings = []
    if dims.pp > 1 and str(cfg.parallel.pp_schedule) in V_SHAPED:
        warnings.append(f"pp_schedule={cfg.parallel.pp_schedule}: a lower bound. The zero-bubble V schedules hold a "
                        f"microbatch's tensors from its input-gradient to its weight-gradient pass; measured on CPU "
                        f"13-26% above this prediction without AC, and with AC 1.5-7x above it (AC under these "
                        f"schedules held more than no AC); docs/memory.md")
    return MemoryPlan(ranks=ranks, reserve_bytes=DEVICE_RESERVE_BYTES.get(device, 0),
                      capacity_bytes=None if capacity_gib is None else int(capacity_gib * GIB),
                      ranks_per_node=min(ranks_per_node, dims.world_size), warnings=warnings)


def _rank_memory(cfg, args, dims: ParallelDims, pp_rank: int, *, device: str) -> RankMemory:
    p, t, o = cfg.parallel, cfg.training, cfg.optim
    data, ac, mode = data_strategy(cfg), ac_mode(cfg), _precision_mode(cfg)
    fsdp, zero = data in ("fsdp", "hsdp"), data in ZERO_STAGES
    compute = 4 if mode == "fp32" else 2
    params, _, first, last, n_parts = _params_of_rank(args, cfg, dims, pp_rank)
    n_local = sum(math.prod(q.local) for q in params)
    n_tp = sum(math.prod(q.tp) for q in params)  # unsharded by FSDP (this rank's TP shards)
    mb_tokens = t.micro_batch_size * t.seq_len // dims.cp  # context parallelism: this rank's share of each sequence
    n_micro = microbatches(t.global_batch_size, t.micro_batch_size, dims.dp_size)
    sched = str(p.pp_schedule)
    flying = in_flight(sched, dims.pp, pp_rank, n_micro)  # {stage: microbatches in flight}
    ranges = split_blocks(args.n_layers, n_stages(sched, dims.pp))
    last_stage = n_stages(sched, dims.pp) - 1
    offload = str(p.offload) == "cpu" and device != "cpu"
    ms = _model_states(cfg, params, dims)
    gathered_zero: list[Term] = []
    grad_bytes = 2 if zero and compute == 2 else 4
    states: list[Term] = []
    opt = str(o.name)
    if zero:
        stage = ZERO_STAGES[data]
        states.append(Term(f"parameters ({'partition' if stage == 3 else 'whole model'}, {compute}-byte)",
                           ms["params"], "params", "DeepSpeed casts the module to the compute dtype" if compute == 2 else ""))
        states.append(Term("fp32 master partition", ms["master"], "host" if offload else "master"))
        states.append(Term("AdamW moments over the partition", ms["optim"], "host" if offload else "optim"))
        if stage == 3:
            threshold = _ds_setting(cfg, "stage3_param_persistence_threshold", PERSISTENCE_THRESHOLD)
            small = sum(math.prod(q.full) for q in params if math.prod(q.full) < threshold)
            states.append(Term(f"persisted parameters (< {threshold:,} elements, kept gathered)",
                               compute * small, "params"))
        bucket = _ds_setting(cfg, "reduce_bucket_size", bucket_elements(args.num_params()))
        if stage == 3:
            live = min(n_local - small, _ds_setting(cfg, "stage3_max_live_parameters", bucket))
            gathered_zero = [Term(f"gathered parameters in use (up to stage3_max_live_parameters = {live:,})",
                                  compute * live, "params")]
        n_buckets = _DS_BUFFERS[(stage, compute)]
        states.append(Term(f"DeepSpeed buffers: {n_buckets} x reduce bucket of {bucket:,} elements x {grad_bytes} bytes",
                           n_buckets * bucket * grad_bytes, "temporaries", "measured layout of DeepSpeed 0.19"))
    else:
        what = "shards" if fsdp else ("TP shards" if dims.tp > 1 else "whole stage" if dims.pp > 1 else "whole model")
        kind = "fp32" if t.master_weights else "bf16 (no fp32 masters)"
        states.append(Term(f"{kind} parameters ({what})", ms["params"], "host" if offload and fsdp else "params"))
        states.append(Term(f"optimizer state ({opt}, with its step counters)",
                           ms["optim"] + STEP_COUNTER_BYTES[opt] * len(params), "host" if offload and fsdp else "optim"))
    hd = args.head_dim
    states.append(Term("RoPE tables (cos, sin)", n_parts * 2 * args.max_seq_len * (hd // 2) * 4, "buffers"))

    # -- gradients as they stand when the peak comes
    grad_full = ms["grads"]  # every gradient of the step, as this rank holds it after the last micro-batch
    # FSDP's CPU offload copies each reduce-scattered shard to the host, where the optimizer steps
    grads_where = "host" if offload and fsdp else "grads"
    step_where = "host" if offload and fsdp else "optim"  # (and the optimizer's update with them)
    accumulating = n_micro > max(flying.values())  # gradients of earlier micro-batches exist at the peak
    grads_at_loss: list[Term] = []
    if accumulating:
        # (under pipelining the V schedules' split backward keeps torch's unsharded accumulation: parallel/pipeline.py)
        if fsdp and (p.accumulate_unsharded_grads or (dims.pp > 1 and str(p.pp_schedule) in V_SHAPED)):
            grads_at_loss.append(Term("unsharded fp32 gradients accumulated over micro-batches", 4 * n_tp,
                                      "unsharded_grads", "reduce-scattered once, after the last micro-batch"))
        elif not zero or ZERO_STAGES[data] == 1:
            grads_at_loss.append(Term("gradients accumulated over micro-batches", grad_full, grads_where))
    if zero and ZERO_STAGES[data] > 1:  # DeepSpeed's gradient partition is allocated once and kept
        grads_at_loss = [Term("gradient partition (DeepSpeed's contiguous buffer, kept)", grad_full, "grads")]

    # -- FSDP's gathered parameters (compute dtype): the output unit is kept gathered from its forward into its
    #    backward; a block is gathered for its backward together with the prefetch of the next one
    per_block = max((sum(math.prod(q.tp) for q in params if q.unit == u) for u in {q.unit for q in params}
                     if u != "root"), default=0)
    gathered_a: list[Term] = []
    gathered_b: list[Term] = []
    if fsdp:
        head = sum(math.prod(q.tp) for q in params if q.unit == "root" and (
            args.tie_embeddings or not q.name.startswith("tok_embeddings")))
        if last:
            gathered_a.append(Term("gathered output projection and final norm (kept from forward into backward)",
                                   compute * head, "gathered_params"))
        if reshards_after_forward(cfg):
            gathered_b.append(Term("gathered blocks: the one in backward and the prefetched next",
                                   2 * compute * per_block, "gathered_params"))
        else:  # reshard_after_forward off (the default under pipelining): every unit stays gathered
            kept = Term("gathered parameters: all of this rank's (reshard_after_forward off)", compute * n_tp,
                        "gathered_params")
            gathered_a[:] = [kept]
            gathered_b.append(kept)

    # -- activations: every stage's blocks x its microbatches in flight
    # (block, microbatch) pairs held, by the AC mode of the block (parallel.ac_every: some blocks keep everything)
    pairs: dict[str, int] = {}
    for sid, n in flying.items():
        for kind, count in blocks_by_ac(cfg, len(ranges[sid])).items():
            pairs[kind] = pairs.get(kind, 0) + count * n
    block_mbs = sum(pairs.values())
    held = ", ".join(f"stage {sid}: {len(ranges[sid])} x {n}" for sid, n in flying.items())
    blk = {kind: block_activation_bytes(args, ac=kind, mode=mode, tp=dims.tp) for kind in pairs}
    moved_of = {kind: offloaded_per_token(cfg, args, dims.tp, ac=kind) for kind in pairs}  # per token and block
    moved = max(moved_of.values(), default=0.0)
    kinds = " and ".join(f"{pairs[k]} under {k} AC" for k in pairs) if len(pairs) > 1 else f"{ac} AC"
    acts: list[Term] = [Term(f"block activations ({kinds}), blocks x microbatches in flight: {held}"
                             + (" (what offloading leaves on the device)" if moved else ""),
                             int(sum((blk[k] - moved_of[k]) * pairs[k] for k in pairs) * mb_tokens), "activations")]
    if moved:
        acts.append(Term(f"offloaded block activations (parallel.activation_offload): {held}",
                         int(sum(moved_of[k] * pairs[k] for k in pairs) * mb_tokens), "host"))
    # (training.float8: torchao's Float8Linear casts the fp32 weight straight to float8 and saves the weight itself
    # for backward, so there is no 2-byte copy; its float8 casts are a matmul's temporaries)
    float8 = str(t.float8) != "none"
    plain = block_mbs and pairs.get("full", 0) < block_mbs  # some blocks not checkpointed
    if mode == "autocast" and plain and not float8:  # autocast's weight casts, saved for backward by each linear
        # of a block that is not checkpointed (one copy: autocast caches them for its region, and a pipeline step
        # runs in one region; under ac_every the share of the blocks that keep everything)
        share = 1.0 - pairs.get("full", 0) / block_mbs if ac == "full" else 1.0
        w = share * sum(math.prod(q.tp) for q in params if q.unit != "root" and len(q.full) == 2)
        acts.append(Term("autocast's 2-byte copies of the block weights", int(2 * w), "activations"))
    boundary = (4 if mode != "mixed" else 2) * args.dim / dims.tp * mb_tokens  # one microbatch's hidden state
    pipeline: list[Term] = []
    if dims.pp > 1:
        recv = sum(n_micro for sid in flying if sid != 0) + sum(n_micro for sid in flying if sid != last_stage)
        pipeline.append(Term(f"pipeline receive buffers: {recv} (activations into a stage, gradients into its "
                             f"output; one per microbatch, kept)", int(recv * boundary), "other"))
        sent = sum(n for sid, n in flying.items() if sid != last_stage)
        acts.append(Term(f"stage outputs kept for their backward ({sent} microbatches in flight)",
                         int(sent * boundary), "activations"))
    V = args.vocab_size
    loss_parallel = dims.tp > 1 and dims.pp == 1
    v_local = _ceil(V, dims.tp) if loss_parallel else V
    logits_temps: list[Term] = []
    chunks = int(t.loss_chunks)
    if last and chunks:  # models/loss.py: the projection and the loss chunk by chunk, the logits never whole
        res = 4 if mode != "mixed" else 2  # the final norm's output, saved in its own dtype
        final = _norm_bytes(args.dim, mode, dims.tp) + res * args.dim + 4 + 8
        acts.append(Term(f"final norm, output input, log-sum-exp, targets (loss over {chunks} chunks)",
                         int(final * mb_tokens), "activations"))
        if mode == "autocast":
            out_w = math.prod(next(q.tp for q in params if q.name in ("output.weight", "tok_embeddings.weight")))
            acts.append(Term("autocast's copy of the output projection", 2 * out_w, "activations"))
        ct = _ceil(mb_tokens, chunks)
        w_loc = v_local * args.dim
        chunk = 4 * v_local * ct + (compute * v_local * ct if compute < 4 else 0)  # fp32 logits, their cast
        extra = {"fp32": 0, "autocast": 2 * w_loc + 2 * args.dim * ct, "mixed": 6 * w_loc}[mode]
        if device == "cpu":  # torch's CPU matmul against the transposed weight copies it (seen by the tracker;
            extra += compute * w_loc  # cuBLAS reads it transposed)
        logits_temps.append(Term(f"one chunk's logits gradient (fp32 and its {compute}-byte copy), the hidden "
                                 f"states' gradient, the per-token loss scale, the weight gradient's fp32 accumulation",
                                 int(chunk + (res * args.dim + 4) * mb_tokens + extra), "temporaries"))
    elif last:
        res = 4 if mode != "mixed" else 2
        lin = 4 if mode == "fp32" else 2
        final = _norm_bytes(args.dim, mode, dims.tp) + lin * args.dim + 4 * v_local + 8
        n_last = flying[last_stage]
        acts.append(Term(f"final norm, output input, fp32 log-softmax, targets x {n_last} in flight",
                         int(final * mb_tokens * n_last), "activations"))
        if mode == "autocast":
            out_w = math.prod(next(q.tp for q in params if q.name in ("output.weight", "tok_embeddings.weight")))
            acts.append(Term("autocast's copy of the output projection", 2 * out_w, "activations"))
        # loss_parallel's backward (DTensor's decomposed log-softmax and masked NLL) holds one fp32 logit-sized
        # tensor more than the fused kernel's (measured on the tracker: 18 vs 14 bytes per local logit with the
        # 16-bit logits and the saved output)
        n_temps = 3 if loss_parallel else 2
        logits_temps.append(Term(f"log-softmax gradient temporaries ({n_temps} x fp32 logits"
                                 f"{', loss_parallel' if loss_parallel else ''})", n_temps * 4 * v_local * mb_tokens,
                                 "temporaries"))

    # moment A: the loss's backward on the last micro-batch (ranks holding the last stage)
    states = states + pipeline
    if data == "ddp":  # measured: a parameter-sized buffer beside the (bucket-view) gradients during backward
        states_bw = [Term("DDP's gradient all-reduce buffer", 4 * n_local, "temporaries", "seen by the tracker on CPU")]
    else:
        states_bw = []
    moment_a = states + states_bw + grads_at_loss + gathered_a + gathered_zero + acts + logits_temps if last else None
    # moment B: the backward of the last block of the micro-batch (its forward recomputed first under AC);
    # the logits' tensors are gone, the block's gradient temporaries and FSDP's reduce-scatter are there
    moment_b = None
    if block_mbs:
        extra, temps = block_recompute_bytes(args, ac=ac, mode=mode, tp=dims.tp)
        if ac == "full" and int(p.ac_every) > 1 and not any((len(ranges[sid]) - 1) % int(p.ac_every) == 0
                                                            for sid in flying):
            # the stage's last block keeps everything: nothing recomputed here, and a checkpointed block's
            # recompute comes after the last block's activations are freed (a smaller sum than this one)
            extra = 0.0
        kept = [a for a in acts if not a.name.startswith("final norm")]
        moment_b = states + states_bw + grads_at_loss + gathered_b + gathered_zero + kept
        if moved:  # the block in backward came back from the host, and the one before it is coming
            back = min(2, max(len(ranges[sid]) for sid in flying))
            moment_b.append(Term(f"offloaded activations back on the device: {back} block(s) (the one in backward, "
                                 f"the prefetched one before it)", int(moved * mb_tokens * back), "activations"))
        if extra:
            moment_b.append(Term("the checkpointed block's recomputed forward", int(extra * mb_tokens), "activations"))
            if mode == "autocast" and ac == "full" and not float8:  # the recompute casts the block's weights again
                w = max((sum(math.prod(q.tp) for q in params if q.unit == u and len(q.full) == 2)
                         for u in {q.unit for q in params} if u != "root"), default=0)
                moment_b.append(Term("autocast's copies of the recomputed block's weights", 2 * w, "activations"))
        moment_b.append(Term("the block's gradient temporaries (output, gate, up)", int(temps * mb_tokens),
                             "temporaries"))
        if dims.cp > 1:
            moment_b.append(Term(f"context-parallel attention's backward ({p.cp_rotate}): keys and values of "
                                 f"{'every rank' if p.cp_rotate == 'allgather' else 'two ranks'}, their fp32 "
                                 f"gradients, the fp32 query gradient", int(cp_attention_bytes(cfg, args, dims)),
                                 "temporaries"))
        if fsdp:
            if compute == 2:
                moment_b.append(Term("the block's unsharded gradients in the compute dtype and their fp32 copy for "
                                     "the reduce-scatter", 6 * per_block, "temporaries"))
            moment_b.append(Term("the reduce-scatter's output (the block's fp32 gradient shard)",
                                 4 * _ceil(per_block, dims.dp_shard * dims.cp), "temporaries"))
    # moment C: the optimizer step: every gradient, the update's largest temporary
    groups: dict[bool, int] = {}
    for q in params:
        groups[q.decay] = groups.get(q.decay, 0) + math.prod(q.local)
    if o.in_backward:  # optim/in_backward.py: each parameter stepped as its gradient completes, then dropped
        # at a block's backward one of its parameters is being stepped (the output projection's update comes
        # after the loss's temporaries are gone, the embedding's after every block's activations)
        largest = max((math.prod(q.local) for q in params if q.unit != "root"), default=0)
        during = [] if fsdp else [Term("one block parameter's gradient, until its hook steps it (largest)",
                                       (4 if t.master_weights else 2) * largest, "grads")]
        if opt in UPDATE_TEMPORARY:
            during.append(Term(f"{opt}'s update temporary, one block parameter at a time in the backward (largest)",
                               _update_bytes(opt, largest, t.master_weights), step_where))
        if moment_b is not None:
            moment_b += during
        moment_c = list(states)  # after the backward nothing is left to apply
    else:
        moment_c = states + [Term("gradients (all, this rank's shards)", grad_full, grads_where)]
    if not zero and opt == "adamw" and not o.in_backward:
        moment_c.append(Term("AdamW's update temporary (sqrt of the second moment, largest group)",
                             4 * max(groups.values(), default=0), step_where))
    elif not zero and opt == "adamw_bf16" and not o.in_backward:  # one parameter at a time
        largest_any = max((math.prod(q.local) for q in params), default=0)
        moment_c.append(Term("adamw_bf16's update temporary (fp32 moments, the rounding noise; largest parameter)",
                             _update_bytes(opt, largest_any, t.master_weights), step_where))
    moments = {"loss backward": moment_a, "last block's backward": moment_b, "optimizer step": moment_c}
    totals = {k: sum(x.bytes for x in v if x.category != "host") for k, v in moments.items() if v is not None}
    phase = max(totals, key=totals.get)
    return RankMemory(pp_rank=pp_rank, stages=stage_ids(sched, pp_rank, dims.pp), phase=phase,
                      terms=[x for x in moments[phase] if x.bytes], phases=totals,
                      moments={k: [x for x in v if x.bytes] for k, v in moments.items() if v is not None})
