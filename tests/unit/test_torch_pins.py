"""The private torch methods shardwise overrides or calls, pinned: a torch release that changes one fails here, by
name, instead of training differently.

parallel/schedules.py::ShardedGradStage overrides `_PipelineStageBase.backward_maybe_with_nosync` and, for the call it
forwards, swaps the FSDP module's `set_requires_gradient_sync` (which torch's method calls with False between
microbatches). Checked by reading torch's own source in the wheels of 2.11.0 (the GPU machine's), 2.13.0 (CI's) and
2.14.1 (2026-12-06): the same signatures and the same call in all three.

parallel/memory.py's tracker overrides `MemTracker._update_peak_stats(self, peak_state)` (called by the tracker's
`__torch_dispatch__` after every operator; FSDPMemTracker's too) with its global-peak half only. Read in 2.11.0 and
2.13.0 (2026-12-06): the same method, the same call. The override is checked against torch's own method below.
"""

from __future__ import annotations

import inspect

# (parameter name, kind, default) of each, as torch 2.11.0, 2.13.0 and 2.14.1 define it
BACKWARD = [
    ("self", "POSITIONAL_OR_KEYWORD", None),
    ("backward_type", "POSITIONAL_OR_KEYWORD", None),
    ("bwd_kwargs", "POSITIONAL_OR_KEYWORD", None),
    ("last_backward", "POSITIONAL_OR_KEYWORD", False),
]
GRADIENT_SYNC = [
    ("self", "POSITIONAL_OR_KEYWORD", None),
    ("requires_gradient_sync", "POSITIONAL_OR_KEYWORD", None),
    ("recurse", "KEYWORD_ONLY", True),
]


def _shape(fn) -> list[tuple]:
    return [
        (p.name, p.kind.name, None if p.default is inspect.Parameter.empty else p.default)
        for p in inspect.signature(fn).parameters.values()
    ]


def test_the_pipeline_stage_method_shardwise_overrides_is_the_one_it_was_written_for():
    from torch.distributed.pipelining.stage import _PipelineStageBase

    from parallel.schedules import ShardedGradStage

    assert _shape(_PipelineStageBase.backward_maybe_with_nosync) == BACKWARD, (
        "torch's backward_maybe_with_nosync changed: re-read torch/distributed/pipelining/stage.py and update "
        "parallel/schedules.py::ShardedGradStage"
    )
    assert _shape(ShardedGradStage.backward_maybe_with_nosync) == BACKWARD
    # the base method turns the sync off through the submodule's own method, which the override swaps per call
    source = inspect.getsource(_PipelineStageBase.backward_maybe_with_nosync)
    assert "self.submod.set_requires_gradient_sync(False)" in source


def test_the_fsdp_method_the_stage_swaps_keeps_its_signature():
    from torch.distributed.fsdp import FSDPModule

    assert _shape(FSDPModule.set_requires_gradient_sync) == GRADIENT_SYNC


def test_the_tracker_method_the_step_memory_overrides_is_the_one_it_was_written_for():
    from torch.distributed._tools import fsdp2_mem_tracker, mem_tracker

    assert _shape(mem_tracker.MemTracker._update_peak_stats) == [
        ("self", "POSITIONAL_OR_KEYWORD", None),
        ("peak_state", "POSITIONAL_OR_KEYWORD", None),
    ]
    body = inspect.getsource(mem_tracker.MemTracker._update_peak_stats)
    for name in ("self._curr_mem_snap", "self._peak_mem[dev]", "self._peak_mem_snap[dev]", "_TOTAL_KEY"):
        assert name in body, f"torch's MemTracker._update_peak_stats no longer uses {name}: re-read it"
    for cls in (mem_tracker.MemTracker, fsdp2_mem_tracker.FSDPMemTracker):
        assert "self._update_peak_stats(peak_state)" in inspect.getsource(cls.__torch_dispatch__)


def test_the_global_peak_is_torchs_own(tmp_path):
    """StepMemory's tracker skips torch's per-module peaks; the global peak and its categories are the ones torch's
    unmodified method finds, on a step with full AC (recomputation in backward) and gradient accumulation."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from parallel.memory import StepMemory
    from trainer.config import load_config
    from trainer.trainer import Trainer
    from trainer.validate import check

    def tracked(torchs: bool) -> dict:
        cfg = load_config(
            [
                "recipe=llama_debug",
                *("model.dim=64", "model.n_layers=2", "model.vocab_size=256", "data.source=synthetic"),
                *("training.seq_len=32", "training.micro_batch_size=2", "training.global_batch_size=4"),
                *("parallel.ac=full", "training.precision=fp32", "training.val_every=0", "logging.console=false"),
                *("logging.jsonl=false", "logging.tensorboard=false", "logging.wandb.mode=disabled"),
                f"run_dir={tmp_path / str(torchs)}",
            ]
        )
        trainer = Trainer(cfg, check(cfg, 1))
        try:
            batch, _ = trainer.train_loader.next_batch()
            trainer.forward_backward(batch)
            trainer.optimizer_step()
            memory = StepMemory(trainer.par, trainer.optimizer)
            if torchs:  # the same tracker with torch's own method back
                memory.tracker._update_peak_stats = MemTracker._update_peak_stats.__get__(memory.tracker)
            batch, _ = trainer.train_loader.next_batch()
            with memory:
                trainer.forward_backward(batch)
                trainer.optimizer_step()
            return memory.breakdown()
        finally:
            trainer.close()

    ours, theirs = tracked(False), tracked(True)
    assert ours == theirs and ours["peak"] > 0 and ours["activations"] > 0
