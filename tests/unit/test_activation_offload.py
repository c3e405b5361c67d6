"""parallel.activation_offload on one process (parallel/offload.py): the loss and every gradient are bitwise those
of the run without it, with and without AC; each saved storage moves once; small ones stay; the host copies are
gone after the backward; backward fetches a block and prefetches the one before it; the CUDA path's stream calls
run in the right order (a recording backend in place of CUDA's streams). Distributed layouts are rows
of tests/distributed/test_parity.py, the memory against the planner rows of test_memory_plan.py."""

from __future__ import annotations

import contextlib

import pytest
import torch

from models.llama import ModelArgs, build_model
from parallel.activation import apply_ac
from parallel.memory_terms import block_saved_tensors
from parallel.offload import attach

ARGS = ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32, max_seq_len=64)
B, T = 2, 64


def _run(ac: str, *, offload: bool, min_bytes: int = 0, compile: bool = False, streams=None):
    model = build_model(ARGS)
    apply_ac(model, ac)
    if compile:
        from parallel.compile import apply_compile

        apply_compile(model)
    model.to_empty(device="cpu")
    model.init_weights(seed=0)
    off = attach([model], torch.device("cpu"), min_bytes=min_bytes, streams=streams) if offload else None
    fetched: list[int] = []
    if off is not None:
        fetch = off._fetch
        off._fetch = lambda group: (fetched.append(group.index), fetch(group))[1]
    g = torch.Generator().manual_seed(1)
    tokens, targets = (torch.randint(0, ARGS.vocab_size, (B, T), generator=g) for _ in range(2))
    loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
    after_forward = off.host_bytes if off is not None else 0
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return {"loss": loss.detach(), "grads": grads, "off": off, "after_forward": after_forward, "fetched": fetched}


@pytest.fixture(scope="module")
def plain():
    return {ac: _run(ac, offload=False) for ac in ("none", "selective", "full")}


@pytest.mark.parametrize("ac", ["none", "selective", "full"])
def test_loss_and_gradients_are_bitwise_those_without_offload(ac, plain):
    got, ref = _run(ac, offload=True), plain[ac]
    assert torch.equal(got["loss"], ref["loss"])
    for name, g in ref["grads"].items():
        assert torch.equal(got["grads"][name], g), name
    off = got["off"]
    assert off.storages > 0 and got["after_forward"] > 0
    assert off.host_bytes == 0, "host copies left after the backward"
    # backward fetches the last block first, and each block's predecessor while the block itself is worked on
    assert got["fetched"] == [2, 1, 0]


@pytest.mark.parametrize("ac", ["none", "full"])
def test_every_saved_storage_moves_once_as_the_planner_counts(ac):
    """The bytes on the host after the forward are the planner's per-block storages (block_saved_tensors) x blocks:
    a storage saved by several ops (a norm's input twice, the linears' shared input three times) is one copy, and
    the RoPE tables a checkpointed block saves as inputs stay where they are (the model's buffers)."""
    got = _run(ac, offload=True)
    per_token = sum(block_saved_tensors(ARGS, ac=ac, mode="fp32", tp=1))
    assert got["after_forward"] == per_token * B * T * ARGS.n_layers
    if ac == "full":
        assert got["off"].storages == ARGS.n_layers  # the block inputs, and nothing else


def test_small_storages_stay_on_the_device():
    """With the threshold above 1/rms and the log-sum-exp (B x T x 4 and B x H x T x 4 bytes), exactly those stay."""
    got = _run("none", offload=True, min_bytes=B * ARGS.n_heads * T * 4 + 1)
    saved = block_saved_tensors(ARGS, ac="none", mode="fp32", tp=1)
    big = sum(b for b in saved if b * B * T >= B * ARGS.n_heads * T * 4 + 1)
    assert got["after_forward"] == big * B * T * ARGS.n_layers
    assert big < sum(saved)


def test_nothing_moves_without_grad():
    model = build_model(ARGS)
    model.to_empty(device="cpu")
    model.init_weights(seed=0)
    off = attach([model], torch.device("cpu"), min_bytes=0)
    with torch.no_grad():
        model(torch.zeros(B, T, dtype=torch.long))
    assert off.storages == 0 and off.host_peak == 0


