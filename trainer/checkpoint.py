"""Checkpoints: one directory per step, trusted only once complete.

    run_dir/checkpoints/
        step-200/            model + optimizer shards (torch DCP, or DeepSpeed's own files under ZeRO)
            trainer-state.pt rank 0: LR schedule, loss scaler, data cursor, counters
            rng-rank-<r>.pt  every rank's RNG states
            train_state.json counters and layout, human-readable
            COMPLETE         written by rank 0 after every rank finished writing
        latest               "step-200", replaced atomically (temp file, fsync, rename) after COMPLETE

Loading reads `latest` if it names a complete checkpoint, otherwise the newest complete `step-N`;
incomplete directories (a crash during a save) are skipped and named.
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

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


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


class Checkpointer:
    def __init__(self, trainer):
        self.t = trainer
        cfg = trainer.cfg
        self.root = Path(cfg.checkpoint.dir or Path(cfg.run_dir) / "checkpoints")
        self.every = cfg.checkpoint.every
        self.keep = cfg.checkpoint.keep
        self.rank = trainer.world.rank

    # -- saving

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int) -> Path:
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
        else:
            import torch.distributed.checkpoint as dcp

            dcp.save(self._native_state(), checkpoint_id=str(path))
        torch.save({"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                   path / f"rng-rank-{self.rank}.pt")
        if self.rank == 0:
            torch.save(self._trainer_state(), path / "trainer-state.pt")
            (path / "train_state.json").write_text(json.dumps(self._train_state(step), indent=2))
        _barrier()  # every rank has finished writing
        if self.rank == 0:
            _write_atomic(path / "COMPLETE", "")
            _write_atomic(self.root / "latest", path.name)  # only ever names a complete checkpoint
            self._prune()
        _barrier()
        return path

    def _native_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.t.par.parts[0], self.t.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def _trainer_state(self) -> dict:
        t = self.t
        return {"scheduler": t.scheduler.state_dict(), "scaler": t.scaler.state_dict() if t.scaler else None,
                "data": t.train_loader.state_dict(), "step": t.step, "tokens_seen": t.tokens_seen}

    def _train_state(self, step: int) -> dict:
        t = self.t
        d = t.plan.dims
        return {"format_version": FORMAT_VERSION, "step": step, "tokens_seen": t.tokens_seen,
                "samples_seen": t.train_loader.cursor, "data": t.train_loader.state_dict(),
                "config_hash": config_hash(t.cfg), "strategy": str(t.cfg.parallel.data),
                "layout": {"dp_replicate": d.dp_replicate, "dp_shard": d.dp_shard, "tp": d.tp, "pp": d.pp,
                           "world_size": t.world.world_size},
                "wandb_run_id": t.logger.wandb.run_id if t.logger.wandb else None}

    def _prune(self) -> None:
        complete, _ = complete_checkpoints(self.root)
        for old in complete[:-self.keep] if self.keep > 0 else []:
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
        state = json.loads((path / "train_state.json").read_text())
        if state["config_hash"] != config_hash(self.t.cfg):
            raise ValueError(f"checkpoint {path} was written for another model shape (config hash "
                             f"{state['config_hash']} != {config_hash(self.t.cfg)}); refusing to load it")
        par = self.t.par
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
            set_state_dict(par.parts[0], self.t.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
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
