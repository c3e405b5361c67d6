"""DeepSpeed ZeRO-1/2/3 (and ZeRO-Offload) behind the same Trainer.

The Trainer's step keeps its shape: it calls `par.backward()` per micro-batch and `par.step()` per
optimizer step; here those become DeepSpeed's `engine.backward()` and `engine.step()`. Loss normalization
stays ours (sum over tokens / global token count, times the data-parallel size to undo DeepSpeed's
gradient averaging), so `engine.backward` is called with `scale_wrt_gas=False`. DeepSpeed keeps its own
micro-step counter to know the accumulation boundary, so `engine.step()` is also called after every
non-final micro-batch (it only advances the counter there).
"""

from __future__ import annotations

import contextlib
import copy
import json

import torch
from torch import nn

from models.adapters import adapter_spec, apply_adapters
from models.args import installed
from models.dtensor import nbytes
from models.init import fill_flat_partition
from models.llama import canonical_name, count_params
from parallel.activation import apply_ac
from parallel.compile import apply_compile
from parallel.layout import PERSISTENCE_THRESHOLD, ZERO_STAGES, ParallelDims, bucket_elements, microbatches
from parallel.mesh import World
from parallel.parallelized import Parallelized


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _deepspeed():
    """The deepspeed module, told not to build the shared-memory communication op: on a CPU accelerator its
    communication layer JIT-builds that op at init (about 35 s on 2 cores the first time, a ninja check in every
    process after) for `inference_all_reduce` only, which training never calls; our collectives go through
    torch.distributed."""
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def build_ds_config(cfg, dims: ParallelDims, n_params: int) -> dict:
    """The ds_config for our recipe; `parallel.deepspeed` entries are merged over it last."""
    from omegaconf import OmegaConf

    p, t = cfg.parallel, cfg.training
    stage = ZERO_STAGES[str(p.data)]
    accum = microbatches(t.global_batch_size, t.micro_batch_size, dims.dp_size)
    pin = torch.cuda.is_available()  # pinned host memory needs a GPU
    # DeepSpeed allocates its buckets at their full size whatever the model's: no bigger than the model
    bucket = bucket_elements(n_params)
    zero = {
        "stage": stage,
        "overlap_comm": True,  # overlap gradient reduction with backward
        "contiguous_gradients": True,  # copy gradients into one buffer as they are reduced (less fragmentation)
        "reduce_bucket_size": bucket,  # elements per reduce bucket
    }
    if stage < 3:
        zero["allgather_bucket_size"] = bucket
    else:
        zero["stage3_prefetch_bucket_size"] = bucket
        zero["stage3_param_persistence_threshold"] = PERSISTENCE_THRESHOLD  # smaller params stay gathered
        # DeepSpeed's defaults (1e9 each) let up to a billion gathered parameters stay live between uses
        # (2 GB in bf16 on every rank); one bucket's worth bounds it, and the planner counts exactly that
        zero["stage3_max_live_parameters"] = bucket
        zero["stage3_max_reuse_distance"] = bucket
    if str(p.offload) == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if p.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    config = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        # DeepSpeed clips at 1.0 unless told otherwise: always state ours (0 = off)
        "gradient_clipping": float(cfg.optim.max_grad_norm),
        "zero_optimization": zero,
        "bf16": {"enabled": str(t.precision) == "bf16"},
        "fp16": {"enabled": str(t.precision) == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,  # our AdamW is torch's; DeepSpeed only vets its own list
        "steps_per_print": 2**31 - 1,  # shardwise logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    return _merge(config, OmegaConf.to_container(p.deepspeed, resolve=True) if p.deepspeed else {})


class ZeroParallelized(Parallelized):
    engine = None
    ds_config: dict
    peak_grad_bytes: int = 0  # the most gradient bytes this rank held after any micro-batch's backward

    def _grad_bytes(self) -> int:
        """Gradient bytes held now: full `.grad`s (ZeRO-1 accumulates them until the boundary) plus the
        reduced gradient partitions DeepSpeed keeps (ZeRO-2/3, and ZeRO-1 after its boundary reduce)."""
        full = sum(nbytes(p.grad) for p in self.parts[0].parameters())
        parts = getattr(self.ds_optimizer, "averaged_gradients", {}) or {}
        return full + sum(
            nbytes(g) for group in parts.values() for g in (group if isinstance(group, list) else [group])
        )

    def model_state_bytes(self) -> dict[str, int]:
        """What this rank holds: model parameters (full for ZeRO-1/2, its partition for ZeRO-3), the fp32
        master partition, the peak gradient bytes, and the optimizer's moments (over its partition)."""
        opt, stage = self.ds_optimizer, self.ds_config["zero_optimization"]["stage"]
        params = list(self.parts[0].parameters())
        masters = opt.fp32_partitioned_groups_flat if stage == 3 else opt.single_partition_of_fp32_groups
        return {
            "params": sum(nbytes(p.ds_tensor if stage == 3 else p) for p in params),
            "master": sum(nbytes(t) for t in masters),
            "grads": self.peak_grad_bytes,
            "optim": sum(
                nbytes(v)
                for st in opt.optimizer.state.values()
                for k, v in st.items()
                if torch.is_tensor(v) and k != "step"
            ),
        }

    def run_files(self) -> dict[str, str]:
        return {"ds_config.json": json.dumps(self.ds_config, indent=2)}

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.engine, self.ds_optimizer, _, _ = _deepspeed().initialize(
            model=self.parts[0], optimizer=optimizer, config=self.ds_config, dist_init_required=False
        )
        self.model = self.engine

    def backward(self, loss: torch.Tensor, *, last_micro: bool, scaler=None) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # our loss is already normalized globally
        self.peak_grad_bytes = max(self.peak_grad_bytes, self._grad_bytes())
        if not last_micro:
            self.engine.step()  # advances DeepSpeed's micro-step counter; no update before the boundary

    def step(self, max_norm: float, scaler=None, apply=None) -> torch.Tensor | None:
        """Reduce, clip (ds_config gradient_clipping), update and zero the gradients, at the boundary.

        Returns the pre-clip global norm, or None when DeepSpeed has none to give: a step it skipped
        for a loss-scale overflow (fp16; its norm is then inf by construction, not a measurement) or a
        configuration that does not compute it. `overflowed` says whether this step was skipped so."""
        # `apply` (numerics.on_nonfinite=skip) is refused under ZeRO at validation: the engine steps itself
        skipped_before = self.engine.skipped_steps
        self.engine.step()
        self.overflowed = self.engine.skipped_steps > skipped_before
        norm = self.engine.get_global_grad_norm()
        if self.overflowed or norm is None:
            return None
        return torch.as_tensor(norm, dtype=torch.float32)

    def loss_scale(self, scaler=None) -> float | None:
        """fp16: DeepSpeed's dynamic loss scale now (it halves on every overflow); None otherwise."""
        if not self.ds_config["fp16"]["enabled"]:
            return None
        return float(self.ds_optimizer.loss_scale)


def parallelize_zero(model: nn.Module, cfg, dims: ParallelDims, world: World, mesh) -> ZeroParallelized:
    """Materialize and initialize the model; DeepSpeed partitions it when the optimizer is attached
    (`deepspeed.initialize`). ZeRO-1/2 keep the whole model on every rank by design; ZeRO-3 builds it partitioned
    (`deepspeed.zero.Init`: each module's parameters are split as soon as the module is constructed, so no rank
    holds more than one module's full weights) and fills each rank's flat partition from the same
    counter-based draw as every other layout (models/init.py). The Trainer writes the resolved ds_config
    (`run_files`) once every check has passed."""
    p, t = cfg.parallel, cfg.training
    notes = []
    # apply AC and compile the same way as the native path; DeepSpeed then shards what they produced

    ds_config = build_ds_config(cfg, dims, count_params(model))
    if ds_config["zero_optimization"]["stage"] == 3:
        model = build_partitioned(model, ds_config, world.device, seed=t.seed)
    else:
        model.to_empty(device=world.device)
        model.init_weights(seed=t.seed)
    apply_ac(model, str(p.ac), every=p.ac_every, sac_matmuls=str(p.sac_matmuls))
    if p.compile:
        apply_compile(model)
    if str(p.offload) == "cpu":
        notes.append(
            "ZeRO-Offload: the optimizer runs as DeepSpeed's CPU Adam, whose C++ op is compiled on first "
            "use (about a minute, cached in ~/.cache/torch_extensions; launch/build_ops.py builds it ahead)"
        )
    par = ZeroParallelized(
        parts=[model],
        model=model,
        dims=dims,
        mesh=mesh,
        grad_reduction_scale=float(dims.dp_size),
        no_sync=contextlib.nullcontext,
        autocast_dtype=None,
        loss_parallel=False,
        notes=notes,
        manages_precision=True,
    )
    par.ds_config = ds_config
    return par


def build_partitioned(meta_model: nn.Module, ds_config: dict, device: torch.device, *, seed: int) -> nn.Module:
    """The model of `meta_model`'s shape, constructed under `deepspeed.zero.Init` on `device` (or, with
    offload_param, in host memory), its partitions filled from `seed`."""
    deepspeed = _deepspeed()
    # DeepSpeed's communication layer wraps our process group (as deepspeed.initialize would), so that
    # zero.Init checks the batch sizes against the real world size and partitions over it
    deepspeed.comm.init_distributed(dist_backend=torch.distributed.get_backend(), dist_init_required=False)
    with (
        deepspeed.zero.Init(config_dict_or_path=ds_config, remote_device=_remote_device(ds_config)),
        torch.device(device),
        _without_default_init(),
    ):
        model = type(meta_model)(meta_model.args)
        if (spec := adapter_spec(meta_model)) is not None:  # finetune: the same adapters, partitioned as made
            apply_adapters(model, spec, share_base=False)
    model.loss_chunks = meta_model.loss_chunks  # (the Trainer's setting on the meta model: the loss in chunks)
    model.init_weights(seed=seed, buffer_device=device, values=False)  # the RoPE tables (buffers: not partitioned)
    for name, prm in model.named_parameters():
        name = canonical_name(name)
        spec, flat = model.init_spec(name), prm.ds_tensor
        start = partition_start(prm)
        if "fill" in spec:
            with torch.no_grad():
                flat.fill_(spec["fill"])
                flat[max(0, min(flat.numel(), prm.ds_numel - start)) :].zero_()
        else:
            fill_flat_partition(flat, start, prm.ds_numel, seed, name, **spec)
    return model


@contextlib.contextmanager
def _without_default_init():
    """nn.Linear and nn.Embedding draw their own initial weights in their constructors, over the full tensor,
    just before zero.Init partitions them and shardwise overwrites the partition: skip those draws."""
    names = ("kaiming_uniform_", "uniform_", "normal_", "trunc_normal_")
    saved = {n: getattr(nn.init, n) for n in names}
    for n in names:
        setattr(nn.init, n, lambda tensor, *a, **k: tensor)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def _remote_device(ds_config: dict) -> str | None:
    return (ds_config["zero_optimization"].get("offload_param") or {}).get("device")


def partition_start(prm) -> int:
    """The index, in the flattened full parameter, of the first element of this rank's ZeRO-3 partition."""
    import torch.distributed as dist

    return dist.get_rank(group=prm.ds_process_group) * prm.ds_tensor.ds_numel


def load_full_into_partitions(model: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Copy full tensors (by canonical name) into a ZeRO-3 model's partitions: each rank its own slice."""

    with torch.no_grad():
        for name, prm in model.named_parameters():
            if canonical_name(name) not in full:  # an adapter (models/adapters.py) keeps its own start
                continue
            src, flat = full[canonical_name(name)].reshape(-1), prm.ds_tensor
            start = partition_start(prm)
            n = max(0, min(flat.numel(), src.numel() - start))
            flat[:n].copy_(src[start : start + n])
            flat[n:].zero_()


def is_partitioned(parts) -> bool:
    return any(hasattr(prm, "ds_tensor") for part in parts for prm in part.parameters())


def config_problems(cfg, *, on_cpu: bool) -> list[str]:
    """The rules of the DeepSpeed strategies (none for the others): what DeepSpeed can run here, and what
    shardwise refuses under it (trainer/validate.py::validate collects every subsystem's rules)."""
    p, t, o = cfg.parallel, cfg.training, cfg.optim
    if str(p.data) not in ZERO_STAGES:
        return []

    problems: list[str] = []
    if p.tp > 1 or p.pp > 1:
        problems.append(
            f"parallel.data={p.data} with tp({p.tp}) / pp({p.pp}): shardwise runs DeepSpeed ZeRO as "
            f"pure data parallelism; for tensor or pipeline parallelism use parallel.data=fsdp"
        )
    if not installed("deepspeed"):
        problems.append(
            f"parallel.data={p.data} needs DeepSpeed, which is not installed: "
            f"pip install -e '.[deepspeed]' (DS_BUILD_OPS=0 skips prebuilding its ops)"
        )
    elif t.precision == "fp16" and on_cpu and not _deepspeed_cpu_fp16():
        problems.append(
            f"training.precision=fp16 with parallel.data={p.data} on the CPU: DeepSpeed's CPU "
            f"accelerator runs fp16 only where oneDNN has fp16 kernels (CPUs with AVX512-FP16), and "
            f"this one has none; use training.precision=bf16 or fp32 on this machine"
        )
    if o.name == "adafactor":
        problems.append(
            f"optim.name=adafactor with parallel.data={p.data} is refused: DeepSpeed hands the optimizer flat fp32 "
            f"partitions cut at arbitrary element offsets, so a matrix's rows and columns, which Adafactor "
            f"factors its second moment over, are split across ranks mid-row; running it would be a different "
            f"algorithm under the same name. Use parallel.data=fsdp (sharding-aware Adafactor) or optim.name=adamw"
        )
    if o.name in ("adamw8bit", "adamw_bf16"):
        problems.append(
            f"optim.name={o.name} with parallel.data={p.data} is refused: DeepSpeed wraps the optimizer "
            f"in its own ZeRO optimizer, which steps flat fp32 partitions and checkpoints their states in "
            f"its own format, a path shardwise does not test for low-precision states. Use "
            f"parallel.data=fsdp (or ddp/hsdp/tp/pp) with {o.name}, or optim.name=adamw under ZeRO"
        )
    if cfg.checkpoint.async_save:
        problems.append(
            f"checkpoint.async_save=true with parallel.data={p.data}: DeepSpeed saves its own files "
            f"synchronously; set checkpoint.async_save=false"
        )
    if str(cfg.numerics.on_nonfinite) == "skip":
        problems.append(
            f"numerics.on_nonfinite=skip with parallel.data={p.data}: DeepSpeed's engine applies the "
            f"update itself; use numerics.on_nonfinite=raise (DeepSpeed skips fp16 overflows on its own)"
        )
    return problems


def _deepspeed_cpu_fp16() -> bool:
    """DeepSpeed's own answer: does its CPU accelerator accept fp16 here?"""
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    return bool(CPU_Accelerator().is_fp16_supported())