def test_a_retained_graph_unpacks_twice():
    model = build_model(ARGS)
    model.to_empty(device="cpu")
    model.init_weights(seed=0)
    attach([model], torch.device("cpu"), min_bytes=0)
    loss = model(torch.ones(B, T, dtype=torch.long)).float().pow(2).mean()
    loss.backward(retain_graph=True)
    first = {n: p.grad.clone() for n, p in model.named_parameters()}
    loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * first[n], rtol=1e-6, atol=0)


def test_compiled_blocks_offload_what_their_graphs_save():
    """Under parallel.compile the hooks are entered outside the compiled block, and its graph's saved tensors go
    through them: the gradients stay those of the compiled run without offloading."""
    ref, got = _run("none", offload=False, compile=True), _run("none", offload=True, compile=True)
    assert got["off"].storages > 0 and got["off"].host_bytes == 0
    for name, g in ref["grads"].items():
        assert torch.equal(got["grads"][name], g), name


class RecordingStreams:
    """parallel/offload.py's CudaStreams with the same methods, on the CPU: each call is recorded in order instead of
    queued on a CUDA stream, so the offload code's CUDA path (side stream, events, record_stream) runs here."""

    pinned = False
    side = "side"

    def __init__(self):
        self.log: list[tuple] = []
        self.events = 0

    def current(self):
        return "compute"

    @contextlib.contextmanager
    def on_side(self):
        self.log.append(("enter side",))
        yield
        self.log.append(("leave side",))

    def side_waits_for(self, stream) -> None:
        self.log.append(("side waits for", stream))

    def record_stream(self, t: torch.Tensor, stream) -> None:
        self.log.append(("record", stream))

    def event_on_side(self):
        self.events += 1
        self.log.append(("event", self.events))
        return self.events

    def wait_event(self, stream, event) -> None:
        self.log.append(("wait", stream, event))


def check_cuda_order(log: list[tuple], storages: int, blocks: int) -> None:
    """The order RecordingStreams saw, against what the CUDA path needs (the docstring below)."""
    forward, backward = log[: 4 * storages], log[4 * storages :]
    assert forward == [("side waits for", "compute"), ("enter side",), ("leave side",), ("record", "side")] * storages
    fetches = [i for i, e in enumerate(backward) if e[0] == "event"]
    assert len(fetches) == blocks
    for i in fetches:  # each fetch: wait for the compute stream, copy on the side stream, then the event
        assert backward[i - 3 : i] == [("side waits for", "compute"), ("enter side",), ("leave side",)]
    first_wait: dict[int, int] = {}
    for i, e in enumerate(backward):
        if e[0] == "wait":
            first_wait.setdefault(e[2], i)
            assert ("event", e[2]) in backward[:i], f"a wait on event {e[2]} before it was recorded"
            assert backward[i + 1] == ("record", "compute"), backward[i : i + 2]  # handed back, then recorded
    # the last block is fetched first (event 1), the one before it (event 2) before anything waits on event 1
    assert first_wait and fetches[1] < first_wait[1]


def test_the_cuda_path_orders_its_copies_and_events(plain):
    """The CUDA path's order of calls, rehearsed on the CPU with a recording stream backend: in the forward, the
    side stream waits for the compute stream before each copy to the host and the copied storage is recorded on the
    side stream; in the backward, each fetch waits for the compute stream, copies on the side stream and records an
    event, the block before it is fetched (its event recorded) before the compute stream first waits on this block's
    event, and every tensor handed back is recorded on the compute stream after that wait. The gradients stay
    bitwise those without offloading. The check fails on a log with a record_stream dropped or a wait moved ahead
    of its event."""
    streams = RecordingStreams()
    got = _run("none", offload=True, streams=streams)
    for name, g in plain["none"]["grads"].items():
        assert torch.equal(got["grads"][name], g), name
    log, storages = streams.log, got["off"].storages
    check_cuda_order(log, storages, ARGS.n_layers)
    dropped = list(log)
    dropped.remove(("record", "side"))
    with pytest.raises(AssertionError):
        check_cuda_order(dropped, storages, ARGS.n_layers)
    early = list(log)
    wait = next(i for i, e in enumerate(early) if e[0] == "wait")
    event = early.index(("event", early[wait][2]))
    early.insert(event, early.pop(wait))
    with pytest.raises(AssertionError):
        check_cuda_order(early, storages, ARGS.n_layers)
