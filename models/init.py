"""Counter-based weight initialization: each element's value is a pure function of (seed, parameter name,
the element's index in the full tensor).

So a rank draws only the elements it holds, on the device where they live, and every layout (one process, DDP,
an FSDP or TP shard, a `_StridedShard` of FSDP x TP, a pipeline stage, a ZeRO-3 flat partition) starts from the
same weights without any rank ever building a full tensor. A sequential generator (torch's CPU Mersenne
twister, CUDA's Philox behind `normal_`) cannot do that: the values of a slice depend on everything drawn
before it, so every rank had to draw every full tensor (llama7b, world 8: minutes of CPU and gigabytes of host
memory per rank). DTensor's own offset-based RNG tracker solves this on CUDA only; CPU runs are where shardwise
is tested, so the generator is ours, in plain torch ops that run on any device:

    uniform(i) = (h >> 9 + 1/2) / 2^23,  h = fmix32(fmix32(fmix32(lo(i) ^ k0) ^ hi(i) ^ k1) ^ k2)
                 (murmur3's 32-bit finalizer, three rounds keyed by (seed, name); lo/hi the 32-bit words of i)
    normal(i)  = sqrt(2) * erfinv(2 uniform(i) - 1)
    truncated normal on [a, b]: the same, with uniform(i) mapped into [Phi(a), Phi(b)] (inverse-CDF sampling)

The integer part is exact on every device; erfinv in fp32 may differ between CPU and CUDA in the last bit, so
the weights are identical across layouts on one device type and equal to within 1 ulp across device types.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator

import torch

_M32 = 0xFFFFFFFF
_CHUNK = 1 << 18  # elements hashed at once: the temporaries stay in cache (4x faster than 1 << 22)


def _keys(seed: int, name: str) -> tuple[int, int, int]:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return tuple(int.from_bytes(digest[4 * i : 4 * i + 4], "little") for i in range(3))


def _signed32(x: int) -> int:
    return x - (1 << 32) if x >= 1 << 31 else x


_C1, _C2 = _signed32(0x85EBCA6B), _signed32(0xC2B2AE35)


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's finalizer on int32 tensors: products wrap modulo 2^32 and the shifts are made logical by masking
    (int32 runs about 8x faster than the same in int64 on a CPU; tests/unit/test_model.py checks the values
    against a pure-Python reference)."""
    h = h ^ ((h >> 16) & 0xFFFF)  # (a new tensor: the rest works in place)
    h *= _C1
    h ^= (h >> 13) & 0x7FFFF
    h *= _C2
    h ^= (h >> 16) & 0xFFFF
    return h


def uniform(index: torch.Tensor, seed: int, name: str) -> torch.Tensor:
    """fp32 values in (0, 1), one per element index (int32, or int64 for tensors of 2^31 elements or more),
    23 random bits each."""
    k0, k1, k2 = (_signed32(k) for k in _keys(seed, name))
    if index.dtype == torch.int64:
        lo = index & _M32
        lo = (lo - ((lo >> 31) << 32)).to(torch.int32)  # the low word, as a signed 32-bit value
        h = _fmix32(lo ^ k0)
        h = _fmix32(h ^ _signed32_tensor(index >> 32) ^ k1)
    else:
        h = _fmix32(_fmix32(index ^ k0) ^ k1)  # (the high word is zero)
    h = _fmix32(h ^ k2)
    return (((h >> 9) & 0x7FFFFF).to(torch.float32) + 0.5) * (2.0**-23)  # exact in fp32, never 0 or 1


def _signed32_tensor(x: torch.Tensor) -> torch.Tensor:
    x = x & _M32
    return (x - ((x >> 31) << 32)).to(torch.int32)


def reference_uniform(i: int, seed: int, name: str) -> float:
    """The same function in pure Python integers (the definition the tensor code is checked against)."""

    def fmix(h):
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & _M32
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & _M32
        return h ^ (h >> 16)

    k0, k1, k2 = _keys(seed, name)
    h = fmix(fmix(fmix((i & _M32) ^ k0) ^ (i >> 32) ^ k1) ^ k2)
    return ((h >> 9) + 0.5) * 2.0**-23


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def normal(
    index: torch.Tensor,
    seed: int,
    name: str,
    mean: float = 0.0,
    std: float = 1.0,
    *,
    lo: float = -math.inf,
    hi: float = math.inf,
) -> torch.Tensor:
    """N(mean, std^2) at these indices, truncated to [lo, hi] (absolute bounds, as nn.init.trunc_normal_)."""
    u = uniform(index, seed, name)
    a, b = _phi((lo - mean) / std), _phi((hi - mean) / std)
    if (a, b) != (0.0, 1.0):
        u = a + (b - a) * u
    x = torch.erfinv(u * 2.0 - 1.0) * (std * math.sqrt(2.0)) + mean
    return x.clamp_(lo, hi) if math.isfinite(lo) or math.isfinite(hi) else x


