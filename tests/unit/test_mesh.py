"""parallel/mesh.py: one process that builds Trainer after Trainer (the test workers and pools, a notebook) gets the
same meshes and side groups for the same layout, so its gloo groups (and their threads) do not grow per Trainer."""

from __future__ import annotations

import torch.distributed as dist

from parallel.layout import ParallelDims
from parallel.mesh import build_meshes, side_groups


def _groups() -> int:
    return len(dist.distributed_c10d._world.pg_names)  # (torch's registry: a count, for this test only)


def _start() -> None:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def test_the_same_layout_reuses_its_meshes_until_the_default_group_changes():
    assert not dist.is_initialized()
    _start()
    try:
        one = ParallelDims(dp_shard=1)
        meshes, (save, side) = build_meshes(one, "cpu"), side_groups()
        made = _groups()
        assert build_meshes(one, "cpu") is meshes and side_groups() == (save, side) and save is not side
        assert _groups() == made  # a second Trainer makes no group (on one rank the meshes' dims use the default
        # group; the side groups are new gloo groups: without the cache, 2 more per Trainer)
        other = build_meshes(ParallelDims(dp_shard=1, cp=1, pp=1, tp=1, dp_replicate=1), "cpu")
        assert other is meshes  # (equal dims are the same layout)
        assert build_meshes(one, "meta") is not meshes  # another layout (here another device type): its own
    finally:
        dist.destroy_process_group()
    _start()
    try:
        assert build_meshes(one, "cpu") is not meshes  # a new default group: new meshes, never a dead group's
        assert side_groups()[0] is not save
    finally:
        dist.destroy_process_group()
