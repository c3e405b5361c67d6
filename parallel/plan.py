"""The memory plan of a run: the bytes every pipeline rank will hold at the peak of a training step, term by term,
assembled from parallel/memory_terms.py on the layout of parallel/layout.py.

Pure arithmetic: no process group, no torch.distributed, no tensor allocated, nothing from trainer/. The
config checks, the dry run, `launch/plan.py` and the tests read the same numbers, so the prediction cannot drift
from what the trainer builds.

How the memory model is built (docs/memory.md has the formulas with their derivation): every term names
the tensors it counts and the tracker category they fall in (`parallel.memory.CATEGORIES`, what torch's
MemTracker / FSDPMemTracker measure). A step's peak is the largest of these moments:
  A. the loss's backward starts on the last micro-batch: every saved activation of the micro-batches in
     flight, the fp32 log-softmax and two logit-sized gradient temporaries, the gradients accumulated so far;
  B. the backward of the micro-batch's last block: (under AC) its forward recomputed on top of the others'
     saved tensors, its gradient temporaries, FSDP's gathered blocks (in fp32: and reduce-scatter output),
     DeepSpeed's reduce buckets;
  B'. under FSDP with 16-bit compute parameters, that block's reduce-scatter: its backward's tensors freed, its
     unsharded gradients with their fp32 copy and the reduce-scatter's output;
  C. the optimizer step: every gradient, the states, and the largest temporary of the update.
The activation formulas count the tensors autograd saves for this model's ops as torch runs them (SwiGLU's
four hidden-size tensors, RMSNorm's input, normalized input and 1/rms, SDPA's output and log-sum-exp, the
casts autocast makes for every linear), checked against the tracker by tests/distributed/test_memory_plan.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from parallel.layout import V_SHAPED, ParallelDims, stage_ids
from parallel.memory_terms import (
    Term,
    activation_terms,
    block_activations,
    block_backward_terms,
    deepspeed_buckets_at_loss,
    fsdp_gathered,
    fsdp_reduce_terms,
    gradients_at_loss,
    in_backward_buffers,
    in_backward_terms,
    load_host_bytes,
    loss_terms,
    model_state_terms,
    optimizer_step_terms,
    rank_shape,
)

GIB = 2**30


# Device memory no tensor accounts for: the CUDA context and kernels (~0.5 GiB), NCCL's buffers and the
# caching allocator's fragmentation. A stated constant (docs/memory.md) until a GPU run measures it: the
# planner's peak is what the tracker measures, and the fit test adds this reserve to it.
DEVICE_RESERVE_BYTES = {"cuda": 2 * GIB, "cpu": 0}


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
        return max(
            (sum(t.bytes for t in terms if t.category == "host") for terms in (self.moments or {}).values()),
            default=sum(t.bytes for t in self.terms if t.category == "host"),
        )

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
    load_host_bytes: int = 0  # checkpoint.init_from: a rank's host memory at the peak of reading the weights
    host_capacity_bytes: int | None = None  # the host memory per node to fit in (None: not asked)

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
            spare = self.capacity_bytes - need
            return f"fits: {need / GIB:.2f} of {self.capacity_bytes / GIB:.2f} GiB ({spare:,} bytes to spare)"
        over = (need - self.capacity_bytes) / GIB
        return f"does not fit by {over:.2f} GiB ({need / GIB:.2f} > {self.capacity_bytes / GIB:.2f} GiB)"

    def host_verdict(self) -> str | None:
        """Whether the offloaded state of a node's ranks fits its host memory (host_memory_gib), or None."""
        if self.host_capacity_bytes is None:
            return None
        need, have = self.host_bytes_per_node, self.host_capacity_bytes
        if need <= have:
            return f"fits: {need / GIB:.2f} of {have / GIB:.2f} GiB per node"
        return f"does not fit by {(need - have) / GIB:.2f} GiB ({need / GIB:.2f} > {have / GIB:.2f} GiB per node)"

    def to_json(self) -> dict:
        top = self.most_loaded
        return {
            "peak_bytes": self.peak_bytes,
            "reserve_bytes": self.reserve_bytes,
            "capacity_bytes": self.capacity_bytes,
            "fits": None
            if self.capacity_bytes is None
            else self.peak_bytes + self.reserve_bytes <= self.capacity_bytes,
            "warnings": self.warnings,
            "most_loaded_pp_rank": top.pp_rank,
            "host_bytes_per_node": self.host_bytes_per_node,
            "host_capacity_bytes": self.host_capacity_bytes,
            "host_fits": None
            if self.host_capacity_bytes is None
            else self.host_bytes_per_node <= self.host_capacity_bytes,
            "ranks": [
                {
                    "pp_rank": r.pp_rank,
                    "stages": r.stages,
                    "phase": r.phase,
                    "peak_bytes": r.peak_bytes,
                    "host_bytes": r.host_bytes,
                    "by_category": r.by_category(),
                    "phases": r.phases,
                    "terms": [t.__dict__ for t in r.terms],
                }
                for r in self.ranks
            ],
        }

    def table(self) -> str:
        """Per pipeline rank: every term, the peak, and the verdict."""
        lines = []
        for r in self.ranks:
            tag = " (most loaded)" if r is self.most_loaded and len(self.ranks) > 1 else ""
            where = f"pipeline rank {r.pp_rank}, stages {r.stages}" if len(self.ranks) > 1 else "every rank"
            lines.append(f"{where}{tag}: peak at the {r.phase}")
            for t in r.terms:
                lines.append(
                    f"  {t.category:<16} {_fmt_bytes(t.bytes):>12}  {t.name}" + (f"  ({t.note})" if t.note else "")
                )
            lines.append(
                f"  {'peak':<16} {_fmt_bytes(r.peak_bytes):>12}  tensor bytes per rank on the device"
                + (f"; {_fmt_bytes(r.host_bytes)} in host memory" if r.host_bytes else "")
            )
        lines.append(
            f"device reserve     {_fmt_bytes(self.reserve_bytes):>12}  CUDA context, NCCL, allocator "
            f"fragmentation (a stated constant; docs/memory.md)"
        )
        if self.host_bytes_per_node:
            lines.append(
                f"host memory        {_fmt_bytes(self.host_bytes_per_node):>12}  per node of "
                f"{self.ranks_per_node} ranks (offloaded states and activations)"
            )
        if self.load_host_bytes:
            lines.append(
                f"host at load       {_fmt_bytes(self.load_host_bytes):>12}  per rank, reading checkpoint.init_from "
                f"one slice at a time (trainer/hf.py)"
            )
        if (v := self.verdict()) is not None:
            lines.append(f"verdict            {v}")
        if (v := self.host_verdict()) is not None:
            lines.append(f"host verdict       {v}")
        lines += [f"warning            {w}" for w in self.warnings]
        return "\n".join(lines)


