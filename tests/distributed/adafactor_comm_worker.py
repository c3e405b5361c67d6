"""Count the collectives of one Adafactor step (torch's CommDebugMode) for each of several block counts.

    torchrun --nproc_per_node=N tests/distributed/adafactor_comm_worker.py OUT_DIR 2,4 recipe=... overrides...

Each block count is counted in turn in this launch (a Trainer each, one process group); rank 0 saves
OUT_DIR/result.pt: {block count: {"counts", "total", "params"}}. The test suite runs it inside the parity worker's
batched launches (tests/distributed/parity_worker.py --batch calls `main`).
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor.debug import CommDebugMode

from parallel.mesh import env_world_size
from trainer.config import load_config
from trainer.trainer import Trainer
from trainer.validate import check


def count(argv: list[str]) -> dict:
    cfg = load_config(argv)
    trainer = Trainer(cfg, check(cfg, env_world_size()))
    try:
        batch, _ = trainer.train_loader.next_batch()
        trainer.forward_backward(batch)
        n_params = sum(1 for part in trainer.par.parts for _ in part.parameters())
        with CommDebugMode() as comm:
            trainer.optimizer.step()
    finally:
        trainer.close(keep_process_group=True)
    counts = {str(k): v for k, v in comm.get_comm_counts().items()}
    return {"counts": counts, "total": comm.get_total_counts(), "params": n_params}


def main(out: str, layers: str, argv: list[str], *, last: bool = True) -> None:
    results = {int(n): count([*argv, f"model.n_layers={n}", f"run_dir={out}/layers-{n}"]) for n in layers.split(",")}
    if dist.get_rank() == 0:
        Path(out).mkdir(parents=True, exist_ok=True)
        torch.save(results, Path(out) / "result.pt")
    dist.barrier()
    if last:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
