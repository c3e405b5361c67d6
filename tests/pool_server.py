"""One rank of a long-lived training pool (tests/pool.py starts it): runs `launch/train.py` jobs in this process.

    python tests/pool_server.py QUEUE_DIR                                   # one process
    python -m torch.distributed.run --nproc_per_node=N tests/pool_server.py QUEUE_DIR

Job K is QUEUE_DIR/K.json, {"argv": [...], "env": {...}}. Every rank runs it as the entry point would
(`launch/train.py`'s main, which parses, validates, builds a Trainer, trains and closes it), keeping the default
process group for the next job, and writes K.rank-R.out, K.rank-R.err and last K.rank-R.rc. Before each job the
process takes the job's environment (the caller's, as a subprocess would inherit it, with the variables torchrun
set for this rank; torch's thread count from its OMP_NUM_THREADS), and after it gets back its working directory,
signal handlers and warning filters; dynamo's caches are reset. The Trainer seeds torch's generator from the
recipe, the data its own generators, so nothing of an earlier job's random state reaches the next. A job that
fails or raises leaves the rank at once (the pool's state is unknown): tests/pool.py then stops the pool and runs
the job as a real launch, whose output the test sees.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import os
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)


def _entry_point():
    spec = importlib.util.spec_from_file_location("_shardwise_pool_train", REPO / "launch" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def serve(queue: Path) -> None:
    import torch

    rank = int(os.environ.get("RANK", "0"))
    start_env = json.loads((queue / "env.json").read_text())
    own = {k: v for k, v in os.environ.items() if start_env.get(k) != v}  # what torchrun set for this rank
    train = _entry_point()
    import trainer.trainer  # noqa: F401  (what each job imports, before the freeze)

    gc.freeze()  # the imports live as long as the process: each Trainer.close collects its own garbage only
    cwd = os.getcwd()
    parent = os.getppid()
    k = 0
    while True:
        job = queue / f"{k}.json"
        while not job.exists():
            if (queue / "STOP").exists() or os.getppid() != parent:  # stopped, or the agent is gone
                if torch.distributed.is_initialized():
                    torch.distributed.destroy_process_group()
                return
            time.sleep(0.05)  # (an idle rank: about 1% of a core)
        spec = json.loads(job.read_text())
        os.environ.clear()
        os.environ.update({**spec["env"], **own})
        if os.environ.get("OMP_NUM_THREADS", "").isdigit():  # (read once at start-up by torch: a process would)
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        handlers = {s: signal.getsignal(s) for s in SIGNALS}
        torch._dynamo.reset()
        with (
            open(queue / f"{k}.rank-{rank}.out", "w") as out,
            open(queue / f"{k}.rank-{rank}.err", "w") as err,
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
            warnings.catch_warnings(),
        ):
            try:
                code = train.main(list(spec["argv"]), keep_process_group=True)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                traceback.print_exc()
                code = 1
        os.chdir(cwd)
        for s, h in handlers.items():
            signal.signal(s, h)
        (queue / f"{k}.rank-{rank}.rc.tmp").write_text(str(code))
        (queue / f"{k}.rank-{rank}.rc.tmp").rename(queue / f"{k}.rank-{rank}.rc")  # whole when it appears
        if code != 0:
            sys.stdout.flush()
            os._exit(code)
        k += 1


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    serve(Path(sys.argv[1]))
