"""Measure one rank of a layout without its hardware: torch's fake process group, FakeTensorMode, the tracker.

`simulate(cfg, world_size, rank)` builds rank `rank` of a `world_size`-rank job exactly as the trainer does
(`parallelize`, the optimizer, the training step of trainer/trainer.py), but every tensor is a FakeTensor
(shapes and dtypes, no storage) and every collective a no-op of the fake process group; then it runs three
steps and tracks the third with `parallel.memory.StepMemory`. So a 70B layout at world 512 is measured on a
laptop in seconds, and launch/plan.py --simulate prints it beside the planner's formulas.

What it cannot see: torch.compile (the simulation runs eager: a compiled block saves fewer tensors, so a
compiled layout measures on the high side); the device's own kernels (it runs the CPU ones: on a GPU, SDPA's flash
and cuDNN kernels save different tensors than the CPU one), allocator fragmentation, and DeepSpeed, whose engine
does not run on FakeTensors, nor does DDP's C++ reducer (ZeRO and DDP layouts are refused with that
reason). Known pitfalls, handled here:
the device meshes are built before fake mode is entered (mesh construction creates real tensors); the model
is transformed on the meta device and allocated under fake mode, without drawing initial weights (there
are no values to draw: `parallelize(fake=...)`); the pipeline stages are
given their input and output shapes, so that they need no shape-inference round trip over the fake group.
"""

from __future__ import annotations

import torch

from models.args import model_args_of
from models.dtensor import nbytes
from models.llama import build_model
from optim import build_optimizer, build_scheduler
from parallel import parallelize
from parallel.memory import StepMemory
from parallel.mesh import World, build_meshes
from parallel.pipeline import static_stage_shapes
from trainer.faults import Faults
from trainer.profiling import Phases
from trainer.trainer import Trainer
from trainer.validate import derive

_INITIALIZED = False


def _fake_process_group(world_size: int, rank: int) -> None:
    global _INITIALIZED
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if _INITIALIZED or dist.is_initialized():
        raise RuntimeError("simulate() needs a process of its own: a process group already exists here")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    _INITIALIZED = True


def _model(cfg, args):
    """The run's meta-device model, with its adapters (finetune.*) as the Trainer builds it."""
    from models.adapters import apply_adapters, spec_of

    model = build_model(args, device="meta")
    if (spec := spec_of(cfg)) is not None:
        apply_adapters(model, spec)
    return model


def _refuse_nf4(cfg) -> None:
    """(before any process group exists: a refusal leaves nothing behind)"""
    if cfg.finetune.quantize_base:
        raise ValueError(
            "--simulate with finetune.quantize_base=true: fake tensors hold no values to quantize, so the "
            "simulation would run a 16-bit base; the planner (launch/plan.py without --simulate) counts NF4"
        )


def simulate(cfg, world_size: int, *, rank: int = 0, device: str = "cpu") -> dict:
    """{category: bytes, "peak": bytes} of rank `rank` at the peak of a simulated step (CPU kernels)."""
    _refuse_nf4(cfg)
    from torch._subclasses.fake_tensor import FakeTensorMode

    data, p = str(cfg.parallel.data), cfg.parallel
    if p.pp > 1 and (str(p.pp_schedule) not in ("gpipe", "1f1b") or p.tp > 1):
        raise ValueError(
            f"--simulate: pipeline parallelism is simulated with one stage per rank and without TP "
            f"(gpipe, 1f1b); parallel.pp_schedule={p.pp_schedule}, tp={p.tp} fails under fake tensors "
            f"(the multi-stage schedules' loss backward, TP's stage shapes); measure it on real ranks"
        )
    if data.startswith("zero") or data == "ddp":
        what = "DeepSpeed's engine" if data != "ddp" else "DDP's C++ reducer"
        raise ValueError(
            f"--simulate: parallel.data={data} runs {what}, which does not run on FakeTensors; measure "
            f"this layout on real ranks (logging.memory_breakdown=true)"
        )
    if cfg.model.get("moe") is not None and cfg.model.moe.get("n_experts"):
        raise ValueError(
            "--simulate: MoE blocks route tokens by their values (how many rows each expert gets, how many travel to "
            "each rank), shapes that fake tensors cannot have; the plan's terms are the prediction (its three "
            "routings), measured on real ranks by tests/distributed/test_memory_plan.py's moe and ep2_moe rows"
        )
    if p.activation_offload:
        raise ValueError(
            "--simulate: parallel.activation_offload copies real tensors to the host, which fake tensors "
            "have not; the plan's terms are the prediction, measure it on real ranks "
            "(logging.memory_breakdown=true)"
        )
    _without_data_dependent_setup()
    if cfg.parallel.compile:  # compiling under FakeTensorMode is not what the trainer runs; measure eager
        cfg = cfg.copy()
        cfg.parallel.compile = False
    plan = derive(cfg, world_size)
    args = model_args_of(cfg)
    _fake_process_group(world_size, rank)
    world = World(rank=rank, world_size=world_size, local_rank=0, device=torch.device("cpu"))
    meshes = build_meshes(plan.dims, "cpu") if world_size > 1 else None
    t = cfg.training
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    # a Trainer without its I/O (no data files, logger or checkpoints): the same step code
    trainer = Trainer.__new__(Trainer)
    trainer.cfg, trainer.plan, trainer.world, trainer.device = cfg, plan, world, world.device
    trainer.faults, trainer.skipped_steps, trainer._first_nonfinite, trainer.step = Faults(rank), 0, None, 0
    trainer.moe_aux, trainer.moe_aux_step = 0.0, None
    trainer.scaler = None  # (fp16's loss scale changes no byte that the simulation counts)
    trainer.packed = bool(cfg.data.pack)  # (its batches hold one document each: the mask is built all the same)
    trainer.model_args = args
    trainer.phases = Phases()  # the step's profiler ranges (no NVTX in a simulation)
    par = parallelize(
        _model(cfg, args),
        cfg,
        plan.dims,
        world,
        loss_sum=trainer._logits_loss_sum,
        meshes=meshes,
        fake=fake,
        stage_shapes=static_stage_shapes(cfg, args, plan.dims) if plan.dims.pp > 1 else None,
    )
    with fake:
        trainer.par, trainer.autocast_dtype = par, par.autocast_dtype
        trainer.optimizer = build_optimizer(par.parts, cfg, device_type="cpu")
        trainer.scheduler = build_scheduler(trainer.optimizer, cfg)
        par.attach_optimizer(trainer.optimizer)
        trainer.model = par.model
        shape = (plan.accum_steps, t.micro_batch_size, t.seq_len + 1)
        for step in range(3):  # step 3 is the steady state (optimizer states exist, DDP buckets rebuilt)
            batch = torch.randint(0, args.vocab_size, shape)
            if step < 2:
                trainer.forward_backward(batch)
                trainer.optimizer_step()
                continue
            with StepMemory(par, trainer.optimizer) as tracked:
                trainer.forward_backward(batch)
                trainer.optimizer_step()
    return tracked.breakdown()


