"""Process-group set-up and the facts about this process's place in the job.

Launchers (torchrun, SLURM + torchrun) describe the job in the environment: RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT. A plain `python launch/train.py` has none of them and runs as world 1.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelDims:
    """Parallel degrees; their product is the world size. Mesh order, outermost first:
    pp (slowest links are fine: one send per microbatch), dp_replicate, dp_shard, tp (innermost: the
    most communication, so neighbouring ranks, which on a GPU node share NVLink)."""

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1

    NAMES = ("pp", "dp_replicate", "dp_shard", "tp")

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp * self.pp

    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    def describe(self) -> str:
        return f"pp {self.pp} x dp_replicate {self.dp_replicate} x dp_shard {self.dp_shard} x tp {self.tp}"

    def build_meshes(self, device_type: str) -> dict:
        """Named sub-meshes of one (pp, dp_replicate, dp_shard, tp) DeviceMesh: each axis by its name,
        "hsdp" = (dp_replicate, dp_shard) for FSDP's 2-D mesh, and "dp" = the two flattened into one
        axis, over which the loader splits batches and losses are summed."""
        from torch.distributed.device_mesh import init_device_mesh

        shape = (self.pp, self.dp_replicate, self.dp_shard, self.tp)
        root = init_device_mesh(device_type, shape, mesh_dim_names=self.NAMES)
        hsdp = root[("dp_replicate", "dp_shard")]
        return {**{name: root[name] for name in self.NAMES}, "hsdp": hsdp, "dp": hsdp._flatten("dp")}


def resolve_dims(data: str, *, dp_replicate: int, dp_shard: int, tp: int, pp: int,
                 world_size: int) -> tuple[ParallelDims | None, list[str]]:
    """Turn the recipe's degrees (with -1 meaning "the rest") into ParallelDims, or explain why not."""
    problems = []
    for key, v in (("tp", tp), ("pp", pp)):
        if v < 1:
            problems.append(f"parallel.{key}={v} must be >= 1")
    if dp_replicate == 0 or dp_replicate < -1 or dp_shard == 0 or dp_shard < -1:
        problems.append(f"parallel.dp_replicate({dp_replicate}) and parallel.dp_shard({dp_shard}) must be >= 1 "
                        f"or -1 (the rest of the world)")
    if problems:
        return None, problems
    if data in ("none", "fsdp") and dp_replicate not in (1, -1):
        problems.append(f"parallel.dp_replicate={dp_replicate} replicates shards, which is parallel.data=hsdp; "
                        f"set parallel.data=hsdp or parallel.dp_replicate=1")
    if data in ("none", "ddp", "zero1", "zero2", "zero3") and dp_shard not in (1, -1):
        problems.append(f"parallel.dp_shard={dp_shard} shards parameters, which parallel.data={data} does not; "
                        f"set parallel.data=fsdp (or hsdp) or parallel.dp_shard=-1")
    if data == "hsdp" and dp_replicate == -1 and dp_shard == -1:
        problems.append("parallel.data=hsdp needs parallel.dp_replicate or parallel.dp_shard set (only one may be -1)")
    if problems:
        return None, problems

    fixed = tp * pp
    rest_of = lambda other: world_size // (fixed * other) if world_size % (fixed * other) == 0 else None  # noqa: E731
    if data == "none":
        rep, shard = 1, 1
    elif data in ("ddp", "zero1", "zero2", "zero3"):  # every rank outside tp/pp is a data-parallel rank
        rep, shard = rest_of(1), 1
        if rep is None:
            problems.append(f"WORLD_SIZE({world_size}) is not divisible by tp({tp}) * pp({pp}) = {fixed}")
        elif dp_replicate > 1 and dp_replicate != rep:
            problems.append(f"parallel.dp_replicate({dp_replicate}) != WORLD_SIZE({world_size}) / (tp({tp}) * "
                            f"pp({pp})) = {rep}; for ddp leave parallel.dp_replicate at 1 or -1")
    elif data == "fsdp":
        rep, shard = 1, (dp_shard if dp_shard > 0 else rest_of(1))
        if shard is None:
            problems.append(f"WORLD_SIZE({world_size}) is not divisible by tp({tp}) * pp({pp}) = {fixed}")
    else:  # hsdp
        rep, shard = dp_replicate, dp_shard
        if shard == -1:
            shard = rest_of(rep)
            if shard is None:
                problems.append(f"WORLD_SIZE({world_size}) is not divisible by dp_replicate({rep}) * tp({tp}) * "
                                f"pp({pp}) = {rep * fixed}")
        elif rep == -1:
            rep = rest_of(shard)
            if rep is None:
                problems.append(f"WORLD_SIZE({world_size}) is not divisible by dp_shard({shard}) * tp({tp}) * "
                                f"pp({pp}) = {shard * fixed}")
    if problems:
        return None, problems
    dims = ParallelDims(dp_replicate=rep, dp_shard=shard, tp=tp, pp=pp)
    if dims.world_size != world_size:
        problems.append(f"dp_replicate({rep}) * dp_shard({shard}) * tp({tp}) * pp({pp}) = {dims.world_size} "
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
    if data == "hsdp" and dims.dp_shard == 1:
        out.append(f"parallel.data=hsdp with dp_shard 1 shards nothing: {dims.dp_replicate} full replicas (DDP "
                   f"with FSDP's overheads); give it more ranks or set parallel.data=ddp")
    if data == "fsdp" and dims.dp_shard == 1:
        out.append("parallel.data=fsdp with dp_shard 1 shards nothing (every rank is used by tp/pp); "
                   "give it more ranks, or set parallel.data=none")
    if data in ("ddp", "zero1", "zero2", "zero3") and dims.dp_size == 1:
        out.append(f"parallel.data={data} with one data-parallel rank: nothing is replicated or partitioned")
    return out


def env_world_size() -> int:
    """The world size the launcher announced (1 without a launcher); read before any process group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("training.device=cuda but no CUDA device is visible; use training.device=cpu")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(requested_device: str, *, timeout_s: float = 600.0) -> World:
    """Start the default process group when launched with several ranks (nccl on GPU, gloo on CPU)."""
    world_size = env_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {}
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if attempt is not None and os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
            # Under torchrun, keep each restart's rendezvous keys apart: after `--max-restarts` brought the
            # workers back, gloo otherwise read the dead attempt's addresses from the agent's store and
            # failed to connect ("Connection refused", seen with torch 2.13).
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                                  is_master=False, timeout=timedelta(seconds=timeout_s))
            kwargs = dict(store=dist.PrefixStore(f"shardwise/attempt-{attempt}", store), rank=rank,
                          world_size=world_size)
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None, **kwargs)
    return World(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def destroy_distributed() -> None:
    """Tear the process groups down without tripping a peer.

    A gloo barrier can return on one rank while a peer is still receiving its last message; if the first
    rank then closes its sockets, the peer's gloo thread sees the connection drop and the process aborts
    ("terminate called without an active exception"). So after the barrier every rank also checks in
    through the rendezvous store (a separate connection) and waits until all have, before any closes.
    """
    if not dist.is_initialized():
        return
    dist.barrier()
    store = dist.distributed_c10d._get_default_store()
    key = f"shardwise/shutdown/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    store.add(key, 1)
    deadline = time.monotonic() + 60.0
    while store.add(key, 0) < dist.get_world_size() and time.monotonic() < deadline:
        time.sleep(0.005)
    dist.destroy_process_group()
