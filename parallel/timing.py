"""A step's time predicted from the config alone, and the hardware rates it is predicted with.

The model (docs/compare.md has it with its assumptions and its measured error):

    step = compute + recompute + exposed data-parallel communication + tensor-parallel communication
           + pipeline sends + bubble + optimizer step (+ host transfers under offload) + per-op overhead

- compute: this rank's training FLOPs (6 x its parameters' matmul FLOPs per token + attention's 12 x H x hd x S
  per block, torchtitan's convention as in models/llama.py) over the device's achievable matmul rate.
- memory-bound ops: what a block's forward saves (parallel/plan.py's activation terms) is written, read back in
  backward, and gradients of the same size written and read: four times those bytes over the memory bandwidth.
- recompute: full AC runs every block's forward again (a third of its FLOPs); selective AC recomputes only the
  cheap ops, counted as the bytes they write (parallel/plan.py's recompute term) over the memory bandwidth.
- communication: bytes every rank moves per step, collective by collective, over the bus bandwidth of the
  link its group spans (a group within one node at the intra-node rate, else the inter-node rate); ring
  algorithms: an all-gather or reduce-scatter of S bytes over n ranks moves (n-1)/n x S, an all-reduce twice that.
  Data-parallel collectives overlap compute (FSDP and ZeRO-3 prefetch, DDP's and ZeRO's bucketed reduce in
  backward): what exceeds the compute, and at least one unit's share, is exposed. Tensor-parallel collectives
  sit on the critical path and are counted whole. ZeRO-1/2's parameter all-gather after the step is exposed.
- bubble: (pp - 1) microbatches' worth of the stage's work for gpipe and 1F1B, divided by the stages per rank for
  interleaved 1F1B, and a third of that for the zero-bubble V schedules (an approximation of their papers).
- optimizer: the bytes the update reads and writes (parameters, gradients, states, masters) over the memory
  bandwidth; offloaded, at the host's rate, plus gradients down and parameters up over PCIe.
- per-op overhead: the dispatch cost of the ops of a block's forward and backward, per microbatch (what a CPU
  run of a tiny model spends most of its time on; about zero on a GPU, where launches overlap).

Pure arithmetic like parallel/plan.py; `calibrate_cpu` measures the rates of this machine.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field

from models.args import model_args_of
from parallel.layout import (
    V_SHAPED,
    ZERO_STAGES,
    ParallelDims,
    bucket_elements,
    data_strategy,
    microbatches,
    n_stages,
    reshards_after_forward,
    split_blocks,
    stage_ids,
    stages_per_rank,
)
from parallel.memory_terms import (
    SELECTIVE_EVERY_SECOND,
    _model_states,
    _params_of_rank,
    _precision_mode,
    ac_mode,
    block_activation_bytes,
    block_recompute_bytes,
    blocks_by_ac,
    expert_exchange_bytes,
    offloaded_per_token,
)

DDP_BUCKET_BYTES = 25 * 2**20  # torch DDP's default bucket_cap_mb
# aten ops one block runs per microbatch, forward and backward (231 counted with a TorchDispatchMode on
# llama_debug in fp32, eager); the loss, embedding and output projection about 44 more per microbatch
OPS_PER_BLOCK, OPS_OUTSIDE_BLOCKS = 231, 44


@dataclass
class Hardware:
    """Rates of one device and its links; `source` says where each came from (measured or assumed)."""

    name: str
    matmul_flops: float  # achievable FLOP/s per device in the compute dtype
    intra_bw: float  # bus bandwidth (bytes/s) of a collective within a node
    inter_bw: float  # bus bandwidth of a collective across nodes, per rank
    mem_bw: float  # device memory bandwidth (the optimizer step, recompute of cheap ops)
    host_bw: float  # device <-> host copies (offload)
    host_mem_bw: float  # host memory bandwidth per rank (an offloaded optimizer step)
    op_overhead_s: float = 0.0  # per torch op dispatched
    latency_s: float = 0.0  # per collective (or send), whatever its size
    device: str = "cuda"  # what the rates are of: "cuda" or "cpu" (parallel/plan.py's device)
    overlap: float = 1.0  # how much of the compute data-parallel communication can hide under (0: none)
    peak_flops: float = 0.0  # the datasheet's peak that MFU is against (0: none known, MFU against matmul_flops)
    source: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


# Vendor datasheet peaks (dense, no sparsity) and the fraction assumed achievable: inputs, not measurements.
# H100/H200 SXM: 989 TFLOP/s bf16, 67 fp32 (no TF32); NVLink 4 450 GB/s per direction; one 400 Gb/s NIC per GPU;
# PCIe Gen5 x16 64 GB/s; HBM 3.35 TB/s (H100 80 GB) and 4.8 TB/s (H200 141 GB).
# ACHIEVABLE: the fraction of the datasheet's matmul peak the model assumes a GPU reaches, where no run measured it.
# An assumption, not a measurement: no GPU run of shardwise has measured it yet (docs/benchmarks/ holds none), and
# every ranking made with it says so; `launch/plan.py achievable=F` sets it, and on a GPU machine the matmul rate is
# measured instead (calibrate_cuda).
ACHIEVABLE = 0.6
LINK_EFFICIENCY = 0.8  # of a link's datasheet bandwidth that a collective's bus bandwidth reaches


def gpu_hardware(
    capacity_gib: float | None, precision: str, *, achievable: float = ACHIEVABLE, **given: float
) -> Hardware:
    """The assumed rates of an H100 (<= 100 GiB) or H200, each overridable (TFLOP/s and GB/s given); the matmul
    rate is `achievable` of the datasheet peak."""
    h200 = capacity_gib is not None and capacity_gib > 100
    peak = 989e12 if precision in ("bf16", "fp16", "float8") else 67e12
    hw = Hardware(
        name="H200" if h200 else "H100",
        matmul_flops=achievable * peak,
        peak_flops=peak,
        intra_bw=LINK_EFFICIENCY * 450e9,
        inter_bw=LINK_EFFICIENCY * 50e9,
        mem_bw=LINK_EFFICIENCY * (4.8e12 if h200 else 3.35e12),
        host_bw=LINK_EFFICIENCY * 64e9,
        host_mem_bw=10e9,
        op_overhead_s=0.0,
        latency_s=30e-6,
    )
    hw.source = {
        k: "assumed (datasheet x efficiency; docs/compare.md)"
        for k in ("intra_bw", "inter_bw", "mem_bw", "host_bw", "host_mem_bw", "latency_s")
    }
    hw.source["matmul_flops"] = (
        f"assumed: {achievable:.0%} of the {peak / 1e12:.0f} TFLOP/s datasheet peak, no measured run (achievable=)"
    )
    return override(hw, **given)


OVERRIDES = {
    "tflops": ("matmul_flops", 1e12),
    "intra_gbps": ("intra_bw", 1e9),
    "inter_gbps": ("inter_bw", 1e9),
    "hbm_gbps": ("mem_bw", 1e9),
    "pcie_gbps": ("host_bw", 1e9),
}


def override(hw: Hardware, **given: float | None) -> Hardware:
    for key, value in given.items():
        if value is not None:
            attr, scale = OVERRIDES[key]
            setattr(hw, attr, float(value) * scale)
            hw.source[attr] = "given"
    return hw


# ------------------------------------------------------------------------------------------------
# Calibration on this machine


def _matmul_rate(m: int, k: int, n: int, threads: int, dtype: str = "float32") -> float:
    import torch

    keep = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(m, k, dtype=getattr(torch, dtype)), torch.randn(k, n, dtype=getattr(torch, dtype))
        for _ in range(2):
            a @ b
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.5:
            a @ b
            reps += 1
        return 2.0 * m * k * n * reps / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(keep)


def _op_overhead(threads: int) -> float:
    """Seconds per aten op of a tiny autograd graph run forward and backward: dispatch and autograd's
    bookkeeping, what a tiny model's step is mostly made of on a CPU."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    def graph():
        y = x
        for _ in range(20):
            y = torch.nn.functional.silu(y * 1.001)
        y.sum().backward()

    keep = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(64, requires_grad=True)
        with Count():
            graph()
        for _ in range(5):
            graph()
        t0, n = time.perf_counter(), 50
        for _ in range(n):
            graph()
        return (time.perf_counter() - t0) / n / Count.ops
    finally:
        torch.set_num_threads(keep)


