"""Adafactor that stays correct when parameters are sharded (FSDP2, tensor parallel, both, HSDP).

The mathematics and defaults are those of `torch.optim.Adafactor` (Shazeer & Stern 2018, "Adafactor:
Adaptive Learning Rates with Sublinear Memory Cost"), step t starting at 1:

    beta2_t = t ** beta2_decay                               (decay of the second-moment EMA; paper eq. 8)
    rho_t   = min(lr, 1 / sqrt(t))                           (relative step size; `relative_step`)
    alpha_t = max(eps2, RMS(param)) * rho_t                  (parameter-scale step; `scale_parameter`)
    param  *= 1 - lr * weight_decay
    matrices (last two dims R x C):                          (factored second moment; paper alg. 4)
        row_var = lerp(row_var, mean_C(g^2), beta2_t)        (..., R, 1)
        col_var = lerp(col_var, mean_R(g^2), beta2_t)        (..., 1, C)
        v       = row_var @ col_var / max(mean_R(row_var), eps1)
    vectors:  v = lerp(v, g^2, beta2_t)
    u       = g / sqrt(max(v, eps1^2))
    param  -= alpha_t / max(1, RMS(u) / d) * u               (update clipping; paper sec. 6, `d`)

Options beyond torch's, from the paper and the Hugging Face implementation: `relative_step=False` uses
`lr` itself as rho_t; `scale_parameter=False` drops the RMS(param) factor; `beta1` keeps an EMA of the
clipped update (a first moment, paper sec. 7; costs one full-size state tensor).

Sharding. A parameter that is a DTensor is processed on its local shard, and every quantity that spans a
shard boundary is summed across the mesh dimensions that cut it: RMS(param) and RMS(u) over every dim that
shards the parameter, the column statistic mean_R(g^2) and mean_R(row_var) over the dims that cut rows, the
row statistic mean_C(g^2) over the dims that cut columns. Means divide by the *global* sizes, so uneven
shards are exact. All parameters' partial sums of one phase are packed into one buffer per process group:
a step issues at most 3 phases x (number of mesh dims) all-reduces, however many parameters there are. The
factored statistics are kept as DTensors sharded like their parameter's rows (row_var) or columns
(col_var), so checkpoints (DCP) can reshard them. Nothing calls `.item()`: the step never waits on the
device.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.distributed as dist
from torch import Tensor

from models.dtensor import local as _local
from optim.common import evaluate_closure


def _sharded_dim(pl) -> int | None:
    """The tensor dim a placement cuts, or None. `_StridedShard` (FSDP2 sharding a TP shard) does not
    report is_shard() in every torch version, so look for the dim itself."""
    dim = getattr(pl, "dim", None)
    return dim if isinstance(dim, int) else None


def _shard_dims(placements, ndim: int) -> tuple[set[int], set[int], set[int]]:
    """Mesh dims that cut (rows, columns, anything) of a tensor with `ndim` dims. For a vector the
    "rows" and "columns" are the same single dim; leading batch dims of a >2-D tensor cut neither."""
    rows, cols, any_ = set(), set(), set()
    for mesh_dim, pl in enumerate(placements):
        if pl.is_partial():
            raise ValueError("Adafactor needs reduced gradients; got a Partial placement")
        if _sharded_dim(pl) is None:
            continue
        d = _sharded_dim(pl) % ndim
        any_.add(mesh_dim)
        if ndim >= 2 and d == ndim - 2:
            rows.add(mesh_dim)
        elif ndim >= 2 and d == ndim - 1:
            cols.add(mesh_dim)
    return rows, cols, any_


class _Reducer:
    """Collects (tensor, mesh dims to sum over) for one phase, then sums them with one all-reduce per
    process group, reducing over the mesh dims one after the other (sums compose)."""

    def __init__(self):
        self.items: list[tuple[Tensor, object, set[int]]] = []

    def add(self, t: Tensor, mesh, dims: set[int]) -> Tensor:
        if mesh is not None and dims:
            self.items.append((t, mesh, dims))
        return t

    def run(self) -> None:
        by_group: dict[object, list[Tensor]] = defaultdict(list)
        order: list[object] = []
        for t, mesh, dims in self.items:
            for d in sorted(dims):
                g = mesh.get_group(d)
                if g not in by_group:
                    order.append(g)
                by_group[g].append(t)
        for g in order:  # one collective per group: pack, reduce, unpack
            ts = by_group[g]
            flat = torch.cat([t.reshape(-1) for t in ts])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=g)
            offset = 0
            for t in ts:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
        self.items.clear()


def _like_param_rows_or_cols(local: Tensor, param: Tensor, keep: str) -> Tensor:
    """Wrap a factored statistic as a DTensor sharded like the parameter's rows ('rows') or columns ('cols')."""
    if not hasattr(param, "device_mesh"):
        return local
    from torch.distributed.tensor import DTensor, Replicate

    ndim = param.ndim
    drop = ndim - 1 if keep == "rows" else ndim - 2  # the dim this statistic has averaged away
    placements = [
        Replicate() if (_sharded_dim(pl) is not None and _sharded_dim(pl) % ndim == drop) else pl
        for pl in param.placements
    ]
    shape = list(param.shape)
    shape[drop] = 1
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(
        local, param.device_mesh, placements, run_check=False, shape=torch.Size(shape), stride=stride
    )