def index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def _dim_coordinates(param) -> list[torch.Tensor]:
    """For each dimension of the full tensor, the coordinates this rank's local tensor covers along it (int32
    or int64, on the parameter's device). A DTensor's are found by laying one 1-D index vector per dimension out
    with the parameter's own placements on its mesh (no communication: `src_data_rank=None`), so every placement DTensor
    has, strided shards included, is handled by DTensor itself."""
    shape = tuple(param.shape)
    mesh = getattr(param, "device_mesh", None)
    device = param.to_local().device if mesh is not None else param.device
    dtype = index_dtype(math.prod(shape))
    coords = [torch.arange(n, dtype=dtype, device=device) for n in shape]
    if mesh is None:
        return coords
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard  # FSDP's shard of a TP-sharded dim

    def along(pl, d):  # the mesh dim's placement of the 1-D coordinate vector of tensor dim d
        if isinstance(pl, _StridedShard) and pl.dim == d:
            return _StridedShard(0, split_factor=pl.split_factor)
        return Shard(0) if pl.is_shard() and pl.dim == d else Replicate()

    return [
        distribute_tensor(c, mesh, [along(pl, d) for pl in param.placements], src_data_rank=None).to_local()
        for d, c in enumerate(coords)
    ]


def local_indices(param) -> Iterator[tuple[slice, torch.Tensor]]:
    """(rows of the local tensor, the flat indices into the full tensor of those rows' elements), in chunks."""
    coords = _dim_coordinates(param)
    strides = [math.prod(param.shape[d + 1 :]) for d in range(len(coords))]
    if not coords:  # a 0-d tensor
        yield slice(None), torch.zeros((), dtype=torch.int32, device=param.device)
        return
    rest = None  # the flat offset contributed by every dimension after the first
    for c, s in zip(coords[1:], strides[1:]):
        term = c * s
        rest = term if rest is None else (rest.unsqueeze(-1) + term)
    row_size = 1 if rest is None else rest.numel()
    step = max(1, _CHUNK // max(row_size, 1))
    for r0 in range(0, coords[0].numel(), step):
        rows = coords[0][r0 : r0 + step] * strides[0]
        idx = rows if rest is None else rows.view(-1, *([1] * rest.dim())) + rest
        yield slice(r0, r0 + step), idx


@torch.no_grad()
def fill_normal(
    param, seed: int, name: str, mean: float = 0.0, std: float = 1.0, *, lo: float = -math.inf, hi: float = math.inf
) -> None:
    """Fill the part of `param` this rank holds (a tensor or a DTensor) from its full-tensor indices."""
    local = param.to_local() if hasattr(param, "to_local") else param
    for rows, idx in local_indices(param):
        local[rows].copy_(normal(idx, seed, name, mean, std, lo=lo, hi=hi))


@torch.no_grad()
def normal_block(
    seed: int, name: str, shape: tuple[int, int], offset: tuple[int, int], local: tuple[int, int], device, **spec
) -> torch.Tensor:
    """The block [offset, offset + local) of the 2-D parameter `name` of `shape`, as `fill_normal` draws it (the
    same values however the parameter is split), drawn for the block's elements only, fp32."""
    out = torch.empty(local, dtype=torch.float32, device=device)
    dtype = index_dtype(shape[0] * shape[1])
    cols = torch.arange(offset[1], offset[1] + local[1], dtype=dtype, device=device)
    step = max(1, _CHUNK // max(local[1], 1))
    for r0 in range(0, local[0], step):
        rows = torch.arange(offset[0] + r0, offset[0] + min(local[0], r0 + step), dtype=dtype, device=device)
        out[r0 : r0 + step].copy_(normal(rows.unsqueeze(1) * shape[1] + cols, seed, name, **spec))
    return out


@torch.no_grad()
def fill_flat_partition(
    flat: torch.Tensor,
    start: int,
    numel: int,
    seed: int,
    name: str,
    mean: float = 0.0,
    std: float = 1.0,
    *,
    lo: float = -math.inf,
    hi: float = math.inf,
) -> None:
    """Fill a flat partition holding elements [start, start + len(flat)) of a parameter of `numel` elements
    (DeepSpeed ZeRO-3's `ds_tensor`); the padding past the end is zeroed."""
    n = max(0, min(flat.numel(), numel - start))
    for r0 in range(0, n, _CHUNK):
        r1 = min(n, r0 + _CHUNK)
        idx = torch.arange(start + r0, start + r1, dtype=index_dtype(numel), device=flat.device)
        flat[r0:r1].copy_(normal(idx, seed, name, mean, std, lo=lo, hi=hi))
    flat[n:].zero_()
