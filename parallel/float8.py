"""`training.float8`: the transformer blocks' linear layers in float8 through torchao (tensorwise or rowwise
dynamic scaling), under bf16 training.

torchao's `convert_to_float8_training` swaps each chosen nn.Linear for a Float8Linear on the meta model, before
tensor parallelism, checkpointing, compile and FSDP are applied (parallel/__init__.py). The output projection and
any linear whose sizes are not multiples of 16 stay in bf16 (the float8 matmul needs multiples of 16; the
output's logits feed the loss). The weights keep their names and dtype, so checkpoints move freely between
float8 and bf16 runs. The float8 matmuls need a GPU of compute capability 8.9 or more (Ada, Hopper);
`training.float8_emulate=true` runs torchao's emulation instead (each operand quantized to float8 and back, the
matmul in high precision): correct numerics for tests on a CPU, none of the speed.
"""

from __future__ import annotations

import dataclasses

from torch import nn

RECIPES = ("tensorwise", "rowwise")


def _filter(module: nn.Module, fqn: str) -> bool:
    if not isinstance(module, nn.Linear) or fqn.split(".")[-1] == "output":
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def convert(model: nn.Module, recipe: str, *, emulate: bool) -> int:
    """Swap the eligible linears of `model` (meta device) in place; returns how many were swapped."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear

    config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), emulate=emulate)
    convert_to_float8_training(model, config=config, module_filter_fn=_filter)
    return sum(isinstance(m, Float8Linear) for m in model.modules())


def config_problems(cfg, *, runs_on_cpu: bool) -> list[str]:
    """The float8 settings' rules (trainer/validate.py::validate collects every subsystem's)."""
    t, p = cfg.training, cfg.parallel
    f8 = str(t.float8)
    if f8 == "none":
        return (
            ["training.float8_emulate=true without training.float8: set training.float8=tensorwise or rowwise"]
            if t.float8_emulate
            else []
        )
    problems = []
    if f8 not in RECIPES:
        return [f"training.float8={f8}: unknown; known: none, {', '.join(RECIPES)}"]
    if str(t.precision) != "bf16":
        problems.append(
            f"training.float8={f8} with training.precision={t.precision}: float8 matmuls run inside "
            f"bf16 training; set training.precision=bf16"
        )
    if p.tp > 1:
        problems.append(
            f"training.float8={f8} with parallel.tp={p.tp}: not built (torchao's float8 tensor-parallel "
            f"plans are not wired in); use FSDP, HSDP, pipeline or context parallelism"
        )
    if str(p.data).startswith("zero"):
        problems.append(
            f"training.float8={f8} with parallel.data={p.data}: not built for DeepSpeed's engine; use "
            f"parallel.data=fsdp"
        )
    try:
        import torchao  # noqa: F401
    except ImportError:
        problems.append(f"training.float8={f8} needs torchao: pip install torchao")
        return problems
    if not t.float8_emulate:
        import torch

        if runs_on_cpu:
            problems.append(
                f"training.float8={f8}: float8 matmuls need a CUDA GPU of compute capability >= 8.9 and "
                f"this run is on the CPU; training.float8_emulate=true runs torchao's emulation "
                f"(correct numerics, no speed)"
            )
        elif torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9):
            cap = ".".join(map(str, torch.cuda.get_device_capability()))
            problems.append(
                f"training.float8={f8}: this GPU's compute capability is {cap}; float8 matmuls need "
                f">= 8.9 (Ada, Hopper); train in bf16 (training.float8=none)"
            )
    return problems
