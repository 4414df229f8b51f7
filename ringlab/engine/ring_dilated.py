"""Ring-dilated attention: LongNet dilation with the sequence sharded over a ring (docs/design.md §6).

For each branch (segment w, rate r):
  * a segment that lies inside one rank's shard is computed locally, with no communication;
  * a segment held by several ranks forms a *sub-ring* of those ranks. Each member packs only
    its selected rows of that segment (per head offset: about 1/r of its K/V) into one
    message, and the messages rotate around the sub-ring, g - 1 hops for g members. A segment
    spanning the whole sequence is the full ring.
Every block's (out, lse) merges into the one accumulator through the LSE, across steps and
branches. The backward rotates the messages again with their dK/dV accumulators riding along,
recomputing each block from the global lse, and a last hop brings each accumulator home.

The per-rank plan is pure geometry (ringlab.engine.dilation, ringlab.engine.layout): every rank computes the
same plan for every other rank, so message sizes need no handshake.

A simulated ring (one device) runs all ranks at once instead (:func:`forward_together`): the
same blocks, reading each message's rows where their sender holds them.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
from dataclasses import dataclass

import torch

from . import trace
from .config import RingConfig, ring_config, run_ring
from .dilated import attend, attend_backward, blocks_backward, blocks_forward, lse_view, rows_view
from .dilation import (Block, Rows, document_blocks, document_pieces, fusable, head_count, head_groups, head_shift,
                       relocated, runs, shifted)
from .kernels import accum_dtype
from .layout import get
from .merge import new_accumulators
from .ring import of_ranks


@dataclass(frozen=True)
class Part:
    """One slice of a message: a sender's rows ``rows`` of segment s for head group ``group``
    (query heads ``heads`` reading K/V heads ``kv_heads``, see ringlab.engine.dilation.head_groups),
    at message slots [start, start + size) where a slot is one (row, K/V head). ``groups`` > 1
    fuses consecutive head groups, each a shift of the first (see ringlab.engine.dilation.Block),
    stored one after the other. A rank's own parts also say which of its query rows meet them."""
    group: int
    heads: slice
    kv_heads: slice
    rows: Rows
    start: int
    size: int
    groups: int = 1
    head_step: int = 0
    kv_step: int = 0

    def view_args(self):
        """rows_view arguments of the query side (q, out, lse)."""
        return self.heads, self.groups, self.head_step

    def kv_view_args(self):
        """rows_view arguments of the K/V side."""
        return self.kv_heads, self.groups, self.kv_step

    def slice(self, lo: int, hi: int) -> "Part":
        """The fused groups lo .. hi - 1 of this part."""
        d = lo - self.group
        return dataclasses.replace(self, group=lo, heads=_shift(self.heads, d * self.head_step),
                                   kv_heads=_shift(self.kv_heads, d * self.kv_step), rows=shifted(self.rows, d),
                                   start=self.start + d * self.size, groups=hi - lo)


def _shift(heads: slice, by: int) -> slice:
    return slice(heads.start + by, heads.stop + by, heads.step)


def _message_layout(pieces, w: int, r: int, seg: int, groups) -> tuple[tuple[Part, ...], int]:
    """The parts of one member's message for segment ``seg``, and its slots. Parts that are
    shifts of one run over consecutive head groups are laid out together and fused."""
    found = [(g, o, heads, kv, rows) for g, (o, heads, kv) in enumerate(groups) for rows in runs(pieces, w, r, o)
             if rows.seg == seg and rows.nseg == 1]
    found.sort(key=lambda t: (t[4].start - t[1], t[0]))  # runs of one shift family, in group order
    parts: list[Part] = []
    slot = 0
    for g, _, heads, kv, rows in found:
        size = rows.count * head_count(kv)
        last = parts[-1] if parts else None
        step = kv_step = None
        if last is not None and last.group + last.groups == g and last.size == size:
            step = fusable(last.rows, last.heads, last.groups, last.head_step, rows, heads)
            kv_step = head_shift(last.kv_heads, last.groups, last.kv_step, kv)
        if step is None or kv_step is None:
            parts.append(Part(g, heads, kv, rows, slot, size))
        else:
            parts[-1] = dataclasses.replace(last, groups=last.groups + 1, head_step=step, kv_step=kv_step)
        slot += size
    return tuple(parts), slot


