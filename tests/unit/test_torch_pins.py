"""The private torch methods shardwise overrides or calls, pinned: a torch release that changes one fails here, by
name, instead of training differently.

parallel/schedules.py::ShardedGradStage overrides `_PipelineStageBase.backward_maybe_with_nosync` and, for the call it
forwards, swaps the FSDP module's `set_requires_gradient_sync` (which torch's method calls with False between
microbatches). Checked by reading torch's own source in the wheels of 2.11.0 (the GPU machine's), 2.13.0 (CI's) and
2.14.1 (2026-12-06): the same signatures and the same call in all three.
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