def _fmt_bytes(n: int) -> str:
    """Bytes as GiB, MiB or KiB, for the plan's table."""
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.2f} MiB"
    return f"{n / 2**10:.1f} KiB"


def memory_plan(
    cfg,
    args,
    dims: ParallelDims,
    *,
    device: str = "cpu",
    capacity_gib: float | None = None,
    ranks_per_node: int = 8,
    expert_routing: str | float | None = None,
) -> MemoryPlan:
    """Every term of every pipeline rank's memory at the peak of a step (module docstring). `expert_routing`: under
    expert parallelism, the routing the experts' rows are sized for (memory_terms.py `expert_load`: balanced, worst,
    or an observed max/mean; None: worst for forced `first` routing, else balanced)."""
    ranks = [_rank_memory(cfg, args, dims, r, device=device, expert_routing=expert_routing) for r in range(dims.pp)]
    warnings = []
    if dims.pp > 1 and str(cfg.parallel.pp_schedule) in V_SHAPED:
        warnings.append(
            f"pp_schedule={cfg.parallel.pp_schedule}: a lower bound. The zero-bubble V schedules hold a "
            f"microbatch's tensors from its input-gradient to its weight-gradient pass; measured on CPU "
            f"13-26% above this prediction without AC, and with AC 1.5-7x above it (AC under these "
            f"schedules held more than no AC); docs/memory.md"
        )
    return MemoryPlan(
        ranks=ranks,
        reserve_bytes=DEVICE_RESERVE_BYTES.get(device, 0),
        capacity_bytes=None if capacity_gib is None else int(capacity_gib * GIB),
        ranks_per_node=min(ranks_per_node, dims.world_size),
        warnings=warnings,
        load_host_bytes=load_host_bytes(cfg, args, dims),
    )


def _rank_memory(cfg, args, dims: ParallelDims, pp_rank: int, *, device: str, expert_routing=None) -> RankMemory:
    """One pipeline rank's moments (module docstring), each the sum of its terms; the peak is the largest."""
    r = rank_shape(cfg, args, dims, pp_rank, device=device, expert_routing=expert_routing)
    states, gathered_zero = model_state_terms(r)
    grads_at_loss = gradients_at_loss(r)
    gathered_at_loss, gathered_at_block = fsdp_gathered(r)
    blocks = block_activations(r)
    acts, pipeline = activation_terms(r, blocks)
    loss_acts, loss_temps = loss_terms(r)
    acts += loss_acts
    states = states + pipeline
    # A: the loss's backward on the last micro-batch (ranks holding the last stage)
    moment_a = None
    if r.last:
        moment_a = states + grads_at_loss + deepspeed_buckets_at_loss(r) + gathered_at_loss + gathered_zero + acts
        moment_a += loss_temps
    # B: the backward of the micro-batch's last block (its forward recomputed first under AC); the logits' tensors
    # are gone, the block's gradient temporaries and FSDP's reduce-scatter are there
    moment_b = None
    if blocks.count:
        kept = [a for a in acts if not a.name.startswith("final norm")]
        moment_b = states + grads_at_loss + gathered_at_block + gathered_zero + kept + block_backward_terms(r, blocks)
        moment_b += in_backward_buffers(r)
        if cfg.optim.in_backward:
            moment_b += in_backward_terms(r)
    # B': under FSDP with 16-bit compute parameters, that block's reduce-scatter (its backward's tensors freed)
    moment_r = None
    if blocks.count and (reduce := fsdp_reduce_terms(r, blocks, kept)) is not None:
        moment_r = states + grads_at_loss + gathered_at_block + gathered_zero + reduce
    # C: the optimizer step: every gradient, the update's largest temporary
    moment_c = states + optimizer_step_terms(r)
    moments = {
        "loss backward": moment_a,
        "last block's backward": moment_b,
        "last block's reduce-scatter": moment_r,
        "optimizer step": moment_c,
    }
    totals = {k: sum(x.bytes for x in v if x.category != "host") for k, v in moments.items() if v is not None}
    phase = max(totals, key=totals.get)
    return RankMemory(
        pp_rank=pp_rank,
        stages=stage_ids(str(cfg.parallel.pp_schedule), pp_rank, dims.pp),
        phase=phase,
        terms=[x for x in moments[phase] if x.bytes],
        phases=totals,
        moments={k: [x for x in v if x.bytes] for k, v in moments.items() if v is not None},
    )
