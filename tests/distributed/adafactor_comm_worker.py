"""Count the collectives of one Adafactor step (torch's CommDebugMode) and save them on rank 0.

torchrun --nproc_per_node=N tests/distributed/adafactor_comm_worker.py OUT.json recipe=... overrides...
torchrun --nproc_per_node=N tests/distributed/adafactor_comm_worker.py --layers 2,4 OUT.json recipe=... overrides...

With --layers, each block count is counted in turn in this launch (a Trainer each, one process group), written to
OUT's name with the count in front (2.json, 4.json next to OUT).
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist
from torch.distributed.tensor.debug import CommDebugMode

from parallel.mesh import env_world_size
from trainer.config import load_config
from trainer.trainer import Trainer
from trainer.validate import check


def main(out: str, argv: list[str], *, last: bool = True) -> None:
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
    trainer.close(keep_process_group=not last)


if __name__ == "__main__":
    if sys.argv[1] == "--layers":
        counts, out = sys.argv[2].split(","), Path(sys.argv[3])
        for i, layers in enumerate(counts):
            argv = [*sys.argv[4:], f"model.n_layers={layers}"]
            main(str(out.with_name(f"{layers}.json")), argv, last=i == len(counts) - 1)
    else:
        main(sys.argv[1], sys.argv[2:])
