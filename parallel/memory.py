"""What one rank actually holds, measured: its model states (`model_state_bytes`) and, by category at the peak
of a whole step, every tensor byte (`StepMemory`, on torch's MemTracker). The prediction is parallel/plan.py."""

from __future__ import annotations

import torch

from models.dtensor import nbytes


def model_state_bytes(parts, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """{'params', 'grads', 'optim'} bytes this rank stores (DTensors count their local shard only;
    a tied parameter counts once; the optimizer's scalar step counters are left out)."""
    params = {id(p): p for part in parts for p in part.parameters()}.values()
    out = {"params": sum(nbytes(p) for p in params), "grads": sum(nbytes(p.grad) for p in params), "optim": 0}
    if optimizer is not None:
        for state in optimizer.state.values():
            for key, v in state.items():
                if torch.is_tensor(v) and key != "step":
                    out["optim"] += nbytes(v)
    return out


# ------------------------------------------------------------------------------------------------
# Measurement of one whole step, by category: torch's own tracker (MemTracker / FSDPMemTracker).

CATEGORIES = (
    "params",
    "gathered_params",
    "buffers",
    "grads",
    "unsharded_grads",
    "optim",
    "master",
    "activations",
    "temporaries",
    "other",
)

OFFLOADED = "offloaded_activations"  # host memory, beside the categories (parallel/offload.py)
# on CUDA, the pinned host allocator's peak (blocks rounded to powers of two, cached ones included): activation
# offloading's buffers, FSDP's CPU offload; beside the categories, like OFFLOADED
PINNED = "pinned_host_bytes"
BESIDE = ("peak", OFFLOADED, PINNED)  # the keys of a breakdown that are not device categories

# torch's category names (mem_tracker._MemRefType, fsdp2_mem_tracker._FSDPRefType) -> ours
_TORCH_NAMES = {
    "Parameter": "params",
    "Sharded Param": "params",
    "Unsharded Param": "gathered_params",
    "All Gather": "gathered_params",
    "Buffer": "buffers",
    "Gradient": "grads",
    "Sharded Grad": "grads",
    "Unsharded Grad": "unsharded_grads",
    "Optstate": "optim",
    "OptState": "optim",
    "Activation": "activations",
    "Temp": "temporaries",
    "Reduce Scatter": "temporaries",
    "Other": "other",
    "Inputs": "other",
}


def _repeatable(base):
    """torch's trackers refuse a second forward of a root module within one tracked region ("does not support
    memory tracking for multiple iterative calls"), which every gradient-accumulation step and every pipeline
    schedule does. The fix is theirs (`reset_mod_stats()` between iterations): a global forward pre-hook,
    registered ahead of the tracker's own, clears a root's per-module statistics when it starts a new forward.
    The global peak and its categories, which are what shardwise reports, carry on across micro-batches."""
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY

    class Repeatable(base):
        def __init__(self, roots, *args):
            super().__init__(*args)
            self._roots = {id(r) for r in roots}
            self._repeat_handle = None

        def _new_forward(self, module, args):
            if id(module) in self._roots and not self._mod_tracker.is_bw:
                for sub in module.modules():  # this root's modules only: a pipeline rank runs two stages
                    self.memory_tracking.pop(sub, None)

        def __enter__(self):
            from torch.nn.modules.module import register_module_forward_pre_hook

            if self._depth == 0:
                self._repeat_handle = register_module_forward_pre_hook(self._new_forward)
            return super().__enter__()

        def __exit__(self, *args):
            super().__exit__(*args)
            if self._depth == 0 and self._repeat_handle is not None:
                self._repeat_handle.remove()
                self._repeat_handle = None

        def _update_peak_stats(self, peak_state) -> None:
            """The global peak only. torch's version (called after every operator) also walks every module it has
            tracked so far to update per-module peaks, deep-copying snapshots: most of a tracked step's time,
            and nothing shardwise reads. The global part is torch's own, its snapshot a copy of a flat dict."""
            for dev, snap in self._curr_mem_snap.items():
                total = snap[_TOTAL_KEY]
                if self._peak_mem.get(dev, 0) < total:
                    self._peak_mem[dev] = total
                    self._peak_mem_snap[dev] = dict(snap)

    return Repeatable


def _leaf_safe_mod_tracker():
    """torch's ModTracker with one change: a module input that is an autograd leaf gets no gradient hook.
    The zero-bubble and looped pipeline schedules compute a stage's input gradient with autograd.grad on the
    received activation, a leaf, and a multi-grad hook on a leaf fails there ("A leaf node was passed to
    _will_engine_execute_node but we are currently running autograd.grad()"). Without the hook that module's
    end of backward is marked when the backward pass ends, which only coarsens the per-module statistics."""
    from torch.distributed._tools.mod_tracker import ModTracker
    from torch.utils._pytree import tree_flatten, tree_unflatten

    class LeafSafe(ModTracker):
        def _fw_pre_hook(self, mod, input):
            args, spec = tree_flatten(input)
            safe = [None if isinstance(a, torch.Tensor) and a.requires_grad and a.grad_fn is None else a for a in args]
            return super()._fw_pre_hook(mod, tree_unflatten(safe, spec))

    return LeafSafe()


class _NoHook:
    def remove(self) -> None:
        pass


class StepMemory:
    """Track one training step (forward, backward, optimizer) of this rank; `breakdown()` is the peak.

    FSDP parts use torch's FSDPMemTracker, which tells sharded from gathered parameters and gradients and
    sees the all-gather and reduce-scatter buffers; every other layout uses MemTracker. Tensors that exist
    before the step and that neither tracker registers by itself (DeepSpeed's fp32 master partitions; ZeRO-3's
    reduce bucket and gradient partition, allocated with its optimizer) are registered by hand. Both trackers are
    TorchDispatchModes: CPU and CUDA tensors alike, and FakeTensors.
    """

    def __init__(self, par, optimizer):
        from torch.distributed._tools.mem_tracker import MemTracker
        from torch.distributed.fsdp import FSDPModule

        parts = list(par.parts)
        roots = [*parts, par.model]  # what the step calls: a part, or its DDP wrapper / DeepSpeed engine
        self.master: list[torch.Tensor] = []
        engine_opt = getattr(par, "ds_optimizer", None)
        if engine_opt is not None:
            stage = par.ds_config["zero_optimization"]["stage"]
            self.master = list(
                engine_opt.fp32_partitioned_groups_flat if stage == 3 else engine_opt.single_partition_of_fp32_groups
            )
        if all(isinstance(p, FSDPModule) for p in parts):
            from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

            tracker = _repeatable(FSDPMemTracker)(roots, parts[0], optimizer)
            if len(parts) > 1:  # FSDPMemTracker instruments one root; a pipeline rank may hold two stages
                instrument = tracker._instrument_fsdp_module

                def every_part():
                    for part in parts:
                        tracker._root_mod = part
                        instrument()
                    tracker._root_mod = parts[0]

                tracker._instrument_fsdp_module = every_part
        else:
            tracker = _repeatable(MemTracker)(roots)
            tracker.track_external(*parts, optimizer if engine_opt is None else engine_opt.optimizer)
        for t in self.master:  # registered as "Other": under ZeRO nothing else is, so Other is the masters
            tracker._update_and_maybe_create_winfos(t, tracker._ref_class.OTH)
        if engine_opt is not None and stage == 3:  # allocated with the optimizer and kept: the step never makes them
            for bucket in engine_opt.ipg_buckets.values():  # the reduce bucket, per gradient dtype
                if bucket.buffer is not None:
                    tracker._update_and_maybe_create_winfos(bucket.buffer, tracker._ref_class.TEMP)
            flat = engine_opt.grad_partitions_flat_buffer  # the gradient partition, every parameter's slice of it
            tracker._update_and_maybe_create_winfos(flat, tracker._ref_class.GRAD)
        for prm in (p for part in parts for p in part.parameters()):  # ZeRO-3: each parameter's own partition
            if getattr(prm, "ds_tensor", None) is not None:
                tracker._update_and_maybe_create_winfos(prm.ds_tensor, tracker._ref_class.PARAM)
        if par.schedule is not None:
            tracker._mod_tracker = _leaf_safe_mod_tracker()
            # the stages' receive buffers (one per microbatch, allocated in the first step, kept): "other"
            other = getattr(tracker._ref_class, "OTH", None) or tracker._ref_class.INP  # FSDP's tracker: "Inputs"
            for buf in pipeline_buffers(par.schedule):
                tracker._update_and_maybe_create_winfos(buf, other)
        self.tracker = tracker
        self.frozen = [p for part in parts for p in part.parameters() if not p.requires_grad]
        self.offload = getattr(par, "activation_offload", None)

    def __enter__(self):
        # torch's MemTracker registers a gradient hook on every parameter it meets, which a frozen one refuses
        # (a base under adapters): mark those as hooked already, with handles that remove nothing
        for p in self.frozen:
            self.tracker._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())
        if self.offload is not None:
            self.offload.reset_peak()
        if torch.cuda.is_initialized():
            torch.cuda.reset_peak_host_memory_stats()
        self.tracker.__enter__()
        return self

    def __exit__(self, *exc):
        self.tracker.__exit__(*exc)

    def breakdown(self) -> dict[str, int]:
        """{category: bytes} at the moment of this rank's peak, summed over devices, plus "peak"; with activation
        offloading also "offloaded_activations", the host copies' own peak (not part of "peak")."""
        snap = self.tracker.get_tracker_snapshot("peak")
        out = dict.fromkeys(CATEGORIES, 0)
        total = 0
        for dev_snap in snap.values():
            for key, v in dev_snap.items():
                name = str(getattr(key, "value", key))
                if name == "Total":
                    total += v
                elif name == "Other" and self.master:  # (no pipeline under ZeRO: Other is only the masters)
                    out["master"] += v
                else:
                    out[_TORCH_NAMES.get(name, "other")] += v
        out["peak"] = total
        if self.offload is not None:
            out[OFFLOADED] = self.offload.host_peak
        if torch.cuda.is_initialized() and (pinned := torch.cuda.host_memory_stats().get("allocated_bytes.peak", 0)):
            out[PINNED] = pinned
        return out


def pipeline_buffers(schedule) -> list[torch.Tensor]:
    """The activation and gradient receive buffers torch's pipeline stages keep, one per microbatch."""
    stages = getattr(schedule, "_stages", None) or [schedule._stage]
    out = []
    for stage in stages:
        for infos in [*stage.args_recv_info.values(), *stage.grad_recv_info.values()]:
            out += [i.buffer for i in infos if getattr(i, "buffer", None) is not None]
    return out
