"""What the checkpoint checksums cost: save a checkpoint of SIZE_MB with torch DCP, then seal it (a checksum of every
file, as `Checkpointer` does before COMPLETE) and verify it (as a resume does before loading), and print the times.

    python launch/bench_checkpoint.py --size-mb 1024 --dir /tmp/ckpt-bench

One process; with N ranks each rank writes and hashes its own share, so the ratio is the same. The file
system's page cache makes a fresh write look fast; --sync adds an fsync of every file to the write time.
"""

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from trainer.integrity import HASH, checkpoint_files, hash_share, manifest_problems

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str]) -> int:
    import torch
    import torch.distributed.checkpoint as dcp

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=int, default=1024)
    p.add_argument("--dir", type=Path, default=Path("/tmp/shardwise-ckpt-bench"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sync", action="store_true", help="fsync every file after the write (counted as write time)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    a = p.parse_args(argv)
    n = a.size_mb * 2**20 // 4
    g = torch.Generator().manual_seed(0)
    # tensors of a few sizes, like a model's: 64 MiB matrices and their small neighbours
    state, left, i = {}, n, 0
    while left > 0:
        k = min(left, 16 * 2**20 if i % 4 else 4096)
        state[f"t{i}"] = torch.randn(k, generator=g)
        left, i = left - k, i + 1
    rows = []
    for r in range(a.repeats):
        shutil.rmtree(a.dir, ignore_errors=True)
        t0 = time.perf_counter()
        dcp.save(state, checkpoint_id=str(a.dir))
        if a.sync:
            for f in a.dir.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        t1 = time.perf_counter()
        names = checkpoint_files(a.dir)
        entries = hash_share(a.dir, names, 0, 1)
        (a.dir / "MANIFEST.json").write_text(json.dumps({"algorithm": HASH, "files": entries}))
        t2 = time.perf_counter()
        problems = manifest_problems(a.dir)
        t3 = time.perf_counter()
        assert not problems, problems
        size = sum((a.dir / n).stat().st_size for n in names)
        rows.append({"repeat": r + 1, "bytes": size, "write_s": t1 - t0, "seal_s": t2 - t1, "verify_s": t3 - t2})
    shutil.rmtree(a.dir, ignore_errors=True)
    print(f"{'repeat':>6} {'size MB':>8} {'write s':>8} {'seal s':>7} {'verify s':>8} {'seal / write':>12}")
    for row in rows:
        print(
            f"{row['repeat']:>6} {row['bytes'] / 2**20:>8.0f} {row['write_s']:>8.2f} {row['seal_s']:>7.2f} "
            f"{row['verify_s']:>8.2f} {row['seal_s'] / row['write_s']:>11.0%}"
        )
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
