"""Parallel strategies, applied by `parallelize()` in one fixed order.

    pipeline split -> per part: tensor parallel -> expert parallel -> activation checkpointing -> compile
    -> FSDP/HSDP -> allocate + initialize -> DDP

Why this order:
- The pipeline split comes first because every later step works on one stage's modules.
- EP splits the experts before FSDP shards what is left of them over the other ranks, and before AC so that a
  checkpointed block's recompute repeats the all-to-alls (every rank recomputes in the same order).
- TP before AC: the checkpoint wrapper must see the TP-parallelized block, so that recompute repeats the
  same sharded computation (and, with selective AC, keeps the reduce-scatter outputs instead of redoing them).
- AC before compile: compile then traces the checkpointed block as one unit and can fuse the recompute.
- FSDP last among the module transforms: it shards whatever parameters the earlier steps produced
  (TP's DTensors become 2-D (dp, tp) DTensors) and its hooks wrap the compiled, checkpointed block.
- Parameters are allocated and initialized only after sharding, so no rank ever holds a full model.
- DDP wraps allocated parameters, so it comes after initialization.
The model supplies its block list (`model.blocks`), TP plan and stage pruning; nothing here is LLaMA-specific.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from models.llama import canonical_name
from parallel.activation import apply_ac
from parallel.compile import apply_compile
from parallel.data_parallel import apply_ddp, apply_fsdp, fsdp_no_sync
from parallel.expert import apply_ep
from parallel.layout import microbatches, reshards_after_forward
from parallel.mesh import ParallelDims, World, build_meshes, needs_process_group
from parallel.parallelized import Parallelized, clip_grad_norm
from parallel.pipeline import PipelineLoss, split_model, static_stage_shapes
from parallel.tensor import apply_tp, keep_grads_sharded_like_params

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def parallelize(
    model: nn.Module,
    cfg,
    dims: ParallelDims,
    world: World,
    *,
    loss_sum=None,
    meshes=None,
    fake=None,
    stage_shapes=None,
    base_reader=None,
) -> Parallelized:
    """Apply the strategies of `cfg.parallel` to a meta-device model, then allocate and initialize it.

    For trainer/simulate.py: `meshes` reuses meshes built beforehand; `fake`, a FakeTensorMode, is where the
    parameters are allocated (the transforms run outside it, on the meta device) and no initial weights are
    drawn (fake tensors have shapes, no values); `stage_shapes(stage id) -> (input, output)` example tensors
    spare the pipeline stages their shape inference over the process group. `base_reader(name, shape)`: where a
    QLoRA base (finetune.quantize_base) reads its weights (checkpoint.init_from), else they are drawn from the seed."""
    values = fake is None
    allocation = fake if fake is not None else contextlib.nullcontext()
    p, t = cfg.parallel, cfg.training
    data = str(p.data)
    device = world.device
    grouped = world.world_size > 1 or needs_process_group(data)  # (a one-rank group for FSDP and DeepSpeed)
    mesh = meshes if meshes is not None else build_meshes(dims, device.type) if grouped else None
    if data.startswith("zero"):  # DeepSpeed owns sharding, precision and the step (parallel/zero.py)
        from parallel.zero import parallelize_zero

        return _offload_activations(parallelize_zero(model, cfg, dims, world, mesh), cfg, device)
    # context parallelism shards the parameters over dp_shard x cp (parallel/mesh.py "fsdp"), even with data=none
    fsdp = data in ("fsdp", "hsdp") or dims.cp > 1
    precision = str(t.precision)
    notes = []

    # 1. pipeline split: each stage a pruned copy of the meta model
    if dims.pp > 1:
        parts_with_ids = split_model(model, p.pp_schedule, mesh["pp"].get_local_rank(), dims.pp)
    else:
        parts_with_ids = [(0, model)]
    parts = [m for _, m in parts_with_ids]

    offload = str(p.offload) == "cpu"
    if offload and device.type == "cpu":
        notes.append("parallel.offload=cpu on a CPU device is a no-op: parameters already live in host memory")
        offload = False
    loss_parallel = dims.tp > 1 and dims.pp == 1  # a pipeline stage boundary needs plain tensors
    masterless = not t.master_weights  # the parameters are stored in bf16 (still on the meta device here)
    if masterless:
        for part in parts:
            part.to(torch.bfloat16)  # (init_weights rounds the fp32 values to it; the RoPE tables stay fp32)
        notes.append(
            "training.master_weights=false: parameters and gradients in bf16, no fp32 copy; updates "
            "stochastically rounded by the optimizer"
        )
    if str(cfg.finetune.method) != "full" and not masterless and _DTYPES[precision] is not None:
        # adapters on a frozen base: the base needs no fp32 master (it never steps), so it is stored in the compute
        # dtype, as it is read; only the adapters keep fp32 (still on the meta device here)
        n = sum(_store_frozen_in(part, _DTYPES[precision]) for part in parts)
        notes.append(f"finetune: the frozen base ({n:,} tensors) stored in {precision}; the adapters in fp32")
    if str(t.float8) != "none":  # 1b. the blocks' linears in float8 (parallel/float8.py), before any wrapping
        from parallel.float8 import convert

        n = sum(convert(part, str(t.float8), emulate=bool(t.float8_emulate)) for part in parts)
        notes.append(
            f"training.float8={t.float8}: {n} linear layers in float8 (torchao"
            f"{', emulated' if t.float8_emulate else ''}); the output projection stays bf16"
        )
    for part in parts:
        # 2. tensor parallel
        if dims.tp > 1:
            apply_tp(part, mesh["tp"], loss_parallel=loss_parallel)
        # 2b. expert parallel: each MoE block's experts split over the ep ranks, tokens exchanged by all-to-all
        if dims.ep > 1:
            apply_ep(part, mesh["ep"])
        # 3. activation checkpointing
        apply_ac(part, str(p.ac), every=p.ac_every, tp=dims.tp, sac_matmuls=str(p.sac_matmuls))
        # 4. compile
        if p.compile:
            apply_compile(part)
        # 4b. QLoRA: each block's adapted base weights read whole and quantized to NF4, one block at a time, just
        #     before FSDP splits the block (FSDP2 keeps and gathers them in 4 bits)
        quantize = _nf4_quantizer(part, cfg, dims, device, base_reader) if values else None
        # 5. FSDP / HSDP
        if fsdp:
            dp_mesh = mesh["hsdp"] if data == "hsdp" else mesh["fsdp"]
            apply_fsdp(
                part,
                dp_mesh,
                param_dtype=_DTYPES[precision],
                reshard_after_forward=reshards_after_forward(cfg),
                offload=offload,
                before_block=quantize,
                experts_mesh=(mesh["expert_hsdp"] if data == "hsdp" else mesh["expert_shard"]) if dims.ep > 1 else None,
                experts_divide=float(dims.dp_size * dims.cp),
            )
        elif quantize is not None:
            for name, block in part.blocks.items():
                quantize(name, block)
        # 6. allocate, then initialize from the seed (the same values as on one process)
        with allocation:
            _allocate(part, "cpu" if offload else device, fake=not values)
            part.init_weights(seed=t.seed, buffer_device=device, values=values)
        if dims.tp > 1 and not fsdp:  # (FSDP reduce-scatters into its own sharded gradients)
            keep_grads_sharded_like_params(part)

    # 7. DDP wraps the allocated model
    wrapped = parts[0]
    no_sync: Callable = contextlib.nullcontext
    if data == "ddp":
        with allocation:
            wrapped = apply_ddp(parts[0], mesh["dp"], device)
        no_sync = wrapped.no_sync
    elif fsdp and dims.pp == 1 and p.accumulate_unsharded_grads:
        no_sync = fsdp_no_sync(parts[0])  # (under pipelining the stages do it: parallel/pipeline.py)

    if dims.cp > 1:
        from parallel.context import CPGroup, local_positions

        cp = CPGroup(mesh["cp"].get_group(), mesh["cp"].get_local_rank(), dims.cp, str(p.cp_rotate))
        positions = local_positions(int(t.seq_len), cp.rank, cp.size, device=device)
        for part in parts:
            part.set_context_parallel(cp, positions)
        notes.append(
            f"parallel.cp={dims.cp}: each rank holds 2 of {2 * dims.cp} chunks of every sequence, attention "
            f"across them by {p.cp_rotate}; FSDP shards over dp_shard x cp"
        )
    par = Parallelized(
        parts=parts,
        model=wrapped,
        dims=dims,
        mesh=mesh,
        grad_reduction_scale=float(dims.dp_size * dims.cp) if fsdp or data != "none" else 1.0,
        no_sync=no_sync,
        autocast_dtype=None if fsdp or masterless else _DTYPES[precision],
        loss_parallel=loss_parallel,
        notes=notes,
        zero_grads_in_place=data == "ddp",
    )
    if dims.cp > 1:
        par.cp_positions = positions
    if dims.pp > 1:
        from parallel.schedules import build_schedule  # torch's pipelining imports dynamo: only runs with a pipeline

        n_stages = dims.pp * (len(parts_with_ids))
        ids = [sid for sid, _ in parts_with_ids]
        par.has_first_stage, par.has_last_stage = 0 in ids, n_stages - 1 in ids
        par.pipeline_loss = PipelineLoss(loss_sum, par.grad_reduction_scale)
        par.stage_parts, par.pp_schedule, par.device = parts_with_ids, str(p.pp_schedule), device
        n_micro = microbatches(t.global_batch_size, t.micro_batch_size, dims.dp_size)
        if stage_shapes is None and model.args.moe is not None:  # (MoE blocks: no shape-inference forward)
            stage_shapes = static_stage_shapes(cfg, model.args, dims)
        par.schedule = build_schedule(
            parts_with_ids,
            p.pp_schedule,
            pp=dims.pp,
            n_microbatches=n_micro,
            device=device,
            group=mesh["pp"].get_group(),
            loss_fn=par.pipeline_loss,
            stage_shapes=stage_shapes,
            sync_each_microbatch=not (fsdp and p.accumulate_unsharded_grads),
        )
    return _offload_activations(par, cfg, device)


def _store_frozen_in(part: nn.Module, dtype: torch.dtype) -> int:
    """Every frozen (requires_grad=False) parameter of a meta-device `part` in `dtype`; returns how many."""
    made: dict[int, nn.Parameter] = {}  # (a tied table stays one parameter)
    for module in part.modules():
        for name, prm in list(module._parameters.items()):
            if prm is not None and not prm.requires_grad and prm.dtype != dtype:
                if id(prm) not in made:
                    made[id(prm)] = nn.Parameter(prm.to(dtype), requires_grad=False)
                module._parameters[name] = made[id(prm)]
    return len(made)


def _nf4_quantizer(part: nn.Module, cfg, dims: ParallelDims, device, base_reader):
    """The per-block step that quantizes a QLoRA base (models/adapters.py `quantize_base`), or None."""
    from models.adapters import adapter_spec, quantize_base

    spec = adapter_spec(part)
    if spec is None or not spec.nf4:
        return None
    seed = int(cfg.training.seed)

    def drawn(name: str, shape: tuple[int, ...], offset: tuple[int, ...], local: tuple[int, ...]) -> torch.Tensor:
        from models.init import normal_block

        return normal_block(seed, name, shape, offset, local, device, **part.init_spec(name))

    def sliced(name: str, shape: tuple[int, ...], offset: tuple[int, ...], local: tuple[int, ...]) -> torch.Tensor:
        if tuple(base_reader.shape(name)) != tuple(shape):
            raise ValueError(f"{base_reader.path}: {name} is {base_reader.shape(name)}, the model's is {tuple(shape)}")
        return base_reader.slice(name, offset, local)

    read = drawn if base_reader is None else sliced
    scaler_block = int(cfg.finetune.nf4_scaler_block)

    def quantize(block_name: str, block: nn.Module) -> None:
        # (the block's own names, AC's and compile's wrappers in them, to the model's canonical ones)
        quantize_base(
            block, lambda n, *where: read(canonical_name(f"layers.{block_name}.{n}"), *where), device, scaler_block
        )

    return quantize


def _offload_activations(par: Parallelized, cfg, device: torch.device) -> Parallelized:
    """parallel.activation_offload: every part's blocks save to host memory (parallel/offload.py)."""
    if cfg.parallel.activation_offload:
        from parallel.offload import attach

        par.activation_offload = attach(par.parts, device, min_bytes=cfg.parallel.activation_offload_min_bytes)
        par.notes.append(
            f"parallel.activation_offload: the blocks' saved tensors of at least "
            f"{cfg.parallel.activation_offload_min_bytes:,} bytes go to host memory in forward"
            + (" (on a CPU device: a copy, counted apart from the device's memory)" if device.type == "cpu" else "")
        )
    return par


def _allocate(part: nn.Module, device, *, fake: bool) -> None:
    """`to_empty`: storage for every meta parameter and buffer on `device`. Under FakeTensorMode, plain (not
    DTensor) meta parameters cannot be swapped for fake ones by Module._apply ("Couldn't swap"); they are
    replaced one by one instead, keeping a shared (tied) parameter shared."""
    if not fake or any(hasattr(p, "placements") for p in part.parameters()):
        part.to_empty(device=device)  # (the model's own: re-ties a shared table, keeps a quantized QLoRA base)
        return
    made: dict[int, nn.Parameter] = {}
    for module in part.modules():
        for name, prm in list(module._parameters.items()):
            if prm is not None:
                if id(prm) not in made:
                    made[id(prm)] = nn.Parameter(torch.empty_like(prm, device=device), requires_grad=prm.requires_grad)
                module._parameters[name] = made[id(prm)]
        for name, buf in list(module._buffers.items()):
            if buf is not None:
                module._buffers[name] = torch.empty_like(buf, device=device)


__all__ = ["Parallelized", "parallelize", "clip_grad_norm", "ParallelDims", "World"]
