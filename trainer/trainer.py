"""The Trainer: the build order of docs/architecture.md, then the training loop, top to bottom."""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig

from models.llama import build_model
from optim import build_optimizer, build_scheduler
from parallel import parallelize
from parallel.mesh import destroy_distributed, init_distributed
from trainer.config import Plan, Precision, model_args_of, save_resolved, to_container
from trainer.data import BatchLoader, open_sources
from trainer.metrics import MemoryMonitor, MetricLogger, detect_peak_tflops, mfu_pct

IGNORE_INDEX = -100  # targets with this id (padding) carry no loss


class Trainer:
    def __init__(self, cfg: DictConfig, plan: Plan):
        # 1. the config was parsed and validated by the caller (trainer.config.check) before this point
        self.cfg, self.plan = cfg, plan
        t = cfg.training
        self.run_dir = Path(cfg.run_dir)

        # 2. process group (nccl on GPU, gloo on CPU) and this rank's place in it
        self.world = init_distributed(t.device)
        self.device = self.world.device
        torch.manual_seed(t.seed)
        self.dp_rank = self.world.rank if plan.dp_size > 1 else 0

        # 3. the model on the meta device: shapes only, nothing allocated
        self.model_args = model_args_of(cfg)
        model = build_model(self.model_args, device="meta")

        # 4. allocate on the device, then 5. initialize every parameter and buffer from the seed
        #    (the same weights in every layout), then wrap for the parallel strategy
        model.to_empty(device=self.device)
        model.init_weights(seed=t.seed)
        self.par = parallelize(model, cfg, self.world)
        self.model = self.par.model

        # 6. precision, optimizer, schedule, data, loggers
        self.precision = Precision(str(t.precision))
        self.autocast_dtype = {Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}.get(self.precision)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == Precision.fp16 else None
        self.optimizer = build_optimizer(self.par.module, cfg, device_type=self.device.type)
        self.scheduler = build_scheduler(self.optimizer, cfg)

        train_src, val_src, self.data_description = open_sources(cfg, t.seq_len, self.model_args.vocab_size)
        if getattr(train_src, "vocab_size", 0) > self.model_args.vocab_size:
            raise ValueError(f"data vocab_size {train_src.vocab_size} > model vocab_size {self.model_args.vocab_size}")
        loader_args = dict(global_batch=t.global_batch_size, micro_batch=t.micro_batch_size, dp_rank=self.dp_rank,
                           dp_size=plan.dp_size, seed=t.seed)
        self.train_loader = BatchLoader(train_src, shuffle=True, **loader_args)
        self.val_source, self.val_loader_args = val_src, loader_args
        self.step = 0
        self.tokens_seen = 0

        if self.world.is_logging_rank:
            save_resolved(cfg, self.run_dir / "config.yaml")
        self.peak_tflops = cfg.logging.peak_tflops or detect_peak_tflops(self.device, str(self.precision))
        self.memory = MemoryMonitor(self.device)
        self.logger = MetricLogger(cfg, self.run_dir, enabled=self.world.is_logging_rank, config=to_container(cfg))

    # ------------------------------------------------------------------------------------------

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.plan.dp_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def _loss_sum(self, tokens: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of one micro-batch (mb, T + 1) -> scalar fp32."""
        inputs, targets = tokens[:, :-1], tokens[:, 1:]  # (mb, T) each
        with self._autocast():
            logits = self.model(inputs)  # (mb, T, V)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum",
                               ignore_index=IGNORE_INDEX)

    def forward_backward(self, batch: torch.Tensor) -> torch.Tensor:
        """Accumulate the gradients of this rank's (accum, mb, T + 1) share of the global batch.

        The objective is the MEAN token loss over the whole global batch. Gradients add up, so each
        micro-batch contributes its loss SUM divided by the global count of target tokens: summing those
        gradients over micro-batches and ranks gives exactly the gradient of the global mean, whatever
        the split into micro-batches and ranks (a per-micro-batch mean would weight batches wrongly).
        Returns this rank's share of the global mean loss, still on the device (no host sync).
        """
        batch = batch.to(self.device, non_blocking=True)
        accum = batch.shape[0]
        # one small all-reduce: the number of target tokens in the global batch
        n_tokens = self._all_reduce_sum((batch[..., 1:] != IGNORE_INDEX).sum().to(torch.float32))
        loss_total = torch.zeros((), device=self.device)
        for i in range(accum):
            # gradients are synchronized across ranks only on the last micro-batch
            sync = contextlib.nullcontext() if i == accum - 1 else self.par.no_sync()
            with sync:
                loss = self._loss_sum(batch[i]) / n_tokens
                scaled = loss * self.par.grad_reduction_scale  # undo DDP's averaging: we want the sum
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_total += loss.detach()
        return loss_total

    def optimizer_step(self) -> torch.Tensor:
        """Clip, step, advance the schedule; returns the pre-clip global gradient norm (on the device)."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        max_norm = self.cfg.optim.max_grad_norm or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.par.module.parameters(), max_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)  # skips the step when gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return grad_norm

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean loss and perplexity over the first val_batches global batches of the held-out split."""
        self.model.eval()
        loader = BatchLoader(self.val_source, shuffle=False, **self.val_loader_args)
        totals = torch.zeros(2, device=self.device)  # (loss sum, target tokens)
        for _ in range(self.cfg.training.val_batches):
            batch, _ = loader.next_batch()
            batch = batch.to(self.device)
            for mb in batch:
                totals[0] += self._loss_sum(mb)
                totals[1] += (mb[:, 1:] != IGNORE_INDEX).sum()
        self._all_reduce_sum(totals)
        self.model.train()
        loss = (totals[0] / totals[1]).item()
        return {"val/loss": loss, "val/perplexity": math.exp(min(loss, 50.0))}

    def train(self) -> list[dict]:
        """Run to training.steps; returns the logged metrics (also written to every sink)."""
        cfg, t = self.cfg, self.cfg.training
        history: list[dict] = []
        self.model.train()
        self.memory.reset()
        if t.val_every and self.step == 0:  # the starting point of the validation curve
            first = self.validate()
            self.logger.log(first, 0)
            history.append({"step": 0, **first})
        run_start = time.perf_counter()
        window_start, window_steps = run_start, 0
        while self.step < t.steps:
            batch, _ = self.train_loader.next_batch()
            lr = self.scheduler.get_last_lr()[0]  # the lr this step's update uses
            loss = self.forward_backward(batch)
            grad_norm = self.optimizer_step()
            self.step += 1
            self.tokens_seen += self.plan.tokens_per_step
            window_steps += 1
            last = self.step == t.steps
            metrics: dict[str, float] = {}
            if self.step % cfg.logging.every == 0 or last:
                # the only host synchronization of a logging step: the loss and the norm
                global_loss = self._all_reduce_sum(loss.clone()).item()
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                elapsed = time.perf_counter() - window_start
                step_time = elapsed / window_steps
                tps = self.plan.tokens_per_step / step_time / self.world.world_size  # per device
                metrics = {
                    "train/loss": global_loss,
                    "train/grad_norm": grad_norm.item(),
                    "train/lr": lr,
                    "train/tokens_seen": self.tokens_seen,
                    "perf/step_time_s": step_time,
                    "perf/tokens_per_sec_per_gpu": tps,
                    "perf/tflops_per_gpu": self.plan.flops_per_token * tps / 1e12,
                    "perf/mfu_pct": mfu_pct(self.plan.flops_per_token, tps, self.peak_tflops),
                    "perf/eta_s": step_time * (t.steps - self.step),
                    **self.memory.stats(),
                }
                window_start, window_steps = time.perf_counter(), 0
            if (t.val_every and self.step % t.val_every == 0) or last:
                v_start = time.perf_counter()
                metrics.update(self.validate())
                window_start += time.perf_counter() - v_start  # validation time is not training time
            if metrics:
                metrics = {k: v for k, v in metrics.items() if v is not None}
                self.logger.log(metrics, self.step)
                history.append({"step": self.step, **metrics})
            self.logger.step_done(metrics.get("train/loss"))
        return history

    def close(self) -> None:
        self.logger.close()
        destroy_distributed()
