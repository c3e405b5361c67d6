"""A LLaMA-style decoder: RMSNorm, RoPE, SwiGLU and grouped-query attention.

Conventions
- Shapes are written next to the tensor lines: B batch, T sequence, D model dim, H query heads,
  Hkv key/value heads, hd head dim, V vocabulary.
- RoPE uses Meta's layout: each head dimension is split into *interleaved* pairs (x0, x1), (x2, x3)...
  that are rotated as complex numbers. Hugging Face checkpoints store q/k weights permuted for the
  "rotate half" layout; `trainer/hf.py` undoes that permutation on import.
- The blocks live in a `ModuleDict` keyed "0".."n-1", so a pipeline split can delete blocks and keep
  the remaining parameter names (`layers.7.attention.wq.weight` is the same name in every layout).
  For the same reason `tok_embeddings`, `norm` and `output` may be set to None on a pipeline stage.
- The model is built on the meta device; `init_weights()` fills every parameter and buffer
  deterministically from a seed, identically on any device and in any sharded layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from models.adapters import AdapterLinear, adapter_init_spec, init_adapters, is_nf4
from models.moe import MoE, MoEArgs, is_moe_layer, moe_args_of


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 frequency scaling of RoPE (long-context extension)."""

    factor: float = 8.0  # how much longer the context is than in pre-training
    low_freq_factor: float = 1.0  # wavelengths above original/low_freq_factor are divided by `factor`
    high_freq_factor: float = 4.0  # wavelengths below original/high_freq_factor are kept
    original_max_seq_len: int = 8192  # the context length the base frequencies were trained for