def _copy_bandwidth() -> float:
    import torch

    src = torch.ones(32 * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t0, n = time.perf_counter(), 10
    for _ in range(n):
        dst.copy_(src)
    return 2 * src.numel() * 4 * n / (time.perf_counter() - t0)  # bytes read and written


def _gloo_worker(rank: int, world: int, port: int, nbytes: int) -> None:
    """One process of the measurement (run as its own interpreter by `_gloo_rates`); rank 0 prints the times."""
    import json
    import sys

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    timed = []
    for numel, n in ((nbytes // 4, 5), (16, 50)):  # the bandwidth, then the latency
        x = torch.ones(numel)
        for _ in range(3):
            dist.all_reduce(x)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(n):
            dist.all_reduce(x)
        timed.append((time.perf_counter() - t0) / n)
    dist.destroy_process_group()
    if rank == 0:
        sys.stdout.write(json.dumps(timed))


def _gloo_rates(world: int, nbytes: int = 8 * 2**20) -> tuple[float, float]:
    """All-reduce bus bandwidth (nccl-tests' convention) and a 64-byte all-reduce's time (the latency) of `world`
    gloo processes on this machine."""
    import json
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": repo}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"from parallel.timing import _gloo_worker; _gloo_worker({r}, {world}, {port}, {nbytes})",
            ],
            cwd=repo,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"the gloo bandwidth measurement failed: {outs[0][1][-2000:]}")
    big, small = json.loads(outs[0][0])
    return 2 * (world - 1) / world * nbytes / max(big - small, 1e-9), small


def calibrate_cpu(cfg, world_size: int, *, threads: int = 1) -> Hardware:
    """Measure this machine: a matmul of the model's shape, a tiny op's dispatch time, a copy's bandwidth, with
    `threads` threads per rank (launch/train.py's ranks run OMP_NUM_THREADS=1 under compare), shared as the ranks
    will share the cores; and the all-reduce bandwidth of `world_size` gloo processes."""

    args = model_args_of(cfg)
    tokens = int(cfg.training.micro_batch_size) * int(cfg.training.seq_len)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    share = min(1.0, cores / max(1, world_size * threads))
    dtype = "float32" if str(cfg.training.precision) == "fp32" else "bfloat16"
    flops = _matmul_rate(tokens, args.dim, args.ffn_hidden, threads, dtype) * share
    overhead = _op_overhead(threads) / share
    mem = _copy_bandwidth() * share
    bw, latency = _gloo_rates(world_size) if world_size > 1 else (float("inf"), 0.0)
    hw = Hardware(
        name=f"this CPU ({cores} cores, {world_size} ranks x {threads} thread)",
        matmul_flops=flops,
        intra_bw=bw,
        inter_bw=bw,
        mem_bw=mem,
        host_bw=mem,
        host_mem_bw=mem,
        op_overhead_s=overhead,
        latency_s=latency,
        overlap=0.0,
        device="cpu",
    )
    what = f"measured here, shared by {world_size} ranks on {cores} cores"
    hw.source = {
        "matmul_flops": f"{what}: a ({tokens} x {args.dim}) @ ({args.dim} x {args.ffn_hidden}) {dtype} matmul",
        "intra_bw": f"measured here: all-reduce of 8 MiB over {world_size} gloo processes",
        "latency_s": f"measured here: all-reduce of 64 bytes over {world_size} gloo processes",
        "inter_bw": "= intra_bw (one machine)",
        "mem_bw": f"{what}: a 32 MiB copy",
        "overlap": "0: the ranks' cores compute, and gloo's threads take turns with them",
        "host_bw": "= mem_bw",
        "host_mem_bw": "= mem_bw",
        "op_overhead_s": f"{what}: a 20-op autograd graph on 64 elements, forward and backward, per aten op",
    }
    return hw


def calibrate_cuda(cfg, capacity_gib: float | None) -> Hardware:
    """On a GPU: the matmul rate (the model's shape, its compute dtype) and the copy bandwidth measured on this
    device; the links stay assumed (one GPU cannot measure NVLink or the network)."""
    import torch

    precision = str(cfg.training.precision)
    hw = gpu_hardware(capacity_gib, precision)
    args = model_args_of(cfg)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    m = int(cfg.training.micro_batch_size) * int(cfg.training.seq_len)
    a = torch.randn(m, args.dim, device="cuda", dtype=dtype)
    b = torch.randn(args.dim, args.ffn_hidden, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    torch.cuda.synchronize()
    hw.matmul_flops = 2.0 * m * args.dim * args.ffn_hidden * 20 / (start.elapsed_time(end) / 1e3)
    src = torch.empty(2**28, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    hw.mem_bw = 2 * src.numel() * 10 / (start.elapsed_time(end) / 1e3)
    hw.name = torch.cuda.get_device_name()
    hw.source.update(
        matmul_flops=f"measured on this GPU: a ({m} x {args.dim}) @ ({args.dim} x {args.ffn_hidden}) {dtype} matmul",
        mem_bw="measured on this GPU: a 256 MiB copy",
    )
    return hw


# ------------------------------------------------------------------------------------------------
# The model


@dataclass
class StepTime:
    seconds: float
    parts: dict  # seconds by part: compute, recompute, dp_comm_exposed, tp_comm, pp_comm, bubble, optimizer, ...
    comm_bytes: dict  # bytes this rank moves per step, by collective
    flops: float  # this rank's model FLOPs per step (no recompute)
    hw_flops: float  # counting recompute
    tokens_per_sec_per_device: float

    @property
    def comm_total(self) -> int:
        return int(sum(self.comm_bytes.values()))

    def to_json(self) -> dict:
        return {
            "seconds": self.seconds,
            "parts": self.parts,
            "comm_bytes": self.comm_bytes,
            "comm_bytes_total": self.comm_total,
            "flops": self.flops,
            "hw_flops": self.hw_flops,
            "tokens_per_sec_per_device": self.tokens_per_sec_per_device,
        }


def _ring(n: int) -> float:
    """The share of the data a rank sends in a ring all-gather or reduce-scatter over n ranks."""
    return (n - 1) / n


def _link(size: int, stride: int, ranks_per_node: int, hw: Hardware) -> float:
    """The bus bandwidth of a group of `size` ranks `stride` apart (mesh order pp, dp_replicate, dp_shard, cp, tp)."""
    return hw.intra_bw if size * stride <= ranks_per_node else hw.inter_bw


def step_time(
    cfg, args, dims: ParallelDims, hw: Hardware, *, ranks_per_node: int = 8, device: str = "cuda"
) -> StepTime:
    p, t = cfg.parallel, cfg.training
    data, sched = data_strategy(cfg), str(p.pp_schedule)
    ac, sac = ac_mode(cfg), str(p.ac)  # (the formulas' name, and the setting's: none, selective or full)
    mode = _precision_mode(cfg)
    act_bytes = 2 if mode == "mixed" else 4  # the residual stream TP and PP move
    param_bytes = 4 if mode == "fp32" else 2  # what FSDP / ZeRO gather
    seq, mb = int(t.seq_len), int(t.micro_batch_size)
    n_micro = microbatches(int(t.global_batch_size), mb, dims.dp_size)
    # tokens of this rank's data-parallel share (context parallelism splits each sequence over cp ranks)
    tokens_rank = int(t.global_batch_size) * seq / dims.dp_size / dims.cp
    ranges = split_blocks(args.n_layers, n_stages(sched, dims.pp))
    attn = 12 * args.n_heads * args.head_dim * seq  # per token per block, fwd + bwd
    offload = str(p.offload) == "cpu" and device != "cpu"
    # the slowest pipeline rank sets the pace; every rank of a stage does the same work
    worst = None
    for pp_rank in range(dims.pp):
        params, blocks, first, last, n_parts = _params_of_rank(args, cfg, dims, pp_rank)
        # an MoE block's experts: a token computes top_k of the n_experts (on balance, under expert parallelism too:
        # each rank computes its experts' rows for its share of the tokens)
        share = args.moe.top_k / args.moe.n_experts if args.moe is not None else 1.0
        block_n = sum(
            math.prod(q.full) * share if ".feed_forward.experts." in q.name else math.prod(q.tp)
            for q in params
            if q.unit != "root"
        )
        head_n = sum(math.prod(q.tp) for q in params if q.unit == "root" and q.name != "tok_embeddings.weight")
        if last and args.tie_embeddings:
            head_n += args.vocab_size * args.dim // dims.tp
        flops = tokens_rank * (6 * (block_n + head_n) + len(blocks) * attn / dims.tp)
        parts = {"compute": flops / hw.matmul_flops}
        hw_flops = flops
        # the memory-bound ops (norms, RoPE, SwiGLU's products, casts, the residual adds): what a block's forward
        # saves is written once and read again in backward, whose gradients of the same size are written and read
        saved = block_activation_bytes(args, ac="none", mode=mode, tp=dims.tp, device=device)
        parts["memory_bound_ops"] = 4 * saved * tokens_rank * len(blocks) / hw.mem_bw
        recomputed, _ = block_recompute_bytes(args, ac=ac, mode=mode, tp=dims.tp, device=device)
        if ac == "full":  # (parallel.ac_every=k: the checkpointed share of the blocks runs its forward again)
            share = blocks_by_ac(cfg, len(blocks)).get("full", 0) / len(blocks) if blocks else 0.0
            extra = share * tokens_rank * (2 * block_n + len(blocks) * attn / 3 / dims.tp)
            hw_flops += extra
            parts["recompute"] = extra / hw.matmul_flops
        elif sac == "selective":
            parts["recompute"] = recomputed * tokens_rank * len(blocks) / hw.mem_bw
            if ac == SELECTIVE_EVERY_SECOND:  # wk, wo and w3 run again in backward
                D, K, F = args.dim, args.kv_heads * args.head_dim, args.ffn_hidden
                extra = tokens_rank * 2 * (D * K + args.n_heads * args.head_dim * D + D * F) / dims.tp * len(blocks)
                hw_flops += extra
                parts["recompute"] += extra / hw.matmul_flops
        comm: dict[str, float] = {}
        comm_t: dict[str, float] = {}

        def add(what: str, nbytes: float, size: int, stride: int, calls: float) -> None:
            """`calls` collectives moving `nbytes` in all: each pays the link's latency, the bytes its bandwidth."""
            if size > 1 and nbytes:  # (called within this iteration only: the loop's dicts are the right ones)
                comm[what] = comm.get(what, 0.0) + nbytes  # noqa: B023
                comm_t[what] = (  # noqa: B023
                    comm_t.get(what, 0.0)  # noqa: B023
                    + calls * hw.latency_s
                    + nbytes / _link(size, stride, ranks_per_node, hw)
                )

        n_tp = sum(math.prod(q.tp) for q in params)  # this rank's parameters before FSDP / ZeRO's split
        ds, dr, tp = dims.dp_shard * dims.cp, dims.dp_replicate, dims.tp  # (FSDP shards over dp_shard x cp)
        dp = dims.dp_size
        if data == "ddp":
            add("DDP gradient all-reduce", 2 * _ring(dp) * 4 * n_tp, dp, tp, math.ceil(4 * n_tp / DDP_BUCKET_BYTES))
        elif data in ("fsdp", "hsdp"):
            gathers = n_micro * (2 if reshards_after_forward(cfg) else 1)  # forward, and again for backward
            # one reduce-scatter per microbatch, unless unsharded gradients accumulate (parallel/__init__.py)
            once = bool(p.accumulate_unsharded_grads) or (dims.pp > 1 and sched in V_SHAPED)
            reduces = 1 if once else n_micro
            units = len(blocks) + (2 if first or last else 1)  # a collective per FSDP unit
            add("FSDP parameter all-gather", gathers * _ring(ds) * param_bytes * n_tp, ds, tp, gathers * units)
            add("FSDP gradient reduce-scatter", reduces * _ring(ds) * 4 * n_tp, ds, tp, reduces * units)
            if dr > 1:
                add(
                    "HSDP gradient all-reduce across replicas",
                    reduces * 2 * _ring(dr) * 4 * n_tp / ds,
                    dr,
                    tp * ds,
                    reduces * units,
                )
        elif data in ZERO_STAGES:
            stage = ZERO_STAGES[data]
            reduces = 1 if stage == 1 else n_micro
            buckets = math.ceil(n_tp / bucket_elements(args.num_params()))
            add("ZeRO gradient reduce-scatter", reduces * _ring(dp) * param_bytes * n_tp, dp, tp, reduces * buckets)
            if stage == 3:  # DeepSpeed fetches each module's parameters: one all-gather per linear layer and pass
                add(
                    "ZeRO-3 parameter all-gather",
                    n_micro * 2 * _ring(dp) * param_bytes * n_tp,
                    dp,
                    tp,
                    n_micro * 2 * 7 * len(blocks),
                )
            else:
                add("ZeRO parameter all-gather after the step", _ring(dp) * param_bytes * n_tp, dp, tp, buckets)
        dp_time = sum(comm_t.values())
        if tp > 1:
            # sequence parallel: all-gather before and reduce-scatter after attention and the MLP, in forward and in
            # backward; full AC runs the forward's four again, selective the two reduce-scatters
            per = {"none": 8, "selective": 10, "full": 12}[sac]
            act = mb * seq * args.dim * act_bytes
            n_coll = per * len(blocks) + 2 * (first + last)
            add("TP activation collectives", n_micro * n_coll * _ring(tp) * act, tp, 1, n_micro * n_coll)
        if dims.cp > 1:
            # context parallelism: every block's keys and values reach every rank of the group in forward and again
            # in backward, whose fp32 gradients go back (all-gathers and a reduce-scatter, or as many ring sends)
            kv_local = mb * seq / dims.cp * 2 * args.kv_heads * args.head_dim / tp
            per_block = _ring(dims.cp) * dims.cp * kv_local * (2 * act_bytes + 4)
            calls = 3 if str(p.cp_rotate) == "allgather" else 3 * (dims.cp - 1)
            add("CP key/value exchange", n_micro * len(blocks) * per_block, dims.cp, tp, n_micro * len(blocks) * calls)
        if dims.ep > 1 and args.moe is not None:
            # expert parallelism: every MoE block's rows to their experts' ranks and back (a count exchange first),
            # in forward and in backward, under full AC the forward's again; the ep ranks are dp_shard's innermost
            n_moe = sum(args.is_moe(i) for i in blocks)
            calls = n_micro * n_moe * (3 if sac == "full" else 2) * 3
            add("EP token all-to-all", expert_exchange_bytes(cfg, args, dims), dims.ep, dims.cp * tp, calls)
        if dims.pp > 1:
            act = mb * seq * args.dim / tp * act_bytes
            sends = sum(1 for s in stage_ids(sched, pp_rank, dims.pp) if s != len(ranges) - 1)
            recvs = sum(1 for s in stage_ids(sched, pp_rank, dims.pp) if s != 0)
            comm["PP sends"] = n_micro * (sends + recvs) * act
            # the pp axis is the mesh's outermost: its neighbours are dp x cp x tp ranks apart
            comm_t["PP sends"] = n_micro * (sends + recvs) * hw.latency_s + comm["PP sends"] / _link(
                dims.pp, tp * dp * dims.cp, ranks_per_node, hw
            )
        busy = parts["compute"] + parts["memory_bound_ops"] + parts.get("recompute", 0.0)
        hide = busy * hw.overlap  # the compute a data-parallel collective can run under
        pieces = len(blocks) + 1  # at least one unit's (block's, bucket's) share is never hidden
        if data in ZERO_STAGES and ZERO_STAGES[data] < 3:
            after = comm_t.get("ZeRO parameter all-gather after the step", 0.0)
            hidden = dp_time - after
            exposed = max(hidden - hide * 2 / 3, hidden / pieces) + after
        elif data == "ddp":
            exposed = max(dp_time - hide * 2 / 3, dp_time / pieces)  # overlaps the backward only
        else:
            exposed = max(dp_time - hide, dp_time / pieces) if dp_time else 0.0
        parts["dp_comm_exposed"] = exposed
        parts["tp_comm"] = comm_t.get("TP activation collectives", 0.0)
        # the all-gathers stand between a block's projections and its attention; the ring's sends run under the
        # attention of the block before, all but one step's
        cp_t = comm_t.get("CP key/value exchange", 0.0)
        parts["cp_comm"] = cp_t if str(p.cp_rotate) == "allgather" else cp_t / max(dims.cp, 1)
        parts["pp_comm"] = comm_t.get("PP sends", 0.0)
        parts["ep_comm"] = comm_t.get("EP token all-to-all", 0.0)  # (between a block's router and its experts)
        if dims.pp > 1:
            per_micro = (busy + parts["tp_comm"]) / n_micro
            bubble_micro = (dims.pp - 1) / (stages_per_rank(sched) if sched != "gpipe" else 1)
            if sched in V_SHAPED:
                bubble_micro /= 3
            parts["bubble"] = bubble_micro * per_micro
        # the optimizer: every byte of parameters, gradients, states and masters read, and the updated ones written
        ms = _model_states(cfg, params, dims)
        touched = 2 * (ms["params"] + ms["optim"] + ms.get("master", 0)) + ms["grads"]
        if offload:
            parts["optimizer"] = touched / hw.host_mem_bw
            local = ms.get("master", ms["params"]) // 4 if data in ZERO_STAGES else ms["params"] // 4
            parts["host_transfers"] = local * (4 + param_bytes) / hw.host_bw
        else:
            parts["optimizer"] = touched / hw.mem_bw
        if device != "cpu" and (moved := offloaded_per_token(cfg, args, dims.tp, device=device)):
            # activation offloading: each block's saved storages down in forward and up in backward over PCIe, on a
            # side stream under the compute; the last block's come back unprefetched
            transfer = 2 * moved * tokens_rank * len(blocks) / hw.host_bw
            parts["activation_transfers"] = max(transfer - busy, transfer / max(2 * len(blocks), 1))
        if hw.op_overhead_s:
            recomputed_ops = {"none": 0.0, "selective": 0.3, "full": 0.4}[sac]  # the forward's share rerun
            parts["op_overhead"] = (
                hw.op_overhead_s
                * n_micro
                * (OPS_PER_BLOCK * (1 + recomputed_ops) * len(blocks) + OPS_OUTSIDE_BLOCKS * (first or last))
            )
        total = sum(parts.values())
        if worst is None or total > worst[0]:
            worst = (total, parts, comm, flops, hw_flops)
    total, parts, comm, flops, hw_flops = worst
    tps = int(t.global_batch_size) * seq / total / dims.world_size
    return StepTime(
        seconds=total, parts=parts, comm_bytes=comm, flops=flops, hw_flops=hw_flops, tokens_per_sec_per_device=tps
    )
