"""Activation offloading (`parallel.activation_offload`): what a transformer block saves for its backward goes to
host memory during the forward and comes back for the backward, one block ahead.

Each block's forward runs under torch's saved-tensor hooks (`torch.autograd.graph.saved_tensors_hooks`), entered
by the model around the block call (`Transformer.block_context`), outside FSDP's hooks and outside a compiled
block. The pack hook copies a saved tensor to the host and hands autograd a small holder instead, so the device
copy is freed as soon as the forward no longer uses it; the unpack hook returns it to the device. When the
backward first needs a tensor of block i, every offloaded tensor of block i comes back, and those of block i - 1
start to (the prefetch): at most two blocks' offloaded tensors are on the device at once.

What stays on the device: tensors smaller than `min_bytes` (1/rms, the attention log-sum-exp: a copy would cost
more than it frees), parameters and views of them (FSDP's gathered blocks are freed by FSDP itself), and autocast's
16-bit copies of the weights (autocast's cache keeps them alive, so a host copy would free nothing). With full AC a
block saves only its input (torch's non-reentrant checkpoint saves it through the same hooks), so that input is
what moves. With selective AC the outputs the policy keeps live in the checkpoint's own cache, which saved-tensor
hooks do not see: only the block input moves, the kept matmul outputs stay.

On CUDA: pinned host buffers (torch's caching host allocator), one side stream for every copy in both directions
(the compute stream waits on an event only when it needs the tensor), `record_stream` so the allocator reuses no
memory a copy still reads. On a CPU device the copies are real copies, made outside the step's memory tracker
(`_disable_current_modes`) so the tracker counts the device side only; `host_peak` is the offloaded bytes'
own peak, reported beside it (parallel/memory.py).
"""

from __future__ import annotations

import contextlib
import weakref
from functools import partial

import torch
from torch import nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import _disable_current_modes

DEFAULT_MIN_BYTES = 1 << 20


class _Group:
    """The offloaded storages of one block in one forward pass; `prev` is the block before it in the same pass."""

    __slots__ = ("index", "prev", "stored", "by_address", "fetched", "ready")

    def __init__(self, index: int, prev: _Group | None):
        self.index, self.prev = index, prev
        self.stored: list[weakref.ref] = []  # every _Stored of the block that autograd may still need
        # device storage address -> (a weak reference to that storage, to its _Stored): one copy per live storage
        # (an address whose storage was freed and reused within the block is a new storage)
        self.by_address: dict[int, tuple] = {}
        self.fetched = False
        self.ready = None  # CUDA: the event after which this group's device copies are complete


class _Stored:
    """One device storage's host copy, and once fetched its new device copy (kept while any view of it is)."""

    __slots__ = ("owner", "host", "back", "nbytes", "__weakref__")

    def __init__(self, owner: ActivationOffload, host: torch.Tensor, nbytes: int):
        self.owner, self.host, self.nbytes = owner, host, nbytes
        self.back: torch.Tensor | None = None

    def drop_host(self) -> None:
        if self.host is not None:
            self.host = None
            self.owner.host_bytes -= self.nbytes

    def __del__(self):
        self.drop_host()


class _Saved:
    """What autograd keeps in place of an offloaded tensor: which storage, and the view of it."""

    __slots__ = ("stored", "group", "dtype", "size", "stride", "offset", "dtensor")

    def __init__(self, stored: _Stored, group: _Group, t: torch.Tensor, dtensor):
        self.stored, self.group, self.dtensor = stored, group, dtensor
        self.dtype, self.size, self.stride, self.offset = t.dtype, t.size(), t.stride(), t.storage_offset()


def _is_weight(t: torch.Tensor) -> bool:
    """A parameter, a view of one, or autocast's cached cast of one (its grad_fn leads straight to the leaf)."""
    base = t._base if t._base is not None else t
    if isinstance(base, nn.Parameter):
        return True
    fn = base.grad_fn
    return (
        fn is not None
        and type(fn).__name__ == "ToCopyBackward0"
        and any(type(n).__name__ == "AccumulateGrad" for n, _ in fn.next_functions if n is not None)
    )


class CudaStreams:
    """The CUDA side of the copies: one side stream for both directions, events, `record_stream`, pinned host
    buffers. ActivationOffload calls only these methods, so that a CPU test can run the same code with a backend
    that records the order of the calls (tests/unit/test_activation_offload.py rehearses it)."""

    pinned = True

    def __init__(self, device: torch.device):
        self.device = device
        self.side = torch.cuda.Stream(device)

    def current(self):
        return torch.cuda.current_stream(self.device)

    def on_side(self) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(self.side)

    def side_waits_for(self, stream) -> None:
        self.side.wait_stream(stream)

    def record_stream(self, t: torch.Tensor, stream) -> None:
        t.record_stream(stream)

    def event_on_side(self):
        event = torch.cuda.Event()
        event.record(self.side)
        return event

    def wait_event(self, stream, event) -> None:
        stream.wait_event(event)


