"""Checkpoints: one directory per step, trusted only once complete.

    run_dir/checkpoints/
        step-200/            model + optimizer shards (torch DCP, or DeepSpeed's own files under ZeRO)
            trainer-state.pt rank 0: LR schedule, loss scaler, data cursor, counters
            rng-rank-<r>.pt  every rank's RNG states
            train_state.json counters and layout, human-readable
            MANIFEST.json    size and xxh3-128 checksum of every file above, written once every rank finished writing
            COMPLETE         written by rank 0 after the manifest
        latest               "step-200", replaced atomically (temp file, fsync, rename) after COMPLETE

Loading starts from the newest complete `step-N` (a stale or missing `latest` is reported). Before anything
is loaded every file of it is checked against the manifest (the ranks share the hashing), and the model
shape and strategy against this run's. A damaged checkpoint (a file missing, short, or with other bytes)
is never loaded: with `checkpoint.on_damaged=fallback` the run resumes from the newest checkpoint that
verifies and the damaged one is moved aside to `step-N.damaged` (kept, never deleted); with `fail`, or when
none verifies, the run stops with the damage named. Incomplete directories (a crash during a save) are
skipped and named.

Native checkpoints are keyed by the parameters' canonical names (`layers.3.attention.wq.weight`), the same
in every layout, so DCP reshards them on load: any native strategy and world size loads any other's.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from models.args import model_args_of
from trainer.hf import init_from_problems, source_shapes
from trainer.integrity import (
    HASH,
    MANIFEST,
    CheckpointError,
    _gather,
    checkpoint_files,
    damage,
    hash_share,
    weights_checksum,
)
from trainer.state import state_module

# 2: optimizer state flattened by parameter name (pipeline ranks hold different groups); 3: + MANIFEST.json
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)  # version 2 has no checksums: loaded after the structural checks only
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
    return hashlib.sha256(repr(model_args_of(cfg)).encode()).hexdigest()[:16]


def complete_checkpoints(root: Path) -> tuple[list[Path], list[Path]]:
    """(complete step directories, incomplete ones), each sorted by step."""
    if not root.is_dir():
        return [], []
    dirs = sorted(
        (d for d in root.iterdir() if d.is_dir() and _STEP_DIR.match(d.name)),
        key=lambda d: int(_STEP_DIR.match(d.name).group(1)),
    )
    return [d for d in dirs if (d / "COMPLETE").is_file()], [d for d in dirs if not (d / "COMPLETE").is_file()]


def find_latest(root: Path) -> tuple[Path | None, list[Path]]:
    """The newest complete checkpoint and the incomplete ones that were skipped."""
    complete, partial = complete_checkpoints(root)
    return (complete[-1] if complete else None), partial


def pointer_note(root: Path) -> str | None:
    """What is wrong with the `latest` pointer, if anything (it is informational: loading trusts COMPLETE)."""
    complete, _ = complete_checkpoints(root)
    if not complete:
        return None
    pointer = root / "latest"
    if not pointer.is_file():
        return f"{pointer} is missing; using the newest complete checkpoint {complete[-1].name}"
    named = pointer.read_text().strip()
    if named != complete[-1].name:
        return (
            f"{pointer} names {named!r}, which is not the newest complete checkpoint ({complete[-1].name}); "
            f"using {complete[-1].name}"
        )
    return None


# ------------------------------------------------------------------------------------------------
# Checksums: every file of a checkpoint, hashed after all ranks wrote it, checked before anything loads


def checkpoint_root(cfg) -> Path:
    return Path(cfg.checkpoint.dir or Path(cfg.run_dir) / "checkpoints")


def refusal(path: Path, cfg, *, zero: bool) -> str | None:
    """Why this run must not resume from `path` even if its files are intact: another model shape (the
    fields named), another checkpoint format, or DeepSpeed vs native files. None: it may."""

    try:
        state = json.loads((path / "train_state.json").read_text())
    except (OSError, ValueError):
        return None  # unreadable: that is damage, reported as such
    if state.get("format_version") not in READABLE_VERSIONS:
        return (
            f"checkpoint {path}: format version {state.get('format_version')}, this shardwise reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    ours = asdict(model_args_of(cfg))
    theirs = state.get("model", {})
    differ = [
        f"model.{k}: {theirs.get(k)!r} in the checkpoint, {v!r} here"
        for k, v in ours.items()
        if k in theirs and theirs[k] != v
    ]
    if differ:
        return (
            f"checkpoint {path} was written for another model shape ({'; '.join(differ)}); refusing to load "
            f"it. Set those model.* keys to the checkpoint's values, or point checkpoint.dir elsewhere"
        )
    ours_ft, theirs_ft = finetune_record(cfg), state.get("finetune", {"method": "full"})
    if ours_ft != theirs_ft:
        return (
            f"checkpoint {path} holds {_describe(theirs_ft)}, this run trains {_describe(ours_ft)}; refusing to "
            "load it. Set the finetune.* keys (and the base: training.seed, checkpoint.init_from) to the "
            "checkpoint's, or point checkpoint.dir elsewhere"
        )
    saved_zero = str(state.get("strategy", "")).startswith("zero")
    if saved_zero != zero:
        return (
            f"checkpoint {path} was written by parallel.data={state.get('strategy')}, this run uses "
            f"{cfg.parallel.data}: DeepSpeed and native checkpoints differ in format. Convert it: "
            f"python launch/convert_checkpoint.py {path} --out model.safetensors, then start this run with "
            f"checkpoint.init_from=model.safetensors (weights only)"
        )
    return None


def finetune_record(cfg) -> dict:
    """What a checkpoint holds and on what (train_state.json's "finetune"): full training holds the whole model; an
    adapter run only the adapters and their optimizer state, so it names its frozen base (drawn from the seed, the
    only base adapters start from so far) and the adapters' settings: resuming on another base or with other
    adapters would silently train something else."""
    from models.adapters import spec_of

    spec = spec_of(cfg)
    if spec is None:
        return {"method": "full"}
    return {
        "method": spec.kind,
        "rank": spec.rank,
        "alpha": spec.alpha,
        "targets": list(spec.targets),
        "base": base_record(cfg),
    }


def base_record(cfg) -> dict:
    """The frozen base an adapter run trains on: drawn from training.seed, or the weights at checkpoint.init_from
    (its path and the xxh3-128 checksum of its weight files, so that a changed file is noticed)."""
    if not cfg.checkpoint.init_from:
        return {"source": "seed", "seed": int(cfg.training.seed)}
    path = Path(cfg.checkpoint.init_from)
    return {"source": "init_from", "path": str(path.resolve()), "checksum": weights_checksum(path.resolve())}


def _describe(record: dict) -> str:
    if record["method"] == "full":
        return "the whole model (full training)"
    base = record["base"]
    on = (
        f"the base drawn from training.seed={base.get('seed')}"
        if base["source"] == "seed"
        else f"the base {base['path']} (xxh3-128 {base['checksum'][:12]}...)"
    )
    return (
        f"{record['method']} adapters (rank {record['rank']}, alpha {record['alpha']}, on "
        f"{', '.join(record['targets'])}) on {on}"
    )


def _move_aside(path: Path) -> Path:
    """Rename a damaged checkpoint out of the step-N namespace (never deleted: it may hold what was lost)."""
    target, k = path.with_name(f"{path.name}.damaged"), 1
    while target.exists():
        k += 1
        target = path.with_name(f"{path.name}.damaged-{k}")
    os.replace(path, target)
    return target


def select_resume(root: Path, cfg, *, zero: bool, rank: int, group=None) -> tuple[Path | None, list[str], list[dict]]:
    """The checkpoint this run resumes from (collective), with notes for the log and events for the metrics.

    Newest complete first. A refusal (another model, format or strategy) stops the run; damage makes it try
    the next older one (`checkpoint.on_damaged=fallback`) or stop (`fail`). Damaged checkpoints newer than
    the one chosen are moved aside by rank 0 and named loudly. When none verifies, nothing is moved and the
    run stops: starting from scratch beside damaged checkpoints would look like lost work."""
    complete, partial = complete_checkpoints(root)
    notes = [f"skipping incomplete checkpoint {p} (no COMPLETE marker: its save did not finish)" for p in partial]
    events: list[dict] = []
    if (n := pointer_note(root)) is not None:
        notes.append(n)
        events.append({"event": "checkpoint_pointer", "note": n})
    if not complete:
        return None, notes, events
    why = refusal(complete[-1], cfg, zero=zero)
    if why is not None:
        raise CheckpointError(why)
    damaged: list[tuple[Path, list[str]]] = []
    chosen = None
    for path in reversed(complete):
        problems = damage(path, zero=zero, group=group)
        if not problems:
            chosen = path
            break
        damaged.append((path, problems))
        if str(cfg.checkpoint.on_damaged) == "fail":
            break
    if damaged and (chosen is None or str(cfg.checkpoint.on_damaged) == "fail"):
        listing = "; ".join(f"{p.name}: {', '.join(pr[:3])}{' ...' if len(pr) > 3 else ''}" for p, pr in damaged)
        hint = (
            "no complete checkpoint verifies"
            if chosen is None and str(cfg.checkpoint.on_damaged) != "fail"
            else "checkpoint.on_damaged=fail"
        )
        raise CheckpointError(
            f"checkpoint damaged, refusing to load it ({hint}): {listing}. Restore the files, or "
            f"move the directory away to resume from an older one"
            + ("" if hint != "checkpoint.on_damaged=fail" else " (checkpoint.on_damaged=fallback does that itself)")
        )
    why = refusal(chosen, cfg, zero=zero) if chosen != complete[-1] else None
    if why is not None:  # the fallback itself cannot be loaded: stop before moving anything
        raise CheckpointError(why)
    for path, problems in damaged:
        target = path.with_name(f"{path.name}.damaged")
        if rank == 0:
            target = _move_aside(path)
        msg = (
            f"WARNING: checkpoint {path.name} is DAMAGED ({', '.join(problems[:3])}); moved it aside to "
            f"{target.name} (kept, not deleted) and resuming from {chosen.name}"
        )
        notes.append(msg)
        events.append(
            {
                "event": "checkpoint_damaged",
                "checkpoint": path.name,
                "moved_to": target.name,
                "problems": problems,
                "resumed_from": chosen.name,
            }
        )
    if dist.is_initialized():
        dist.barrier(group=group)  # the renames are done before any rank looks again
    return chosen, notes, events


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
        self.adapters_only = finetune_record(cfg)["method"] != "full"

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
            par.engine.save_checkpoint(
                str(self.root), tag=path.name, save_latest=False, exclude_frozen_parameters=self.adapters_only
            )
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
        self._finalize(path, self.control)  # the manifest's gather on the gloo side group (CPU objects)
        _barrier()
        return path

    def _seal(self, path: Path, group=None) -> None:
        """Collective: hash every file of the checkpoint (the ranks share the files) into its manifest."""
        rank = dist.get_rank(group) if dist.is_initialized() else 0
        world = dist.get_world_size(group) if dist.is_initialized() else 1
        entries = {}
        for share in _gather(hash_share(path, checkpoint_files(path), rank, world), group):
            entries.update(share)
        if self.rank == 0:
            _write_atomic(path / MANIFEST, json.dumps({"algorithm": HASH, "files": entries}, indent=1))

    def _save_small_files(self, path: Path, step: int) -> None:
        torch.save(
            {
                "cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
            path / f"rng-rank-{self.rank}.pt",
        )
        if self.rank == 0:
            torch.save(self._trainer_state(), path / "trainer-state.pt")
            (path / "train_state.json").write_text(json.dumps(self._train_state(step), indent=2))

    def _finalize(self, path: Path, group=None) -> None:
        """Collective: the manifest, then (rank 0) COMPLETE, the `latest` pointer and pruning."""
        self._seal(path, group)
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
        self._finalize(path, self.control)
        _barrier(self.control)

    def _native_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        # flattened: every optimizer entry (state and param-group settings) is keyed by its parameter's name,
        # so ranks that hold different parameters (pipeline stages) never write the same key
        model_sd, optim_sd = get_state_dict(self.module, self._optimizers(), options=self._options())
        return {"model": model_sd, "optim": optim_sd}

    def _optimizers(self):
        """The optimizer, or under optim.in_backward its per-parameter ones (the same flattened keys)."""
        return getattr(self.t.optimizer, "optimizers", self.t.optimizer)

    def _options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        # adapters on a frozen base: the checkpoint holds the trainable parameters only (the base is rebuilt from
        # its source, which train_state.json names), and loading leaves the base as the build made it
        adapters = self.adapters_only
        return StateDictOptions(flatten_optimizer_state_dict=True, ignore_frozen_params=adapters, strict=not adapters)

    def _trainer_state(self) -> dict:
        t = self.t
        return {
            "scheduler": t.scheduler.state_dict(),
            "scaler": t.scaler.state_dict() if t.scaler else None,
            "data": t.train_loader.state_dict(),
            "step": t.step,
            "tokens_seen": t.tokens_seen,
            "skipped_steps": t.skipped_steps,
        }

    def _layout(self) -> dict:
        """This run's layout, as train_state.json records it (a per-rank file means the same thing only under
        the same one)."""
        d = self.t.plan.dims
        return {
            "dp_replicate": d.dp_replicate,
            "dp_shard": d.dp_shard,
            "tp": d.tp,
            "pp": d.pp,
            "cp": d.cp,
            "world_size": self.t.world.world_size,
        }

    def _train_state(self, step: int) -> dict:
        t = self.t
        return {
            "format_version": FORMAT_VERSION,
            "step": step,
            "tokens_seen": t.tokens_seen,
            "model": asdict(model_args_of(t.cfg)),
            "skipped_steps": t.skipped_steps,
            "samples_seen": t.train_loader.cursor,
            "data": t.train_loader.state_dict(),
            "config_hash": config_hash(t.cfg),
            "strategy": str(t.cfg.parallel.data),
            "finetune": finetune_record(t.cfg),
            "layout": self._layout(),
            "wandb_run_id": t.logger.wandb.run_id if t.logger.wandb else None,
        }

    def _prune(self) -> None:
        complete, _ = complete_checkpoints(self.root)
        for old in complete[: -self.keep]:
            if self.keep_every and int(_STEP_DIR.match(old.name).group(1)) % self.keep_every == 0:
                continue  # a milestone: kept forever
            # deletion never leaves the checkpoint root
            if old.resolve().parent == self.root.resolve() and _STEP_DIR.match(old.name):
                shutil.rmtree(old)

    # -- loading

    def load(self, path: Path) -> None:
        """Load a checkpoint that `select_resume` chose (and verified, every file, on every rank)."""
        par = self.t.par
        if getattr(par, "engine", None) is not None:
            loaded, _ = par.engine.load_checkpoint(
                str(self.root),
                tag=path.name,
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
                load_module_strict=not self.adapters_only,
            )
            if loaded is None:
                raise ValueError(f"DeepSpeed could not load {path}")
        else:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import set_state_dict

            sd = self._native_state()
            dcp.load(sd, checkpoint_id=str(path))
            set_state_dict(
                self.module,
                self._optimizers(),
                model_state_dict=sd["model"],
                optim_state_dict=sd["optim"],
                options=self._options(),
            )
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
        saved = json.loads((path / "train_state.json").read_text())
        # (checkpoints written before the counter was saved here have it in train_state.json)
        t.skipped_steps = ts.get("skipped_steps", saved.get("skipped_steps", 0))
        layout = {"cp": 1, **saved.get("layout", {})}  # (cp was not recorded before: those runs had cp 1)
        rng = path / f"rng-rank-{self.rank}.pt"
        if layout == self._layout() and rng.is_file():  # the same layout: this rank's streams, exactly
            r = torch.load(rng, weights_only=False)
            torch.set_rng_state(r["cpu"])
            if r["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(r["cuda"])
            self.rng_note = "random streams restored (the same layout)"
        else:  # rank r of another layout drew other numbers: this run's seeds stand
            changed = ", ".join(f"{k} {layout.get(k)} -> {v}" for k, v in self._layout().items() if layout.get(k) != v)
            self.rng_note = f"random streams from this run's seed (the layout changed: {changed})"


def config_problems(cfg) -> list[str]:
    """The checkpoint section's rules (trainer/validate.py::validate collects every subsystem's)."""
    problems: list[str] = []
    c = cfg.checkpoint
    if c.every < 0:
        problems.append(f"checkpoint.every={c.every} must be >= 0 (0: never)")
    if c.keep < 2:
        problems.append(
            f"checkpoint.keep={c.keep} must be >= 2 (the newest checkpoint may be the one a crash "
            f"interrupts; the one before it is the fallback)"
        )
    if c.keep_every < 0:
        problems.append(f"checkpoint.keep_every={c.keep_every} must be >= 0 (0: no milestones)")
    if c.init_from is not None and not Path(c.init_from).exists():
        problems.append(f"checkpoint.init_from={c.init_from}: no such file or directory")
    elif c.init_from is not None:
        try:
            source_args, shapes = source_shapes(Path(c.init_from))
            problems += init_from_problems(cfg, Path(c.init_from), source_args, shapes)
        except ValueError as e:
            problems.append(f"checkpoint.init_from={c.init_from}: {e}")
    return problems
