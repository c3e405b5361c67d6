"""Train from a recipe: `python launch/train.py recipe=llama_debug optim.lr=1e-3`, or under torchrun.

Parses and validates the whole config before any process group starts, so a bad setting ends in one
message naming every problem; `dry_run=true` prints the plan and exits without allocating the model.
"""

import os
import sys
import traceback

from parallel.mesh import env_world_size
from trainer.config import ConfigError, check, load_config, to_yaml


def _fail_fast() -> None:
    """Fail fast: a peer may be waiting inside a collective this rank will never join, so an orderly
    teardown (which starts with a barrier) would hang until the collective timeout. Report and leave at
    once; torchrun sees the failure and stops the other ranks (or restarts the group)."""
    traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def main(argv: list[str]) -> int:
    try:
        cfg = load_config(argv)
        plan = check(cfg, env_world_size())
    except ConfigError as e:
        if os.environ.get("RANK", "0") == "0":  # every rank found the same problems; one reports them
            print(f"shardwise: {e}", file=sys.stderr)
        return 2
    if cfg.dry_run:
        print(to_yaml(cfg), end="")
        print("---\n" + plan.describe())
        return 0
    from trainer.trainer import Trainer  # imported late: a dry run needs neither data nor a device

    from trainer.checkpoint import CheckpointError

    try:
        trainer = Trainer(cfg, plan)
    except CheckpointError as e:  # every rank checked the same files and refuses alike, before loading any
        if os.environ.get("RANK", "0") == "0":
            print(f"shardwise: {e}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)
    except BaseException:
        if env_world_size() == 1:
            raise
        _fail_fast()
    try:
        trainer.train()
    except BaseException:
        if env_world_size() == 1:
            trainer.close()
            raise
        _fail_fast()
    trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