@dataclass(frozen=True)
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: same as n_heads (multi-head attention)
    vocab_size: int = 32000
    multiple_of: int = 256  # the SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 4096  # length of the precomputed RoPE table
    tie_embeddings: bool = False
    ffn_hidden_dim: int | None = None  # the SwiGLU hidden size itself (an imported model's), overriding the rule
    attention: str = "auto"  # SDPA's kernel: auto (SDPA picks), flash, cudnn, efficient
    expand_kv: bool | None = None  # repeat the kv heads to the query heads before SDPA; None: where the kernel needs it
    moe: MoEArgs | None = None  # Mixture-of-Experts feed-forward blocks (models/moe.py); None: dense
    head_size: int | None = None  # each head's width (config model.head_dim); None: dim / n_heads (Qwen3: 128 at 2048)
    qk_norm: bool = False  # an RMSNorm over each head's queries and keys before RoPE (Qwen3)

    @property
    def kv_expanded(self) -> bool:
        """Whether SDPA gets the keys and values repeated to every query head (grouped-query attention only):
        cuDNN's and the memory-efficient kernel take no grouped heads, so they always get them expanded."""
        if self.kv_heads == self.n_heads:
            return False
        return self.attention in ("cudnn", "efficient") if self.expand_kv is None else bool(self.expand_kv)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.head_size or self.dim // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        # SwiGLU has 3 matrices instead of 2, so 2/3 of the usual 4*D keeps the FLOPs (LLaMA paper).
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def is_moe(self, layer_id: int) -> bool:
        """Whether block `layer_id` has an MoE feed-forward (models/moe.py)."""
        return is_moe_layer(self.moe, layer_id)

    @property
    def expert_hidden(self) -> int:
        """An MoE expert's SwiGLU width F (model.moe.expert_hidden, else the dense rule's)."""
        return (self.moe.expert_hidden if self.moe and self.moe.expert_hidden else None) or self.ffn_hidden

    def ffn_params(self, layer_id: int, *, active: bool = False) -> int:
        """The feed-forward parameters of block `layer_id`: the dense SwiGLU, or the router, the experts (`active`:
        only the K a token uses) and the shared experts."""
        D = self.dim
        if not self.is_moe(layer_id):
            return 3 * D * self.ffn_hidden
        m, Fe = self.moe, self.expert_hidden
        experts = m.top_k if active else m.n_experts
        return D * m.n_experts + 3 * D * Fe * (experts + m.n_shared_experts)

    def num_params(self, *, exclude_embedding: bool = False, active: bool = False) -> int:
        """Exact parameter count, from the shapes alone (no model needed); `active`: those one token computes with
        (an MoE block's top-k experts, not all)."""
        D, hd = self.dim, self.head_dim
        attn = D * self.n_heads * hd + 2 * D * self.kv_heads * hd + self.n_heads * hd * D + 2 * hd * self.qk_norm
        blocks = sum(attn + self.ffn_params(i, active=active) + 2 * D for i in range(self.n_layers))  # + two norms
        embedding = self.vocab_size * D
        output = 0 if self.tie_embeddings else self.vocab_size * D
        total = blocks + D + embedding + output
        return total - embedding if exclude_embedding else total

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward), torchtitan's convention.

        6 x N for the matmuls of every parameter except the embedding lookup (which is a gather, not a
        matmul; the output projection *is* counted, also when tied), plus 12 x L x H x hd x T for the
        attention score and value matmuls (QK^T and PV: 2 matmuls x 2 FLOPs per MAC x 3 for fwd+bwd).
        """
        n = self.num_params(exclude_embedding=True, active=True)  # (MoE: the router and the K experts a token uses)
        if self.tie_embeddings:
            n += self.vocab_size * self.dim  # the tied table is still a matmul at the output
        return 6 * n + 12 * self.n_layers * self.n_heads * self.head_dim * seq_len

    def _ffn_shapes(self, layer_id: int) -> list[tuple[str, tuple[int, ...]]]:
        """(name within the block, shape) of block `layer_id`'s feed-forward parameters."""
        D, F = self.dim, self.ffn_hidden
        if not self.is_moe(layer_id):
            return [
                ("feed_forward.w1.weight", (F, D)),
                ("feed_forward.w2.weight", (D, F)),
                ("feed_forward.w3.weight", (F, D)),
            ]
        E, Fe, shared = self.moe.n_experts, self.expert_hidden, self.moe.n_shared_experts * self.expert_hidden
        out = [
            ("feed_forward.router.gate.weight", (E, D)),
            ("feed_forward.experts.w1", (E, Fe, D)),
            ("feed_forward.experts.w2", (E, D, Fe)),
            ("feed_forward.experts.w3", (E, Fe, D)),
        ]
        if shared:
            out += [
                (f"feed_forward.shared.{w}.weight", shape)
                for w, shape in (("w1", (shared, D)), ("w2", (D, shared)), ("w3", (shared, D)))
            ]
        return out

    def param_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every distinct parameter in module order, from the shapes alone (no model
        needed; the same names as `Transformer.named_parameters()`, a tied output table omitted)."""
        D, Q, K, hd = self.dim, self.n_heads * self.head_dim, self.kv_heads * self.head_dim, self.head_dim
        out = [("tok_embeddings.weight", (self.vocab_size, D))]
        for i in range(self.n_layers):
            out += [
                (f"layers.{i}.{name}", shape)
                for name, shape in (
                    ("attention_norm.weight", (D,)),
                    ("attention.wq.weight", (Q, D)),
                    ("attention.wk.weight", (K, D)),
                    ("attention.wv.weight", (K, D)),
                    ("attention.wo.weight", (D, Q)),
                    *([("attention.q_norm.weight", (hd,)), ("attention.k_norm.weight", (hd,))] * self.qk_norm),
                    ("ffn_norm.weight", (D,)),
                    *self._ffn_shapes(i),
                )
            ]
        out.append(("norm.weight", (D,)))
        if not self.tie_embeddings:
            out.append(("output.weight", (self.vocab_size, D)))
        return out


# The weight dimension tensor parallelism splits, per module (block modules relative to the block): column-wise
# linears split their output features (dim 0), row-wise ones their input features (dim 1), the embedding its
# vocabulary (dim 0). The norms are not split (they run sequence-parallel on replicated weights).
# `Transformer.tp_plan()` says how; this table says what, for the planner (tests check they agree).
TP_SPLIT_DIM = {
    "tok_embeddings": 0,
    "output": 0,
    "attention.wq": 0,
    "attention.wk": 0,
    "attention.wv": 0,
    "attention.wo": 1,
    "feed_forward.w1": 0,
    "feed_forward.w2": 1,
    "feed_forward.w3": 0,
}


# Shapes of the published models (Llama-2: 7B, 13B, 70B; Llama-3/3.2: 1B, 3B, 8B, 70B) and a tiny one.
FLAVORS: dict[str, ModelArgs] = {
    # a few million parameters: trains in seconds on a laptop CPU; vocab of the default tokenizer
    "debug": ModelArgs(
        dim=256,
        n_layers=4,
        n_heads=8,
        n_kv_heads=4,
        vocab_size=4096,
        multiple_of=64,
        rope_theta=10000.0,
        max_seq_len=1024,
    ),
    # Llama-3.2-1B
    "1b": ModelArgs(
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=128256,
        multiple_of=256,
        ffn_dim_multiplier=1.5,
        norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(factor=32.0),
        max_seq_len=131072,
        tie_embeddings=True,
    ),
    # Llama-3.2-3B
    "3b": ModelArgs(
        dim=3072,
        n_layers=28,
        n_heads=24,
        n_kv_heads=8,
        vocab_size=128256,
        multiple_of=256,
        ffn_dim_multiplier=1.0,
        norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(factor=32.0),
        max_seq_len=131072,
        tie_embeddings=True,
    ),
    # Llama-2-7B
    "7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256, max_seq_len=4096),
    # Llama-3-8B
    "8b": ModelArgs(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=128256,
        multiple_of=1024,
        ffn_dim_multiplier=1.3,
        rope_theta=500000.0,
        max_seq_len=8192,
    ),
    # Llama-2-13B
    "13b": ModelArgs(dim=5120, n_layers=40, n_heads=40, vocab_size=32000, multiple_of=256, max_seq_len=4096),
    # Llama-3-70B
    "70b": ModelArgs(
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        vocab_size=128256,
        multiple_of=4096,
        ffn_dim_multiplier=1.3,
        rope_theta=500000.0,
        max_seq_len=8192,
    ),
}


def model_args(flavor: str, **overrides) -> ModelArgs:
    """The flavor's shape with any fields replaced (None values are ignored)."""
    if flavor not in FLAVORS:
        raise KeyError(f"unknown model flavor {flavor!r}; known: {', '.join(FLAVORS)}")
    return replace(FLAVORS[flavor], **{k: v for k, v in overrides.items() if v is not None})


