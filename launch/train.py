"""Train from a recipe: `python launch/train.py recipe=llama_debug optim.lr=1e-3`, or under torchrun.

Parses and validates the whole config before any process group starts, so a bad setting ends in one
message naming every problem; `dry_run=true` prints the plan and exits without allocating the model.
`--help [section]` lists every key with its type, default and meaning.
"""

import gc
import json
import os
import sys
import time
import traceback

from parallel.mesh import env_world_size
from trainer.config import ConfigError, load_config, to_yaml
from trainer.faults import RefusedStart, watch_parent
from trainer.help import help_text, usage
from trainer.validate import check

_RANK = int(os.environ.get("RANK", "0"))


_OWN_PROCESS = __name__ == "__main__"  # (not when tests/pool_server.py or a test calls main in its own process)


def _refuse(message: str, code: int = 2) -> int:
    """One message for a run that must not start, from rank 0 only. Under torchrun it goes into the agent's
    error file, and the agent prints it (once) as the job's root cause; the other ranks leave a moment later,
    so that rank 0's failure is the first the agent observes."""
    if _RANK == 0:
        if not _write_error_file(f"shardwise: {message}"):
            print(f"shardwise: {message}", file=sys.stderr, flush=True)
    elif env_world_size() > 1:
        time.sleep(10.0)  # torchrun stops this rank as soon as rank 0 has failed; this is only the upper bound
    return code


def _write_error_file(message: str) -> bool:
    """torchrun's error file (TORCHELASTIC_ERROR_FILE): the agent prints its message as the root cause."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with open(path, "w") as f:
            json.dump({"message": message, "timestamp": int(time.time())}, f)
    return bool(path)


def _fail_fast() -> None:
    """Fail fast: a peer may be waiting inside a collective this rank will never join, so an orderly
    teardown (which starts with a barrier) would hang until the collective timeout. Report and leave at
    once; torchrun sees the failure and stops the other ranks (or restarts the group)."""
    traceback.print_exc()
    exc = sys.exc_info()[1]
    _write_error_file(f"{type(exc).__name__}: {exc}")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def _leave(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # peers may hold process groups this rank will never tear down politely


def main(argv: list[str], *, keep_process_group: bool = False) -> int:
    """The entry point: 0 when the run ended, 2 when it was refused. `keep_process_group`: leave the default process
    group up for another run in this process (tests/pool_server.py runs many; a user's run ends with it)."""
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] in ("--help", "-h"):
        try:
            print(help_text(argv[1] if len(argv) > 1 else None))
        except ConfigError as e:
            print(f"shardwise: {e}", file=sys.stderr)
            return 2
        return 0
    if "TORCHELASTIC_RUN_ID" in os.environ:
        watch_parent()  # stop when the torchrun agent is gone (workers live in sessions of their own)
    try:
        cfg = load_config(argv)
        plan = check(cfg, env_world_size())
        if str(cfg.data.source) == "chat":  # tokenized once, before any process group: the data's own problems
            from models.args import model_args_of
            from trainer.chat import ready

            ready(cfg, model_args_of(cfg).vocab_size)
    except ConfigError as e:
        return _refuse(str(e))  # every rank found the same problems; one reports them
    if cfg.dry_run:
        print(to_yaml(cfg), end="")
        print("---\n" + plan.describe())
        return 0
    from trainer.trainer import Trainer  # imported late: a dry run needs neither data nor a device

    if _OWN_PROCESS:
        # what is imported now lives as long as the process: the collector need not walk it again (Trainer.close's
        # collection then takes milliseconds, not a quarter of a second; more where one process runs many)
        gc.freeze()

    try:
        trainer = Trainer(cfg, plan)
    except RefusedStart as e:  # every rank checked the same things and refuses alike, before loading any
        _leave(_refuse(str(e)))
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
    trainer.close(keep_process_group=keep_process_group)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
