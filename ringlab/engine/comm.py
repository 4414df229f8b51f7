"""The ring's communication helper: post sends and receives now, wait for them later.

The per-rank algorithms (ring, ring-dilated; forward and backward) are generators written
against this small interface, and wait with ``yield from pending.wait()``. A real rank
(:func:`run_rank`, :class:`P2PComm`) never yields: its wait blocks on torch.distributed. A
simulated rank (:class:`SimComm`) yields while the message it waits for has not been sent
yet, and :func:`run_lockstep` then runs the other ranks; so one process runs exactly the
code that P ranks would run, in ring order.

Rules the algorithms follow, as real P2P requires: a tensor handed to ``exchange`` as a send is
never modified afterwards, and a receive buffer is read only after its wait. A simulated
delivery hands the receiver the sent tensor itself, so a receiver modifies what it received
(a travelling dK/dV accumulator) only once its sender reads it no more.
"""

from __future__ import annotations

import collections
import functools
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from . import trace
from .layout import get

BLOCKED = "blocked"  # what a simulated rank yields while its message has not arrived


@dataclass
class Pending:
    """Posted transfers; ``wait()`` blocks until every one of them is complete."""
    works: list = field(default_factory=list)
    deliveries: list = field(default_factory=list)  # simulated: (Mailbox, key, recv buffer)
    rank: int = 0
    step: int = 0
    posted_at: float = 0.0
    nbytes: int = 0
    label: str = ""

    def wait(self):
        """Complete the transfers (a generator: ``yield from pending.wait()``)."""
        t0 = time.perf_counter()
        for w in self.works:
            w.wait()
        for box, key, buf in self.deliveries:
            while not box.ready(key):
                yield BLOCKED
            _adopt(buf, box.take(key))
        # Done: drop the references to the sent tensors so they can be freed now.
        self.works, self.deliveries = [], []
        if trace.recording():
            trace.record(kind="wait", rank=self.rank, step=self.step, label=self.label,
                         posted=self.posted_at, t0=t0, t1=time.perf_counter(), bytes=self.nbytes)


def _adopt(buf: torch.Tensor, sent: torch.Tensor) -> None:
    """A simulated delivery: ``buf`` becomes the sent tensor itself, not a copy. The sender
    never modifies a sent tensor (the rule above) and drops it once delivered, so sharing it
    is safe; on a GPU the copy was a device-wide memcpy per ring step."""
    if sent.shape != buf.shape or sent.dtype != buf.dtype or sent.device != buf.device:
        raise RuntimeError(f"simulated ring: a message of {tuple(sent.shape)} {sent.dtype} on {sent.device} "
                           f"arrived for a receive buffer of {tuple(buf.shape)} {buf.dtype} on {buf.device}")
    buf.set_(sent)


class RingComm:
    """Rank arithmetic shared by the real and simulated communicators."""

    rank: int
    world_size: int

    @property
    def next(self) -> int:
        return (self.rank + 1) % self.world_size

    @property
    def prev(self) -> int:
        return (self.rank - 1) % self.world_size

    def exchange(self, sends, recvs, *, step: int, label: str, tag: int = 0) -> Pending:
        """Post sends [(peer, tensor)] and receives [(peer, buffer)]; peers are ring ranks."""
        nbytes = sum(t.numel() * t.element_size() for _, t in sends)
        pending = Pending(rank=self.rank, step=step, posted_at=time.perf_counter(),
                          nbytes=nbytes, label=label)
        self._post(sends, recvs, tag, pending)
        if trace.recording():
            trace.record(kind="post", rank=self.rank, step=step, label=label,
                         t=pending.posted_at, bytes=nbytes, peers=[p for p, _ in sends])
        return pending

    def receive_buffer(self, shape, like: torch.Tensor) -> torch.Tensor:
        """A tensor of ``shape``, with ``like``'s dtype and device, to receive into."""
        return like.new_empty(shape)

    def pass_on(self, tensor, *, step: int, label: str, tag: int = 0):
        """Send ``tensor`` to the next rank and receive one like it from the previous.
        Returns (receive buffer, pending)."""
        incoming = self.receive_buffer(tensor.shape, tensor)
        return incoming, self.exchange([(self.next, tensor)], [(self.prev, incoming)], step=step,
                                       label=label, tag=tag)

    def all_to_all(self, x, split: int, cat: int, *, step: int, label: str, tag: int = 0) -> "AllToAll":
        """Post an all-to-all: cut ``x`` into world_size equal parts along dim ``split`` and send
        part j to rank j; receive one part from every rank. ``AllToAll.wait()`` returns the
        received parts joined along dim ``cat`` in rank order. Nothing is sent to oneself."""
        parts = x.chunk(self.world_size, split)
        got = [parts[i] if i == self.rank else self.receive_buffer(parts[i].shape, x) for i in range(self.world_size)]
        others = [i for i in range(self.world_size) if i != self.rank]
        pending = self.exchange([(i, parts[i]) for i in others], [(i, got[i]) for i in others],
                                step=step, label=label, tag=tag)
        return AllToAll(got, pending, cat)

    def _post(self, sends, recvs, tag, pending) -> None:
        raise NotImplementedError