def args_from_record(record: dict) -> ModelArgs:
    """The ModelArgs a checkpoint's train_state.json recorded (`dataclasses.asdict` of them), rebuilt: its RoPE
    scaling and MoE sections back to their dataclasses; keys this version does not know are left out."""
    m = {k: v for k, v in record.items() if k in ModelArgs.__dataclass_fields__}
    m["rope_scaling"] = RopeScaling(**m["rope_scaling"]) if m.get("rope_scaling") else None
    m["moe"] = MoEArgs(**m["moe"]) if m.get("moe") else None
    return ModelArgs(**m)


def args_from_config(m) -> ModelArgs:
    """The shape a config's `model` section asks for: its flavor with every non-null field replaced.
    Raises ValueError, naming the setting, for an unknown flavor or scaling values without a scaling type."""
    if m.flavor not in FLAVORS:
        raise ValueError(f"model.flavor={m.flavor}: unknown flavor; known: {', '.join(FLAVORS)}")
    args = model_args(
        m.flavor,
        dim=m.dim,
        n_layers=m.n_layers,
        n_heads=m.n_heads,
        n_kv_heads=m.n_kv_heads,
        vocab_size=m.vocab_size,
        max_seq_len=m.max_seq_len,
        tie_embeddings=m.tie_embeddings,
        ffn_hidden_dim=m.ffn_hidden_dim,
        norm_eps=m.norm_eps,
        rope_theta=m.rope_theta,
    )
    args = replace(
        args,
        attention=str(m.get("attention", "auto")),
        expand_kv=m.get("expand_kv"),
        moe=moe_args_of(m.get("moe")),
        head_size=m.get("head_dim") or args.head_size,
        qk_norm=bool(m.get("qk_norm")) if m.get("qk_norm") is not None else args.qk_norm,
    )
    r = m.rope_scaling
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len")
    kind = None if r.type is None else str(r.type)
    if kind == "none":
        return replace(args, rope_scaling=None)
    if kind == "llama3" or (kind is None and args.rope_scaling is not None):
        base = args.rope_scaling or RopeScaling()
        return replace(
            args, rope_scaling=replace(base, **{k: getattr(r, k) for k in keys if getattr(r, k) is not None})
        )
    if any(getattr(r, k) is not None for k in keys):
        raise ValueError(
            f"model.rope_scaling.* values are set but the flavor {m.flavor} has no RoPE scaling; "
            f"set model.rope_scaling.type=llama3 as well"
        )
    return args


