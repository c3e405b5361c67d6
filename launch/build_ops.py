"""Compile DeepSpeed's CPU Adam op now, not at the first ZeRO-Offload step.

    python launch/build_ops.py

`parallel.offload=cpu` runs the optimizer as DeepSpeed's `DeepSpeedCPUAdam`, a C++ op. The README installs DeepSpeed
with `DS_BUILD_OPS=0` (no op compiled at install, none of the GPU ones this machine cannot build), so the op is
compiled by torch's extension loader the first time a run uses it: about a minute on 2 cores, in the middle of the
run's start. This script does that compile ahead of time, into the same cache the runs read
(`$TORCH_EXTENSIONS_DIR`, else `~/.cache/torch_extensions`); with the op already there it only loads it. It is what
`DS_BUILD_CPU_ADAM=1 pip install deepspeed` does at install time, without rebuilding DeepSpeed.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv: list[str]) -> int:
    if argv:
        print("usage: python launch/build_ops.py (no arguments)\n\n" + __doc__.split("\n\n", 1)[1], file=sys.stderr)
        return 0 if argv in (["-h"], ["--help"]) else 2
    try:
        from deepspeed.ops.op_builder import CPUAdamBuilder
    except ImportError:
        print(
            "shardwise: DeepSpeed is not installed, so there is no op to build: "
            "DS_BUILD_OPS=0 pip install -e '.[deepspeed]'",
            file=sys.stderr,
        )
        return 2
    from torch.utils.cpp_extension import _get_build_directory

    builder = CPUAdamBuilder()
    where = _get_build_directory(builder.name, verbose=False)
    started = time.perf_counter()
    builder.load(verbose=False)
    print(f"build_ops: DeepSpeed's {builder.name} op ready in {time.perf_counter() - started:.1f} s ({where})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