@dataclass(frozen=True)
class SubRing:
    """The ranks holding one segment of one branch (of one packed document), and what each
    of them sends."""
    branch: int
    segment: int
    members: tuple[int, ...]
    parts: tuple[tuple[Part, ...], ...]  # per member: its message layout
    sizes: tuple[int, ...]                # per member: message slots
    document: int = 0

    def hops(self) -> int:
        return len(self.members) - 1


@dataclass(frozen=True)
class RankPlan:
    local: tuple[tuple[Block, ...], ...]       # per branch: blocks among this rank's own rows
    subrings: tuple[tuple[SubRing, ...], ...]  # per branch: the sub-rings this rank belongs to
    steps: tuple[int, ...]                     # per branch: the most hops of any sub-ring


def _moved(part: Part, local0: int, start: int) -> Part:
    """A part of a document's message, its rows moved to the sender's local rows and positions."""
    return dataclasses.replace(part, rows=relocated(part.rows, local0, start)) if local0 or start else part


@dataclass(frozen=True)
class Holders:
    """Who holds what, the same for every rank. ``inside[d]``: {rank: (its pieces inside
    document d, counted from the document's start; its first local row)}. ``of_rank[b]``:
    {rank: the segments of branch b it shares with other ranks, as (document, segment,
    members)}; ``steps[b]``: the most hops of any sub-ring of branch b."""
    docs: tuple[int, ...]
    inside: tuple[dict, ...]
    of_rank: tuple[dict[int, list[tuple[int, int, tuple[int, ...]]]], ...]
    steps: tuple[int, ...]