def config_problems(args: ModelArgs, name: str) -> list[str]:
    """The model section's rules (trainer/validate.py::validate collects every subsystem's)."""
    problems: list[str] = []
    sizes = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "vocab_size": args.vocab_size}
    sizes |= {"max_seq_len": args.max_seq_len, "n_kv_heads": args.n_kv_heads, "ffn_hidden_dim": args.ffn_hidden_dim}
    for key, value in sizes.items():
        if value is not None and value < 1:
            problems.append(f"model.{key}={value} must be >= 1")
    if problems:  # (the rules below divide by these)
        return problems
    if args.rope_scaling is not None:
        r = args.rope_scaling
        for key in ("factor", "low_freq_factor", "original_max_seq_len"):
            if getattr(r, key) <= 0:
                problems.append(f"model.rope_scaling.{key}={getattr(r, key)} must be > 0 (Llama 3.1's RoPE scaling)")
        if r.high_freq_factor <= r.low_freq_factor:
            problems.append(
                f"model.rope_scaling.high_freq_factor({r.high_freq_factor}) must be above low_freq_factor"
                f"({r.low_freq_factor}): the wavelengths between the two are blended over their difference"
            )
    if args.head_size is None and args.dim % args.n_heads:
        problems.append(
            f"model.n_heads({args.n_heads}) must divide model.dim({args.dim}): "
            f"{args.dim} % {args.n_heads} = {args.dim % args.n_heads}"
        )
    if args.attention not in ATTENTION_KERNELS:
        problems.append(f"model.attention={args.attention}: unknown SDPA kernel; known: {', '.join(ATTENTION_KERNELS)}")
    elif args.attention in ("cudnn", "efficient") and args.expand_kv is False and args.kv_heads != args.n_heads:
        problems.append(
            f"model.attention={args.attention} with model.expand_kv=false: that kernel takes no grouped "
            f"kv heads; leave model.expand_kv unset (null) or pick flash or auto"
        )
    if args.n_heads % args.kv_heads:
        problems.append(
            f"model.n_kv_heads({args.kv_heads}) must divide model.n_heads({args.n_heads}): "
            f"{args.n_heads} % {args.kv_heads} = {args.n_heads % args.kv_heads}"
        )
    elif (args.head_size or args.dim % args.n_heads == 0) and args.head_dim % 2:
        problems.append(
            f"head dim {args.head_dim} (model.head_dim, else model.dim/model.n_heads = {args.dim}/{args.n_heads}) "
            "must be even for RoPE"
        )
    if name != "llama":
        problems.append(f"model.name={name}: unknown model; known: llama")
    return problems


