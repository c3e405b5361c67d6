"""Run a few steps of a recipe under any layout and save what a parity test compares.

    torchrun --nproc_per_node=N tests/distributed/parity_worker.py OUT_DIR recipe=... overrides...
    torchrun --nproc_per_node=N tests/distributed/parity_worker.py --batch SPEC.json

With --batch, SPEC.json lists cases, {"out": OUT_DIR, "argv": [arguments...]}, run one after the other in this
launch (one process group, a Trainer each), which spares each case the launch; a case that also names a "worker"
(memory_worker, adafactor_comm_worker) is run by that script's `main(OUT_DIR, argv[0], argv[1:])` in this launch.

Saves OUT_DIR/result.pt on rank 0: the per-step global losses and gradient norms, the validation loss
after the last step (every layout's validation path, pipeline schedules included), the full
(unsharded, fp32) gradient of every parameter after step 1, keyed by its canonical name, and the bytes
of parameters, gradients and optimizer state each rank held during step 1, and every parameter after the last
step (fp32, full: DeepSpeed's master copy). Gradients and parameters are gathered from DTensor shards and from every
pipeline stage, so any layout is comparable to one process.
"""

import gc
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from models.dtensor import full
from models.llama import canonical_name
from parallel.memory import model_state_bytes
from parallel.mesh import env_world_size
from trainer.config import load_config
from trainer.trainer import Trainer
from trainer.validate import check


def full_grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    scale = trainer.scaler.get_scale() if trainer.scaler else 1.0  # fp16: gradients are still loss-scaled
    grads = {}
    for part in trainer.par.parts:
        for name, p in part.named_parameters():
            g = p.grad
            if getattr(trainer.par, "engine", None) is not None:  # DeepSpeed keeps gradients in its partitions
                from deepspeed.utils import safe_get_full_grad

                g = safe_get_full_grad(p)
            if g is None:
                continue
            grads[canonical_name(name)] = full(g).detach().float().cpu() / scale
    if trainer.par.dims.pp > 1:  # each pipeline rank holds other stages: gather the dicts
        gathered = [None] * trainer.par.dims.pp
        dist.all_gather_object(gathered, grads, group=trainer.par.group("pp"))
        grads = {k: v for d in gathered for k, v in d.items()}
    return grads


def full_params(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every parameter, full and fp32, keyed by its canonical name (the master copy where one is kept)."""
    params = {}
    for part in trainer.par.parts:
        for name, p in part.named_parameters():
            if getattr(trainer.par, "engine", None) is not None and p.requires_grad:
                from deepspeed.utils import safe_get_full_fp32_param

                value = safe_get_full_fp32_param(p)
            elif getattr(p, "ds_status", None) is not None:  # a frozen ZeRO-3 parameter: gathered to read it
                import deepspeed

                with deepspeed.zero.GatheredParameters([p]):
                    value = p.detach().clone()
            else:  # (a QLoRA base dequantized before it is gathered: NF4 shards do not gather as plain tensors)
                value = full(p.detach().float())
            params[canonical_name(name)] = value.detach().float().cpu()
    if trainer.par.dims.pp > 1:
        gathered = [None] * trainer.par.dims.pp
        dist.all_gather_object(gathered, params, group=trainer.par.group("pp"))
        params = {k: v for d in gathered for k, v in d.items()}
    return params


NF4_LIKE_TP = "worker.nf4_like_tp="  # (an argument of this worker, not of the trainer: `nf4_like_tp_reference`)


def nf4_like_tp_reference(out: str, argv: list[str]) -> list[str]:
    """The single-process reference of a tensor-parallel QLoRA row (argv names `worker.nf4_like_tp=N`): TP quantizes
    each rank's shard on its own (models/adapters.py `quantize_base`), which one process holding whole NF4 weights
    cannot reproduce; so this reference trains on a plain fp32 base holding exactly the values the TP run computes
    with: the seed's base, each adapted weight quantized shard by shard as `N`-way TP splits it and dequantized
    (`quantized_like_tp`), read through checkpoint.init_from. Returns the trainer's arguments."""
    from safetensors.torch import save_file

    from models.adapters import quantized_like_tp, target_shapes
    from models.args import model_args_of
    from models.llama import TP_SPLIT_DIM, build_model

    tp = int(next(a for a in argv if a.startswith(NF4_LIKE_TP))[len(NF4_LIKE_TP) :])
    argv = [a for a in argv if not a.startswith(NF4_LIKE_TP)]
    cfg = load_config(argv)
    model = build_model(model_args_of(cfg), device="meta").to_empty(device="cpu")
    model.init_weights(seed=int(cfg.training.seed))
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if "rope" not in k}
    modules = [m for m, _ in target_shapes(model.args, tuple(cfg.finetune.targets))]
    for name in state:
        module = name.split(".", 2)[-1].rsplit(".", 1)[0] if name.startswith("layers.") else None
        if module in modules:
            state[name] = quantized_like_tp(state[name], TP_SPLIT_DIM[module], tp, int(cfg.finetune.nf4_scaler_block))
    Path(out).mkdir(parents=True, exist_ok=True)
    save_file(state, str(Path(out) / "base.safetensors"))
    return [*argv, "finetune.quantize_base=false", f"checkpoint.init_from={Path(out) / 'base.safetensors'}"]