@dataclass
class AllToAll:
    """A posted all-to-all: ``yield from a.wait()`` returns the joined result."""
    parts: list
    pending: Pending
    cat: int

    def wait(self):
        yield from self.pending.wait()
        joined = torch.cat(self.parts, self.cat)
        self.parts = []  # the pieces (and, through our own, the sent tensor) can go now
        return joined


class P2PComm(RingComm):
    """Real ring over a torch.distributed process group (gloo on CPU, NCCL on GPU)."""

    def __init__(self, group):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def _post(self, sends, recvs, tag, pending) -> None:
        ops = [dist.P2POp(dist.isend, t.contiguous(), dist.get_global_rank(self.group, p), self.group, tag)
               for p, t in sends]
        ops += [dist.P2POp(dist.irecv, b, dist.get_global_rank(self.group, p), self.group, tag)
                for p, b in recvs]
        if ops:
            pending.works = dist.batch_isend_irecv(ops)


class Mailbox:
    """The messages in flight of one simulated ring, FIFO per (src, dst, tag)."""

    def __init__(self):
        self.queues = collections.defaultdict(collections.deque)
        self.events = 0  # posts + deliveries; the deadlock check watches it

    def put(self, key, tensor) -> None:
        self.queues[key].append(tensor)
        self.events += 1

    def ready(self, key) -> bool:
        return bool(self.queues[key])

    def take(self, key):
        self.events += 1
        return self.queues[key].popleft()


class SimComm(RingComm):
    """One simulated rank; all ranks of a simulated run share one mailbox. ``members``: the
    run-wide id of each rank of this group (default: the ranks themselves), so that several
    groups of one simulated mesh address one mailbox, like subgroups of one world."""

    def __init__(self, rank: int, world_size: int, mailbox: Mailbox, members: tuple[int, ...] | None = None):
        self.rank, self.world_size, self.mailbox = rank, world_size, mailbox
        self.members = members or tuple(range(world_size))

    def receive_buffer(self, shape, like: torch.Tensor) -> torch.Tensor:
        # A delivery adopts the sent tensor itself (_adopt), so the buffer needs no memory of its own.
        return like.new_empty(1).expand(shape)

    def _post(self, sends, recvs, tag, pending) -> None:
        me = self.members[self.rank]
        for peer, t in sends:
            self.mailbox.put((me, self.members[peer], tag), t)
        pending.deliveries = [(self.mailbox, (self.members[peer], me, tag), buf) for peer, buf in recvs]