# ----------------------------------------------------------------------------------------------
# RoPE


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/hd), i < hd/2, with optional Llama-3.1 scaling. fp32, (hd/2,)."""
    hd = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    s = args.rope_scaling
    if s is not None:
        wavelen = 2 * math.pi / inv_freq
        low_wavelen = s.original_max_seq_len / s.low_freq_factor  # longer than this: fully scaled
        high_wavelen = s.original_max_seq_len / s.high_freq_factor  # shorter than this: untouched
        # in between, interpolate smoothly between scaled and unscaled
        smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        mixed = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
        inv_freq = torch.where(
            wavelen > low_wavelen, inv_freq / s.factor, torch.where(wavelen < high_wavelen, inv_freq, mixed)
        )
    return inv_freq.float()


def rope_tables(args: ModelArgs, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position x frequency, each (max_seq_len, hd/2) fp32."""
    inv_freq = rope_frequencies(args).to(device)
    pos = torch.arange(args.max_seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(pos, inv_freq)  # (T_max, hd/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (B, T, H, hd) by the angles of positions 0..T-1 (cos, sin: (>= T, hd/2)), or by
    each token's own (cos, sin: (B, T, hd/2), e.g. positions restarting at each packed document)."""
    B, T, H, hd = x.shape
    xp = x.float().reshape(B, T, H, hd // 2, 2)  # (B, T, H, hd/2, 2): pairs (x_2i, x_2i+1)
    x0, x1 = xp[..., 0], xp[..., 1]
    shape = (1, T, 1, hd // 2) if cos.dim() == 2 else (B, T, 1, hd // 2)
    c = (cos[:T] if cos.dim() == 2 else cos).view(shape)
    s = (sin[:T] if sin.dim() == 2 else sin).view(shape)
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)  # complex multiply by e^(i angle)
    return out.flatten(3).type_as(x)  # (B, T, H, hd)


# ----------------------------------------------------------------------------------------------
# Blocks


# (SDPA's math kernel is left out: it saves every head's T x T probabilities for backward)
ATTENTION_KERNELS = ("auto", "flash", "cudnn", "efficient")


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }[name]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.head_dim = args.head_dim
        self.kernel = None if args.attention == "auto" else _sdpa_backend(args.attention)
        self.expand_kv = args.kv_expanded
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        # Qwen3: each head's queries and keys RMS-normalized over the head's width (one weight shared by the heads)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=args.norm_eps) if args.qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=args.norm_eps) if args.qk_norm else None
        self.cp = None  # parallel.cp > 1: the context-parallel group this attention spans (parallel/context.py)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`mask` of packed documents (`document_mask`): (B, 1, T, T) additive (0 where a query may attend to a key,
        -inf elsewhere) or FlexAttention's BlockMask; None: causal over the whole sequence."""
        B, T, _ = x.shape
        # -1 instead of n_heads: under tensor parallelism each rank holds only its share of the heads
        q = self.wq(x).view(B, T, -1, self.head_dim)  # (B, T, H, hd)
        k = self.wk(x).view(B, T, -1, self.head_dim)  # (B, T, Hkv, hd)
        v = self.wv(x).view(B, T, -1, self.head_dim)  # (B, T, Hkv, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H or Hkv, T, hd)
        # enable_gqa shares each kv head among H/Hkv query heads without materializing the repeats.
        # With grouped kv heads SDPA can only pick its flash kernel (on CUDA and CPU) or the math
        # fallback: the cuDNN and memory-efficient kernels need the kv heads expanded first (model.expand_kv,
        # which then saves the expanded keys and values for backward instead of the grouped ones).
        if self.cp is not None:  # this rank's two sequence chunks against the whole sequence, exact
            y = self.cp.attend(q, k, v)  # (parallel/context.py CPGroup)
        else:
            if self.expand_kv and k.shape[1] != q.shape[1]:
                rep = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            how = {"is_causal": True} if mask is None else {"attn_mask": mask}
            if mask is not None and not isinstance(mask, torch.Tensor):  # packed documents on CUDA: a BlockMask
                y = flex_attend(q, k, v, mask)
            elif self.kernel is None:
                y = F.scaled_dot_product_attention(q, k, v, enable_gqa=k.shape[1] != q.shape[1], **how)
            else:  # model.attention: this kernel or an error, never a silent fallback
                from torch.nn.attention import sdpa_kernel

                with sdpa_kernel(self.kernel):
                    y = F.scaled_dot_product_attention(q, k, v, enable_gqa=k.shape[1] != q.shape[1], **how)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*hd)
        return self.wo(y)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, hidden: int | None = None):
        super().__init__()
        hidden = hidden or args.ffn_hidden
        self.w1 = nn.Linear(args.dim, hidden, bias=False)  # gate
        self.w2 = nn.Linear(hidden, args.dim, bias=False)  # down
        self.w3 = nn.Linear(args.dim, hidden, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        if args.is_moe(layer_id):
            m, hidden = args.moe, args.expert_hidden
            shared = FeedForward(args, hidden * m.n_shared_experts) if m.n_shared_experts else None
            self.feed_forward = MoE(args.dim, hidden, m, shared)
        else:
            self.feed_forward = FeedForward(args)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask)  # (B, T, D)
        return h + self.feed_forward(self.ffn_norm(h))


