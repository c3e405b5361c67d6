"""Context parallelism: causal attention over a sequence split across the ranks of a `cp` group, exact.

The sequence of every micro-batch is cut into 2 x cp equal chunks; rank r holds chunks r and 2 cp - 1 - r (a
head and a tail: with a causal mask the early chunks attend to few keys and the late ones to many, so each
rank gets the same work). `local_positions` gives a rank's token positions; everything but attention is
position-wise and runs on them unchanged (RoPE takes the tables at those positions).

Attention needs every earlier key. A query chunk g attends to the key chunks before it without a mask and to its
own chunk with the causal one; the partial results are merged with their log-sum-exps (out = sum_i
exp(lse_i - lse) out_i, lse = logsumexp_i lse_i), which is exact. The backward recomputes each partial's gradient
from the merged output and log-sum-exp (the softmax over all keys factors over key blocks), so nothing but the
local q, k, v, the output and the log-sum-exp is saved. The kernels are SDPA's own that return the log-sum-exp
(`aten._scaled_dot_product_flash_attention_for_cpu` and its backward on CPU; on CUDA flash attention's pair).
Two ways to see the keys (`parallel.cp_rotate`):
- `allgather`: all-gather K and V of the group (with GQA, kv heads are few: the Llama 3 paper's choice), compute,
  and in backward reduce-scatter their gradients back to the owners. Memory: the whole sequence's K and V.
- `ring`: K and V pass around the ring, one rank's chunks at a time (cp - 1 sends each way), the next block's
  transfer started before the current block's compute; in backward the blocks go round again, each carrying
  the gradient of its K and V, which is home after the last step. Memory: two ranks' K and V at a time.
torch's `context_parallel` (DTensor-based) fails on CPU, where aten's CPU flash kernel has no sharding rule; this
module is what runs, on CPU and CUDA alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class CPGroup:
    group: object  # the cp process group
    rank: int
    size: int
    rotate: str = "allgather"

    def attend(self, q, k, v) -> torch.Tensor:
        """Causal attention of this rank's two chunks against the whole sequence (`context_parallel_attention`).
        The model calls this on the group parallelize() gave its attention (models/llama.py `Attention.cp`), so
        the model's code never imports the parallel layer."""
        return context_parallel_attention(q, k, v, self)


def local_positions(seq_len: int, rank: int, size: int, device=None) -> torch.Tensor:
    """The token positions rank `rank` of `size` holds: chunks rank and 2 size - 1 - rank of 2 size."""
    c = seq_len // (2 * size)
    head = torch.arange(rank * c, (rank + 1) * c, device=device)
    tail = torch.arange((2 * size - 1 - rank) * c, (2 * size - rank) * c, device=device)
    return torch.cat([head, tail])


def _chunks_of(rank: int, size: int) -> tuple[int, int]:
    return rank, 2 * size - 1 - rank


# -- the kernels: (out, lse) of one query block against one key block, and its backward from the merged result


def _expand(kv: torch.Tensor, heads: int) -> torch.Tensor:
    return kv if kv.shape[1] == heads else kv.repeat_interleave(heads // kv.shape[1], dim=1)


def _fold(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """The gradient of expanded kv heads summed back over the query heads that shared each."""
    b, h, t, d = grad.shape
    return grad if h == kv_heads else grad.view(b, kv_heads, h // kv_heads, t, d).sum(2)


def _forward(q, k, v, causal: bool):
    k, v = _expand(k, q.shape[1]), _expand(v, q.shape[1])
    if q.is_cuda:  # (not yet run on a GPU) memory-efficient attention: any head size, log-sum-exp returned
        out = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal)
        return out[0], out[1][..., : q.shape[2]]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)
    return out, lse


def _backward(dout, q, k, v, out, lse, causal: bool):
    kv_heads = k.shape[1]
    ke, ve = _expand(k, q.shape[1]), _expand(v, q.shape[1])
    if q.is_cuda:  # (not yet run on a GPU) the kernel's log-sum-exp rows are padded to a multiple of 32
        pad = -lse.shape[-1] % 32
        zero = torch.zeros((), dtype=torch.int64, device=q.device)
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            dout,
            q,
            ke,
            ve,
            None,
            out,
            torch.nn.functional.pad(lse, (0, pad)).contiguous(),
            zero,
            zero,
            0.0,
            [True, True, True, False],
            causal,
        )
    else:
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, ke, ve, out, lse, 0.0, causal
        )
    return dq, _fold(dk, kv_heads), _fold(dv, kv_heads)


def _merge(acc, part):
    """Merge (out, lse) partial attentions over disjoint key sets: exact, in fp32."""
    if acc is None:
        return part[0].float(), part[1].float()
    out, lse = acc
    o2, l2 = part
    new = torch.logaddexp(lse, l2.float())
    out = out * torch.exp(lse - new).unsqueeze(-1) + o2.float() * torch.exp(l2.float() - new).unsqueeze(-1)
    return out, new


def _visible(query_chunk: int, key_chunk: int) -> str | None:
    """How a query chunk sees a key chunk under the causal mask: "full", "causal" (its own chunk) or None."""
    return "full" if key_chunk < query_chunk else "causal" if key_chunk == query_chunk else None


