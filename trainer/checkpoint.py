"""Checkpoints: one directory per step, trusted only once complete.

    run_dir/checkpoints/
        step-200/            model + optimizer shards (torch DCP, or DeepSpeed's own files under ZeRO)
            trainer-state.pt rank 0: LR schedule, loss scaler, data cursor, counters
            rng-rank-<r>.pt  every rank's RNG states
            train_state.json counters and layout, human-readable
            COMPLETE         written by rank 0 after every rank finished writing
        latest               "step-200", replaced atomically (temp file, fsync, rename) after COMPLETE

Loading reads `latest` if it names a complete checkpoint, otherwise the newest complete `step-N`;
incomplete directories (a crash during a save) are skipped and named. Before anything is loaded every
rank checks the chosen checkpoint (readable metadata, every shard file present and long enough, the same
model shape), so a damaged checkpoint is refused whole, never loaded half-way.

Native checkpoints are keyed by the parameters' canonical names (`layers.3.attention.wq.weight`), the same
in every layout, so DCP reshards them on load: any native strategy and world size loads any other's.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

FORMAT_VERSION = 2  # 2: optimizer state flattened by parameter name (pipeline ranks hold different groups)
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _barrier(group=None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def config_hash(cfg) -> str:
    """A hash of what makes checkpoints compatible: the model's shape."""
    from trainer.config import model_args_of

    return hashlib.sha256(repr(model_args_of(cfg)).encode()).hexdigest()[:16]


def complete_checkpoints(root: Path) -> tuple[list[Path], list[Path]]:
    """(complete step directories, incomplete ones), each sorted by step."""
    if not root.is_dir():
        return [], []
    dirs = sorted((d for d in root.iterdir() if d.is_dir() and _STEP_DIR.match(d.name)),
                  key=lambda d: int(_STEP_DIR.match(d.name).group(1)))
    return [d for d in dirs if (d / "COMPLETE").is_file()], [d for d in dirs if not (d / "COMPLETE").is_file()]


def find_latest(root: Path) -> tuple[Path | None, list[Path]]:
    """The checkpoint to resume from and the incomplete ones that were skipped."""
    complete, partial = complete_checkpoints(root)
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if complete and named == complete[-1]:
            return named, partial
    return (complete[-1] if complete else None), partial


class CheckpointError(ValueError):
    pass


def checkpoint_root(cfg) -> Path:
    return Path(cfg.checkpoint.dir or Path(cfg.run_dir) / "checkpoints")


def verify_native(path: Path) -> None:
    """Refuse a DCP checkpoint whose metadata is unreadable or whose shard files are missing or short."""
    from torch.distributed.checkpoint import FileSystemReader

    if not (path / ".metadata").is_file():
        raise CheckpointError(f"checkpoint {path}: no .metadata file; it is not a complete DCP checkpoint")
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # a truncated pickle raises EOFError / UnpicklingError
        raise CheckpointError(f"checkpoint {path}: .metadata is truncated or corrupt ({type(e).__name__}: {e}); "
                              f"resume from an older step-N (remove this directory) or restore it") from None
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path}: shard {name} is missing; refusing to load a partial "
                                  f"checkpoint (resume from an older step-N or restore the file)")
        if f.stat().st_size < size:
            raise CheckpointError(f"checkpoint {path}: shard {name} is truncated ({f.stat().st_size} of {size} "
                                  f"bytes); refusing to load it")


def verify_deepspeed(path: Path, state: dict) -> None:
    world = state.get("layout", {}).get("world_size", 1)
    optim = sorted(path.glob("*optim_states.pt"))
    model = sorted(path.glob("*model_states.pt"))
    if not model or len(optim) != world:
        raise CheckpointError(f"checkpoint {path}: expected DeepSpeed model states and {world} optimizer "
                              f"partitions, found {len(model)} and {len(optim)}; refusing to load it")


def state_module(parts: list[nn.Module]) -> nn.Module:
    """One module whose parameter names are the whole model's, over this rank's model parts.

    A pipeline rank holds one or more stages, each a pruned Transformer keeping the full model's names;
    gathering their children under one parent gives DCP the same keys as any other layout, so pipeline
    checkpoints reshard like all others. One part is returned as it is.
    """
    if len(parts) == 1:
        return parts[0]
    merged = nn.Module()
    layers = nn.ModuleDict()
    for part in parts:
        for name, child in part.named_children():
            if name == "layers":
                for k, block in child.items():
                    layers[k] = block
            elif child is not None:
                merged.add_module(name, child)
    merged.add_module("layers", layers)
    return merged