def vocab_parallel_loss(**kwargs):
    """ColwiseParallel for an OutputProjection that returns its loss: the weight split over the vocabulary, the
    input gathered over the sequence as for the logits, and the (plain, replicated) loss passed through."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import ColwiseParallel

    class VocabParallelLoss(ColwiseParallel):
        @staticmethod
        def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
            if not isinstance(outputs, DTensor):
                return outputs
            return ColwiseParallel._prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh)

    return VocabParallelLoss(**kwargs)


class OutputProjection(nn.Linear):
    """The vocabulary projection. Called with `targets` and `chunks` it returns the summed cross-entropy instead
    of the logits, projecting chunk by chunk (models/loss.py): the module is still the one FSDP, DeepSpeed and
    tensor parallelism wrap, so its weight is gathered and split as for the logits."""

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None, chunks: int = 0) -> torch.Tensor:
        if targets is None or not chunks:
            return super().forward(x)
        from models.loss import chunked_cross_entropy

        return chunked_cross_entropy(x, self.weight, targets, chunks=chunks)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, args) for i in range(args.n_layers)})
        self.norm: nn.RMSNorm | None = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.output: nn.Linear | None = OutputProjection(args.dim, args.vocab_size, bias=False)
        self.loss_chunks = 0  # training.loss_chunks: forward(tokens, targets) returns the loss computed in chunks
        # parallel.activation_offload: block index -> the context each block's forward runs in (parallel/offload.py)
        self.block_context = None
        self.positions: torch.Tensor | None = None  # parallel.cp > 1: the token positions this rank holds
        # packed documents' mask: "flex" (FlexAttention's block mask) or "dense" (one additive mask); None: flex on
        # CUDA, dense elsewhere (`document_mask`; tests/gpu/test_kernels.py compares the two on a GPU)
        self.packed_attention: str | None = None
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # RoPE tables are derived data, not state: non-persistent, rebuilt by init_weights()
        cos, sin = rope_tables(args, device=self.output.weight.device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(
        self, tokens: torch.Tensor, targets: torch.Tensor | None = None, documents: torch.Tensor | None = None
    ) -> torch.Tensor:
        """tokens (B, T) int64 -> logits (B, T, V). On a pipeline stage: hidden (B, T, D) in or out.
        With `targets` (B, T) and `loss_chunks` set: the summed fp32 cross-entropy, the logits never whole.
        `documents` (B, T): which packed document each token belongs to (consecutive runs); each attends only to its
        own document's earlier tokens, its positions restarting at 0 (`document_mask`)."""
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens  # (B, T, D)
        cos, sin, mask = self.rope_cos, self.rope_sin, None
        if documents is not None:
            if self.positions is not None:
                raise ValueError("packed documents under context parallelism are not built")
            positions, mask = document_mask(documents, _compute_dtype(h), self.packed_attention)
            cos, sin = cos[positions], sin[positions]  # (B, T, hd/2)
        if self.positions is not None:  # context parallelism: the angles of the positions this rank holds
            cos, sin = cos[self.positions], sin[self.positions]
        for name, block in self.layers.items():
            if self.block_context is None:
                h = block(h, cos, sin, mask)
            else:  # (outside the block's FSDP hooks and its compiled graph)
                with self.block_context(int(name)):
                    h = block(h, cos, sin, mask)
        h = self.norm(h) if self.norm is not None else h
        if self.output is None:
            return h
        if targets is not None and self.loss_chunks:
            # (keywords: TP's input hook on the projection replaces the positional arguments with its first one)
            return self.output(h, targets=targets, chunks=self.loss_chunks)
        return self.output(h)  # (B, T, V)

    def to_empty(self, *, device, recurse: bool = True) -> Transformer:
        # Module.to_empty replaces each module's parameters one module at a time, which silently unties
        # a shared embedding/output table (each side gets its own empty tensor); tie it again. A tensor that is
        # not on the meta device any more (a QLoRA base, quantized before FSDP split it) keeps its values.
        self._apply(lambda t: torch.empty_like(t, device=device) if t.is_meta else t, recurse=recurse)
        if self.args.tie_embeddings and self.tok_embeddings is not None and self.output is not None:
            self.output.weight = self.tok_embeddings.weight
        return self

    # ------------------------------------------------------------------------------------------
    # What the generic parallel code asks of a model

    @property
    def blocks(self) -> nn.ModuleDict:
        """The repeated units: what FSDP shards one by one, AC wraps and compile compiles."""
        return self.layers

    def tp_plan(self, *, loss_parallel: bool) -> tuple[dict, dict]:
        """Megatron-style tensor parallelism with sequence parallelism, as DTensor plans.

        Returns (plan for the root modules, {block name: its plan}). Between blocks the residual stream is
        sharded along the sequence (Shard(1)); norms run on those shards (SequenceParallel); attention and
        MLP all-gather the sequence, split heads / hidden units column-wise and reduce-scatter back to
        sequence shards after the row-wise output projection. The embedding is split over the vocabulary.
        With `loss_parallel` the logits stay split over the vocabulary (Shard(-1)) into the loss; with
        `loss_chunks` too, the output projection returns the loss itself (models/loss.py all-reduces across the
        vocabulary shards).
        """
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            PrepareModuleInput,
            PrepareModuleInputOutput,
            RowwiseParallel,
            SequenceParallel,
        )

        root = {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "norm": SequenceParallel(),
            "output": (
                vocab_parallel_loss(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False)
                if loss_parallel and self.loss_chunks
                else ColwiseParallel(
                    input_layouts=Shard(1),
                    output_layouts=Shard(-1) if loss_parallel else Replicate(),
                    use_local_output=not loss_parallel,
                )
            ),
        }
        root = {k: v for k, v in root.items() if getattr(self, k) is not None}  # a pipeline stage may lack them
        block = {
            "attention_norm": SequenceParallel(),
            # forward(x, cos, sin): gather the sequence of x; the RoPE tables are plain tensors
            # (x, cos, sin, mask): the mask of packed documents, like the RoPE tables, is whole on every rank
            "attention": PrepareModuleInput(
                input_layouts=(Shard(1), None, None, None), desired_input_layouts=(Replicate(), None, None, None)
            ),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
            "feed_forward.w3": ColwiseParallel(),
        }
        # an MoE block's feed-forward (models/moe.py) is not split: every TP rank gathers the whole sequence, routes and
        # computes it with the whole router and experts (the same values on every rank, so their gradients are the
        # same too: no reduction over tp), and keeps its own sequence shard of the output
        moe_ffn = PrepareModuleInputOutput(
            input_layouts=(Shard(1),),
            desired_input_layouts=(Replicate(),),
            use_local_input=True,
            output_layouts=Replicate(),
            desired_output_layouts=Shard(1),
        )
        moe_block = {k: v for k, v in block.items() if not k.startswith("feed_forward")} | {"feed_forward": moe_ffn}
        return root, {i: moe_block if self.args.is_moe(int(i)) else block for i in self.layers}

    def set_context_parallel(self, cp, positions: torch.Tensor) -> None:
        """Context parallelism: this rank holds the tokens at `positions` of every sequence, and each attention
        spans the group `cp` (a parallel.context.CPGroup) to see the others."""
        self.positions = positions
        for block in self.layers.values():
            for module in block.modules():
                if isinstance(module, Attention):
                    module.cp = cp

    def keep_stage(self, block_names: list[str], *, first: bool, last: bool) -> None:
        """Turn this (meta) model into one pipeline stage: keep these blocks, the embedding only on the
        first stage, the final norm and output only on the last. Parameter names do not change."""
        for name in list(self.layers.keys()):
            if name not in block_names:
                del self.layers[name]
        if not first:
            self.tok_embeddings = None
        if not last:
            self.norm = None
            self.output = None

    # ------------------------------------------------------------------------------------------
    # Initialization

    @torch.no_grad()
    def init_spec(self, name: str) -> dict:
        """How the parameter `name` (canonical) starts: {"fill": v}, or a normal draw {"mean", "std", "lo", "hi"}
        (models/init.py gives each element a value from its index in the full tensor)."""
        if name.endswith(AdapterLinear.ADAPTER_NAMES):  # LoRA/DoRA (models/adapters.py): A's std from the fan-in
            a = self.args
            linear = name.split(".")[3]  # layers.<i>.<attention|feed_forward>.<linear>....
            fan_in = {"wo": a.n_heads * a.head_dim, "w2": a.ffn_hidden}.get(linear, a.dim)
            return adapter_init_spec(name, fan_in)
        if name.endswith("norm.weight"):
            return {"fill": 1.0}
        if name == "tok_embeddings.weight" and self.args.tie_embeddings:
            # one table as input and output (Llama 3.2 1B/3B): std 0.02, as Megatron-LM and Hugging Face draw it.
            # At the embedding's std 1 every token's own logit starts near sqrt(D) x |e_t| and step 0's loss far
            # above ln V (about 64 on the parity model); at 0.02 the logits start small and the loss near ln V
            return {"mean": 0.0, "std": 0.02, "lo": -2.0, "hi": 2.0}
        if name == "tok_embeddings.weight":
            return {"mean": 0.0, "std": 1.0}
        if name == "output.weight":
            # scaled so that initial logits have unit variance; cut at 3 sigma (torchtitan)
            s = self.args.dim**-0.5
            return {"mean": 0.0, "std": s, "lo": -3 * s, "hi": 3 * s}
        # depth-scaled init for the projections that write into the residual stream
        layer_id = int(name.split(".")[1])
        writes_residual = name.endswith(
            (
                "attention.wo.weight",
                "feed_forward.w2.weight",
                "feed_forward.w3.weight",
                "experts.w2",
                "experts.w3",
                "shared.w2.weight",
                "shared.w3.weight",
            )
        )
        s = 0.02 / math.sqrt(2 * (layer_id + 1)) if writes_residual else 0.02
        return {"mean": 0.0, "std": s, "lo": -2.0, "hi": 2.0}

    def init_weights(self, seed: int = 0, *, buffer_device: torch.device | None = None, values: bool = True) -> None:
        """Fill every parameter and buffer, deterministically from `seed`.

        Each element's value is a function of (seed, parameter name, its index in the full tensor)
        (models/init.py), computed where the parameter lives for the elements this rank holds. So the weights
        do not depend on the order in which modules are visited, on which blocks this pipeline stage holds, or
        on how the parameter is sharded, and no rank builds a full tensor: every layout starts from the
        single-process weights. `values=False` only rebuilds the RoPE tables (a simulation under
        FakeTensorMode has shapes, no values to draw).
        """
        from models.init import fill_normal

        for name, p in self.named_parameters() if values else ():  # a tied table is visited once, as tok_embeddings
            if is_nf4(p):  # a QLoRA base, drawn (or read) and quantized before FSDP split it
                continue
            name = canonical_name(name)
            spec = self.init_spec(name)
            if "fill" in spec:
                with torch.no_grad():
                    (p.to_local() if hasattr(p, "to_local") else p).fill_(spec["fill"])
            else:
                fill_normal(p, seed, name, **spec)
        if values:
            init_adapters(self)  # DoRA's magnitudes from the base rows just drawn
        cos, sin = rope_tables(self.args)
        device = buffer_device or self.rope_cos.device  # with CPU offload, parameters live on the CPU
        self.rope_cos = cos.to(device)
        self.rope_sin = sin.to(device)
        for module in self.modules():  # MoE blocks: the balancing bias and the routing counts start at 0 (to_empty
            if isinstance(module, MoE):  # left whatever memory held; a checkpoint's bias is loaded after this)
                module.reset_buffers()


