"""Measure what each optimizer costs: bytes of state per parameter and step time, on one process.

    python launch/optimizer_memory.py                 # the debug model, every optimizer
    python launch/optimizer_memory.py --flavor 1b --device cuda --steps 20

Builds the model, runs `--steps` optimizer steps on random gradients after `--warmup` untimed ones (so
torchao's compiled kernels and CUDA's lazy init are excluded), and sums the bytes of the tensors the
optimizer keeps (parallel/memory.py; torchao's 8-bit states are counted by what they store). The numbers
in docs/optimizers.md come from this script.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from models.args import installed
from models.llama import FLAVORS, build_model  # noqa: E402
from optim import OPTIMIZERS, build_optimizer  # noqa: E402
from parallel.memory import model_state_bytes  # noqa: E402
from trainer.config import load_config  # noqa: E402


def measure(
    name: str,
    *,
    flavor: str = "debug",
    device: str = "cpu",
    steps: int = 3,
    warmup: int = 2,
    overrides: tuple[str, ...] = (),
) -> dict:
    cfg = load_config(["recipe=llama_debug", f"optim.name={name}", *overrides])
    torch.manual_seed(0)
    model = build_model(FLAVORS[flavor], device=device)
    opt = build_optimizer([model], cfg, device_type=device)
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)

    def one_step():
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        opt.step()

    for _ in range(warmup):
        one_step()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    state = model_state_bytes([model], opt)["optim"]
    return {
        "optimizer": name,
        "params": n,
        "state_bytes": state,
        "bytes_per_param": state / n,
        "step_ms": seconds * 1e3,
    }


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flavor", default="debug", choices=sorted(FLAVORS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--optimizers", nargs="*", default=list(OPTIMIZERS))
    ap.add_argument("--json", metavar="FILE", help="also write the rows, with the machine and date, to FILE")
    args = ap.parse_args(argv)
    rows = []
    for name in args.optimizers:
        if name == "adamw8bit" and not installed("torchao"):
            print(f"skipping {name}: torchao is not installed (pip install -e '.[lowbit]')", file=sys.stderr)
            continue
        rows.append(measure(name, flavor=args.flavor, device=args.device, steps=args.steps))
    print(f"model {args.flavor}: {rows[0]['params']:,} parameters, device {args.device}, torch {torch.__version__}")
    print("| optimizer | optimizer state | bytes per parameter | step time |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['optimizer']} | {r['state_bytes']:,} B | {r['bytes_per_param']:.4f} | {r['step_ms']:.1f} ms |")
    if args.json:
        import datetime
        import json
        import platform

        where = {"date": str(datetime.date.today()), "cpu": platform.processor() or platform.machine()}
        if args.device == "cpu":
            with open("/proc/cpuinfo") as f:
                where["cpu"] = next((x.split(":", 1)[1].strip() for x in f if x.startswith("model name")), where["cpu"])
        else:
            where["gpu"] = torch.cuda.get_device_name()
        meta = {**where, "torch": torch.__version__, "flavor": args.flavor, "device": args.device, "steps": args.steps}
        Path(args.json).write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
