"""Count the collectives of one Adafactor step (torch's CommDebugMode) and save them on rank 0.

torchrun --nproc_per_node=N tests/distributed/adafactor_comm_worker.py OUT.json recipe=... overrides...
"""

import json
import sys

import torch.distributed as dist
from torch.distributed.tensor.debug import CommDebugMode

from parallel.mesh import env_world_size
from trainer.config import load_config
from trainer.trainer import Trainer
from trainer.validate import check


def main(out: str, argv: list[str]) -> None:
    cfg = load_config(argv)
    trainer = Trainer(cfg, check(cfg, env_world_size()))
    batch, _ = trainer.train_loader.next_batch()
    trainer.forward_backward(batch)
    n_params = sum(1 for part in trainer.par.parts for _ in part.parameters())
    with CommDebugMode() as comm:
        trainer.optimizer.step()
    counts = {str(k): v for k, v in comm.get_comm_counts().items()}
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"counts": counts, "total": comm.get_total_counts(), "params": n_params}, f)
    trainer.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