def document_mask(
    documents: torch.Tensor, dtype: torch.dtype = torch.float32, kind: str | None = None
) -> tuple[torch.Tensor, object]:
    """For packed documents (B, T) (each a consecutive run of one id): each token's position within its document,
    (B, T), and the attention mask: a query attends to the keys of its own document that are not later.

    kind "dense" (the CPU's): one (B, 1, T, T) additive mask in the attention's dtype (0 or -inf), built once per
    forward and shared by every block (SDPA would turn a boolean mask into such a tensor in every block and save each
    copy for the backward; parallel/memory_terms.py `packed_documents_term` counts the one). kind "flex" (CUDA's):
    FlexAttention's BlockMask, which stores which (128 x 128) tiles are full, partial or empty instead of T x T
    values; torch 2.13 has no FlexAttention backward on the CPU. None: flex on CUDA, dense elsewhere."""
    B, T = documents.shape
    idx = torch.arange(T, device=documents.device)
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    first = torch.cummax(torch.where(starts, idx, 0), dim=1).values  # each token's document start
    positions = idx - first
    if (kind or ("flex" if documents.is_cuda else "dense")) == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        def same_document_causal(b, h, q, kv):
            return (documents[b, q] == documents[b, kv]) & (q >= kv)

        # (compiled: the eager builder would evaluate all T x T pairs at once)
        block = create_block_mask(
            same_document_causal, B, None, T, T, device=documents.device, _compile=documents.is_cuda
        )
        return positions, block
    apart = (documents[:, None, :, None] != documents[:, None, None, :]) | (idx[:, None] < idx[None, :])
    return positions, torch.zeros(B, 1, T, T, dtype=dtype, device=documents.device).masked_fill_(apart, -math.inf)


_COMPILED_FLEX = None


def flex_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    """FlexAttention over a BlockMask (packed documents on CUDA), compiled on CUDA (its eager form materializes the
    scores), eager elsewhere (the CPU has it forward only: tests/unit/test_model.py compares it with the dense mask)."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    fn = flex_attention
    if q.is_cuda:
        if _COMPILED_FLEX is None:
            _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
        fn = _COMPILED_FLEX
    return fn(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1])


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    """The dtype the attention's queries will have: autocast's where it is on, else the hidden states'."""
    kind = h.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else h.dtype


def canonical_name(name: str) -> str:
    """A parameter's name without the wrappers that AC and compile insert, the same in every layout."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def build_model(args: ModelArgs, device: torch.device | str = "meta") -> Transformer:
    """Construct the model; on the meta device nothing is allocated (step 1 of the build order)."""
    with torch.device(device):
        return Transformer(args)


def count_params(model: nn.Module) -> int:
    """Distinct parameters (a tied table counts once); works on meta-device models."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


__all__ = [
    "ModelArgs",
    "RopeScaling",
    "FLAVORS",
    "model_args",
    "Transformer",
    "build_model",
    "count_params",
    "rope_tables",
    "apply_rope",
    "canonical_name",
]