# data.pack rows (test_parity.py PACKED): the reference trains each packed document alone; a broken run ignores them
UNPACK, UNMASKED = "worker.unpack=true", "worker.unmasked=true"


def unpacked(batch: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """A packed (accum, mb, T + 1) batch as (n, 1, T + 1): each document that has a trained target alone in a
    sequence of its own, from position 0, padded after with untrained tokens, nothing in the high bits; and how many
    such documents each packed sequence held."""
    from models.loss import DOCUMENT_SHIFT, UNTRAINED, trained_targets

    rows, per_sequence = [], []
    for window in batch.flatten(0, 1):
        documents, before = window >> DOCUMENT_SHIFT, len(rows)
        for d in documents.unique(sorted=True).tolist():
            tokens = window[documents == d] & ((1 << DOCUMENT_SHIFT) - 1)  # (a document is one consecutive run)
            row = torch.full_like(window, UNTRAINED)
            row[: len(tokens)] = tokens
            if trained_targets(row):
                rows.append(row)
        per_sequence.append(len(rows) - before)
    return torch.stack(rows)[:, None], per_sequence


def main(out: str, argv: list[str], *, last: bool = True) -> None:
    if any(a.startswith(NF4_LIKE_TP) for a in argv):
        argv = nf4_like_tp_reference(out, argv)
    unpack, unmasked = UNPACK in argv, UNMASKED in argv
    argv = [a for a in argv if a not in (UNPACK, UNMASKED)]
    cfg = load_config(argv)
    trainer = Trainer(cfg, check(cfg, env_world_size()))
    losses, norms, grads, packed = [], [], None, []
    for step in range(cfg.training.steps):
        batch, _ = trainer.train_loader.next_batch()
        if unpack:  # one process: each document alone, plain causal attention (no mask)
            batch, per_sequence = unpacked(batch)
            packed.append(per_sequence)
        # (unmasked: the documents see each other; their targets stay apart)
        trainer.packed = bool(cfg.data.pack) and not (unpack or unmasked)
        loss = trainer.forward_backward(batch)
        trainer.packed = bool(cfg.data.pack)  # (validation as the run is configured: compared packed with packed)
        if step == 0:
            grads = full_grads(trainer)
            held = model_state_bytes(trainer.par.parts)
        norms.append(trainer.optimizer_step().item())
        if step == 0:
            held["optim"] = model_state_bytes(trainer.par.parts, trainer.optimizer)["optim"]
            if hasattr(trainer.par, "model_state_bytes"):  # DeepSpeed: its own partitions
                held = trainer.par.model_state_bytes()
        loss = trainer._all_reduce_sum(trainer._all_reduce_sum(loss, "pp"))
        losses.append(loss.item())
    params = full_params(trainer)
    buffers = {  # (persistent buffers: an MoE router's balancing bias; the same on every rank of a pipeline stage)
        canonical_name(name): b.detach().float().cpu()
        for part in trainer.par.parts
        for name, b in part.named_buffers()
        if name.endswith("expert_bias")
    }
    if trainer.par.dims.pp > 1:  # every stage's
        stages = [None] * trainer.world.world_size
        dist.all_gather_object(stages, buffers)
        buffers = {k: v for stage in stages for k, v in stage.items()}
    val_loss = trainer.validate()["val/loss"]  # after training: every strategy's validation path
    per_rank = [held]
    if trainer.world.distributed:
        per_rank = [None] * trainer.world.world_size
        dist.all_gather_object(per_rank, held)
    if trainer.world.rank == 0:
        Path(out).mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "losses": losses,
                "grad_norms": norms,
                "grads": grads,
                "params": params,
                "bytes_per_rank": per_rank,
                "val_loss": val_loss,
                "buffers": buffers,
                "documents_per_sequence": packed,  # (worker.unpack: each step's, as packed)
            },
            Path(out) / "result.pt",
        )
    trainer.close(keep_process_group=not last)


if __name__ == "__main__":
    gc.freeze()  # the imports live as long as the process: each Trainer.close collects its own garbage only
    if sys.argv[1] == "--batch":
        cases = json.loads(Path(sys.argv[2]).read_text())
        for i, case in enumerate(cases):
            started, out, last = time.perf_counter(), case["out"], i == len(cases) - 1
            if "worker" in case:  # another worker of tests/distributed/, beside this script: main(OUT, first, rest)
                import importlib

                importlib.import_module(case["worker"]).main(out, case["argv"][0], case["argv"][1:], last=last)
            else:
                main(out, case["argv"], last=last)
            # each case's wall time, for the suite's cost log (tests/costs.py: `kind: batched`)
            Path(out, "seconds.json").write_text(json.dumps(time.perf_counter() - started))
    else:
        main(sys.argv[1], sys.argv[2:])
