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

This module is the model side: which layers get adapters (`AdapterSpec.targets`), the adapters' names
(`adapter_parameters`, the one place that collects them), the merged weight (`merged_weight`), QLoRA's NF4 base
(`quantize_base`, `nf4_bytes`) and the finetune section's rules (`config_problems`). The strategies split adapters
in parallel/tensor.py and quantize bases in parallel/__init__.py; checkpoints, PEFT and merged export are in
trainer/ (docs/finetune.md).
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
    nf4: bool = False  # QLoRA: the adapted linears' base weights in NF4 (`quantize_nf4`)

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

    def base_weight(self) -> torch.Tensor:
        """W as a plain tensor of the adapters' dtype (an NF4 base dequantized: a temporary)."""
        return _dequantized(self.weight, self.lora_b.weight.dtype) if is_nf4(self.weight) else self.weight

    def row_norms(self) -> torch.Tensor:
        """||W + s B A|| per output row, without a graph (DoRA detaches it): computed under no_grad, so that no
        weight-sized tensor is saved for a backward that never comes."""
        with torch.no_grad():
            return torch.linalg.vector_norm(self.base_weight() + self.delta(), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # an NF4 base (QLoRA): dequantized to x's dtype for the product, and only the 4-bit weight kept for backward
        base = _linear_nf4(x, self.weight) if is_nf4(self.weight) else F.linear(x, self.weight)
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
        w = self.base_weight() + self.delta()
        if self.magnitude is not None:
            w = w * (self.magnitude / torch.linalg.vector_norm(w, dim=1)).unsqueeze(1)
        return w


def is_nf4(t) -> bool:
    """An NF4 tensor (torchao), or a DTensor (FSDP2's shard) holding one."""
    t = t.to_local() if hasattr(t, "to_local") else t
    return type(t).__name__ == "NF4Tensor"


def _nf4():
    """torchao's NF4 module (it moved from torchao.dtypes to torchao.quantization in 0.15)."""
    try:
        from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor
    except ImportError:
        from torchao.dtypes import nf4tensor as nf4_tensor
    return nf4_tensor


def _nf4_regather_under_tp() -> None:
    """FSDP2's second all-gather of a TP-split NF4 base (backward, after resharding) passes the unsharded parameter
    as `out=`: a DTensor holding the NF4 tensor, which torchao's `NF4Tensor.fsdp_post_all_gather` (0.18) asserts to
    be an NF4Tensor itself (torchao's float8 weights accept both). The gathered data already is that NF4 tensor's
    storage: hand it the local tensor. Wrapped once per process; nothing else changes."""
    cls = _nf4().NF4Tensor
    original = cls.fsdp_post_all_gather
    if getattr(original, "accepts_dtensor", False):
        return

    def post_all_gather(self, outputs, metadata, param_dtype, *, out=None):
        if out is not None and hasattr(out, "_local_tensor"):
            out = out._local_tensor
        return original(self, outputs, metadata, param_dtype, out=out)

    post_all_gather.accepts_dtensor = True
    cls.fsdp_post_all_gather = post_all_gather


def _dequantized(w, dtype: torch.dtype) -> torch.Tensor:
    """An NF4 base as a plain tensor of `dtype` (a temporary). A TP shard's (a DTensor holding NF4) is dequantized
    explicitly: DTensor's `.to(dtype)` returns the tensor itself when the NF4 tensor's nominal dtype is already
    `dtype` (bf16), and a matmul on the undequantized tensor goes through torchao's NF4 `mm`, which computes x W^T
    whatever was asked (a transposed product in the backward's grad @ W)."""
    if not hasattr(w, "placements"):
        return w.to(dtype)
    from torch.distributed.tensor import DTensor

    plain = w.to_local().get_original_weight().to(dtype)
    return DTensor.from_local(plain, w.device_mesh, w.placements, run_check=False, shape=w.shape, stride=w.stride())


class _LinearNF4TP(torch.autograd.Function):
    """x W^T for a TP-split NF4 base (torchao's `linear_nf4`, with the dequantization explicit): only the 4-bit
    weight is saved for backward, which dequantizes it again."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(weight)
        return F.linear(x, _dequantized(weight, x.dtype))

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad @ _dequantized(weight, grad.dtype), None


def _linear_nf4(x, weight):
    if hasattr(weight, "placements"):
        return _LinearNF4TP.apply(x, weight)
    return _nf4().linear_nf4(x, weight)


NF4_BLOCK = 64  # elements per absmax block (QLoRA's, Dettmers et al. 2023)
NF4_SCALER_BLOCK = 256  # block scales per second-level (double-quantization) block


def nf4_problems(name: str, shape: tuple[int, int], shards: int, scaler_block: int) -> list[str]:
    """Why a weight cannot be an NF4 base split `shards` ways (FSDP splits rows and every NF4 part evenly)."""
    numel = shape[0] * shape[1]
    per = NF4_BLOCK * scaler_block
    if numel % per or shape[0] % shards or (numel // per) % shards:
        return [
            f"{name}: NF4 with finetune.nf4_scaler_block={scaler_block} needs whole blocks of "
            f"{NF4_BLOCK} x {scaler_block} elements, {shards} way(s) split (FSDP) by rows"
        ]
    return []


def nf4_bytes(numel: int, scaler_block: int = NF4_SCALER_BLOCK) -> int:
    """What an NF4 tensor of `numel` elements (or an FSDP shard of them) stores: the 4-bit codes, an int8 scale per
    64-element block, a bf16 factor per `scaler_block` scales, the bf16 mean of the scales and the 16-value table."""
    return numel // 2 + numel // NF4_BLOCK + 2 * (numel // (NF4_BLOCK * scaler_block)) + 2 + 16 * 2


def quantize_nf4(w: torch.Tensor, scaler_block: int = NF4_SCALER_BLOCK):
    """W in NF4 (torchao's NF4Tensor: 4-bit codes, an int8 scale per 64 elements, an fp32 factor per `scaler_block`
    scales), quantized from bf16 as QLoRA does. The same values however FSDP splits it afterwards."""
    return _nf4().to_nf4(w.to(torch.bfloat16).contiguous(), NF4_BLOCK, scaler_block)


def quantize_base(block: nn.Module, read, device, scaler_block: int = NF4_SCALER_BLOCK) -> None:
    """Replace the base weight of each AdapterLinear in `block` (still on the meta device) by its NF4 copy, read
    (`read(name in the block, shape, offset, local shape) -> the block [offset, offset + local shape) of the weight`)
    on `device` and quantized at once, one weight in full precision at a time. A plain weight is read whole, before
    FSDP splits it (FSDP2 gathers NF4 parameters in 4 bits: torchao's all-gather extension). A tensor-parallel
    weight (a DTensor: parallel/tensor.py split it by rows or columns) reads only this rank's rows or columns and
    quantizes that shard on its own (its 64-element blocks and the scales' mean are the shard's), the NF4 shard
    then wrapped as the same DTensor; FSDP splits it further by rows."""
    for name, mod in block.named_modules():
        if isinstance(mod, AdapterLinear) and not is_nf4(mod.weight):
            wt, shape = mod.weight, tuple(mod.weight.shape)
            if hasattr(wt, "placements"):
                from torch.distributed.tensor import DTensor
                from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

                _nf4_regather_under_tp()
                local, offset = compute_local_shape_and_global_offset(wt.shape, wt.device_mesh, wt.placements)
                w = read(f"{name}.weight", shape, tuple(offset), tuple(local)).to(device)
                q = DTensor.from_local(
                    quantize_nf4(w, scaler_block),
                    wt.device_mesh,
                    wt.placements,
                    run_check=False,
                    shape=wt.shape,
                    stride=wt.stride(),
                )
            else:
                w = read(f"{name}.weight", shape, (0,) * len(shape), shape).to(device)
                q = quantize_nf4(w, scaler_block)
            mod.weight = nn.Parameter(q, requires_grad=False)
            del w


def quantized_like_tp(w: torch.Tensor, dim: int, tp: int, scaler_block: int = NF4_SCALER_BLOCK) -> torch.Tensor:
    """The values a `tp`-way tensor-parallel QLoRA base computes with for weight `w`, split on `dim` (0: a
    column-parallel layer's rows, 1: a row-parallel layer's columns): each shard quantized on its own
    (`quantize_base`), dequantized, put back together (fp32). One process on these values computes what the TP
    run computes (its parity reference)."""
    return torch.cat([quantize_nf4(c.contiguous(), scaler_block).to(torch.float32) for c in w.chunk(tp, dim)], dim)


def unquantized(parts) -> list[str]:
    """Adapted linears whose base is not NF4 any more (QLoRA's check after wrapping: a strategy that turned the
    4-bit weights into plain ones would train with none of the memory saved), by name."""
    return [
        name
        for part in parts
        for name, mod in part.named_modules()
        if isinstance(mod, AdapterLinear) and not is_nf4(mod.weight)
    ]


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
    return AdapterSpec(
        str(f.method), int(f.rank), float(f.alpha), float(f.dropout), tuple(f.targets), bool(f.quantize_base)
    )


def config_problems(cfg) -> list[str]:
    """The `finetune` section: a known method, a valid spec, and only where it is built and tested. Adapters train
    under one process, DDP, FSDP2, HSDP, TP (parallel/tensor.py splits them with their layer), PP, CP and their
    combinations, and ZeRO-1/2/3 (LoRA; DoRA's magnitudes are read from the whole base rows, which ZeRO-3
    partitions); the options below are refused until the planner counts them with adapters."""
    f, p, t = cfg.finetune, cfg.parallel, cfg.training
    method = str(f.method)
    if method == "full":
        return (
            ["finetune.quantize_base=true with finetune.method=full: a quantized base cannot train; use lora or dora"]
            if f.quantize_base
            else []
        )
    if method not in KINDS:
        return [
            f"finetune.method={method}: use full, lora or dora (QLoRA: lora or dora with finetune.quantize_base=true)"
        ]
    try:
        spec_of(cfg)
    except ValueError as e:
        return [f"finetune: {e}"]
    problems = []
    if f.quantize_base:
        problems += _qlora_problems(cfg)
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


def _qlora_problems(cfg) -> list[str]:
    """finetune.quantize_base (QLoRA): where an NF4 base is built and tested. FSDP2 gathers NF4 in 4 bits and TP
    quantizes each rank's shard after the split (`quantize_base`); DDP would broadcast and DeepSpeed re-partition
    the quantized weights, FSDP's CPU offload would copy them as plain tensors."""
    import importlib.util

    p, problems = cfg.parallel, []
    if importlib.util.find_spec("torchao") is None:
        problems.append("finetune.quantize_base=true needs torchao's NF4 (pip install 'shardwise[lowbit]')")
    why = {
        "parallel.data": (str(p.data), ("none", "fsdp", "hsdp"), "use parallel.data=fsdp or hsdp (or none)"),
        "parallel.offload": (str(p.offload), ("none",), "use parallel.offload=none"),
    }
    for key, (value, ok, fix) in why.items():
        if value not in ok:
            problems.append(f"finetune.quantize_base=true with {key}={value}: the NF4 base is not built there; {fix}")
    return problems


def target_shapes(args, targets) -> list[tuple[str, tuple[int, int]]]:
    """(module path in a block, (out, in) features) of each linear the adapters wrap."""
    Q, K, D, F = args.n_heads * args.head_dim, args.kv_heads * args.head_dim, args.dim, args.ffn_hidden
    shapes = {"wq": (Q, D), "wk": (K, D), "wv": (K, D), "wo": (D, Q), "w1": (F, D), "w2": (D, F), "w3": (F, D)}
    parent = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention"}
    return [(f"{parent.get(n, 'feed_forward')}.{n}", shapes[n]) for n in targets]


def nf4_layout_problems(cfg, args, dims, split_dims: dict[str, int]) -> list[str]:
    """Every adapted weight's TP shard (its rows or columns: `split_dims`, models/llama.py `TP_SPLIT_DIM`) must split
    into whole NF4 blocks over FSDP's shards (dp_shard x cp)."""
    shards = dims.dp_shard * dims.cp if str(cfg.parallel.data) in ("fsdp", "hsdp") or dims.cp > 1 else 1
    problems = []
    for module, shape in target_shapes(args, tuple(cfg.finetune.targets)):
        local = list(shape)
        local[split_dims[module]] //= dims.tp
        where = f"{module} {tuple(shape)}" + (f" (its TP shard {tuple(local)})" if dims.tp > 1 else "")
        problems += nf4_problems(where, tuple(local), shards, int(cfg.finetune.nf4_scaler_block))
    if problems:
        return [f"finetune.quantize_base=true: {'; '.join(problems[:3])}; choose model sizes that divide"]
    return []