class _Attention(torch.autograd.Function):
    """q (B, H, 2C, d), k and v (B, Hkv, 2C, d): this rank's two chunks -> the attention output for them."""

    @staticmethod
    def forward(ctx, q, k, v, cp: CPGroup):
        C = q.shape[2] // 2
        mine = _chunks_of(cp.rank, cp.size)
        acc = [None, None]  # per local query chunk
        q_parts = (q[:, :, :C], q[:, :, C:])

        def attend(owner: int, kb: torch.Tensor, vb: torch.Tensor) -> None:
            for j, key_chunk in enumerate(_chunks_of(owner, cp.size)):
                ks, vs = kb[:, :, j * C : (j + 1) * C], vb[:, :, j * C : (j + 1) * C]
                for i, query_chunk in enumerate(mine):
                    how = _visible(query_chunk, key_chunk)
                    if how is not None:
                        acc[i] = _merge(acc[i], _forward(q_parts[i], ks, vs, how == "causal"))

        _rotate(cp, k, v, attend)
        out = torch.cat([acc[0][0], acc[1][0]], dim=2).to(q.dtype)
        lse = torch.cat([acc[0][1], acc[1][1]], dim=2)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cp = cp
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        cp = ctx.cp
        C = q.shape[2] // 2
        mine = _chunks_of(cp.rank, cp.size)
        dout = dout.contiguous()
        dq = torch.zeros_like(q, dtype=torch.float32)
        sl = [slice(0, C), slice(C, 2 * C)]

        def grads(owner: int, kb: torch.Tensor, vb: torch.Tensor):
            dk, dv = torch.zeros_like(kb, dtype=torch.float32), torch.zeros_like(vb, dtype=torch.float32)
            for j, key_chunk in enumerate(_chunks_of(owner, cp.size)):
                for i, query_chunk in enumerate(mine):
                    how = _visible(query_chunk, key_chunk)
                    if how is None:
                        continue
                    gq, gk, gv = _backward(
                        dout[:, :, sl[i]],
                        q[:, :, sl[i]],
                        kb[:, :, sl[j]],
                        vb[:, :, sl[j]],
                        out[:, :, sl[i]],
                        lse[:, :, sl[i]],
                        how == "causal",
                    )
                    dq[:, :, sl[i]] += gq
                    dk[:, :, sl[j]] += gk
                    dv[:, :, sl[j]] += gv
            return dk, dv

        dk, dv = _rotate_backward(cp, k, v, grads)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def _rotate(cp: CPGroup, k, v, attend) -> None:
    """Call attend(owner rank, its k, its v) for every rank of the group, this one first."""
    if cp.rotate == "allgather":
        ks, vs = _gather(cp, k), _gather(cp, v)
        for owner in range(cp.size):
            attend(owner, ks[owner], vs[owner])
        return
    kv = torch.stack([k, v]).contiguous()
    for step in range(cp.size):
        owner = (cp.rank - step) % cp.size
        pending = _ring_shift(cp, kv) if step < cp.size - 1 else None  # the next block moves under this compute
        attend(owner, kv[0], kv[1])
        if pending is not None:
            kv = pending()


def _rotate_backward(cp: CPGroup, k, v, grads):
    """The gradients of this rank's k and v, summed over every rank's queries."""
    if cp.rotate == "allgather":
        ks, vs = _gather(cp, k), _gather(cp, v)
        dks, dvs = zip(*(grads(owner, ks[owner], vs[owner]) for owner in range(cp.size)))
        dk, dv = torch.empty_like(dks[0]), torch.empty_like(dvs[0])
        dist.reduce_scatter(dk, list(dks), group=cp.group)
        dist.reduce_scatter(dv, list(dvs), group=cp.group)
        return dk, dv
    kv = torch.stack([k, v]).contiguous()
    acc = None  # the gradient of the block now held, travelling with it
    for step in range(cp.size):
        owner = (cp.rank - step) % cp.size
        pending = _ring_shift(cp, kv) if step < cp.size - 1 else None
        dk, dv = grads(owner, kv[0], kv[1])
        here = torch.stack([dk, dv])
        acc = here if acc is None else acc + here
        if pending is not None:
            kv = pending()
        # pass the accumulated gradient on with its block: after cp steps it is back with its owner
        acc = _ring_shift(cp, acc.contiguous())()
    return acc[0], acc[1]


def _gather(cp: CPGroup, t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `t`, by rank."""
    out = [torch.empty_like(t) for _ in range(cp.size)]
    dist.all_gather(out, t.contiguous(), group=cp.group)
    return out


def _ring_shift(cp: CPGroup, t: torch.Tensor):
    """Send `t` to the next rank and receive the previous rank's; returns a wait() giving the received one."""
    recv = torch.empty_like(t)
    nxt = dist.get_global_rank(cp.group, (cp.rank + 1) % cp.size)
    prv = dist.get_global_rank(cp.group, (cp.rank - 1) % cp.size)
    ops = [dist.P2POp(dist.isend, t, nxt, cp.group), dist.P2POp(dist.irecv, recv, prv, cp.group)]
    works = dist.batch_isend_irecv(ops)

    def wait() -> torch.Tensor:
        for w in works:
            w.wait()
        return recv

    return wait


def context_parallel_attention(q, k, v, cp: CPGroup) -> torch.Tensor:
    """Causal attention of this rank's two sequence chunks against the whole sequence of the cp group."""
    return _Attention.apply(q, k, v, cp)
