"""The Trainer: the build order of docs/architecture.md, then the training loop, top to bottom."""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import re
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.distributed.tensor.parallel import loss_parallel

from models.adapters import AdapterLinear, apply_adapters, init_adapters, unquantized
from models.adapters import spec_of as adapter_spec_of
from models.args import model_args_of
from models.dtensor import full
from models.llama import build_model
from models.loss import IGNORE_INDEX, documents_of, inputs_and_targets, trained_targets
from models.moe import balance, load_metrics, take_aux_losses
from optim import build_optimizer, build_scheduler
from parallel import parallelize
from parallel.memory import BESIDE, OFFLOADED, PINNED
from parallel.mesh import destroy_distributed, init_distributed, needs_process_group, side_groups
from trainer.checkpoint import Checkpointer, checkpoint_root, select_resume
from trainer.config import Precision, save_resolved, to_container
from trainer.data import BatchLoader, open_sources
from trainer.faults import PREEMPT_FLAG, REQUEUE_MARKER, Faults, NonFiniteError, Preemption, RefusedStart, RunLock
from trainer.metrics import MemoryMonitor, MetricLogger, detect_peak_tflops, mfu_pct
from trainer.profiling import Phases, Profiler
from trainer.validate import Plan, banner


def deterministic(on: bool) -> bool:
    """training.deterministic: torch's deterministic algorithms, strict (an op without a deterministic kernel
    raises; SDPA's flash and memory-efficient backward take their deterministic paths, cuDNN attention is excluded),
    and cuBLAS's fixed workspace, which must be set before its first handle (the variable is only read then).
    Returns what was set before, for close() to restore (a test pool runs several Trainers in one process)."""
    before = torch.are_deterministic_algorithms_enabled()
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    return before