def run_rank(gen):
    """Drive one real rank's generator to completion and return its result."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def run_lockstep(gens, mailbox: "Mailbox") -> list:
    """Drive every simulated rank's generator in turn until all are done; a rank runs until it
    waits for a message that has not been sent yet."""
    gens = list(gens)
    results: list = [None] * len(gens)
    alive = list(range(len(gens)))
    while alive:
        before = (mailbox.events, len(alive))
        for r in list(alive):
            try:
                while next(gens[r]) != BLOCKED:
                    pass
            except StopIteration as stop:
                results[r] = stop.value
                alive.remove(r)
        if (mailbox.events, len(alive)) == before:
            raise RuntimeError(f"simulated ring deadlock: ranks {alive} wait for messages nobody sent")
    return results


# Per group, the metadata all its ranks agreed on (weak keys: an entry goes with its group).
_AGREED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
MAX_AGREED = 256       # distinct calls remembered per group; beyond, every rank starts over alike
AGREE_TIMEOUT_S = 300.0  # how long a rank with new metadata waits for the others to check too


def check_group_agrees(group, device, meta: list[int], names: list[str], show: dict | None = None) -> None:
    """All ranks of ``group`` must pass the same ``meta`` ints; raise on every rank otherwise.

    ``names`` labels each int; ``show`` maps a name to a function that turns its int back into
    a readable value (a dtype name, a float). Ranks may pass lists of different lengths (a
    different number of branches): they agree on the lengths first, then compare the values
    all of them have. Two small all_gathers, before any K/V moves.

    Agreed metadata is remembered per group, so a repeated call (every layer, every step)
    communicates nothing. A rank that alone passes new metadata while the others repeat an
    agreed call waits in the check for them; after ``AGREE_TIMEOUT_S`` it raises, naming what
    it passed (the others then fail on their transfers to it).
    """
    agreed = _AGREED.setdefault(group, set())
    if tuple(meta) in agreed:
        return
    world, me = dist.get_world_size(group), dist.get_rank(group)
    counts = [torch.empty(1, dtype=torch.int64, device=device) for _ in range(world)]
    _gather(counts, torch.tensor([len(meta)], dtype=torch.int64, device=device), group, meta, names, show)
    counts = [int(c) for c in counts]
    common = min(counts)
    mine = torch.tensor(meta[:common], dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    _gather(everyone, mine, group, meta, names, show)
    for r, theirs in enumerate(everyone):
        theirs = theirs.tolist()
        bad = [n for n, a, b in zip(names, meta, theirs) if a != b]
        if not bad and counts[r] != len(meta):
            bad = [f"the number of values ({len(meta)} here, {counts[r]} on rank {r})"]
        if bad:
            raise ValueError(
                f"ranks of the group disagree on {', '.join(bad)}: rank {me} has "
                f"{_readable(meta, names, show)}, rank {r} has {_readable(theirs, names, show)}"
                + (" (and more)" if counts[r] > common else "")
                + ". Every rank must pass shards of the same shape, dtype and options")
    if len(agreed) >= MAX_AGREED:
        agreed.clear()
    agreed.add(tuple(meta))


def _readable(values, names, show) -> dict:
    return {n: (show or {}).get(n, int)(x) for n, x in zip(names, values)}


def _gather(outputs, tensor, group, meta, names, show) -> None:
    """all_gather, but a rank whose peers never join (they repeat an agreed call) raises."""
    work = dist.all_gather(outputs, tensor, group=group, async_op=True)
    deadline = time.monotonic() + AGREE_TIMEOUT_S
    while not work.is_completed():
        if time.monotonic() > deadline:
            raise ValueError(
                f"rank {dist.get_rank(group)} passes {_readable(meta, names, show)}, which the ranks of its "
                f"group have not agreed on, and they did not join the check within {AGREE_TIMEOUT_S:g} s: "
                "they are probably repeating an earlier call with other shapes or options. Every rank must "
                "pass shards of the same shape, dtype and options")
        time.sleep(0.0005)
    work.wait()


# A simulated ring whose algorithm has a form for all ranks at once (``RingAlgorithm.together``)
# runs that form, unless a trace is being recorded: a trace shows each rank's transfers, which
# only the per-rank generators make. False: always the generators (an A/B in benchmarks).
SIMULATE_TOGETHER = True


@dataclass(frozen=True, eq=False)
class RingAlgorithm:
    """An algorithm given as per-rank generators, run on a real ring or a simulated one.

    ``forward_rank(comm, q, k, v, heads=)`` returns (out, lse); ``backward_rank(comm, dout, q,
    k, v, out, lse, dlse, heads=)`` returns (dq, dk, dv); ``heads`` is the slice of the call's
    heads that q, k, v hold. Real (``group`` given): tensors are this rank's
    shards. Simulated (``ring_size``): tensors are whole sequences, sharded by ``layout`` for
    each simulated rank, and the ranks' results are unsharded (``documents``: the packed
    documents, for a layout that splits each one). ``together``: optional (forward, backward)
    that take and return every rank's shards at once, stacked in dim 0 (rank r: rows r*B to
    (r+1)*B), and give what the generators give; a simulated ring runs them when it may
    (:data:`SIMULATE_TOGETHER`).
    """
    forward_rank: Callable
    backward_rank: Callable
    group: object
    ring_size: int | None
    layout: str
    documents: tuple[int, ...] = ()
    together: tuple[Callable, Callable] | None = None

    def forward(self, q, k, v, heads, into):
        args = (q, k, v), (1, 1, 1), (1, 2)
        if self._runs_together():
            return self._run_together(self.together[0], heads, *args)
        return self._run(functools.partial(self.forward_rank, heads=heads), *args)

    def backward(self, dout, q, k, v, out, lse, dlse, heads, into):
        args = (dout, q, k, v, out, lse, dlse), (1, 1, 1, 1, 1, 2, 2), (1, 1, 1)
        if self._runs_together():
            return self._run_together(self.together[1], heads, *args)
        return self._run(functools.partial(self.backward_rank, heads=heads), *args)

    def _runs_together(self) -> bool:
        return self.together is not None and self.group is None and SIMULATE_TOGETHER and not trace.recording()

    def _run_together(self, fn, heads, tensors, dims, out_dims):
        p, layout, docs = self.ring_size, get(self.layout), self.documents or None
        stacked = [None if t is None else _stacked_shards(layout, t, p, d, docs) for t, d in zip(tensors, dims)]
        return tuple(layout.unshard(list(x.chunk(p, 0)), d, docs) for x, d in zip(fn(*stacked, heads=heads), out_dims))

    def _run(self, rank_fn, tensors, dims, out_dims):
        if self.group is not None:
            return run_rank(rank_fn(P2PComm(self.group), *tensors))
        p, layout, docs = self.ring_size, get(self.layout), self.documents or None
        local = [[None if t is None else layout.shard(t, r, p, d, docs) for t, d in zip(tensors, dims)]
                 for r in range(p)]
        box = Mailbox()
        results = run_lockstep([rank_fn(SimComm(r, p, box), *local[r]) for r in range(p)], box)
        return tuple(layout.unshard([res[i] for res in results], d, docs) for i, d in enumerate(out_dims))


def _stacked_shards(layout, x, p: int, dim: int, documents) -> torch.Tensor:
    """Every rank's shard of x along ``dim``, stacked in dim 0 (rank r: rows r*B to (r+1)*B).
    A view of x where every rank holds one strided run and one stride steps forward from rank
    to rank (contiguous and striped shards of a batch of one). Otherwise one gather of the
    rows (zigzag, packed documents, a larger batch), not a copy per rank joined into a second
    one (except for a lse-like x of a larger batch, whose positions come after its heads)."""
    n, b, s = x.shape[dim], x.shape[0], x.stride()
    runs = [layout.runs(n, r, p, documents) for r in range(p)]
    if all(len(held) == 1 for held in runs):
        first = [held[0] for held in runs]
        step = first[1].pos - first[0].pos if p > 1 else 0
        if (step >= 0 and all(r.stride == first[0].stride and r.pos == first[0].pos + i * step
                              for i, r in enumerate(first))
                and (b == 1 or step * s[dim] == b * s[0])):  # as_strided takes no negative stride
            shape, strides = list(x.shape), list(s)
            shape[0], shape[dim] = p * b, n // p
            strides[0], strides[dim] = step * s[dim] if b == 1 else s[0], first[0].stride * s[dim]
            return x.as_strided(shape, strides, x.storage_offset() + first[0].pos * s[dim])
    if b == 1:  # positions in rank order, then the ranks moved to the front: a view of the gather
        picked = x.index_select(dim, _gathered_rows(layout, n, p, 1, documents, x.device))
        return picked.unflatten(dim, (p, n // p)).movedim(dim, 0).flatten(0, 1)
    if dim == 1 and s[0] == n * s[1]:  # batch and positions merge into one row index
        rows = x.flatten(0, 1).index_select(0, _gathered_rows(layout, n, p, b, documents, x.device))
        return rows.unflatten(0, (p * b, n // p))
    return torch.cat([layout.shard(x, r, p, dim, documents) for r in range(p)], 0)


@functools.lru_cache(maxsize=8)  # few: at a million tokens one index is 8 MB of device memory
def _gathered_rows(layout, n: int, p: int, b: int, documents, device) -> torch.Tensor:
    """Indices into x's (batch x positions) rows, in the stacked order: rank, then batch, then
    the rank's local order."""
    held = torch.stack([layout.positions(n, r, p, documents) for r in range(p)])  # (P, N / P)
    return (held[:, None, :] + n * torch.arange(b)[None, :, None]).flatten().to(device)
