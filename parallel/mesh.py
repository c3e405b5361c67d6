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

from parallel.layout import ParallelDims

# (the default process group, what) -> build_meshes' and side_groups' answers. A process that builds
# Trainer after Trainer (the test workers and pools; a notebook) gets the same meshes for the same layout: new ones
# would be new gloo groups each time, whose threads stay for the process's life (torch's DTensor caches key meshes
# by their ranks, so groups under a mesh cannot be destroyed while the default group lives) and wake even when idle.
_MESHES: dict[tuple, object] = {}


def build_meshes(dims: ParallelDims, device_type: str) -> dict:
    """Named sub-meshes of one (pp, dp_replicate, dp_shard, cp, tp) DeviceMesh: each axis by its name, "dp" =
    (dp_replicate, dp_shard) flattened, over which the loader splits batches and losses are summed; "fsdp" =
    (dp_shard, cp) flattened, what FSDP shards over (context-parallel ranks hold different tokens of the same
    sequences, so their gradients are reduced like data parallelism's, as torchtitan does); "hsdp" =
    (dp_replicate, fsdp), FSDP's 2-D mesh. With expert parallelism dp_shard is (expert_shard, ep): "ep" the ranks
    one MoE block's experts are split over, "expert_shard" (and "expert_hsdp" with dp_replicate) what shards them."""
    return _once(("meshes", dims, device_type), lambda: _build_meshes(dims, device_type))


def side_groups() -> tuple:
    """Two gloo groups over every rank beside the training ones (trainer.Trainer: one for the background thread
    of async checkpoint writes, one for the main thread's votes), made once per default group, like the meshes."""
    return _once(("side",), lambda: (dist.new_group(backend="gloo"), dist.new_group(backend="gloo")))


def _once(what: tuple, make):
    """`make()` once per default process group and `what` (an earlier default group's entries: never again)."""
    key = (dist.group.WORLD, *what)
    if key not in _MESHES:
        for old in [k for k in _MESHES if k[0] is not key[0]]:
            del _MESHES[old]
        _MESHES[key] = make()
    return _MESHES[key]


def _build_meshes(dims: ParallelDims, device_type: str) -> dict:
    import warnings

    from torch.distributed.device_mesh import init_device_mesh

    # HSDP's mesh with cp or ep slices a flattened dim (dp_shard_cp, dp_shard) with a root one: torch 2.11-2.13 warn
    # that this "will be deprecated" and do it (FSDP needs the 2-D mesh to share the root of the TP / EP meshes)
    warnings.filterwarnings("ignore", message="Slicing a flattened dim from root mesh")

    if dims.ep == 1:
        shape = (dims.pp, dims.dp_replicate, dims.dp_shard, dims.cp, dims.tp)
        root = init_device_mesh(device_type, shape, mesh_dim_names=ParallelDims.NAMES)
        out = {name: root[name] for name in ParallelDims.NAMES}
    else:  # dp_shard split into (dp_shard / ep, ep), the expert ranks innermost (neighbours, as tp's are)
        names = ("pp", "dp_replicate", "expert_shard", "ep", "cp", "tp")
        shape = (dims.pp, dims.dp_replicate, dims.dp_shard // dims.ep, dims.ep, dims.cp, dims.tp)
        root = init_device_mesh(device_type, shape, mesh_dim_names=names)
        out = {name: root[name] for name in names}
        out["dp_shard"] = root[("expert_shard", "ep")]._flatten("dp_shard")
    dp = root[("dp_replicate", "dp_shard")]._flatten("dp")
    fsdp = root[("dp_shard", "cp")]._flatten("dp_shard_cp") if dims.cp > 1 else root["dp_shard"]
    hsdp = root[("dp_replicate", "dp_shard_cp")] if dims.cp > 1 else root[("dp_replicate", "dp_shard")]
    out.update(hsdp=hsdp, dp=dp, fsdp=fsdp)
    if dims.ep > 1:  # what shards the experts: the dp_shard ranks that hold the same experts (with HSDP, replicated)
        out["expert_hsdp"] = root[("dp_replicate", "expert_shard")]
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


def needs_process_group(data: str) -> bool:
    """FSDP and DeepSpeed work through a process group and a mesh even on one rank (init_distributed starts a
    one-rank group for them when the run is one plain process)."""
    return data in ("fsdp", "hsdp") or data.startswith("zero")


def init_distributed(requested_device: str, *, timeout_s: float = 600.0, one_rank_group: bool = False) -> World:
    """Start the default process group when launched with several ranks (nccl and gloo on GPU, gloo on CPU).
    `one_rank_group`: a strategy that works through a process group (FSDP, DeepSpeed) gets one of a single rank
    when the run is one plain process (`python launch/train.py`, no torchrun), on an in-process store."""
    world_size = env_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # on a GPU every group gets gloo beside NCCL: tensors that live on the host (FSDP's offloaded gradient
    # shards in the norm's all-reduce, an offloaded optimizer's statistics) take gloo, device tensors NCCL
    backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
    if world_size == 1 and one_rank_group and not dist.is_initialized():
        kwargs = {} if os.environ.get("MASTER_ADDR") else dict(store=dist.HashStore(), rank=0, world_size=1)
        for key in ("RANK", "LOCAL_RANK"):  # what torchrun would have set (DeepSpeed reads them)
            os.environ.setdefault(key, "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group(
            backend=backend,
            timeout=timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
            **kwargs,
        )
    if world_size > 1 and not dist.is_initialized():
        kwargs = {}
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if attempt is not None and os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
            # Under torchrun, keep each restart's rendezvous keys apart: after `--max-restarts` brought the
            # workers back, gloo otherwise read the dead attempt's addresses from the agent's store and
            # failed to connect ("Connection refused", seen with torch 2.13).
            store = dist.TCPStore(
                os.environ["MASTER_ADDR"],
                int(os.environ["MASTER_PORT"]),
                world_size,
                is_master=False,
                timeout=timedelta(seconds=timeout_s),
            )
            kwargs = dict(
                store=dist.PrefixStore(f"shardwise/attempt-{attempt}", store), rank=rank, world_size=world_size
            )
        dist.init_process_group(
            backend=backend,
            timeout=timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
            **kwargs,
        )
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
    _MESHES.clear()  # (the holders of groups go before the groups: Trainer.close then collects them)
    dist.destroy_process_group()