class Trainer:
    def __init__(self, cfg: DictConfig, plan: Plan):
        # 1. the config was parsed and validated by the caller (trainer.config.check) before this point
        self.cfg, self.plan = cfg, plan
        t = cfg.training
        self.packed = bool(cfg.data.pack)  # several documents per sequence (trainer/data.py): the model gets them
        self.run_dir = Path(cfg.run_dir)

        # 2. process group (nccl on GPU, gloo on CPU) and this rank's place in it
        self.world = init_distributed(t.device, one_rank_group=needs_process_group(str(cfg.parallel.data)))
        self.device = self.world.device
        torch.manual_seed(t.seed)
        self._was_deterministic = deterministic(t.deterministic)
        # two gloo groups beside the training one, so that neither interleaves with (or synchronizes) the
        # training collectives: one for the background thread of async checkpoint writes, one for the
        # main thread's votes (preemption, "has the async write finished"). Two threads must never issue
        # collectives on one group: their order could differ between ranks.
        self.save_group, self.side_group = side_groups() if self.world.distributed else (None, None)
        self.faults = Faults(self.world.rank)
        self.skipped_steps = 0
        self.moe_aux, self.moe_aux_step = 0.0, None  # MoE sequence balance loss: this step's so far, the last step's
        self._first_nonfinite = None  # device tensor: the first step whose gradient norm was not finite
        self.notes: list[str] = []  # for the log, once the logger exists (nothing is written before the checks)
        self.lock = RunLock([self.run_dir, checkpoint_root(cfg)])
        try:
            # 2b. the checks that need the process group, before anything is written: this run owns its
            #     directories, and the checkpoint it resumes from (if any) is intact and fits this model
            self.notes += self._lock_run_dirs()
            resume_from, notes, self.events = (
                select_resume(
                    checkpoint_root(cfg),
                    cfg,
                    zero=str(cfg.parallel.data).startswith("zero"),
                    rank=self.world.rank,
                    group=self.side_group,
                )
                if cfg.checkpoint.resume
                else (None, [], [])
            )
            self.notes += notes
            self._build(cfg, plan, resume_from)
        except BaseException:
            self.lock.release()
            raise

    def _lock_run_dirs(self) -> list[str]:
        """Rank 0 takes the run's directory locks; every rank learns the verdict and refuses alike."""
        notes, refused = [], None
        if self.world.rank == 0:
            try:
                notes = self.lock.acquire()
            except RefusedStart as e:
                refused = str(e)
        if self.world.distributed:
            box = [refused]
            dist.broadcast_object_list(box, src=0, group=self.side_group)
            refused = box[0]
        if refused is not None:
            raise RefusedStart(refused)
        return notes

    def _build(self, cfg: DictConfig, plan: Plan, resume_from: Path | None) -> None:
        t = cfg.training
        self.preemption = Preemption(Path(cfg.checkpoint.preempt_flag or self.run_dir / PREEMPT_FLAG), self.side_group)

        # 3. the model on the meta device: shapes only, nothing allocated
        self.model_args = model_args_of(cfg)
        model = build_model(self.model_args, device="meta")
        model.loss_chunks = int(t.loss_chunks)  # (read by its TP plan and its forward)
        if (spec := adapter_spec_of(cfg)) is not None:  # finetune: adapters on the frozen base, before the split
            apply_adapters(model, spec)

        # 4. + 5. parallelize in the fixed order (pipeline split, TP, AC, compile, FSDP), then allocate
        #    on the device and initialize every parameter and buffer from the seed (the same weights in
        #    every layout), then DDP (parallel/__init__.py explains the order)
        reader = None
        if spec is not None and spec.nf4 and cfg.checkpoint.init_from:  # QLoRA: the base read tensor by tensor
            from trainer.hf import TensorReader

            reader = TensorReader(Path(cfg.checkpoint.init_from))
        self.par = parallelize(model, cfg, plan.dims, self.world, loss_sum=self._logits_loss_sum, base_reader=reader)
        if spec is not None and spec.nf4:
            # the check others' FSDP + QLoRA stacks lacked: after every wrapper, each base is still 4-bit
            if lost := unquantized(self.par.parts):
                raise RuntimeError(f"finetune.quantize_base: these base weights are no longer NF4: {lost[:5]}")
            n = sum(1 for part in self.par.parts for m in part.modules() if isinstance(m, AdapterLinear))
            self.par.notes.append(
                f"finetune.quantize_base: {n} base weights in NF4 (torchao; 64-element blocks, "
                f"{cfg.finetune.nf4_scaler_block} scales per double-quantization block), still NF4 after wrapping"
            )
        self.dp_rank = self.par.dp_rank

        # starting weights from elsewhere (checkpoint.init_from) replace the seeded ones before the optimizer
        # (and DeepSpeed's fp32 master copy) exists, unless there is a checkpoint to resume
        # (an adapter run's checkpoints hold no base: its base is loaded on resume too)
        self.init_note = None
        if cfg.checkpoint.init_from and (resume_from is None or spec is not None):
            from trainer.hf import load_weights

            grew = load_weights(self.par.parts, cfg, Path(cfg.checkpoint.init_from))
            if spec is not None:
                for part in self.par.parts:
                    init_adapters(part)  # DoRA's magnitudes from the loaded base's rows
            self.init_note = (
                f"initialized the {'base ' if spec else ''}weights from {cfg.checkpoint.init_from}, each rank "
                f"reading its own slices (rank {self.world.rank}: host memory +{grew / 2**20:,.1f} MiB at most)"
            )

        # 6. precision, optimizer, schedule, data, loggers
        self.precision = Precision(str(t.precision))
        self.autocast_dtype = self.par.autocast_dtype
        self.scaler = None
        if self.precision == Precision.fp16 and not self.par.manages_precision:
            if self.world.distributed and str(cfg.parallel.data) != "ddp":
                from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

                self.scaler = ShardedGradScaler(self.device.type)  # handles DTensor shards, agrees on inf
            else:
                self.scaler = torch.amp.GradScaler(self.device.type)
        self.optimizer = build_optimizer(self.par.parts, cfg, device_type=self.device.type)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.par.attach_optimizer(self.optimizer)  # DeepSpeed builds its engine around it here
        self.model = self.par.model  # what the step calls: the model, its DDP wrapper or the DeepSpeed engine

        if str(cfg.data.source) == "chat":
            from trainer.chat import open_chat_sources

            train_src, val_src, self.data_description = open_chat_sources(cfg, t.seq_len)
        else:
            train_src, val_src, self.data_description = open_sources(cfg, t.seq_len, self.model_args.vocab_size)
        loader_args = dict(
            global_batch=t.global_batch_size,
            micro_batch=t.micro_batch_size,
            dp_rank=self.dp_rank,
            dp_size=plan.dp_size,
            seed=t.seed,
        )
        self.train_loader = BatchLoader(train_src, shuffle=True, **loader_args)
        if t.samples_every:  # (validation allows it with chat data only)
            from trainer.chat import held_out_prompts, load_tokenizer, with_defaults

            self.sample_prompts, self.sample_stop = held_out_prompts(val_src, t.sample_prompts)
            self.sample_tokenizer = load_tokenizer(with_defaults(cfg).data.tokenizer)
            self.sample_pad = val_src.meta["pad_id"]
        self.val_source, self.val_loader_args = val_src, loader_args
        self.step = 0
        self.tokens_seen = 0

        # every check has passed: from here on the run writes into run_dir
        if self.world.is_logging_rank:
            save_resolved(cfg, self.run_dir / "config.yaml")
            for name, text in self.par.run_files().items():
                (self.run_dir / name).write_text(text)
        self.peak_tflops = cfg.logging.peak_tflops or detect_peak_tflops(self.device, str(self.precision))
        self.memory = MemoryMonitor(self.device)
        self.phases = Phases(nvtx=bool(cfg.profile.nvtx) and self.device.type == "cuda")
        # a resumed run continues its W&B run (the id is in the checkpoint's train_state.json)
        wandb_id = None
        if resume_from is not None and (resume_from / "train_state.json").is_file():
            with contextlib.suppress(ValueError, OSError):
                wandb_id = json.loads((resume_from / "train_state.json").read_text()).get("wandb_run_id")
        self.logger = MetricLogger(
            cfg, self.run_dir, enabled=self.world.is_logging_rank, config=to_container(cfg), wandb_run_id=wandb_id
        )
        for line in banner(cfg, plan, self.model_args):
            self.logger.note(line)
        for note in [f"data: {self.data_description}", *self.par.notes, *self.notes]:
            self.logger.note(note)
        for event in self.events:
            self.logger.event(event)
        if self.world.rank == 0:  # a flag or marker left by the run this one continues has been acted on
            for stale in (self.preemption.flag_file, self.run_dir / REQUEUE_MARKER):
                stale.unlink(missing_ok=True)
        if self.world.distributed:
            dist.barrier(group=self.side_group)
        self.checkpointer = Checkpointer(self, group=self.save_group, control_group=self.side_group)
        if resume_from is not None:
            self.checkpointer.load(resume_from)
            self.logger.note(f"resumed from {resume_from} at step {self.step}; {self.checkpointer.rng_note}")
        elif self.init_note:
            self.logger.note(self.init_note)
        self.resumed_from = resume_from
        self.samples_file = None
        if cfg.logging.sample_ids:
            (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
            self.samples_file = open(self.run_dir / "samples" / f"rank-{self.world.rank}.jsonl", "a")

    # ------------------------------------------------------------------------------------------

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _all_reduce_sum(self, t: torch.Tensor, axis: str = "dp") -> torch.Tensor:
        size = {"dp": self.par.dims.dp_size, "tp": self.par.dims.tp, "pp": self.par.dims.pp, "cp": self.par.dims.cp}[
            axis
        ]
        if size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.par.group(axis))
        return t

    def _logits_loss_sum(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of (mb, T, V) logits against (mb, T) targets, in fp32.
        Under TP the logits may be split over the vocabulary: loss_parallel computes the softmax
        across the shards without gathering them."""
        with loss_parallel() if self.par.loss_parallel else contextlib.nullcontext():
            return F.cross_entropy(
                logits.float().flatten(0, 1), targets.flatten(), reduction="sum", ignore_index=IGNORE_INDEX
            )

    def _local_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """Under context parallelism, this rank's positions of each sequence (a head and a tail chunk)."""
        return t if self.par.cp_positions is None else t[:, self.par.cp_positions]

    def _documents(self, tokens: torch.Tensor) -> dict:
        """The model's `documents` keyword of a (..., T + 1) batch under data.pack (models/loss.py DOCUMENT_SHIFT),
        else none (one document per sequence: plain causal attention, no mask built)."""
        return {"documents": documents_of(tokens)} if self.packed else {}

    def _loss_sum(self, tokens: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of one micro-batch (mb, T + 1) -> scalar fp32."""
        inputs, targets = (self._local_tokens(t) for t in inputs_and_targets(tokens))  # (mb, T) each
        docs = self._documents(tokens)  # (data.pack refuses context parallelism: whole sequences here)
        with self._autocast():
            if self.cfg.training.loss_chunks:  # the projection and the loss together, chunk by chunk
                return self.model(inputs, targets, **docs)
            logits = self.model(inputs, **docs)  # (mb, T, V)
        return self._logits_loss_sum(logits, targets)

    def _aux_loss(self, sequences: int) -> torch.Tensor | float:
        """The MoE blocks' sequence balance loss of the micro-batch just run (model.moe.aux_loss_coef), weighted by
        its sequences' share of the global batch, so that the objective is the token-mean loss plus the mean over
        the global batch's sequences of their balance loss, however the batch is split; 0 without one. Its sum over
        the step's micro-batches (this rank's) is logged as moe/aux_loss, summed over the data-parallel ranks."""
        moe = self.model_args.moe  # (only a run with the loss walks the model's modules, once per micro-batch)
        aux = take_aux_losses(self.par.parts) if moe is not None and moe.aux_loss_coef else None
        if aux is None:
            return 0.0
        share = aux * (sequences / self.cfg.training.global_batch_size)
        self.moe_aux = self.moe_aux + share.detach()
        return share

    def forward_backward(self, batch: torch.Tensor) -> torch.Tensor:
        """Accumulate the gradients of this rank's (accum, mb, T + 1) share of the global batch.

        The objective is the MEAN token loss over the whole global batch. Gradients add up, so each
        micro-batch contributes its loss SUM divided by the global count of target tokens: summing those
        gradients over micro-batches and ranks gives exactly the gradient of the global mean, whatever
        the split into micro-batches and ranks (a per-micro-batch mean would weight batches wrongly).
        Returns this rank's share of the global mean loss, still on the device (no host sync); under
        pipeline parallelism only the ranks holding the last stage have a nonzero share.
        """
        batch = batch.to(self.device, non_blocking=True)
        accum = batch.shape[0]
        # one small all-reduce: the number of target tokens in the global batch
        n_tokens = self._all_reduce_sum(trained_targets(batch).to(torch.float32))
        if self.par.schedule is not None:
            return self._pipeline_forward_backward(batch, n_tokens)
        loss_total = torch.zeros((), device=self.device)
        for i in range(accum):
            # gradients are synchronized across ranks only on the last micro-batch
            sync = contextlib.nullcontext() if i == accum - 1 else self.par.no_sync()
            with sync:
                with self.phases("forward"):
                    loss = self.faults.poison_loss(self.step + 1, self._loss_sum(batch[i]) / n_tokens)
                    objective = loss + self._aux_loss(batch.shape[1])
                with self.phases("backward"):  # DDP, FSDP and DeepSpeed average gradients over ranks; we want the sum
                    self.par.backward(
                        objective * self.par.grad_reduction_scale, last_micro=i == accum - 1, scaler=self.scaler
                    )
            loss = loss.detach()
            loss_total += full(loss)  # a replicated DTensor under TP
        return self._all_reduce_sum(loss_total, "cp")  # context-parallel ranks hold shares of the same sequences

    def _pipeline_forward_backward(self, batch: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
        """One schedule step runs all `accum` micro-batches through the pipeline (forward and backward)."""
        from parallel.schedules import STEP_RETURNS_OUTPUTS  # (torch's pipelining: imported only with a pipeline)

        flat = batch.flatten(0, 1)  # (accum * mb, T + 1): the schedule cuts it back into accum microbatches
        inputs, targets = (self._local_tokens(t) for t in inputs_and_targets(flat))
        self.par.pipeline_loss.n_tokens = n_tokens
        if self.scaler:  # the scaler's own scale(), as a backward of a scaled loss would call it (and no host sync)
            self.par.pipeline_loss.scale = self.scaler.scale(
                torch.tensor(self.par.grad_reduction_scale, device=self.device, dtype=torch.float32)
            )
        losses: list[torch.Tensor] = []
        args = (inputs,) if self.par.has_first_stage else ()
        kwargs = {"target": targets, "losses": losses} if self.par.has_last_stage else {}
        kwargs |= self._documents(flat)  # (every stage builds the documents' mask: torch passes keywords to each)
        if STEP_RETURNS_OUTPUTS:  # the logits of every microbatch would otherwise be kept for a merged output
            kwargs["return_outputs"] = False
        with self._autocast():
            self.par.schedule.step(*args, **kwargs)
        if not losses:
            return torch.zeros((), device=self.device)
        scale = self.par.pipeline_loss.scale  # the losses carry the DP (and loss-scaler) factor: remove it
        return self._all_reduce_sum(torch.stack([x.detach() for x in losses]).sum() / scale, "cp")

    def learning_rates(self) -> dict[str, float]:
        """The schedule's lr for the step about to run: `train/lr` is the base lr (optim.lr x schedule),
        and with optim.lr_multipliers each rule's lr beside it (`train/lr/<pattern>`). Read from the
        schedule, not from a parameter group (group 0 may be a scaled one), and without a device sync."""
        o = self.cfg.optim
        base = o.lr * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        out = {"train/lr": base}
        for rule in o.lr_multipliers:
            out["train/lr/" + re.sub(r"[^-\w.]", "_", rule.pattern)] = base * rule.scale
        return out

    def optimizer_step(self) -> torch.Tensor | None:
        """Clip, step, advance the schedule; returns the pre-clip global norm (on the device).

        The norm is global (all-reduced over every shard and stage), so a NaN or Inf anywhere gives every
        rank the same verdict. `raise` records the first bad step on the device and is checked where the
        loop synchronizes anyway (logging, saving, the end); `skip` must decide before the update, which
        costs one host synchronization per step. Under fp16 the loss scaler's own skip handles overflows
        (DeepSpeed's are counted in skipped_steps). Returns None where the strategy has no norm to give.
        """
        skip = str(self.cfg.numerics.on_nonfinite) == "skip" and self.scaler is None
        applied = []
        # MoE blocks: the routing counts of this step, summed over the data-parallel ranks, move the balancing bias
        # (context-parallel ranks route other tokens of the same sequences: their counts are summed too)
        counts_sum = lambda t: self._all_reduce_sum(self._all_reduce_sum(t), "cp")  # noqa: E731
        self.moe_load = balance(self.par.parts, counts_sum, self.par.dims.ep) if self.model_args.moe else {}
        aux, self.moe_aux = self.moe_aux, 0.0
        self.moe_aux_step = self._all_reduce_sum(aux) if torch.is_tensor(aux) else None  # (on the device: no sync)

        def apply(norm: torch.Tensor) -> bool:
            ok = bool(torch.isfinite(norm))
            applied.append(ok)
            return ok

        if self.cfg.optim.in_backward:  # every parameter was updated during the backward: the norm is what remains
            grad_norm = self.optimizer.grad_norm(self.par.group("dp"), replicas=self.par.dims.dp_replicate)
            self.optimizer.step()  # a no-op that keeps the schedule's books (it checks the step was called)
        else:
            grad_norm = self.par.step(
                self.cfg.optim.max_grad_norm or float("inf"), scaler=self.scaler, apply=apply if skip else None
            )
        if self.par.overflowed:  # fp16 under DeepSpeed: its loss scaler skipped the step (normal; it rescales)
            self.skipped_steps += 1
        elif skip and not applied[0]:
            self.skipped_steps += 1
            self.logger.note(
                f"step {self.step + 1}: non-finite gradient norm; update skipped "
                f"({self.skipped_steps} skipped so far, numerics.on_nonfinite=skip)"
            )
        elif self.scaler is None and grad_norm is not None:  # raise: remember the first bad step, no sync
            if self._first_nonfinite is None:
                self._first_nonfinite = torch.full((), -1, dtype=torch.int64, device=grad_norm.device)
            bad = ~torch.isfinite(grad_norm) & (self._first_nonfinite < 0)
            self._first_nonfinite.masked_fill_(bad, self.step + 1)
        if self.par.overflowed or (skip and not applied[0]):
            with warnings.catch_warnings():  # a skipped update never called optimizer.step(): expected here
                warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
                self.scheduler.step()
        else:
            self.scheduler.step()
        return grad_norm

    def check_finite(self) -> None:
        """numerics.on_nonfinite=raise: stop (on every rank alike) if any step so far had a NaN/Inf norm."""
        if self._first_nonfinite is not None and (bad := int(self._first_nonfinite)) >= 0:
            raise NonFiniteError(
                f"non-finite loss or gradient norm at step {bad} (numerics.on_nonfinite=raise); "
                f"the parameters after it are not trustworthy, nothing was saved after it. "
                f"Lower optim.lr, check the data, or set numerics.on_nonfinite=skip"
            )

    @torch.no_grad()
    def samples(self) -> list[dict]:
        """Greedy completions of the held-out prompts (training.samples_every), without a KV cache: each new token is
        one forward over the prompt and what was generated so far, right-padded to a multiple of 8 x tp (sequence
        parallelism splits the sequence; padding after the last token changes nothing before it under causal
        attention). Every rank runs the same forwards (FSDP, TP, DDP and ZeRO need them all), and rank 0's choice of
        each token is broadcast, so that the ranks stop together."""
        t = self.cfg.training
        mult = 8 * self.plan.dims.tp
        tok, stop = self.sample_tokenizer, self.sample_stop
        rows = []
        self._set_train(False)
        try:
            for prompt, reference in self.sample_prompts:
                ids, out = list(prompt[-(t.seq_len - t.sample_tokens) :]), []
                while len(out) < t.sample_tokens:
                    n = len(ids)
                    x = torch.full((1, min(-(-n // mult) * mult, t.seq_len)), self.sample_pad, dtype=torch.int64)
                    x[0, :n] = torch.tensor(ids)
                    with self._autocast():
                        logits = self.model(x.to(self.device))
                    nxt = full(logits)[0, n - 1].argmax().reshape(1)
                    if self.world.distributed:
                        dist.broadcast(nxt, src=0)
                    ids.append(int(nxt))
                    out.append(ids[-1])
                    if stop and out[-len(stop) :] == stop:
                        break
                rows.append(
                    {"prompt": tok.decode(prompt), "completion": tok.decode(out), "reference": tok.decode(reference)}
                )
        finally:
            self._set_train(True)
        return rows

    def _set_train(self, mode: bool) -> None:
        for part in self.par.parts:
            part.train(mode)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean loss and perplexity over the first val_batches global batches of the held-out split."""
        self._set_train(False)
        loader = BatchLoader(self.val_source, shuffle=False, **self.val_loader_args)
        totals = torch.zeros(2, device=self.device)  # (loss sum, target tokens)
        for _ in range(self.cfg.training.val_batches):
            batch, _ = loader.next_batch()
            batch = batch.to(self.device)
            totals[1] += trained_targets(batch)
            if self.par.schedule is None:
                for mb in batch:
                    loss = self._loss_sum(mb)
                    totals[0] += full(loss)
                continue
            # pipeline: forward only, stage by stage (parallel/pipeline.py: the same for every schedule)
            inputs, targets = (self._local_tokens(t) for t in inputs_and_targets(batch.flatten(0, 1)))
            with self._autocast():
                totals[0] += self.par.forward_only(
                    inputs,
                    targets,
                    batch.shape[0],
                    self._logits_loss_sum,
                    **self._documents(batch.flatten(0, 1)),
                )
        self._all_reduce_sum(totals)  # over data-parallel ranks
        totals[0:1] = self._all_reduce_sum(totals[0:1].clone(), "cp")  # (the token counts are the whole sequences')
        totals[0:1] = self._all_reduce_sum(totals[0:1].clone(), "pp")  # only the last stage has losses
        self._set_train(True)
        loss = (totals[0] / totals[1]).item()
        return {"val/loss": loss, "val/perplexity": math.exp(min(loss, 50.0))}

    def train(self) -> list[dict]:
        """Run to training.steps; returns the logged metrics (also written to every sink)."""
        cfg, t = self.cfg, self.cfg.training
        history: list[dict] = []
        self._set_train(True)
        self.memory.reset()
        start_step = self.step
        self.logger.event(
            {
                "event": "start",
                "step": self.step,
                "resumed_from": str(self.resumed_from) if self.resumed_from else None,
                "world_size": self.world.world_size,
                "strategy": str(cfg.parallel.data),
                "layout": self.plan.dims.describe(),
            }
        )
        if (share := getattr(self.train_loader.source, "trained_fraction", None)) is not None:
            self.logger.log({"data/trained_fraction": share}, self.step)  # (chat data: the assistant tokens' share)
        if t.val_every and self.step == 0:  # the starting point of the validation curve
            first = self.validate()
            self.logger.log(first, 0)
            history.append({"step": 0, **first})
        if t.samples_every and self.step == 0:  # what the model says before training
            self.logger.samples(self.samples(), 0)
        run_start = time.perf_counter()
        window_start, window_steps = run_start, 0
        profiler = Profiler(cfg, self.run_dir, self.world.rank, self.device, note=self.logger.note)
        try:
            while self.step < t.steps:
                profiler.before_step(self.step + 1)
                lrs = self.learning_rates()  # this step's
                tracked = self._tracker()
                with tracked or contextlib.nullcontext():
                    loss, grad_norm = self.run_step()
                profiler.after_step(self.step)
                self.tokens_seen += self.plan.tokens_per_step
                window_steps += 1
                last = self.step == t.steps
                metrics: dict[str, float] = {}
                if self.step % cfg.logging.every == 0 or last:
                    # the only host synchronization of a logging step: the loss and the norm
                    with self.phases("log_sync"):
                        self.check_finite()
                        global_loss = self._all_reduce_sum(self._all_reduce_sum(loss.clone(), "pp")).item()
                        if self.device.type == "cuda":
                            torch.cuda.synchronize(self.device)
                    elapsed = time.perf_counter() - window_start
                    step_time = elapsed / window_steps
                    tps = self.plan.tokens_per_step / step_time / self.world.world_size  # per device
                    metrics = {
                        "train/loss": global_loss,
                        "train/grad_norm": grad_norm.item() if grad_norm is not None else None,
                        **lrs,
                        "train/loss_scale": self.par.loss_scale(self.scaler),
                        "train/tokens_seen": self.tokens_seen,
                        "train/skipped_steps": self.skipped_steps,
                        "perf/step_time_s": step_time,
                        "perf/tokens_per_sec_per_gpu": tps,
                        "perf/tflops_per_gpu": self.plan.flops_per_token * tps / 1e12,
                        "perf/mfu_pct": mfu_pct(self.plan.flops_per_token, tps, self.peak_tflops),
                        "perf/eta_s": step_time * (t.steps - self.step),
                        **self.memory.stats(),
                        **load_metrics(self.moe_load),
                        **({"moe/aux_loss": self.moe_aux_step.item()} if self.moe_aux_step is not None else {}),
                    }
                    window_start, window_steps = time.perf_counter(), 0
                if tracked is not None:
                    metrics.update(self._log_breakdown(tracked.breakdown()))
                if (t.val_every and self.step % t.val_every == 0) or last:
                    v_start = time.perf_counter()
                    metrics.update(self.validate())
                    window_start += time.perf_counter() - v_start  # validation time is not training time
                if metrics:
                    metrics = {k: v for k, v in metrics.items() if v is not None}
                    self.logger.log(metrics, self.step)
                    history.append({"step": self.step, **metrics})
                if t.samples_every and (self.step % t.samples_every == 0 or last):
                    s_start = time.perf_counter()
                    self.logger.samples(self.samples(), self.step)
                    window_start += time.perf_counter() - s_start  # (nor is sampling)
                self.logger.step_done(metrics.get("train/loss"))
                self.checkpointer.poll()
                stop = self.preemption.should_stop()
                if self.checkpointer.due(self.step) or (last and cfg.checkpoint.every > 0) or stop:
                    self.check_finite()  # never save parameters a NaN went through
                    with self.phases("checkpoint_save"):
                        self.checkpointer.save(self.step, sync=last or stop)
                self.faults.maybe_crash(self.step)
                if stop:
                    self._stop_for_preemption()
                    break
        except torch.cuda.OutOfMemoryError:
            profiler.on_oom()  # profile.memory_snapshot: what filled the memory, before the process dies
            raise
        self.checkpointer.wait()
        self.check_finite()
        self.summary(start_step, time.perf_counter() - run_start, history)
        return history

    def run_step(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One optimizer step on the next global batch: (this rank's loss share, the pre-clip norm), both on the
        device. Each part runs in its `shardwise.<phase>` range (trainer/profiling.py)."""
        with self.phases("data"):
            batch, ids = self.train_loader.next_batch()
            if self.samples_file is not None:
                self.samples_file.write(json.dumps({"step": self.step + 1, "ids": ids.flatten().tolist()}) + "\n")
                self.samples_file.flush()
        with self.phases("forward_backward"):
            loss = self.forward_backward(batch)
        with self.phases("optimizer_step"):
            grad_norm = self.optimizer_step()
        self.step += 1
        return loss, grad_norm

    def _tracker(self):
        """logging.memory_breakdown: a tracker around the chosen step (the last one of a shorter run), else None."""
        lg, t = self.cfg.logging, self.cfg.training
        if not lg.memory_breakdown or self.step + 1 != min(lg.memory_breakdown_step, t.steps):
            return None
        from parallel.memory import StepMemory

        return StepMemory(self.par, self.optimizer)

    def _log_breakdown(self, mine: dict[str, int]) -> dict[str, float]:
        """Every rank's tracked breakdown, gathered: the per-rank table goes into metrics.jsonl (a
        `memory_breakdown` record) and the console; the most loaded rank's numbers into every sink."""
        ranks = [mine]
        if self.world.distributed:
            ranks = [None] * self.world.world_size
            dist.all_gather_object(ranks, mine, group=self.side_group)
        top = max(range(len(ranks)), key=lambda r: ranks[r]["peak"])
        self.logger.event({"event": "memory_breakdown", "step": self.step, "unit": "bytes", "ranks": ranks})
        mib = 2**20
        for r, b in enumerate(ranks):
            parts = ", ".join(f"{k} {v / mib:.2f}" for k, v in b.items() if k not in BESIDE and v)
            host = f"; offloaded activations {b[OFFLOADED] / mib:.2f} MiB on the host" if OFFLOADED in b else ""
            host += f"; pinned host memory {b[PINNED] / mib:.2f} MiB" if PINNED in b else ""
            self.logger.note(
                f"memory at the peak of step {self.step}, rank {r}: {b['peak'] / mib:.2f} MiB ({parts} MiB){host}"
            )
        out = {"memory/tracked_peak_bytes": float(ranks[top]["peak"]), "memory/tracked_peak_rank": float(top)}
        out.update({f"memory/tracked/{k}_bytes": float(v) for k, v in ranks[top].items() if k != "peak"})
        return out

    def summary(self, start_step: int, wall_s: float, history: list[dict]) -> None:
        """The end-of-run lines on the console, and an `end` record in metrics.jsonl."""
        steps = self.step - start_step
        tokens = steps * self.plan.tokens_per_step
        tps = tokens / wall_s / self.world.world_size if wall_s > 0 and steps else 0.0
        mfu = mfu_pct(self.plan.flops_per_token, tps, self.peak_tflops)
        mem = self.memory.stats()
        peak = mem.get("mem/peak_allocated_gib", mem.get("mem/peak_rss_gib"))
        latest = self.checkpointer.root / "latest"
        last_ckpt = str(self.checkpointer.root / latest.read_text().strip()) if latest.is_file() else None
        final = next((r for r in reversed(history) if "train/loss" in r), {})
        record = {
            "event": "end",
            "step": self.step,
            "steps_this_run": steps,
            "tokens_this_run": tokens,
            "wall_time_s": wall_s,
            "mean_tokens_per_sec_per_gpu": tps,
            "mean_mfu_pct": mfu,
            "peak_memory_gib": peak,
            "last_checkpoint": last_ckpt,
            "final_loss": final.get("train/loss"),
            "skipped_steps": self.skipped_steps,
        }
        self.logger.event(record)
        self.logger.note(
            f"done: {steps} steps (to step {self.step}), {tokens:,} tokens in {wall_s:.1f} s; "
            f"{tps:,.0f} tokens/s/device; MFU {'-' if mfu is None else f'{mfu:.1f}%'}; "
            f"peak memory {peak:.2f} GiB; final loss {final.get('train/loss', float('nan')):.4f}; "
            f"skipped steps {self.skipped_steps}; last checkpoint {last_ckpt or 'none'}"
        )

    def _stop_for_preemption(self) -> None:
        reason = self.preemption.local_reason() or "another rank was asked to stop"
        if self.world.rank == 0:
            marker = self.preemption.write_requeue_marker(self.run_dir, self.step, reason)
            self.preemption.flag_file.unlink(missing_ok=True)
            self.logger.note(
                f"preempted ({reason}): saved step {self.step}, wrote {marker}; the same command resumes from here"
            )

    def close(self, *, keep_process_group: bool = False) -> None:
        """End the run. `keep_process_group`: leave the default process group up for another Trainer in this
        process (the test workers build several in one launch)."""
        if self.samples_file is not None:
            self.samples_file.close()
        self.logger.close()
        self.lock.release()
        if not keep_process_group:
            destroy_distributed()
        torch.use_deterministic_algorithms(self._was_deterministic)
        # Drop everything that holds process groups (meshes, DTensors, FSDP/DeepSpeed state) and collect it
        # now: left to interpreter teardown, gloo's threads can be destroyed in the wrong order and abort
        # a finished process ("terminate called without an active exception").
        self.par = self.model = self.optimizer = self.scheduler = self.checkpointer = None
        gc.collect()