@functools.lru_cache(maxsize=16)
def holders(seq_len: int, world_size: int, layout: str, documents: tuple[int, ...],
            segments: tuple[int, ...]) -> Holders:
    """The segments of each branch held by several ranks (see :class:`Holders`). Packed
    documents are separate sequences: segments are per document, in document order."""
    docs = documents or (0, seq_len)
    inside: list[dict[int, tuple]] = [{} for _ in docs[1:]]
    for x in range(world_size):
        for start, rel, local0 in document_pieces(get(layout).pieces(seq_len, x, world_size, documents or None), docs):
            inside[bisect.bisect_left(docs, start)][x] = (rel, local0)
    spans = [sorted((a, e, x) for x, (rel, _) in held.items() for a, e in rel) for held in inside]  # tile each document
    of_rank, steps = [], []
    for w in segments:
        mine, most = collections.defaultdict(list), 0
        for d, held_spans in enumerate(spans):
            starts, stops = [a for a, _, _ in held_spans], [e for _, e, _ in held_spans]
            # A segment reaches several ranks only where one span ends and the next begins inside it.
            for seg in sorted({e // w for _, e, _ in held_spans[:-1] if e % w}):
                lo, hi = bisect.bisect_right(stops, seg * w), bisect.bisect_left(starts, (seg + 1) * w)
                members = tuple(sorted({x for _, _, x in held_spans[lo:hi]}))
                if len(members) > 1:
                    most = max(most, len(members) - 1)
                    for x in members:
                        mine[x].append((d, seg, members))
        of_rank.append(dict(mine))
        steps.append(most)
    return Holders(docs, tuple(inside), tuple(of_rank), tuple(steps))


@functools.lru_cache(maxsize=64)
def rank_plan(config: RingConfig, rank: int, heads: tuple[int, int] | None = None) -> RankPlan:
    """Local blocks and sub-rings of ``rank`` (see module doc), for the heads h0 <= h < h1
    of ``heads`` = (h0, h1) (default all), numbered from h0."""
    geo = holders(config.seq_len, config.world_size, config.layout, config.documents, config.segments)
    pieces = get(config.layout).pieces(config.seq_len, rank, config.world_size, config.documents or None)
    own = document_blocks(pieces, config.documents, config.heads, config.segments, config.rates,
                          config.head_offsets, config.causal, heads, config.kv_group)
    local = tuple(tuple(x for x in own if x.branch == b) for b in range(len(config.segments)))
    subrings = []
    for b, (w, r) in enumerate(zip(config.segments, config.rates)):
        groups = head_groups(config.heads, r, config.head_offsets, heads, config.kv_group)
        mine = []
        for d, seg, members in geo.of_rank[b].get(rank, ()):
            held = geo.inside[d]
            layouts = [_message_layout(held[x][0], w, r, seg, groups) for x in members]
            parts = tuple(tuple(_moved(part, held[x][1], geo.docs[d]) for part in p)
                          for x, (p, _) in zip(members, layouts))
            mine.append(SubRing(b, seg, members, parts, tuple(n for _, n in layouts), d))
        subrings.append(tuple(mine))
    return RankPlan(local, tuple(subrings), geo.steps)


def _part_view(msg: torch.Tensor, part: Part) -> torch.Tensor:
    """A part of a message (B, slots, D) as a block view (B, G, 1, count, H_g, D)."""
    b, _, d = msg.shape
    return msg[:, part.start:part.start + part.groups * part.size].view(b, part.groups, 1, part.rows.count, -1, d)


def _pack(k, v, parts, slots) -> torch.Tensor:
    """This rank's message for one sub-ring: (2, B, slots, D) holding its selected K and V rows."""
    msg = k.new_empty(2, k.shape[0], slots, k.shape[-1])
    for part in parts:
        _part_view(msg[0], part).copy_(rows_view(k, part.rows, *part.kv_view_args()))
        _part_view(msg[1], part).copy_(rows_view(v, part.rows, *part.kv_view_args()))
    return msg


def cross_blocks(mine, theirs, causal):
    """(my part, their part) pairs of one segment that interact, cut to their common offset
    groups: all of them, or under the causal mask only keys before the queries (runs of two
    ranks never interleave)."""
    for q_part in mine:
        for k_part in theirs:
            lo = max(q_part.group, k_part.group)
            hi = min(q_part.group + q_part.groups, k_part.group + k_part.groups)
            if lo < hi and not (causal and k_part.rows.pos > q_part.rows.pos):
                yield q_part.slice(lo, hi), k_part.slice(lo, hi)


def _rotate(comm, subs, idx, held, step):
    """Post, for every sub-ring still rotating, the held message to the next member and the
    receive of the next one. Returns [(sub-ring index, receive buffer, pending)]."""
    pending = []
    for j, (s, i) in enumerate(zip(subs, idx)):
        if step < s.hops():
            members = len(s.members)
            b, _, d = held[j].shape[1:]
            incoming = comm.receive_buffer((2, b, s.sizes[(i - step - 1) % members], d), held[j])
            pending.append((j, incoming, comm.exchange(
                [(s.members[(i + 1) % members], held[j])], [(s.members[(i - 1) % members], incoming)],
                step=step, label=f"kv/b{s.branch}/s{s.segment}", tag=_tag(s, False))))
    return pending


def _tag(sub: SubRing, grads: bool) -> int:
    """A message tag per (document, branch, segment); equal tags of two sub-rings between the
    same ranks stay apart because both ranks post them in the same order."""
    return 2 + 2 * ((sub.document * 64 + sub.branch) * 4096 % 2**28 + sub.segment % 4096) + int(grads)


def _event(comm, step, sub, src, q_part, k_part):
    return dict(kind="compute", rank=comm.rank, step=step, src=src, branch=sub.branch,
                segment=sub.segment, q_rows=q_part.rows.count, k_rows=k_part.rows.count, causal=False,
                groups=q_part.groups, pairs=q_part.rows.count * k_part.rows.count * head_count(q_part.heads)
                * q_part.groups)


def _cross(q_part: Part, k, v, q, out, lse, scale: float) -> None:
    """One cross block: ``q_part``'s rows of q against the K/V views k, v (B, G, 1, count, H_g, D)
    of the sender's part, merged into the accumulators out, lse."""
    at, rows = q_part.view_args(), q_part.rows
    attend(rows_view(q, rows, *at), k, v, rows_view(out, rows, *at), lse_view(lse, rows, *at),
           causal=False, scale=scale)


def _cross_backward(q_part: Part, k, v, dk, dv, dout, q, out, lse, dlse, dq, scale: float) -> None:
    """The gradients of :func:`_cross`, added to dq's rows of ``q_part`` and to the views dk, dv."""
    at, rows = q_part.view_args(), q_part.rows
    attend_backward(rows_view(dout, rows, *at), rows_view(q, rows, *at), k, v, rows_view(out, rows, *at),
                    lse_view(lse, rows, *at), None if dlse is None else lse_view(dlse, rows, *at),
                    rows_view(dq, rows, *at), dk, dv, causal=False, scale=scale)


def forward_rank(comm, q, k, v, *, config: RingConfig, heads: slice):
    """One rank's forward (a generator; see ringlab.engine.comm). Returns (out, lse) accumulators."""
    plan = rank_plan(config, comm.rank, (heads.start, heads.stop))
    causal, scale = config.causal, config.scale
    out, lse = new_accumulators(q)
    for b, subs in enumerate(plan.subrings):
        idx = [s.members.index(comm.rank) for s in subs]
        held = [_pack(k, v, s.parts[i], s.sizes[i]) for s, i in zip(subs, idx)]
        for step in range(plan.steps[b] + 1):
            pending = _rotate(comm, subs, idx, held, step)
            if step == 0:
                with trace.span(kind="compute", rank=comm.rank, step=0, src=comm.rank, branch=b,
                                local=True, pairs=sum(x.pairs(q.shape[2]) for x in plan.local[b])):
                    blocks_forward(q, k, v, plan.local[b], out, lse, scale=scale)
            else:
                for j, (s, i) in enumerate(zip(subs, idx)):
                    if step <= s.hops():
                        src_i = (i - step) % len(s.members)
                        for q_part, k_part in cross_blocks(s.parts[i], s.parts[src_i], causal):
                            with trace.span(**_event(comm, step, s, s.members[src_i], q_part, k_part)):
                                _cross(q_part, _part_view(held[j][0], k_part), _part_view(held[j][1], k_part),
                                       q, out, lse, scale)
            for j, incoming, p in pending:
                yield from p.wait()
                held[j] = incoming
    return out, lse


def backward_rank(comm, dout, q, k, v, out, lse, dlse, *, config: RingConfig, heads: slice):
    """One rank's backward (a generator). Returns (dq, dk, dv) in the accumulation dtype."""
    plan = rank_plan(config, comm.rank, (heads.start, heads.stop))
    causal, scale = config.causal, config.scale
    acc = accum_dtype(q.dtype)
    dq, dk, dv = (torch.zeros(x.shape, dtype=acc, device=x.device) for x in (q, k, v))
    for b, subs in enumerate(plan.subrings):
        idx = [s.members.index(comm.rank) for s in subs]
        held = [_pack(k, v, s.parts[i], s.sizes[i]) for s, i in zip(subs, idx)]
        grads = [None] * len(subs)       # dK/dV of the held message, travelling with it
        homecoming = [None] * len(subs)  # (buffer, pending) of our own message's dK/dV
        for step in range(plan.steps[b] + 1):
            pending = _rotate(comm, subs, idx, held, step)
            if step == 0:
                blocks_backward(dout, q, k, v, out, lse, dlse, plan.local[b], dq, dk, dv, scale=scale)
            for j, (s, i) in enumerate(zip(subs, idx)):
                if not 1 <= step <= s.hops():
                    continue
                members = len(s.members)
                src_i = (i - step) % members
                if step == 1:
                    dkv = torch.zeros(held[j].shape, dtype=acc, device=q.device)
                else:
                    buf, p = grads[j]
                    yield from p.wait()
                    dkv = buf
                for q_part, k_part in cross_blocks(s.parts[i], s.parts[src_i], causal):
                    with trace.span(**_event(comm, step, s, s.members[src_i], q_part, k_part)):
                        # the held K, V and their dK, dV; unnamed, so the old message is freed when it moves on
                        _cross_backward(q_part, *(_part_view(x, k_part) for x in (*held[j], *dkv)),
                                        dout, q, out, lse, dlse, dq, scale)
                # Pass the accumulator on; from the last holder, that is home to its owner.
                incoming = comm.receive_buffer((2, q.shape[0], s.sizes[(src_i - 1) % members], q.shape[-1]), dkv)
                p = comm.exchange([(s.members[(i + 1) % members], dkv)], [(s.members[(i - 1) % members], incoming)],
                                  step=step, label=f"dkv/b{b}/s{s.segment}", tag=_tag(s, True))
                if step == s.hops():
                    homecoming[j] = (incoming, p)
                else:
                    grads[j] = (incoming, p)
            for j, incoming, p in pending:
                yield from p.wait()
                held[j] = incoming
        for j, (s, i) in enumerate(zip(subs, idx)):
            buf, p = homecoming[j]
            yield from p.wait()
            for part in s.parts[i]:
                rows_view(dk, part.rows, *part.kv_view_args()).add_(_part_view(buf[0], part))
                rows_view(dv, part.rows, *part.kv_view_args()).add_(_part_view(buf[1], part))
    return dq, dk, dv


# ------------------------------------------------------------- all simulated ranks at once
def _read(rows: Rows) -> Rows:
    """Which local rows ``rows`` reads, whatever their global positions and segments."""
    return dataclasses.replace(rows, pos=0, seg=0)


def _reads(x: Block | Part) -> tuple:
    """What a block, or a part's side of one, reads: rows and heads (not message slots)."""
    if isinstance(x, Block):
        return _read(x.q), _read(x.k), x.heads, x.kv_heads, x.causal, x.groups, x.head_step, x.kv_step
    return _read(x.rows), x.heads, x.kv_heads, x.groups, x.head_step, x.kv_step


def _step_blocks(config: RingConfig, span: tuple[int, int], rank: int, branch: int, step: int):
    """The blocks ``rank`` computes at ``step`` of a branch, in :func:`forward_rank`'s order:
    (blocks, their senders, what they read). Step 0: the local blocks (no senders); later
    steps: (my part, their part) per cross block, each from the member that sent it."""
    plan = rank_plan(config, rank, span)
    if step == 0:
        return plan.local[branch], (), tuple(_reads(x) for x in plan.local[branch])
    work = []
    for s in plan.subrings[branch]:
        if step <= s.hops():
            i = s.members.index(rank)
            src = (i - step) % len(s.members)
            work += [(pair, s.members[src]) for pair in cross_blocks(s.parts[i], s.parts[src], config.causal)]
    blocks = tuple(pair for pair, _ in work)
    return blocks, tuple(x for _, x in work), tuple((_reads(a), _reads(b)) for a, b in blocks)


@functools.lru_cache(maxsize=1024)  # a model's layers repeat the same configuration
def _runs(config: RingConfig, span: tuple[int, int], branch: int, step: int):
    """One step of a branch for every simulated rank, in runs that compute together: (ranks,
    the first rank's senders, blocks) for consecutive ranks whose blocks read alike and whose
    senders advance with the rank."""
    runs = []  # [ranks, senders, blocks, what they read]
    for rank in range(config.world_size):
        blocks, senders, reads = _step_blocks(config, span, rank, branch, step)
        if not blocks:
            continue
        last = runs[-1] if runs else None
        if (last is not None and last[0].stop == rank and last[3] == reads
                and senders == tuple(x + rank - last[0].start for x in last[1])):
            last[0] = slice(last[0].start, rank + 1)
        else:
            runs.append([slice(rank, rank + 1), senders, blocks, reads])
    return tuple((ranks, senders, blocks) for ranks, senders, blocks, _ in runs)


def _of_senders(ranks: slice, sender: int, batch: int, *xs):
    """The rows of the ranks that sent to the run ``ranks``, the first of them ``sender``."""
    return of_ranks(slice(sender, sender + ranks.stop - ranks.start), batch, *xs)


def forward_together(q, k, v, *, config: RingConfig, heads: slice):
    """Every rank of a simulated ring at once; q, k, v (P*B, n, H, D) stack the ranks' shards
    (rank r: rows r*B to (r+1)*B). Returns (out, lse) stacked alike.

    The blocks of :func:`forward_rank`, merged in the same order per rank, but each run of
    ranks whose blocks read alike (:func:`_runs`) takes one kernel call per block, not one
    per rank. Nothing is packed or sent: a cross block reads its keys where the sender holds
    them, through the sender's part of the message."""
    b, span, scale = q.shape[0] // config.world_size, (heads.start, heads.stop), config.scale
    out, lse = new_accumulators(q)
    for branch, steps in enumerate(rank_plan(config, 0, span).steps):  # every rank has the same steps
        for step in range(steps + 1):
            for ranks, senders, blocks in _runs(config, span, branch, step):
                rq, rk, rv, rout, rlse = of_ranks(ranks, b, q, k, v, out, lse)
                if step == 0:
                    blocks_forward(rq, rk, rv, blocks, rout, rlse, scale=scale)
                    continue
                for (q_part, k_part), sender in zip(blocks, senders):
                    kv = k_part.rows, *k_part.kv_view_args()
                    sk, sv = (rows_view(x, *kv) for x in _of_senders(ranks, sender, b, k, v))
                    _cross(q_part, sk, sv, rq, rout, rlse, scale)
    return out, lse


def backward_together(dout, q, k, v, out, lse, dlse, *, config: RingConfig, heads: slice):
    """The backward of :func:`forward_together` (tensors stacked as there): the gradients of
    :func:`backward_rank`. A cross block adds its dK/dV straight into the sender's rows, where
    a rank sums them in the travelling accumulator first, so the two agree up to rounding.
    Returns (dq, dk, dv) in the accumulation dtype."""
    b, span, scale = q.shape[0] // config.world_size, (heads.start, heads.stop), config.scale
    acc = accum_dtype(q.dtype)
    dq, dk, dv = (torch.zeros(x.shape, dtype=acc, device=x.device) for x in (q, k, v))
    for branch, steps in enumerate(rank_plan(config, 0, span).steps):
        for step in range(steps + 1):
            for ranks, senders, blocks in _runs(config, span, branch, step):
                rdout, rq, rk, rv, rout, rlse, rdlse, rdq, rdk, rdv = of_ranks(
                    ranks, b, dout, q, k, v, out, lse, dlse, dq, dk, dv)
                if step == 0:
                    blocks_backward(rdout, rq, rk, rv, rout, rlse, rdlse, blocks, rdq, rdk, rdv, scale=scale)
                    continue
                for (q_part, k_part), sender in zip(blocks, senders):
                    kv = k_part.rows, *k_part.kv_view_args()
                    sk, sv, sdk, sdv = (rows_view(x, *kv) for x in _of_senders(ranks, sender, b, k, v, dk, dv))
                    _cross_backward(q_part, sk, sv, sdk, sdv, rdout, rq, rout, rlse, rdlse, rdq, scale)
    return dq, dk, dv


def ring_dilated_attention(q, k, v, segment_lengths, dilation_rates, *, group=None,
                           ring_size: int | None = None, causal: bool = False,
                           layout: str = "contiguous", scale: float | None = None,
                           head_offsets: str = "interleaved", return_lse: bool = False, cu_seqlens=None):
    """LongNet dilated attention with the sequence sharded over a ring of ranks.

    Same semantics as :func:`ringlab.dilated_attention` on the whole sequence, and the same
    calling convention as :func:`ringlab.ring_attention`: with ``group``, q, k, v
    (B, N/P, H, D) are this rank's shards and the result is this rank's shard; with
    ``ring_size=P`` one process simulates the P ranks on the whole sequence.

    Args:
        layout: one whose ranks hold whole chunks: "contiguous", "zigzag" or one you registered
            (striped would put every segment on every rank), or "doc_zigzag" with cu_seqlens.
        cu_seqlens: packed documents of the whole sequence, as in :func:`ringlab.ring_attention`;
            each document is its own LongNet sequence (see :func:`ringlab.dilated_attention`).
    """
    config = ring_config(q, k, v, group=group, ring_size=ring_size, causal=causal, layout=layout, scale=scale,
                         segment_lengths=segment_lengths, dilation_rates=dilation_rates, head_offsets=head_offsets,
                         cu_seqlens=cu_seqlens)
    out, lse = run_ring(config, q, k, v, group=group, ring_size=ring_size)
    return (out, lse) if return_lse else out