class Adafactor(torch.optim.Optimizer):
    def __init__(
        self,
        params,
        lr: float = 1e-2,
        beta2_decay: float = -0.8,
        eps: tuple[float | None, float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        relative_step: bool = True,
        scale_parameter: bool = True,
        beta1: float | None = None,
    ):
        if not 0.0 <= lr:
            raise ValueError(f"Adafactor lr={lr} must be >= 0")
        if not beta2_decay <= 0.0:
            raise ValueError(f"Adafactor beta2_decay={beta2_decay} must be <= 0")
        if eps[0] is not None and not eps[0] >= 0.0 or not eps[1] >= 0.0:
            raise ValueError(f"Adafactor eps={eps} must be >= 0")
        if not d >= 1.0:
            raise ValueError(f"Adafactor clipping threshold d={d} must be >= 1")
        if beta1 is not None and not 0.0 <= beta1 < 1.0:
            raise ValueError(f"Adafactor beta1={beta1} must be in [0, 1)")
        defaults = dict(
            lr=lr,
            beta2_decay=beta2_decay,
            eps=eps,
            d=d,
            weight_decay=weight_decay,
            maximize=maximize,
            relative_step=relative_step,
            scale_parameter=scale_parameter,
            beta1=beta1,
        )
        super().__init__(params, defaults)

    def _init_state(self, p: Tensor, group: dict) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)  # on the CPU: reading it never syncs the device
            local = _local(p)
            if p.ndim >= 2:
                state["row_var"] = _like_param_rows_or_cols(
                    torch.zeros(local.shape[:-1] + (1,), dtype=local.dtype, device=local.device), p, "rows"
                )
                state["col_var"] = _like_param_rows_or_cols(
                    torch.zeros(local.shape[:-2] + (1, local.shape[-1]), dtype=local.dtype, device=local.device),
                    p,
                    "cols",
                )
            else:
                state["variance"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["beta1"] is not None:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)

        work = []  # (param, grad, state, group, locals)
        phase1, phase2, phase3 = _Reducer(), _Reducer(), _Reducer()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Adafactor does not support sparse gradients")
                grad = p.grad
                if hasattr(grad, "placements") and grad.placements != p.placements:
                    grad = grad.redistribute(placements=p.placements)
                state = self._init_state(p, group)
                mesh = getattr(p, "device_mesh", None)
                rows, cols, any_ = _shard_dims(p.placements, p.ndim) if mesh is not None else (set(), set(), set())
                P, G = _local(p), _local(grad)
                if group["maximize"]:
                    G = -G
                w = {"P": P, "G": G, "mesh": mesh, "rows": rows, "cols": cols, "any": any_}
                # phase 1: sum of param^2 (for RMS(param)); partial row and column sums of g^2
                w["sq_param"] = phase1.add(P.float().square().sum().reshape(1), mesh, any_)
                if p.ndim >= 2:
                    G2 = G.square()
                    w["row_sum"] = phase1.add(G2.sum(dim=-1, keepdim=True), mesh, cols)
                    w["col_sum"] = phase1.add(G2.sum(dim=-2, keepdim=True), mesh, rows)
                work.append((p, grad, state, group, w))
        phase1.run()

        for p, _, state, group, w in work:
            state["step"] += 1
            t = state["step"].item()  # a CPU scalar: no device synchronization
            eps1 = group["eps"][0] if group["eps"][0] is not None else torch.finfo(w["P"].dtype).eps
            eps2 = group["eps"][1]
            w["eps1"] = eps1
            beta2_t = t ** group["beta2_decay"]
            lr = group["lr"]
            rho = min(lr, 1.0 / math.sqrt(t)) if group["relative_step"] else lr
            if group["scale_parameter"]:
                rms_param = (w["sq_param"] / p.numel()).sqrt()
                w["alpha"] = torch.clamp(rms_param, min=eps2) * rho  # (1,) tensor, stays on the device
            else:
                w["alpha"] = torch.full((1,), rho, dtype=torch.float32, device=w["P"].device)
            if group["weight_decay"] != 0:
                w["P"].mul_(1 - lr * group["weight_decay"])
            if p.ndim >= 2:
                R, C = p.shape[-2], p.shape[-1]
                row_var, col_var = _local(state["row_var"]), _local(state["col_var"])
                row_var.lerp_(w["row_sum"] / C, beta2_t)
                col_var.lerp_(w["col_sum"] / R, beta2_t)
                # phase 2: mean over all rows of row_var
                w["row_var_sum"] = phase2.add(row_var.sum(dim=-2, keepdim=True), w["mesh"], w["rows"])
            else:
                _local(state["variance"]).lerp_(w["G"].square(), beta2_t)
        phase2.run()

        for p, _, state, _group, w in work:
            eps1 = w["eps1"]
            if p.ndim >= 2:
                row_var, col_var = _local(state["row_var"]), _local(state["col_var"])
                row_mean = (w["row_var_sum"] / p.shape[-2]).clamp_(min=eps1)
                var_estimate = (row_var @ col_var).div_(row_mean)
            else:
                var_estimate = _local(state["variance"]).clone()
            update = var_estimate.clamp_(min=eps1 * eps1).rsqrt_().mul_(w["G"])
            w["update"] = update
            # phase 3: sum of u^2 (for RMS(u))
            w["sq_update"] = phase3.add(update.float().square().sum().reshape(1), w["mesh"], w["any"])
        phase3.run()

        for p, _, state, group, w in work:
            rms_update = (w["sq_update"] / p.numel()).sqrt()
            denom = torch.clamp(rms_update / group["d"], min=1.0)
            update = w["update"]
            if group["beta1"] is not None:
                exp_avg = _local(state["exp_avg"])
                exp_avg.lerp_(update, 1 - group["beta1"])
                update = exp_avg
            w["P"].add_(update * (-w["alpha"] / denom).to(update.dtype))
        return loss