def build_cost(cfg, world_size: int, *, rank: int = 0) -> dict:
    """What building rank `rank` of a `world_size`-rank job costs on this machine: the trainer's own
    `parallelize` (meta model, transforms, allocation, initial weights) with real tensors on the fake process
    group (collectives are no-ops, so nothing waits for the other ranks). Returns the wall time, the growth of
    the process's peak resident memory (ru_maxrss) over the build, and the parameter bytes this rank holds."""
    import os
    import resource
    import time

    _refuse_nf4(cfg)
    plan = derive(cfg, world_size)
    _fake_process_group(world_size, rank)
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's communication layer reads it
    world = World(rank=rank, world_size=world_size, local_rank=0, device=torch.device("cpu"))
    meshes = build_meshes(plan.dims, "cpu") if world_size > 1 else None
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # noqa: E731 (Linux: KiB)
    before, start = rss(), time.perf_counter()
    par = parallelize(_model(cfg, model_args_of(cfg)), cfg, plan.dims, world, meshes=meshes)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "peak_host_growth_bytes": rss() - before,
        "param_bytes": _held_param_bytes(par),
        "world_size": world_size,
        "rank": rank,
    }


def _held_param_bytes(par) -> int:
    seen, total = set(), 0
    for prm in par.parameters():
        if id(prm) not in seen:
            seen.add(id(prm))
            total += nbytes(getattr(prm, "ds_tensor", prm))
    return total


def _without_data_dependent_setup() -> None:
    """Two set-up steps read values that fake tensors do not have; in this process (of its own) they are
    replaced: DDP's check that every rank holds the same parameter shapes and its broadcast of rank 0's
    values (the layouts are identical by construction), and the pipeline's warm-up vote that chooses static
    shapes (they are static: `stage_shapes`)."""
    import torch.nn.parallel.distributed as ddp
    from torch.distributed.pipelining import schedules
    from torch.distributed.pipelining.stage import PipelineStage

    ddp._verify_param_shape_across_processes = lambda *a, **k: None
    ddp._sync_module_states = lambda *a, **k: None

    def static_shapes(self, stages, has_backward, p2p_done):
        for stage in stages:
            if isinstance(stage, PipelineStage):
                stage._inference_mode = schedules.InferenceMode.STATIC

    schedules._PipelineSchedule._warmup_p2p = static_shapes


def comparison(memory, simulated: dict) -> str:
    """The planner's categories for the most loaded rank beside the simulation's, with the differences."""
    top = memory.most_loaded
    predicted = top.by_category()
    lines = [
        "",
        f"simulated (fake process group, FakeTensorMode, torch's MemTracker; CPU kernels), pipeline rank "
        f"{top.pp_rank}:",
        f"  {'category':<16} {'predicted':>14} {'simulated':>14} {'difference':>11}",
    ]
    keys = [k for k in simulated if k != "peak" and (simulated[k] or predicted.get(k))]
    for k in [*keys, "peak"]:
        p = top.peak_bytes if k == "peak" else predicted.get(k, 0)
        s = simulated[k]
        diff = f"{(p - s) / s * 100:+.1f}%" if s else "-"
        lines.append(f"  {k:<16} {p:>14,} {s:>14,} {diff:>11}")
    return "\n".join(lines)