def _bytes_of(storage, device: torch.device) -> torch.Tensor:
    """A storage as a flat uint8 tensor (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage)


class ActivationOffload:
    """One per rank. `block(index)` is the context a block's forward runs in (the model enters it)."""

    def __init__(self, device: torch.device, *, min_bytes: int = DEFAULT_MIN_BYTES, constants=(), streams=None):
        self.device = device
        # the storages of the model's buffers (the RoPE tables a checkpointed block saves as an input): held anyway
        self._constants = {b.untyped_storage().data_ptr() for b in constants if b.device.type != "meta"}
        self.min_bytes = int(min_bytes)
        # CUDA: the side stream and its events (`CudaStreams`); on the CPU none, or a test's recording backend
        self.streams = streams if streams is not None else CudaStreams(device) if device.type == "cuda" else None
        self.host_bytes = 0  # offloaded bytes now held on the host
        self.host_peak = 0
        self.storages = 0  # storages offloaded so far (for tests and the log)
        self._last: _Group | None = None

    def reset_peak(self) -> None:
        self.host_peak = self.host_bytes

    def block(self, index: int) -> contextlib.AbstractContextManager:
        if not torch.is_grad_enabled():  # evaluation: nothing is saved
            return contextlib.nullcontext()
        last = self._last
        group = _Group(index, last if last is not None and last.index == index - 1 else None)
        self._last = group
        return torch.autograd.graph.saved_tensors_hooks(partial(self._pack, group), self._unpack)

    # -- forward: to the host, one copy per storage (a norm's input is saved twice, the linears' input three times)

    def _pack(self, group: _Group, t: torch.Tensor):
        if _is_weight(t):
            return t
        dtensor, local = None, t
        if hasattr(t, "_local_tensor"):  # a DTensor (tensor parallelism): its local shard moves, rebuilt on return
            dtensor, local = (t.device_mesh, t.placements, t.shape, t.stride()), t._local_tensor
        if isinstance(local, AsyncCollectiveTensor):  # a DTensor straight out of a collective: its result
            local = local.wait()
        if type(local) is not torch.Tensor:  # another tensor subclass: left where it is
            return t
        storage = local.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self._constants or local.device.type != self.device.type:
            return t
        known = group.by_address.get(ptr)
        stored = known[1]() if known is not None and not known[0].expired() else None
        if stored is None:
            nbytes = storage.nbytes()
            if nbytes < self.min_bytes:
                return t
            with _disable_current_modes():  # the host copy is not the device's memory: the step's tracker skips it
                src = _bytes_of(storage, local.device)
                streams = self.streams
                if streams is not None:
                    streams.side_waits_for(streams.current())  # the tensor is complete
                    with streams.on_side():
                        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=streams.pinned)
                        host.copy_(src, non_blocking=True)
                    streams.record_stream(src, streams.side)  # its memory is not reused until the copy has read it
                else:
                    host = src.clone()
            stored = _Stored(self, host, nbytes)
            group.stored.append(weakref.ref(stored))
            group.by_address[ptr] = (StorageWeakRef(storage), group.stored[-1])
            self.host_bytes += nbytes
            self.host_peak = max(self.host_peak, self.host_bytes)
            self.storages += 1
        return _Saved(stored, group, local, dtensor)

    # -- backward: back to the device, the block before it prefetched

    def _fetch(self, group: _Group) -> None:
        group.fetched = True
        live = [s for s in (ref() for ref in group.stored) if s is not None and s.host is not None]
        group.stored, group.by_address = [], {}
        if not live:
            return
        streams = self.streams
        if streams is not None:
            streams.side_waits_for(streams.current())
            with streams.on_side():
                for s in live:
                    s.back = s.host.to(self.device, non_blocking=True)
            group.ready = streams.event_on_side()
        else:
            for s in live:
                s.back = s.host.clone()  # made on the device: the tracker sees it come back
        for s in live:  # (a pinned buffer is reused only after the copy that reads it: torch's host allocator)
            s.drop_host()

    def _unpack(self, x):
        if isinstance(x, torch.Tensor):
            return x
        group, stored = x.group, x.stored
        if not group.fetched:
            self._fetch(group)
        if group.prev is not None and not group.prev.fetched:
            self._fetch(group.prev)  # backward reaches the block before next: its copies overlap this block's work
        back = stored.back
        if self.streams is not None and group.ready is not None:
            current = self.streams.current()
            self.streams.wait_event(current, group.ready)
            self.streams.record_stream(back, current)
        out = torch.empty(0, dtype=x.dtype, device=back.device).set_(back.untyped_storage(), x.offset, x.size, x.stride)
        if x.dtensor is not None:
            from torch.distributed.tensor import DTensor

            mesh, placements, shape, stride = x.dtensor
            out = DTensor.from_local(out, mesh, placements, run_check=False, shape=shape, stride=stride)
        return out


def attach(parts, device: torch.device, *, min_bytes: int, streams=None) -> ActivationOffload:
    """Offload the blocks' saved tensors of every model part (each part's forward enters `block`)."""
    constants = [b for part in parts for b in part.buffers()]
    off = ActivationOffload(device, min_bytes=min_bytes, constants=constants, streams=streams)
    for part in parts:
        part.block_context = off.block
    return off
