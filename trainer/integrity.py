"""Checkpoint integrity: every file of a checkpoint hashed (xxh3-128) into MANIFEST.json once all ranks wrote it,
and checked against it before anything loads, the ranks sharing the hashing (trainer/checkpoint.py decides what to
do with a damaged one). Version-2 checkpoints, which have no manifest, get the structural checks only.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import torch.distributed as dist
import xxhash
from torch.distributed.checkpoint import FileSystemReader

from trainer.faults import RefusedStart

MANIFEST = "MANIFEST.json"


_HASH_CHUNK = 8 << 20


class CheckpointError(RefusedStart):
    pass


# xxh3-128: a non-cryptographic 128-bit hash at memory speed (~13 GB/s here, sha256 1.7 GB/s), which is what
# detecting damage needs (not forgery: a checkpoint is trusted code anyway, its .metadata is a pickle).
# Measured on 1 GiB (launch/bench_checkpoint.py, docs/checkpoints.md). Manifests name their algorithm.
HASH = "xxh3_128"


def file_digest(path: Path, algorithm: str = HASH) -> str:
    if algorithm == "xxh3_128":
        h = xxhash.xxh3_128()
    elif algorithm == "sha256":
        h = hashlib.sha256()
    else:
        raise ValueError(f"unknown checksum algorithm {algorithm!r}")
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def checkpoint_files(path: Path) -> list[str]:
    """Every file of a checkpoint directory (relative, sorted), except the manifest and the marker."""
    return sorted(
        str(f.relative_to(path)) for f in path.rglob("*") if f.is_file() and f.name not in (MANIFEST, "COMPLETE")
    )


def hash_share(path: Path, names: list[str], rank: int, world: int) -> dict[str, dict]:
    """This rank's share of the hashing: files rank, rank + world, ... of `names`."""
    return {n: {"size": (path / n).stat().st_size, "digest": file_digest(path / n)} for n in names[rank::world]}


def manifest_problems(path: Path, rank: int = 0, world: int = 1) -> list[str]:
    """This rank's share of the verification against MANIFEST.json (all of it on one process)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        entries, algorithm = manifest["files"], manifest["algorithm"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{MANIFEST} is missing or unreadable ({type(e).__name__})"]
    problems = []
    for name in sorted(entries)[rank::world]:
        f, want = path / name, entries[name]
        if not f.is_file():
            problems.append(f"{name} is missing")
        elif f.stat().st_size != want["size"]:
            problems.append(f"{name} is {f.stat().st_size} bytes, {want['size']} when saved")
        elif file_digest(f, algorithm) != want["digest"]:
            problems.append(f"{name} has other bytes than when saved ({algorithm} differs)")
    return problems


def _gather(obj, group=None) -> list:
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def damage(path: Path, *, zero: bool, group=None) -> list[str]:
    """Every way the files of `path` differ from what was saved (collective: the ranks share the work).
    Empty: every file is as it was written."""
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    local: list[str] = []
    try:
        state = json.loads((path / "train_state.json").read_text())
    except (OSError, ValueError) as e:
        state = None
        local.append(f"train_state.json is unreadable ({type(e).__name__})")
    if state is not None and state.get("format_version", 0) >= 3:
        local += manifest_problems(path, rank, world)
    elif rank == 0 and state is not None:  # version 2: no checksums; the structure is all there is to check
        try:
            verify_deepspeed(path, state) if zero else verify_native(path)
        except CheckpointError as e:
            local.append(str(e).split(": ", 1)[-1])
    problems = sorted({p for share in _gather(local, group) for p in share})
    return problems


def verify_native(path: Path) -> None:
    """Refuse a DCP checkpoint whose metadata is unreadable or whose shard files are missing or short."""
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"checkpoint {path}: no .metadata file; it is not a complete DCP checkpoint")
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # a truncated pickle raises EOFError / UnpicklingError
        raise CheckpointError(
            f"checkpoint {path}: .metadata is truncated or corrupt ({type(e).__name__}: {e}); "
            f"resume from an older step-N (remove this directory) or restore it"
        ) from None
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        f = path / name
        if not f.is_file():
            raise CheckpointError(
                f"checkpoint {path}: shard {name} is missing; refusing to load a partial "
                f"checkpoint (resume from an older step-N or restore the file)"
            )
        if f.stat().st_size < size:
            raise CheckpointError(
                f"checkpoint {path}: shard {name} is truncated ({f.stat().st_size} of {size} "
                f"bytes); refusing to load it"
            )


def verify_deepspeed(path: Path, state: dict) -> None:
    world = state.get("layout", {}).get("world_size", 1)
    optim = sorted(path.glob("*optim_states.pt"))
    model = sorted(path.glob("*model_states.pt"))
    if not model or len(optim) != world:
        raise CheckpointError(
            f"checkpoint {path}: expected DeepSpeed model states and {world} optimizer "
            f"partitions, found {len(model)} and {len(optim)}; refusing to load it"
        )


def weights_checksum(path: Path) -> str:
    """xxh3-128 over the weight files at `path` (a .safetensors file; an HF directory's *.safetensors and
    config.json; a step-N checkpoint's files), in name order: one hex string."""
    if path.is_file():
        files = [path]
    elif (path / "config.json").is_file():
        files = sorted([*path.glob("*.safetensors"), path / "config.json"])
    else:
        files = [path / f for f in checkpoint_files(path)]
    return _digest_of(tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


@functools.cache
def _digest_of(files: tuple[tuple[str, int, int], ...]) -> str:
    """(cached by name, size and modification time: a process asks for its base's checksum at each save)"""
    h = xxhash.xxh3_128()
    for name, _, _ in files:
        h.update(f"{Path(name).name}:{file_digest(Path(name))};".encode())
    return h.hexdigest()