class Checkpointer:
    def __init__(self, trainer, group=None, control_group=None):
        self.t = trainer
        cfg = trainer.cfg
        self.root = checkpoint_root(cfg)
        self.every = cfg.checkpoint.every
        self.keep = cfg.checkpoint.keep
        self.keep_every = cfg.checkpoint.keep_every
        self.async_save = cfg.checkpoint.async_save
        self.rank = trainer.world.rank
        self.group = group  # a gloo group of its own: async saves must not collide with training collectives
        self.control = control_group  # the main thread's checks while a background save uses `group`
        self.pending = None  # (future, path) of an async save not yet marked complete
        self.module = state_module(trainer.par.parts)

    # -- saving

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, *, sync: bool = True) -> Path:
        """Save this step. With checkpoint.async_save and not `sync`, the state is staged (copied) now and
        written in the background; the checkpoint is marked complete by `poll` once every rank's write
        finished. A second save waits for the first."""
        self.wait()
        path = self.root / f"step-{step}"
        if self.rank == 0:
            if path.exists():  # a leftover of a crashed save at this step: never trusted, replace it
                shutil.rmtree(path)
            path.mkdir(parents=True)
        _barrier()
        par = self.t.par
        if getattr(par, "engine", None) is not None:
            # DeepSpeed writes its partitioned model and optimizer states into root/step-N itself
            par.engine.save_checkpoint(str(self.root), tag=path.name, save_latest=False)
        elif self.async_save and not sync:
            import torch.distributed.checkpoint as dcp

            # staging copies every tensor to host memory before this returns, so the next optimizer step
            # may update the parameters in place while the copy is written
            future = dcp.async_save(self._native_state(), checkpoint_id=str(path), process_group=self.group)
        else:
            import torch.distributed.checkpoint as dcp

            dcp.save(self._native_state(), checkpoint_id=str(path))
        self._save_small_files(path, step)
        if self.async_save and not sync and getattr(par, "engine", None) is None:
            self.pending = (future, path)
            return path
        self.t.faults.maybe_kill_in_save(step)
        _barrier()  # every rank has finished writing
        self._finalize(path)
        _barrier()
        return path

    def _save_small_files(self, path: Path, step: int) -> None:
        torch.save({"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                   path / f"rng-rank-{self.rank}.pt")
        if self.rank == 0:
            torch.save(self._trainer_state(), path / "trainer-state.pt")
            (path / "train_state.json").write_text(json.dumps(self._train_state(step), indent=2))

    def _finalize(self, path: Path) -> None:
        if self.rank == 0:
            _write_atomic(path / "COMPLETE", "")
            _write_atomic(self.root / "latest", path.name)  # only ever names a complete checkpoint
            self._prune()

    def poll(self) -> None:
        """Mark a finished async save complete (collective: every rank calls it at the same step)."""
        if self.pending is None:
            return
        done = torch.tensor([int(self.pending[0].done())], dtype=torch.int32)
        if dist.is_initialized():
            dist.all_reduce(done, op=dist.ReduceOp.MIN, group=self.control)
        if done.item():
            self.wait()

    def wait(self) -> None:
        """Block until a pending async save has been written everywhere, then mark it complete."""
        if self.pending is None:
            return
        future, path = self.pending
        self.pending = None
        future.result()  # re-raises a failed write
        step = int(_STEP_DIR.match(path.name).group(1))
        self.t.faults.maybe_kill_in_save(step)
        _barrier(self.control)
        self._finalize(path)
        _barrier(self.control)

    def _native_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        # flattened: every optimizer entry (state and param-group settings) is keyed by its parameter's name,
        # so ranks that hold different parameters (pipeline stages) never write the same key
        model_sd, optim_sd = get_state_dict(self.module, self.t.optimizer, options=self._options())
        return {"model": model_sd, "optim": optim_sd}

    @staticmethod
    def _options():
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(flatten_optimizer_state_dict=True)

    def _trainer_state(self) -> dict:
        t = self.t
        return {"scheduler": t.scheduler.state_dict(), "scaler": t.scaler.state_dict() if t.scaler else None,
                "data": t.train_loader.state_dict(), "step": t.step, "tokens_seen": t.tokens_seen}

    def _train_state(self, step: int) -> dict:
        t = self.t
        d = t.plan.dims
        from dataclasses import asdict

        from trainer.config import model_args_of

        return {"format_version": FORMAT_VERSION, "step": step, "tokens_seen": t.tokens_seen,
                "model": asdict(model_args_of(t.cfg)), "skipped_steps": t.skipped_steps,
                "samples_seen": t.train_loader.cursor, "data": t.train_loader.state_dict(),
                "config_hash": config_hash(t.cfg), "strategy": str(t.cfg.parallel.data),
                "layout": {"dp_replicate": d.dp_replicate, "dp_shard": d.dp_shard, "tp": d.tp, "pp": d.pp,
                           "world_size": t.world.world_size},
                "wandb_run_id": t.logger.wandb.run_id if t.logger.wandb else None}

    def _prune(self) -> None:
        complete, _ = complete_checkpoints(self.root)
        for old in complete[:-self.keep]:
            if self.keep_every and int(_STEP_DIR.match(old.name).group(1)) % self.keep_every == 0:
                continue  # a milestone: kept forever
            # deletion never leaves the checkpoint root
            if old.resolve().parent == self.root.resolve() and _STEP_DIR.match(old.name):
                shutil.rmtree(old)

    # -- loading

    def load_latest(self) -> Path | None:
        path, skipped = find_latest(self.root)
        if self.rank == 0:
            for p in skipped:
                self.t.logger.note(f"skipping incomplete checkpoint {p} (no COMPLETE marker: its save did not finish)")
        if path is not None:
            self.load(path)
        return path

    def load(self, path: Path) -> None:
        try:
            state = json.loads((path / "train_state.json").read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path}: train_state.json unreadable ({e}); refusing to load it") from None
        if state.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"checkpoint {path}: format version {state.get('format_version')}, this shardwise "
                                  f"reads {FORMAT_VERSION}")
        if state["config_hash"] != config_hash(self.t.cfg):
            from trainer.config import model_args_of

            raise CheckpointError(
                f"checkpoint {path} was written for another model shape (config hash {state['config_hash']} != "
                f"{config_hash(self.t.cfg)}; this run's model is {model_args_of(self.t.cfg)}); refusing to load it. "
                f"Point checkpoint.dir elsewhere, or set the model.* keys the checkpoint was trained with")
        par = self.t.par
        saved_zero = state.get("strategy", "").startswith("zero")
        if saved_zero != (getattr(par, "engine", None) is not None):
            raise CheckpointError(
                f"checkpoint {path} was written by parallel.data={state.get('strategy')}, this run uses "
                f"{self.t.cfg.parallel.data}: DeepSpeed and native checkpoints differ in format. Convert it: "
                f"python launch/convert_checkpoint.py {path} --out model.safetensors, then start this run with "
                f"checkpoint.init_from=model.safetensors (weights only)")
        if getattr(par, "engine", None) is not None:
            verify_deepspeed(path, state)
        else:
            verify_native(path)
        if getattr(par, "engine", None) is not None:
            loaded, _ = par.engine.load_checkpoint(str(self.root), tag=path.name, load_optimizer_states=True,
                                                   load_lr_scheduler_states=False)
            if loaded is None:
                raise ValueError(f"DeepSpeed could not load {path}")
        else:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import set_state_dict

            sd = self._native_state()
            dcp.load(sd, checkpoint_id=str(path))
            set_state_dict(self.module, self.t.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"],
                           options=self._options())
        ts = torch.load(path / "trainer-state.pt", weights_only=False)
        t = self.t
        t.scheduler.load_state_dict(ts["scheduler"])
        # the optimizer state carried the old run's lr; recompute it from this run's schedule (the same
        # value when the config is unchanged, the right one when e.g. training.steps was raised)
        t.scheduler.last_epoch -= 1
        t.scheduler.step()
        if t.scaler and ts["scaler"]:
            t.scaler.load_state_dict(ts["scaler"])
        t.train_loader.load_state_dict(ts["data"])
        t.step, t.tokens_seen = ts["step"], ts["tokens_seen"]
        rng = path / f"rng-rank-{self.rank}.pt"
        if rng.is_file():  # the same layout: restore this rank's streams exactly
            r = torch.load(rng, weights_only=False)
            torch.set_rng_state(r["cpu"])
            if r["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(r["cuda"])


def consolidated_state_dict(path: Path) -> dict[str, torch.Tensor]:
    import tempfile

    from models.llama import canonical_name

    if not (path / "COMPLETE").is_file():
        raise ValueError(f"{path} has no COMPLETE marker: its save did not finish; refusing to convert it")
    if list(path.glob("*zero_pp_rank_*")) or list(path.glob("mp_rank_*_model_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    else:
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(str(path), f"{tmp}/full.pt")
            sd = torch.load(f"{tmp}/full.pt", weights_only=False)["model"]
    # one tensor per name, fp32, contiguous, no shared storage (safetensors refuses aliases)
    return {canonical_name(k): v.detach().float().contiguous().clone() for k, v in sd.items()}
