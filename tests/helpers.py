"""Test helpers: reading back what W&B wrote offline, running the real entry point."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pool

REPO = Path(__file__).resolve().parent.parent


def read_wandb_records(path: Path) -> list:
    """Parse a `.wandb` offline run file into `wandb_internal_pb2.Record`s.

    The file is a 7-byte header (":W&B", 2-byte magic, 1-byte version) and then a LevelDB-style log:
    32 KiB blocks of chunks, each `crc32 (4) | length (2) | type (1) | data`, where type 1 is a whole
    record and 2/3/4 are the first/middle/last pieces of one split across blocks. Every chunk's CRC is
    checked, so a corrupt file fails the test instead of being half-read.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B datastore file"
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block tail too short for a header is padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += block - pos % block
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF == crc, f"bad CRC at byte {pos} of {path}"
        pos += 7 + length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            out.append(pending + chunk)
            pending = b""
    records = []
    for raw in out:
        r = pb.Record()
        r.ParseFromString(raw)
        records.append(r)
    return records


def wandb_history(records) -> list[dict]:
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item})
    return rows


def wandb_config(records) -> dict:
    cfg = {}
    for r in records:
        kind = r.WhichOneof("record_type")
        items = r.run.config.update if kind == "run" else r.config.update if kind == "config" else []
        for i in items:
            cfg[i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
    return cfg


def run_train(
    args: list[str],
    *,
    nproc: int = 1,
    timeout: float = 300,
    env: dict | None = None,
    check: bool = True,
    script: str = "train.py",
) -> subprocess.CompletedProcess:
    """Run launch/train.py (or another launch/ script): plain python for one process, torchrun for several. A
    train.py job expected to succeed, with no environment of its own, runs in a long-lived pool of its rank count
    (tests/pool.py: no process start; a failure there runs it again for real)."""
    full_env = {
        **os.environ,
        "OMP_NUM_THREADS": "1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2"),
        "WANDB_SILENT": "true",
        **(env or {}),
    }
    if script == "train.py" and check and not env and pool.enabled():
        proc = pool.run(list(args), nproc, full_env, timeout)
        if proc is not None:
            return proc
    if nproc == 1:
        cmd = [sys.executable, str(REPO / "launch" / script), *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(REPO / "launch" / script),
            *args,
        ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
        )
    return proc


_SCRIPTS: dict[str, object] = {}


def run_cli(script: str, args: list[str], *, env: dict | None = None, **main_kwargs) -> subprocess.CompletedProcess:
    """launch/<script>'s `main(args)` called in this process, with `env` set for the call and stdout and stderr
    captured: what `run_train(..., check=False)` returns, without a process start (4-5 s of imports each on 2
    cores). For what ends before any process group or training starts: --help, refusals, dry runs, the planner.
    One real subprocess per script stays in the suite for the entry point itself (tests/unit/test_entrypoint.py,
    tests/distributed/test_docs_commands.py run the documented lines that train). `main_kwargs` go to `main`
    (compare.py's `launch`)."""
    if script not in _SCRIPTS:
        name = f"_shardwise_launch_{Path(script).stem}"
        spec = importlib.util.spec_from_file_location(name, REPO / "launch" / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _SCRIPTS[script] = module
    saved = {k: os.environ.get(k) for k in (env or {})}
    out, err = io.StringIO(), io.StringIO()
    try:
        os.environ.update({k: str(v) for k, v in (env or {}).items()})
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = _SCRIPTS[script].main(list(args), **main_kwargs)
            except SystemExit as e:  # argparse and friends; a message is printed to stderr as the interpreter would
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def once_per_name(tmp_path_factory, launch):
    """The body of a module fixture: run(name) calls launch(name, a fresh run directory) the first time and returns
    its result, cached, every time (so the assertions of several tests share one launch)."""
    cache = {}

    def run(name: str):
        if name not in cache:
            cache[name] = launch(name, tmp_path_factory.mktemp(name) / "run")
        return cache[name]

    return run


def losses_of(run_dir: Path) -> list[float]:
    """The logged training losses of a run, step by step."""
    return [r["train/loss"] for r in metric_rows(Path(run_dir) / "metrics.jsonl") if "train/loss" in r]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def metric_rows(path: Path) -> list[dict]:
    """The logging-step records of a metrics.jsonl (the `event` records of starts, ends etc. left out)."""
    return [r for r in read_jsonl(path) if "event" not in r]


def relative_errors(ref: dict, got: dict, key: str = "grads", prefix: str = "layers.") -> dict[str, float]:
    """A parity worker's result.pt (tests/distributed/parity_worker.py) against a reference's, tensor by tensor:
    ||x - x_ref|| / ||x_ref|| for each name under `prefix` (the transformer blocks by default; "" for all) of
    `key` ("grads": every parameter's gradient after step 1; "params": every parameter after the last step). A
    reference block gradient that is zero fails: a check must see the blocks."""
    errors = {}
    for name, want in ref[key].items():
        if name.startswith(prefix):
            if key == "grads":
                assert want.norm() > 0, f"{name}: no gradient reaches the block"
            errors[name] = ((got[key][name] - want).norm() / want.norm()).item()
    assert errors, f"no {key} under {prefix!r}"
    return errors


def tiny_mixtral(out: Path, *, n_layers: int = 2, rope_theta: float = 1e6):
    """A tiny Hugging Face Mixtral (width 64, 4 heads of 16, 2 kv heads, 4 experts of 48, top-2, vocab 256) built with
    transformers, every weight drawn (HF leaves norms at 1), saved to `out`; returns the model in eval mode."""
    import torch
    import transformers

    cfg = transformers.MixtralConfig(
        hidden_size=64,
        intermediate_size=48,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
        num_local_experts=4,
        num_experts_per_tok=2,
        rms_norm_eps=1e-5,
        rope_theta=rope_theta,
    )
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in n else p.normal_(0, 0.1)
    model.save_pretrained(out, safe_serialization=True)
    return model
