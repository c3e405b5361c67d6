"""Several training commands of one rank count in one launch: `torchrun --nproc_per_node=N train_pool.py SPEC.json`.

SPEC.json lists the argument lists of `launch/train.py` lines; each runs as the entry point runs it (parse,
validate, a Trainer, train, close) over one process group kept for the next, with dynamo's caches reset between
them, so each command pays no process start, no import and no rendezvous of its own. The entry point itself is
started for real elsewhere (tests/unit/test_entrypoint.py, the DeepSpeed and SLURM lines of the docs).
"""

import gc
import json
import sys
from pathlib import Path

import torch

from parallel.mesh import env_world_size
from trainer.config import load_config
from trainer.trainer import Trainer
from trainer.validate import check

if __name__ == "__main__":
    gc.freeze()  # the imports live as long as the process: each Trainer.close collects its own garbage only
    jobs = json.loads(Path(sys.argv[1]).read_text())
    for i, argv in enumerate(jobs):
        torch._dynamo.reset()  # a compiled recipe leaves nothing cached for the next one
        cfg = load_config(argv)
        trainer = Trainer(cfg, check(cfg, env_world_size()))
        trainer.train()
        trainer.close(keep_process_group=i < len(jobs) - 1)
