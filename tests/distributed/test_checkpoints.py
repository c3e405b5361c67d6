"""Checkpoints that never lose work, run for real under torchrun with gloo:

- bitwise resume (losses, samples, final parameters and optimizer state) for ddp, fsdp (sync and async saves), tp,
  pp, fsdp+tp, zero3 and the optimizer in the backward;
- kill -9 inside a save; a rank killed under `torchrun --max-restarts=1`; SIGTERM to one rank; the flag file;
- resharding fsdp 2 -> fsdp 4, tp 2, pp 2, one process, with the sample stream continuing exactly;
- NaN injected on one rank (raise and skip); damaged checkpoints refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, read_jsonl, run_cli, run_train

TINY = [
    "recipe=llama_debug",
    "model.dim=64",
    "model.n_layers=4",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.vocab_size=256",
    "data.source=synthetic",
    "training.seq_len=32",
    "training.precision=fp32",
    "training.global_batch_size=8",
    "training.micro_batch_size=2",
    "training.steps=4",
    "training.val_every=0",
    "optim.warmup_steps=1",
    "optim.lr=1e-2",
    "logging.every=1",
    "logging.tensorboard=false",
    "logging.wandb.mode=disabled",
    "logging.sample_ids=true",
    "checkpoint.every=2",
]

MOE = [
    "model.moe.n_experts=4",
    "model.moe.top_k=2",
    "model.moe.expert_hidden=64",
    "model.moe.dense_layers=1",
    "model.moe.bias_update_rate=0.01",
]

LAYOUTS = {
    "ddp": (2, ["parallel.data=ddp"]),
    "fsdp": (2, ["parallel.data=fsdp"]),
    # every step: at step 3 the save first completes step 2's background write, then starts its own, which
    # the crash interrupts
    "fsdp_async": (2, ["parallel.data=fsdp", "checkpoint.async_save=true", "checkpoint.every=1"]),
    "tp": (2, ["parallel.tp=2"]),
    "pp": (2, ["parallel.pp=2"]),
    "fsdp_tp": (4, ["parallel.data=fsdp", "parallel.tp=2"]),
    "zero3": (2, ["parallel.data=zero3"]),
    # MoE blocks with their experts split over 2 ranks (parallel/expert.py): the balancing bias is state too
    "fsdp_ep2_moe": (2, ["parallel.data=fsdp", "parallel.ep=2", *MOE]),
    # the optimizer steps inside the backward: one optimizer per parameter, saved under the same keys
    "fsdp_in_backward": (
        2,
        ["parallel.data=fsdp", "optim.in_backward=true", "optim.max_grad_norm=0", "training.micro_batch_size=4"],
    ),
}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """straight(nproc, args) -> the run directory of an uninterrupted run, made once per module."""
    cache = {}

    def run(nproc: int, args: list[str]) -> Path:
        key = (nproc, tuple(args))
        if key not in cache:
            run_dir = tmp_path_factory.mktemp("straight") / "run"
            run_train([*args, f"run_dir={run_dir}"], nproc=nproc)
            cache[key] = run_dir
        return cache[key]

    return run


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss, the last value logged for each step (a resumed run appends to the same file)."""
    return {r["step"]: r["train/loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r}


def samples(run_dir: Path) -> dict[int, list[int]]:
    """step -> sorted global sample ids trained on (all ranks; the last record of a step wins)."""
    per_rank = {}
    for f in sorted((run_dir / "samples").glob("rank-*.jsonl")):
        rows = {}
        for r in read_jsonl(f):
            rows[r["step"]] = r["ids"]
        per_rank[f.name] = rows
    steps = sorted({s for rows in per_rank.values() for s in rows})
    return {s: sorted({i for rows in per_rank.values() for i in rows.get(s, [])}) for s in steps}


def full_state(step_dir: Path) -> dict:
    """Every tensor of a checkpoint: model and optimizer state (DCP), or DeepSpeed's files."""
    if list(step_dir.glob("*optim_states.pt")):
        out = {}
        for f in sorted(step_dir.glob("*.pt")):
            if f.name.startswith(("rng-", "trainer-state")):
                continue
            out[f.name] = torch.load(f, weights_only=False, map_location="cpu")
        return out
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    tmp = step_dir.parent.parent / f"full-{step_dir.name}.pt"
    dcp_to_torch_save(str(step_dir), str(tmp))
    return torch.load(tmp, weights_only=False)


def assert_equal_trees(a, b, where: str = "") -> None:
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        keys = set(a) - {"ds_config", "ds_version", "dp_world_size", "mp_world_size", "lr_scheduler"}
        assert keys <= set(b), f"{where}: keys {sorted(keys - set(b))[:5]} missing"
        for k in keys:
            assert_equal_trees(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_trees(x, y, f"{where}[{i}]")


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_resume_is_bitwise(layout, tmp_path, straight):
    """Run 4 steps; resume a new run directory holding only that run's step-2 checkpoint to step 4: every logged
    loss, the samples, and the step-4 parameters and optimizer state are identical. Under async saves the second run
    is a real crash after step 3 (step 3's save first completes step 2's background write, then starts its own,
    which the crash interrupts), resumed in place. (The other layouts resume without a crash run, one launch fewer
    each; the kill -9, torchrun-restart and preemption tests below crash for real.)"""
    nproc, overrides = LAYOUTS[layout]
    straight = straight(nproc, [*TINY, *overrides])
    if layout == "fsdp_async":
        broken = tmp_path / "broken"
        crashed = run_train(
            [*TINY, *overrides, f"run_dir={broken}"], nproc=nproc, check=False, env={"SHARDWISE_FAULT": "crash@3:0"}
        )
        assert crashed.returncode != 0
        assert (broken / "checkpoints" / "latest").read_text() == "step-2"
        proc = run_train([*TINY, *overrides, f"run_dir={broken}"], nproc=nproc)
        assert losses(broken) == losses(straight)
    else:
        proc, broken = _resume_step_2(straight, tmp_path, [*TINY, *overrides], nproc)
        want = losses(straight)
        assert losses(broken) == {3: want[3], 4: want[4]}
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    assert "random streams restored (the same layout)" in proc.stdout
    want, got = samples(straight), samples(broken)
    assert {s: got[s] for s in (3, 4)} == {s: want[s] for s in (3, 4)}
    assert_equal_trees(
        full_state(straight / "checkpoints" / "step-4"), full_state(broken / "checkpoints" / "step-4"), layout
    )


def test_kill_9_during_a_save_falls_back_to_the_previous_checkpoint(tmp_path, straight):
    args = [*TINY, "parallel.data=fsdp", "training.steps=6"]
    broken = tmp_path / "broken"
    straight = straight(2, args)
    proc = run_train([*args, f"run_dir={broken}"], nproc=2, check=False, env={"SHARDWISE_FAULT": "kill_in_save@4:0"})
    assert proc.returncode != 0
    ckpts = broken / "checkpoints"
    assert (ckpts / "latest").read_text() == "step-2"  # never names the checkpoint being written
    assert (ckpts / "step-4").is_dir() and not (ckpts / "step-4" / "COMPLETE").exists()
    assert list((ckpts / "step-4").glob("*.distcp")), "the kill should come after the shards were written"
    proc = run_train([*args, f"run_dir={broken}"], nproc=2)
    assert "skipping incomplete checkpoint" in proc.stdout and "step-4" in proc.stdout
    assert "at step 2" in proc.stdout
    assert losses(broken) == losses(straight)
    assert (ckpts / "latest").read_text() == "step-6" and (ckpts / "step-4" / "COMPLETE").is_file()


def test_torchrun_max_restarts_recovers_from_a_killed_rank(tmp_path, straight):
    args = [*TINY, "parallel.data=fsdp", "training.steps=6"]
    broken = tmp_path / "broken"
    straight = straight(2, args)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "--max-restarts=1",
        str(REPO / "launch" / "train.py"),
        *args,
        f"run_dir={broken}",
    ]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "SHARDWISE_FAULT": "crash@3:1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout  # the restarted workers resumed
    assert losses(broken)[6] == losses(straight)[6]
    assert losses(broken) == losses(straight)


def _worker_pids(agent: subprocess.Popen) -> dict[int, int]:
    """RANK -> pid of torchrun's workers, read from their environments."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            ppid = int(next(ln for ln in status.splitlines() if ln.startswith("PPid:")).split()[1])
            if ppid != agent.pid:
                continue
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except (OSError, StopIteration):
            continue
        for kv in env:
            if kv.startswith(b"RANK="):
                out[int(kv[5:])] = int(pid)
    return out


@pytest.mark.parametrize("how", ["sigterm_rank_1", "flag_file"])
def test_preemption_stops_every_rank_at_one_step_and_resumes_bitwise(how, tmp_path, straight):
    args = [*TINY, "parallel.data=fsdp", "training.steps=60", "checkpoint.every=0"]
    run = tmp_path / "run"
    straight = straight(2, args)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "launch" / "train.py"),
        *args,
        f"run_dir={run}",
    ]
    agent = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if (run / "metrics.jsonl").is_file() and len(losses(run)) >= 5:
            break
        time.sleep(0.05)
    else:
        agent.kill()
        pytest.fail("the run never reached step 5")
    if how == "flag_file":
        (run / "PREEMPT").write_text("")
    else:
        os.kill(_worker_pids(agent)[1], signal.SIGTERM)
    out, err = agent.communicate(timeout=120)
    assert agent.returncode == 0, err[-3000:]
    marker = (run / "REQUEUE").read_text()
    stop = int(marker.split()[1])
    assert 5 <= stop < 60, marker
    # every rank trained exactly steps 1..stop, and the checkpoint of that step is complete
    for f in (run / "samples").glob("rank-*.jsonl"):
        assert [r["step"] for r in read_jsonl(f)] == list(range(1, stop + 1)), f.name
    assert (run / "checkpoints" / "latest").read_text() == f"step-{stop}"
    assert (run / "checkpoints" / f"step-{stop}" / "COMPLETE").is_file()
    assert not (run / "PREEMPT").exists()
    proc = run_train([*args, f"run_dir={run}"], nproc=2)  # the requeued job: the same command
    assert f"at step {stop}" in proc.stdout and not (run / "REQUEUE").exists()
    assert losses(run) == losses(straight)


@pytest.mark.parametrize("target", ["fsdp_4", "tp_2", "pp_2", "one_process"])
def test_fsdp_checkpoint_reshards_and_the_sample_stream_continues(target, tmp_path, straight):
    nproc, overrides = {
        "fsdp_4": (4, ["parallel.data=fsdp"]),
        "tp_2": (2, ["parallel.tp=2"]),
        "pp_2": (2, ["parallel.pp=2"]),
        "one_process": (1, []),
    }[target]
    straight = straight(2, [*TINY, "parallel.data=fsdp"])
    proc, moved = _resume_step_2(straight, tmp_path, [*TINY, *overrides], nproc)
    assert "at step 2" in proc.stdout
    # no sample skipped or repeated: steps 3 and 4 see exactly the uninterrupted run's samples
    s_want, s_got = _continues_like(straight, moved, target)
    seen = [i for s in (1, 2, 3, 4) for i in (s_want if s < 3 else s_got)[s]]
    assert len(seen) == len(set(seen)) == 4 * 8


def test_nan_on_one_rank_raise_stops_every_rank_naming_the_step(tmp_path):
    run = tmp_path / "run"
    proc = run_train(
        [*TINY, "parallel.data=fsdp", "training.steps=6", f"run_dir={run}"],
        nproc=2,
        check=False,
        env={"SHARDWISE_FAULT": "nan@3:1"},
    )
    assert proc.returncode != 0
    assert "non-finite loss or gradient norm at step 3" in proc.stdout + proc.stderr
    for f in (run / "samples").glob("rank-*.jsonl"):
        assert read_jsonl(f)[-1]["step"] == 3, f"{f.name} went past the bad step"
    assert (run / "checkpoints" / "latest").read_text() == "step-2"  # nothing saved after the NaN


def test_nan_on_one_rank_skip_leaves_the_parameters_and_goes_on(tmp_path):
    run = tmp_path / "run"
    run_train(
        [
            *TINY,
            "parallel.data=fsdp",
            "training.steps=4",
            "checkpoint.every=1",
            "checkpoint.keep=10",
            "numerics.on_nonfinite=skip",
            f"run_dir={run}",
        ],
        nproc=2,
        env={"SHARDWISE_FAULT": "nan@3:1"},
    )
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["train/skipped_steps"] for r in rows if "train/skipped_steps" in r] == [0, 0, 1, 1]
    s2, s3, s4 = (full_state(run / "checkpoints" / f"step-{k}") for k in (2, 3, 4))
    assert_equal_trees(s2["model"], s3["model"], "step 3 model")
    moments = [k for k in s2["optim"] if k.startswith("state.")]  # flattened: state.<name>.<exp_avg|...>
    assert moments and all(torch.equal(s2["optim"][k], s3["optim"][k]) for k in moments), "step 3 optimizer state"
    assert any(not torch.equal(s3["model"][k], s4["model"][k]) for k in s3["model"]), "step 4 trained"
    assert all(torch.isfinite(v).all() for v in s4["model"].values())
    # resumed, the count goes on from the checkpoint's (it restarted at 0 before)
    resume = [*TINY, "parallel.data=fsdp", "training.steps=6", "numerics.on_nonfinite=skip", f"run_dir={run}"]
    run_train(resume, nproc=2)
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["train/skipped_steps"] for r in rows if "train/skipped_steps" in r][-2:] == [1, 1]


@pytest.fixture(scope="module")
def one_checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("ckpt") / "run"
    run_train([*TINY, "parallel.data=fsdp", "training.steps=2", f"run_dir={run}"], nproc=2)
    return run


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing_shard", "__1_0.distcp is missing"),
        ("truncated_metadata", ".metadata is 100 bytes"),
        ("zeroed_shard", "__0_0.distcp has other bytes than when saved (xxh3_128 differs)"),
        ("other_model", "another model shape (model.n_layers: 4 in the checkpoint, 2 here)"),
        ("full_into_lora", "holds the whole model (full training), this run trains lora adapters (rank 8"),
    ],
)
def test_a_damaged_only_checkpoint_is_refused_and_nothing_is_written(damage, message, one_checkpoint, tmp_path):
    """With no older checkpoint to fall back to, a damaged one stops the run before anything is loaded or
    written: one message from rank 0, the same config.yaml, no TensorBoard file, metrics untouched."""
    run = tmp_path / "run"
    shutil.copytree(one_checkpoint, run)
    step = run / "checkpoints" / "step-2"
    args = [*TINY, "parallel.data=fsdp", "training.steps=4", "logging.tensorboard=true", f"run_dir={run}"]
    if damage == "missing_shard":
        (step / "__1_0.distcp").unlink()
    elif damage == "truncated_metadata":
        meta = step / ".metadata"
        meta.write_bytes(meta.read_bytes()[:100])
    elif damage == "zeroed_shard":
        _zero_64k(step / "__0_0.distcp")
    elif damage == "full_into_lora":
        args = [*args, "finetune.method=lora"]
    else:
        args = [*args, "model.n_layers=2"]
    before = {f: (run / f).read_bytes() for f in ("metrics.jsonl", "config.yaml")}
    proc = run_train(args, nproc=2, check=False)
    assert proc.returncode != 0  # each rank exits 2; torchrun reports the failure as 1
    assert "exitcode  : 2" in proc.stdout + proc.stderr
    assert proc.stderr.count("shardwise: checkpoint") == 1 and message in proc.stderr, proc.stderr[-2000:]
    assert {f: (run / f).read_bytes() for f in before} == before  # nothing trained, logged or rewritten
    assert not (run / "tensorboard").exists()
    assert step.is_dir() and not list(run.glob("checkpoints/*.damaged*"))  # nothing moved without a fallback


def _zero_64k(f: Path) -> None:
    """64 KiB of zeros inside the file, its size unchanged."""
    data = bytearray(f.read_bytes())
    assert len(data) > 200_000
    data[100_000 : 100_000 + 65536] = bytes(65536)
    f.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    run = tmp_path_factory.mktemp("ckpt2") / "run"
    run_train([*TINY, "parallel.data=fsdp", f"run_dir={run}"], nproc=2)  # step-2 and step-4
    return run


@pytest.mark.parametrize("damage", ["zeroed_shard", "truncated_trainer_state"])
def test_a_damaged_newest_checkpoint_falls_back_and_is_kept_aside(damage, two_checkpoints, straight, tmp_path):
    args = [*TINY, "parallel.data=fsdp", "training.steps=6"]
    want = losses(straight(2, args))
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    step4 = run / "checkpoints" / "step-4"
    if damage == "zeroed_shard":
        _zero_64k(step4 / "__0_0.distcp")
        problem = "__0_0.distcp has other bytes than when saved"
    else:
        f = step4 / "trainer-state.pt"
        f.write_bytes(f.read_bytes()[:200])
        problem = "trainer-state.pt is 200 bytes"
    proc = run_train([*args, f"run_dir={run}"], nproc=2)
    assert "Traceback" not in proc.stderr
    assert "WARNING: checkpoint step-4 is DAMAGED" in proc.stdout and problem in proc.stdout
    assert "moved it aside to step-4.damaged" in proc.stdout and "at step 2" in proc.stdout
    kept = run / "checkpoints" / "step-4.damaged"
    assert kept.is_dir() and (kept / "__0_0.distcp").is_file()  # kept whole, never deleted
    events = [r for r in read_jsonl(run / "metrics.jsonl") if r.get("event") == "checkpoint_damaged"]
    assert len(events) == 1 and events[0]["checkpoint"] == "step-4" and events[0]["resumed_from"] == "step-2"
    assert any(problem in p for p in events[0]["problems"])
    got = losses(run)
    assert {k: got[k] for k in (3, 4, 5, 6)} == {k: want[k] for k in (3, 4, 5, 6)}  # retrained, bitwise
    assert (run / "checkpoints" / "latest").read_text() == "step-6"


def test_on_damaged_fail_stops_and_the_converter_refuses_damage(two_checkpoints, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    step4 = run / "checkpoints" / "step-4"
    _zero_64k(step4 / "__1_0.distcp")
    proc = run_train(
        [*TINY, "parallel.data=fsdp", "training.steps=6", "checkpoint.on_damaged=fail", f"run_dir={run}"],
        nproc=2,
        check=False,
    )
    assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr
    assert "checkpoint damaged, refusing to load it (checkpoint.on_damaged=fail): step-4: __1_0.distcp" in proc.stderr
    assert step4.is_dir() and not (run / "checkpoints" / "step-4.damaged").exists()
    conv = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch" / "convert_checkpoint.py"),
            str(step4),
            "--out",
            str(tmp_path / "w.safetensors"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert conv.returncode == 2 and "is damaged (__1_0.distcp has other bytes" in conv.stderr
    assert not (tmp_path / "w.safetensors").exists()


@pytest.mark.parametrize("pointer", ["stale", "missing"])
def test_a_stale_or_missing_latest_pointer_is_reported(pointer, two_checkpoints, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    latest = run / "checkpoints" / "latest"
    if pointer == "stale":
        latest.write_text("step-2")
    else:
        latest.unlink()
    proc = run_train([*TINY, "parallel.data=fsdp", "training.steps=5", f"run_dir={run}"], nproc=2)
    note = (
        "names 'step-2', which is not the newest complete checkpoint (step-4)"
        if pointer == "stale"
        else "latest is missing; using the newest complete checkpoint step-4"
    )
    assert note in proc.stdout and "at step 4" in proc.stdout
    assert any(r.get("event") == "checkpoint_pointer" for r in read_jsonl(run / "metrics.jsonl"))


def _val_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["val/loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "val/loss" in r}


def test_an_hf_mixtral_trains_under_expert_parallelism_and_exports_back(tmp_path):
    """An HF Mixtral built here (4 experts, top-2, every block) -> an FSDP run with the experts split over 2 ranks
    starts from it (each rank reads only its experts' slices) -> one step at lr 1e-9 -> convert_checkpoint.py --hf ->
    transformers loads a Mixtral with the original's logits (1e-5): a wrong expert slice anywhere on the way would
    change them (tests/unit/test_hf.py shows a moved balancing bias refused on export, and w1/w3 swapped caught)."""
    transformers = pytest.importorskip("transformers")
    from helpers import tiny_mixtral

    hf = tiny_mixtral(tmp_path / "hf", n_layers=4)
    moe = [*(f"model.moe.{k}" for k in ("n_experts=4", "top_k=2", "expert_hidden=48")), "model.rope_theta=1e6"]
    start = ["training.steps=1", "optim.lr=1e-9", "optim.warmup_steps=1", f"checkpoint.init_from={tmp_path / 'hf'}"]
    run = tmp_path / "ep2"
    proc = run_train(
        [*TINY, *moe, *start, "model.moe.bias_update_rate=0", "parallel.data=fsdp", "parallel.ep=2", f"run_dir={run}"],
        nproc=2,
    )
    assert "initialized the weights from" in proc.stdout
    proc = run_cli("convert_checkpoint.py", [str(run / "checkpoints" / "step-1"), "--hf", str(tmp_path / "out")])
    assert proc.returncode == 0 and "a MixtralForCausalLM directory" in proc.stdout, proc.stderr
    back = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(tokens).logits
        torch.testing.assert_close(back(tokens).logits, want, rtol=0, atol=1e-5)
        # (the comparison sees an expert in the wrong place: two experts of one block swapped change the logits)
        experts = back.model.layers[0].mlp.experts
        for w in experts.parameters():
            w.copy_(w[[1, 0, *range(2, w.shape[0])]])
        assert (back(tokens).logits - want).abs().max() > 1e-3


def test_export_to_hf_and_start_other_strategies_from_it(tmp_path):
    """fsdp checkpoint -> HF directory (transformers loads it, same logits) -> a ZeRO-3 run starts from it;
    that run's checkpoint -> safetensors -> an FSDP run starts from it: the validation loss of the
    starting weights is the same everywhere."""
    transformers = pytest.importorskip("transformers")
    from models.llama import build_model
    from trainer.hf import from_hf
    from trainer.state import consolidated_state_dict

    convert = [sys.executable, str(REPO / "launch" / "convert_checkpoint.py")]
    src = tmp_path / "fsdp"
    run_train([*TINY, "parallel.data=fsdp", "training.steps=2", f"run_dir={src}"], nproc=2)
    v_src = _val_losses(src)[2]
    hf_dir = tmp_path / "hf"
    proc = subprocess.run(
        [*convert, str(src / "checkpoints" / "step-2"), "--hf", str(hf_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
    args, _ = from_hf(hf_dir)
    ours = build_model(args, device="cpu")
    ours.init_weights(0)
    ours.load_state_dict(consolidated_state_dict(src / "checkpoints" / "step-2"))
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours.eval()(tokens), rtol=0, atol=1e-5)

    start = ["training.steps=1", "training.val_every=1", "optim.lr=1e-9", "optim.warmup_steps=1"]
    zero = tmp_path / "zero3"
    proc = run_train(
        [*TINY, *start, "parallel.data=zero3", f"checkpoint.init_from={hf_dir}", f"run_dir={zero}"], nproc=2
    )
    assert "initialized the weights from" in proc.stdout
    assert abs(_val_losses(zero)[0] - v_src) <= 1e-5 * v_src
    flat = tmp_path / "zero3.safetensors"
    proc = subprocess.run(
        [*convert, str(zero / "checkpoints" / "step-1"), "--out", str(flat)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    back = tmp_path / "back"
    run_train([*TINY, *start, "parallel.data=fsdp", f"checkpoint.init_from={flat}", f"run_dir={back}"], nproc=2)
    # lr 1e-9 for one step: the weights moved by ~1e-9, the loss by far less than the tolerance
    assert abs(_val_losses(back)[0] - v_src) <= 1e-5 * v_src


def test_a_resumed_run_continues_its_wandb_run(tmp_path):
    from helpers import read_wandb_records, wandb_history

    run = tmp_path / "run"
    args = [*TINY, "logging.wandb.mode=offline", f"run_dir={run}"]
    run_train([*args, "training.steps=2"])
    run_train([*args, "training.steps=4"])  # resumes from step 2
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    ids = {d.name.rsplit("-", 1)[1] for d in runs}
    saved = json.loads((run / "checkpoints" / "step-2" / "train_state.json").read_text())["wandb_run_id"]
    assert ids == {saved}, (ids, saved)
    second = wandb_history(read_wandb_records(next(runs[1].glob("*.wandb"))))
    assert sorted(r["train/step"] for r in second if "train/loss" in r) == [3, 4]
    # metrics.jsonl marks where each run starts and ends, so the two runs in one run_dir stay apart
    marks = [(r["event"], r["step"]) for r in read_jsonl(run / "metrics.jsonl") if "event" in r]
    assert marks == [("start", 0), ("end", 2), ("start", 2), ("end", 4)], marks
    starts = [r for r in read_jsonl(run / "metrics.jsonl") if r.get("event") == "start"]
    assert starts[0]["resumed_from"] is None and starts[1]["resumed_from"].endswith("step-2")


def test_two_jobs_cannot_share_a_run_dir_and_workers_die_with_their_agent(tmp_path):
    run = tmp_path / "run"
    args = [*TINY, "parallel.data=fsdp", "training.steps=100000", "checkpoint.every=0", f"run_dir={run}"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(REPO / "launch" / "train.py"),
        *args,
    ]
    first = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not ((run / "metrics.jsonl").is_file() and len(losses(run)) >= 2):
            assert time.monotonic() < deadline and first.poll() is None, "the first job never trained"
            time.sleep(0.05)
        workers = _worker_pids(first)
        assert sorted(workers) == [0, 1]
        # a second job on the same run_dir is refused while the first trains, and writes nothing
        before = (run / "config.yaml").read_bytes()
        second = run_train([*TINY, "parallel.data=fsdp", "training.steps=3", f"run_dir={run}"], nproc=2, check=False)
        assert second.returncode != 0 and "exitcode  : 2" in second.stderr
        assert f"is in use by another shardwise run (pid {workers[0]} on" in second.stderr
        assert (run / "config.yaml").read_bytes() == before
        # SIGKILL to the first agent's process group: its workers (sessions of their own) stop as well
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        deadline = time.monotonic() + 20
        while any(
            Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()
            for pid in workers.values()
        ):
            assert time.monotonic() < deadline, "workers kept training after their agent died"
            time.sleep(0.1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
    # the killed run's lock is stale: the next run takes it over and says so
    proc = run_train([*TINY, "parallel.data=fsdp", "training.steps=3", f"run_dir={run}"], nproc=2)
    assert f"took over the lock of {run}" in proc.stdout and f"pid {workers[0]}" in proc.stdout
    assert (run / ".shardwise.lock").read_text() == ""  # released cleanly at the end


def test_context_parallel_checkpoint_reshards_from_cp_2_to_cp_4(tmp_path, straight):
    """A cp=2 run's checkpoint (FSDP over the two context-parallel ranks) resumed with cp=4: the same losses as the
    uninterrupted cp=2 run (to 1e-5: the attention's partial results merge in another order) and the same samples."""
    straight = straight(2, [*TINY, "parallel.cp=2"])
    proc, moved = _resume_step_2(straight, tmp_path, [*TINY, "parallel.cp=4"], 4)
    assert "at step 2" in proc.stdout and "parallel.cp=4" in proc.stdout
    # the layout record names cp, and rank r of cp 2 drew other numbers than rank r of cp 4: not restored
    assert json.loads((straight / "checkpoints" / "step-2" / "train_state.json").read_text())["layout"]["cp"] == 2
    assert "random streams from this run's seed (the layout changed: " in proc.stdout and "cp 2 -> 4" in proc.stdout
    _continues_like(straight, moved, "cp 4")


@pytest.mark.parametrize("target", ["ep_4", "fsdp_only"])
def test_expert_parallel_checkpoints_reshard_to_other_expert_layouts(target, tmp_path, straight):
    """An ep 2 run's step-2 checkpoint (each rank held 2 of the 4 experts of every MoE block) resumed with the experts
    split over 4 ranks, and with no expert parallelism (FSDP shards every expert): the uninterrupted run's losses
    (1e-5: the experts' gradients are summed in another order) and samples. The checkpoint holds each block's experts
    whole (DCP's global shape, 4 x 64 x 64), whatever the layout that wrote it, and the balancing bias moved."""
    nproc, overrides = LAYOUTS["fsdp_ep2_moe"]
    straight = straight(nproc, [*TINY, *overrides])
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(straight / "checkpoints" / "step-2")).read_metadata().state_dict_metadata
    experts = {k: tuple(v.size) for k, v in meta.items() if k.endswith("feed_forward.experts.w1")}
    assert experts and set(experts.values()) == {(4, 64, 64)}, experts
    nproc, layout = {"ep_4": (4, ["parallel.ep=4"]), "fsdp_only": (2, [])}[target]
    proc, moved = _resume_step_2(straight, tmp_path, [*TINY, "parallel.data=fsdp", *MOE, *layout], nproc)
    assert "at step 2" in proc.stdout
    _continues_like(straight, moved, target)
    bias = full_state(moved / "checkpoints" / "step-4")["model"]["layers.1.feed_forward.router.expert_bias"]
    assert bias.abs().sum() > 0


def _resume_step_2(source: Path, tmp_path: Path, args: list[str], nproc: int):
    """A new run directory holding only `source`'s step-2 checkpoint, resumed under `args`: (the run, its dir)."""
    moved = tmp_path / "moved"
    (moved / "checkpoints").mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / "step-2", moved / "checkpoints" / "step-2")
    (moved / "checkpoints" / "latest").write_text("step-2")
    return run_train([*args, f"run_dir={moved}"], nproc=nproc), moved


def _continues_like(source: Path, moved: Path, what: str):
    """Steps 3 and 4 of the resumed run have the uninterrupted run's losses (1e-5) and samples; returns the samples
    (uninterrupted, resumed)."""
    want, got = losses(source), losses(moved)
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), f"{what} step {step}: {got[step]} vs {want[step]}"
    s_want, s_got = samples(source), samples(moved)
    assert s_got == {3: s_want[3], 4: s_want[4]}
    return s_want, s_got


# adapters on a frozen base (models/adapters.py): the checkpoint holds the adapters and their optimizer state only
LORA = ["finetune.method=lora"]


def _dcp_keys(step_dir: Path) -> list[str]:
    import torch.distributed.checkpoint as dcp

    return list(dcp.FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata)


@pytest.mark.parametrize("layout", ["fsdp", "zero3"])
def test_adapter_checkpoints_hold_only_the_adapters_and_resume_bitwise(layout, tmp_path, straight):
    """A LoRA run's checkpoint holds the adapters, their optimizer state and the name of the base (train_state.json),
    no base weight; resumed at step 2 in the same layout, the losses, samples and the step-4 state are identical."""
    nproc, overrides = LAYOUTS[layout]
    run = straight(nproc, [*TINY, *LORA, *overrides])
    step2 = run / "checkpoints" / "step-2"
    record = json.loads((step2 / "train_state.json").read_text())["finetune"]
    assert record == {
        "method": "lora",
        "rank": 8,
        "alpha": 16.0,
        "targets": ["wq", "wk", "wv", "wo", "w1", "w2", "w3"],
        "base": {"source": "seed", "seed": 0},
    }
    if layout == "fsdp":
        tensors = [k for k in _dcp_keys(step2) if k.startswith("model.")]
        assert tensors and all(".lora_" in k for k in tensors), [k for k in tensors if ".lora_" not in k][:3]
    else:  # DeepSpeed's module file keeps no frozen parameter
        module = torch.load(step2 / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)["module"]
        assert all(".lora_" in k for k in module), [k for k in module if ".lora_" not in k][:3]
    proc, resumed = _resume_step_2(run, tmp_path, [*TINY, *LORA, *overrides], nproc)
    assert "at step 2" in proc.stdout and "random streams restored (the same layout)" in proc.stdout
    want = losses(run)
    assert losses(resumed) == {3: want[3], 4: want[4]}
    assert_equal_trees(full_state(run / "checkpoints" / "step-4"), full_state(resumed / "checkpoints" / "step-4"))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapter_checkpoints_reshard_from_fsdp_to_tp(method, tmp_path, straight):
    """An FSDP adapter checkpoint resumed under TP (B split by rows, A by columns, DoRA's magnitudes with B): the
    uninterrupted run's losses (1e-5) and samples; resuming with other adapters is refused before anything loads."""
    run = straight(2, [*TINY, f"finetune.method={method}", "parallel.data=fsdp"])
    proc, moved = _resume_step_2(run, tmp_path, [*TINY, f"finetune.method={method}", "parallel.tp=2"], 2)
    assert "at step 2" in proc.stdout
    _continues_like(run, moved, f"{method} fsdp -> tp")
    if method == "dora":
        other = run_train([*TINY, "finetune.method=dora", "finetune.rank=4", f"run_dir={run}"], nproc=1, check=False)
        assert other.returncode != 0
        assert "holds dora adapters (rank 8, alpha 16.0" in other.stderr
        assert "this run trains dora adapters (rank 4" in other.stderr


def test_dora_on_an_hf_base_exports_to_peft_and_a_merged_model(one_checkpoint, tmp_path):
    """A shardwise model exported to HF is the frozen base of a DoRA run under FSDP (checkpoint.init_from); its
    checkpoint exports as a PEFT adapter that peft loads onto that base, and as merged HF weights built from the base's
    original file, both with shardwise's logits (fp32, 1e-5; the base alone is far off). A changed base file is
    noticed by its checksum: the converter and a resume both refuse it."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from helpers import run_cli

    from trainer.hf import adapted_model

    base_dir, run = tmp_path / "base", tmp_path / "dora"
    assert run_cli("convert_checkpoint.py", [str(one_checkpoint / "checkpoints" / "step-2"), "--hf", str(base_dir)])
    ft = ["finetune.method=dora", "parallel.data=fsdp", f"checkpoint.init_from={base_dir}"]
    proc = run_train([*TINY, *ft, f"run_dir={run}"], nproc=2)
    assert "initialized the base weights from" in proc.stdout
    step4 = run / "checkpoints" / "step-4"
    out = run_cli("convert_checkpoint.py", [str(step4), "--peft", str(tmp_path / "peft"), "--hf", str(tmp_path / "hf")])
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        base_dir.resolve()
    )
    ours, args, _, _ = adapted_model(step4)
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    load = transformers.LlamaForCausalLM.from_pretrained
    with torch.no_grad():
        want = ours.eval()(tokens)
        base = load(base_dir, torch_dtype=torch.float32).eval()
        alone = base(tokens).logits
        with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()(tokens).logits
        merged = load(tmp_path / "hf", torch_dtype=torch.float32).eval()(tokens).logits
    rel = lambda a: ((a - want).norm() / want.norm()).item()  # noqa: E731
    assert rel(with_adapter) < 1e-5 and rel(merged) < 1e-5, (rel(with_adapter), rel(merged))
    assert rel(alone) > 1e-2  # the adapters changed the model: the comparison can fail

    with open(base_dir / "config.json", "a") as f:
        f.write("\n")  # the same model, another file: the recorded checksum no longer matches
    refused = run_cli("convert_checkpoint.py", [str(step4), "--hf", str(tmp_path / "again")])
    assert refused.returncode != 0 and "not the file it trained on" in refused.stderr
    resumed = run_train([*TINY, *ft, "training.steps=6", f"run_dir={run}"], nproc=1, check=False)
    assert resumed.returncode != 0 and "holds dora adapters" in resumed.stderr and "xxh3-128" in resumed.stderr


@pytest.mark.slow
def test_a_sharded_load_reads_only_each_ranks_slices(tmp_path):
    """checkpoint.init_from with an HF directory under FSDP over 2 ranks: each rank reads only the rows it holds, so
    its host memory grows by far less than the model (a 119 M-parameter model, 476 MB in fp32) while loading; the
    same weights from a step-N checkpoint, which every rank reads whole, grow it by at least the model: the bound
    tells the two apart. (The growth is the run's note: the peak resident set over the resident set before the load,
    an upper bound.)"""
    import re

    from models.args import model_args_of
    from models.llama import build_model
    from trainer.config import load_config
    from trainer.hf import to_hf

    shape = ["model.dim=1024", "model.n_layers=8", "model.n_heads=8", "model.n_kv_heads=8", "model.vocab_size=8192"]
    args_model = model_args_of(load_config([*TINY, *shape]))
    model = build_model(args_model, device="cpu")
    model.init_weights(seed=1)
    full_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert full_bytes > 400e6
    to_hf(
        {k: v.detach() for k, v in model.state_dict().items() if not k.startswith("rope")}, args_model, tmp_path / "hf"
    )
    del model
    start = [*TINY, *shape, "parallel.data=fsdp", "training.steps=1", "training.global_batch_size=4"]

    def grown(source: Path, run: Path, extra=()) -> list[float]:
        proc = run_train([*start, *extra, f"checkpoint.init_from={source}", f"run_dir={run}"], nproc=2)
        return [float(x.replace(",", "")) * 2**20 for x in re.findall(r"host memory \+([\d,.]+) MiB", proc.stdout)]

    sliced = grown(tmp_path / "hf", tmp_path / "a", ["checkpoint.every=1"])
    assert sliced and max(sliced) < 0.25 * full_bytes, (sliced, full_bytes)
    whole = grown(tmp_path / "a" / "checkpoints" / "step-1", tmp_path / "b")
    assert whole and max(whole) >= full_bytes, (whole, full_bytes)
    from memory_table import plan_from_args

    plan, _ = plan_from_args([*start, f"checkpoint.init_from={tmp_path / 'hf'}"], 2)
    # docs/finetune.md's numbers (tests/unit/test_finetune_docs.py renders them)
    if path := os.environ.get("SHARDWISE_LOAD_RESULTS"):
        import datetime

        with open("/proc/cpuinfo") as f:
            cpu = next((x.split(":", 1)[1].strip() for x in f if x.startswith("model name")), "unknown CPU")
        record = {
            "model_bytes": full_bytes,
            "sliced": max(sliced),
            "whole": max(whole),
            "planned": plan.load_host_bytes,
            "measured": f"{datetime.date.today()}, {cpu} ({os.cpu_count()} cores), torch {torch.__version__}",
        }
        Path(path).write_text(json.dumps(record, indent=1) + "\n")


@pytest.mark.slow
def test_qlora_under_tp_reads_and_quantizes_its_shards_of_an_hf_base(tmp_path):
    """QLoRA under TP with checkpoint.init_from an HF directory: each rank reads its own rows or columns of each base
    weight (wq and wk from whole HF heads, reordered) and quantizes that shard. Its step-0 validation loss (the base
    alone: B starts at zero) equals one process's on a plain base holding exactly those shards' dequantized values,
    and one process quantizing whole tensors from the same directory is further off than that. (The weights are the
    seed's scaled up 8 x, so that the loss feels the quantization.)"""
    from safetensors.torch import save_file

    from models.adapters import quantized_like_tp, target_shapes
    from models.args import model_args_of
    from models.llama import TP_SPLIT_DIM, build_model
    from trainer.config import load_config
    from trainer.hf import to_hf

    args_model = model_args_of(load_config(TINY))
    model = build_model(args_model, device="cpu")
    model.init_weights(seed=5)
    state = {k: 8 * v.detach() for k, v in model.state_dict().items() if not k.startswith("rope")}
    to_hf(state, args_model, tmp_path / "hf")
    adapted = {m for m, _ in target_shapes(args_model, ("wq", "wk", "wv", "wo", "w1", "w2", "w3"))}
    plain = {}
    for name, w in state.items():
        module = name.split(".", 2)[-1].rsplit(".", 1)[0] if name.startswith("layers.") else None
        plain[name] = quantized_like_tp(w, TP_SPLIT_DIM[module], 2, 8) if module in adapted else w.clone()
    save_file(plain, str(tmp_path / "tp-values.safetensors"))
    start = ["training.steps=1", "training.val_every=1", "optim.lr=1e-9", "checkpoint.every=0"]
    nf4 = ["finetune.method=lora", "finetune.quantize_base=true", "finetune.nf4_scaler_block=8"]
    losses = {}
    for name, nproc, extra in (
        ("tp", 2, [*nf4, "parallel.tp=2", f"checkpoint.init_from={tmp_path / 'hf'}"]),
        ("reference", 1, ["finetune.method=lora", f"checkpoint.init_from={tmp_path / 'tp-values.safetensors'}"]),
        ("whole", 1, [*nf4, f"checkpoint.init_from={tmp_path / 'hf'}"]),
    ):
        proc = run_train([*TINY, *start, *extra, f"run_dir={tmp_path / name}"], nproc=nproc)
        assert "initialized the base weights from" in proc.stdout
        losses[name] = _val_losses(tmp_path / name)[0]
    tp_off = abs(losses["tp"] - losses["reference"]) / losses["reference"]
    whole_off = abs(losses["whole"] - losses["reference"]) / losses["reference"]
    assert tp_off <= 1e-6 and whole_off > 10 * max(tp_off, 1e-7), losses
