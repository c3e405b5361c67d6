"""Low-rank adapters on a frozen base: LoRA (Hu et al. 2021) and DoRA (Liu et al. 2024).

`AdapterLinear` replaces a block's `nn.Linear` and keeps its own `weight` under the same name (base checkpoints and
Hugging Face imports load unchanged; the base is frozen: no gradient, no optimizer state), beside two new children:

    LoRA:  y = x W^T + s (dropout(x) A^T) B^T                  A: (rank, in), B: (out, rank), s = alpha / rank
    DoRA:  y = (m / ||W + s B A||_row) * (x W^T + s (dropout(x) A^T) B^T)
           m: (out,) magnitudes, one per output feature (row of W); the row norm is detached (DoRA paper,
           section 4.3: the gradient does not flow through it, which saves the norm's backward memory; PEFT does
           the same)

A is drawn at random (std 1 / sqrt(in), from the counter-based draw of models/init.py, so every layout starts
from the same adapter), B starts at zero and m at the row norms of W: at step 0 the adapted model computes exactly
what the base computes (DoRA's scale is m / ||W||_row = 1 exactly, the same float operation on the same data).

This module is the model side only: which layers get adapters (`AdapterSpec.targets`), the adapters' names
(`adapter_parameters`, the one place that collects them), the merged weight (`merged_weight`). The config keys,
the strategies, QLoRA's NF4 base, checkpoints and PEFT export build on it (issue 26).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("lora", "dora")
LINEARS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # the block's linear layers (models/llama.py)


@dataclass(frozen=True)
class AdapterSpec:
    kind: str  # lora or dora
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = LINEARS

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"adapter kind {self.kind!r}: use one of {', '.join(KINDS)}")
        if self.rank < 1:
            raise ValueError(f"adapter rank {self.rank} must be >= 1")
        unknown = sorted(set(self.targets) - set(LINEARS))
        if unknown:
            raise ValueError(f"adapter targets {unknown}: the block's linear layers are {', '.join(LINEARS)}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class AdapterLinear(nn.Linear):
    """A frozen `nn.Linear` with a LoRA or DoRA adapter (module docstring). Its parameters: `weight` (the base,
    frozen), `lora_a.weight`, `lora_b.weight` and, for DoRA, `magnitude`."""

    ADAPTER_NAMES = ("lora_a.weight", "lora_b.weight", "magnitude")

    def __init__(self, in_features: int, out_features: int, spec: AdapterSpec, *, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.spec = spec
        self.lora_a = nn.Linear(in_features, spec.rank, bias=False)
        self.lora_b = nn.Linear(spec.rank, out_features, bias=False)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout else nn.Identity()
        self.magnitude = nn.Parameter(torch.empty(out_features)) if spec.kind == "dora" else None

    def delta(self) -> torch.Tensor:
        """s B A: what the adapter adds to the weight, (out, in)."""
        return self.spec.scaling * (self.lora_b.weight @ self.lora_a.weight)

    def row_norms(self) -> torch.Tensor:
        """||W + s B A|| per output row, without a graph (DoRA detaches it): computed under no_grad, so that no
        weight-sized tensor is saved for a backward that never comes."""
        with torch.no_grad():
            return torch.linalg.vector_norm(self.weight + self.delta(), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight)
        out = base + self.spec.scaling * self.lora_b(self.lora_a(self.dropout(x)))
        if self.magnitude is not None:
            out = (self.magnitude / self.row_norms()).to(out.dtype) * out
        return out if self.bias is None else out + self.bias

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """DoRA: m = ||W + s B A||_row, so that the scale is 1 (at step 0, where B = 0: the base's row norms)."""
        if self.magnitude is not None:
            self.magnitude.copy_(self.row_norms())

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The plain weight that computes what this layer computes (dropout off): W + s B A, and for DoRA scaled
        per row to m."""
        w = self.weight + self.delta()
        if self.magnitude is not None:
            w = w * (self.magnitude / torch.linalg.vector_norm(w, dim=1)).unsqueeze(1)
        return w


def apply_adapters(model: nn.Module, spec: AdapterSpec, *, share_base: bool = True) -> list[str]:
    """Replace each target linear of every block (`model.layers`) by an AdapterLinear (on the linear's own device:
    the meta device before the build allocates) and freeze every other parameter. Returns the replaced modules'
    names. The adapters' values are set by `init_adapters` (or a checkpoint). `share_base=False` leaves the new
    layer its own base weight (under DeepSpeed's zero.Init: already partitioned, filled later) instead of the old
    layer's storage."""
    replaced = []
    for p in model.parameters():
        p.requires_grad_(False)
    for block_name, block in model.layers.items():
        for parent_name, parent in block.named_children():
            for child_name, child in list(parent.named_children()):
                if child_name in spec.targets and type(child) is nn.Linear:
                    with torch.device(child.weight.device):
                        new = AdapterLinear(child.in_features, child.out_features, spec, bias=child.bias is not None)
                    if share_base:
                        new.weight.data = child.weight.data  # the base's own storage (meta or real), frozen
                    if child.bias is not None and share_base:
                        new.bias.data = child.bias.data
                    setattr(parent, child_name, new)
                    replaced.append(f"layers.{block_name}.{parent_name}.{child_name}")
    return replaced


def adapter_spec(model: nn.Module) -> AdapterSpec | None:
    """The spec of the adapters applied to `model`, or None where it has none."""
    return next((m.spec for m in model.modules() if isinstance(m, AdapterLinear)), None)


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every adapter parameter by its name in `model`: the one way adapters are found (each AdapterLinear declares
    its own, `ADAPTER_NAMES`); the trainable set of a fine-tuning run."""
    out = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, AdapterLinear):
            for n, p in mod.named_parameters():
                if n in AdapterLinear.ADAPTER_NAMES:
                    out[f"{mod_name}.{n}"] = p
    return out


def adapter_init_spec(name: str, in_features: int) -> dict:
    """How an adapter parameter starts, in models/llama.py's `init_spec` form: A a normal draw of std
    1 / sqrt(in) cut at 2 sigma, B zero, DoRA's magnitude filled later from the base (`init_adapters`)."""
    if name.endswith("lora_a.weight"):
        s = in_features**-0.5
        return {"mean": 0.0, "std": s, "lo": -2 * s, "hi": 2 * s}
    if name.endswith("lora_b.weight"):
        return {"fill": 0.0}
    return {"fill": 1.0}  # magnitude: a placeholder until init_adapters reads the base's row norms


def init_adapters(model: nn.Module) -> None:
    """After the base weights are final (drawn or loaded): DoRA's magnitudes from their row norms."""
    for mod in model.modules():
        if isinstance(mod, AdapterLinear):
            mod.reset_magnitude()


def spec_of(cfg) -> AdapterSpec | None:
    """The run's adapters (the `finetune` section), or None for full training."""
    f = cfg.finetune
    if str(f.method) == "full":
        return None
    return AdapterSpec(str(f.method), int(f.rank), float(f.alpha), float(f.dropout), tuple(f.targets))


def config_problems(cfg) -> list[str]:
    """The `finetune` section: a known method, a valid spec, and only where it is built and tested. Adapters train
    under one process, DDP, FSDP2, HSDP, TP (parallel/tensor.py splits them with their layer), PP, CP and their
    combinations, and ZeRO-1/2/3 (LoRA; DoRA's magnitudes are read from the whole base rows, which ZeRO-3
    partitions); the options below are refused until the planner counts them with adapters."""
    f, p, t = cfg.finetune, cfg.parallel, cfg.training
    method = str(f.method)
    if method == "full":
        return []
    if method not in KINDS:
        return [f"finetune.method={method}: use full, lora or dora"]
    try:
        spec_of(cfg)
    except ValueError as e:
        return [f"finetune: {e}"]
    problems = []
    if method == "dora" and str(p.data) == "zero3":
        problems.append(
            "finetune.method=dora with parallel.data=zero3: DoRA's magnitudes start at the base's row norms, which "
            "ZeRO-3 partitions before they can be read; use parallel.data=fsdp (or zero1/zero2), or "
            "finetune.method=lora"
        )
    where = {
        "parallel.compile": (bool(p.compile), False),
        "parallel.activation_offload": (bool(p.activation_offload), False),
        "training.float8": (str(t.float8), "none"),
        "training.master_weights": (bool(t.master_weights), True),
        "optim.in_backward": (bool(cfg.optim.in_backward), False),
    }
    if str(p.ac) == "selective":
        problems.append(
            f"finetune.method={method} with parallel.ac=selective: the planner does not count what selective AC "
            "keeps of the adapters' matmuls yet; use parallel.ac=none or full"
        )
    for key, (value, supported) in where.items():
        if value != supported:
            problems.append(
                f"finetune.method={method} with {key}={value}: not built with adapters yet (the planner does not "
                f"count it with them); use {key}={supported}"
            )
    return problems
