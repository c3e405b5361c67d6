"""Measure one layout's per-rank memory by category for several AC modes and precisions, in one launch.

    torchrun --nproc_per_node=N tests/distributed/memory_worker.py OUT_DIR MODES recipe=... overrides...

The test suite batches layouts into the launches of tests/distributed/parity_worker.py --batch (one per rank count),
which calls `main` for each; the process group is started once for them all.

MODES is a comma-separated list of `ac/precision` (e.g. none/fp32,full/bf16). For each, the Trainer is built
(the process group is started once and reused), steps 1-2 run untracked and step 3 under
`parallel.memory.StepMemory`. Rank 0 saves OUT_DIR/result.pt: {mode: [breakdown of rank 0, rank 1, ...]}.
"""

import gc
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from parallel.memory import StepMemory
from parallel.mesh import env_world_size
from trainer.config import load_config
from trainer.trainer import Trainer
from trainer.validate import check


def measure(argv: list[str]) -> dict:
    cfg = load_config(argv)
    trainer = Trainer(cfg, check(cfg, env_world_size()))
    try:
        for _ in range(2):  # step 3 is the steady state: DDP rebuilds its buckets during step 2
            batch, _ = trainer.train_loader.next_batch()
            trainer.forward_backward(batch)
            trainer.optimizer_step()
        batch, _ = trainer.train_loader.next_batch()
        with StepMemory(trainer.par, trainer.optimizer) as tracked:
            trainer.forward_backward(batch)
            trainer.optimizer_step()
        mine = tracked.breakdown()
        ranks = [mine]
        if trainer.world.distributed:
            ranks = [None] * trainer.world.world_size
            dist.all_gather_object(ranks, mine)
    finally:
        trainer.close(keep_process_group=True)
    return ranks


def main(out: str, modes: str, argv: list[str], *, last: bool = True) -> None:
    results = {}
    for mode in modes.split(","):
        ac, precision = mode.split("/")
        run_dir = f"{out}/{ac}-{precision}"
        results[mode] = measure([*argv, f"parallel.ac={ac}", f"training.precision={precision}", f"run_dir={run_dir}"])
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save(results, Path(out) / "result.pt")
    if dist.is_initialized():
        dist.barrier()
        if last:
            dist.destroy_process_group()


if __name__ == "__main__":
    gc.freeze()  # the imports live as long as the process: each Trainer.close collects its own garbage only
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
