"""Geometry of LongNet dilation (docs/design.md §3), shared by the engine, the reference, tests and plots.

Branch i has segment length w and dilation rate r. Head h reads offset o(h) = h % r
("interleaved", the paper's s_j = j mod r) or h // ceil(H / r) ("grouped", torchscale's
assignment). Position p is selected for head h iff (p mod w) % r == o(h); a query and a key
interact in branch i iff they share a w-segment, both are selected (and k <= q when causal).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from .checks import check_cu_seqlens
from .layout import exact_dtype, get, summed_by_length

Pieces = tuple[tuple[int, int], ...]  # sorted, disjoint [start, stop) ranges of positions


def head_offset(head: int, num_heads: int, rate: int, head_offsets: str) -> int:
    """Offset o(h) of one head in a branch with dilation ``rate``."""
    if head_offsets == "interleaved":
        return head % rate
    return head // math.ceil(num_heads / rate)


def offset_groups(num_heads: int, rate: int, head_offsets: str, heads: tuple[int, int] | None = None
                  ) -> tuple[tuple[int, slice], ...]:
    """The heads sharing each offset, as (offset, slice of heads); offsets no head uses are absent.

    interleaved: offset o holds heads o, o + r, o + 2r, ...; grouped: a contiguous run of
    ceil(H / r) heads per offset. ``heads`` = (h0, h1) keeps the heads h0 <= h < h1 of the H
    (a chunk of a call) and numbers the slices from h0.
    """
    if head_offsets == "interleaved":
        groups = tuple((o, slice(o, num_heads, rate)) for o in range(min(rate, num_heads)))
    else:
        size = math.ceil(num_heads / rate)
        groups = tuple((o, slice(o * size, min((o + 1) * size, num_heads)))
                       for o in range(math.ceil(num_heads / size)))
    if heads is None:
        return groups
    h0, h1 = heads
    kept = []
    for o, s in groups:
        inside = [h for h in range(num_heads)[s] if h0 <= h < h1]
        if inside:
            kept.append((o, slice(inside[0] - h0, inside[-1] - h0 + 1, s.step)))
    return tuple(kept)



def head_groups(num_heads: int, rate: int, head_offsets: str, heads: tuple[int, int] | None = None,
                kv_group: int = 1) -> tuple[tuple[int, slice, slice], ...]:
    """(offset, query heads, K/V heads) of one branch: :func:`offset_groups`, each offset's
    query heads cut into pieces for grouped-query attention (``kv_group`` query heads per K/V
    head; 1 for multi-head attention, where both slices are the same).

    In a piece, every K/V head serves the same number m of consecutive query heads (query head
    i of the piece reads K/V head i // m), and the K/V heads are a strided run, so both are
    views. Pieces of one offset read disjoint K/V heads: a ring message never holds a K/V row
    twice. ``heads`` = (h0, h1) are whole groups; slices number from h0 and h0 // kv_group.
    """
    out = []
    for o, hs in offset_groups(num_heads, rate, head_offsets, heads):
        if kv_group == 1:
            out.append((o, hs, hs))
            continue
        runs: list[tuple[int, list[int]]] = []  # (K/V head, its query heads), in order
        for h in range(hs.start, hs.stop, hs.step or 1):
            if runs and runs[-1][0] == h // kv_group:
                runs[-1][1].append(h)
            else:
                runs.append((h // kv_group, [h]))
        pieces: list[tuple[list[int], list[int]]] = []  # (K/V heads, query heads)
        for kv, q in runs:
            if pieces and _extends(pieces[-1], kv, len(q)):
                pieces[-1][0].append(kv)
                pieces[-1][1].extend(q)
            else:
                pieces.append(([kv], list(q)))
        out += [(o, _as_slice(q), _as_slice(kv)) for kv, q in pieces]
    return tuple(out)


def _extends(piece, kv: int, count: int) -> bool:
    """Whether K/V head ``kv`` with ``count`` query heads continues ``piece`` evenly."""
    kvs, qs = piece
    return len(qs) == count * len(kvs) and (len(kvs) == 1 or kv - kvs[-1] == kvs[1] - kvs[0])


def _as_slice(xs: list[int]) -> slice:
    """An increasing arithmetic list as a slice."""
    return slice(xs[0], xs[-1] + 1, xs[1] - xs[0] if len(xs) > 1 else 1)


@dataclass(frozen=True)
class Rows:
    """The selected rows of ``nseg`` consecutive segments that hold them alike: a strided run.

    Row (i, j), for i < nseg and j < count, is local row ``start + i*seg_stride + j*stride``
    at global position ``pos + i*seg_stride + j*stride``, in segment ``seg + i``. The engine
    reads such rows as a strided view of q, k, v and the accumulators, without copying.
    """
    start: int
    pos: int
    seg: int
    nseg: int
    count: int
    stride: int
    seg_stride: int

    @property
    def num_rows(self) -> int:
        return self.nseg * self.count


def _segment_run(lo: int, hi: int, seg: int, local0: int, a: int, w: int, r: int, o: int):
    """Rows of segment ``seg`` selected by offset o, restricted to positions [lo, hi)."""
    first = seg * w + o
    if first < lo:
        first += -(-(lo - first) // r) * r
    if first >= hi:
        return None
    return Rows(start=local0 + first - a, pos=first, seg=seg, nseg=1,
                count=(hi - 1 - first) // r + 1, stride=r, seg_stride=w)


def _piece_runs(a: int, b: int, local0: int, w: int, r: int, o: int) -> list[Rows]:
    """Runs of one contiguous piece [a, b): a partial head segment, the full segments in one
    run, a partial tail segment."""
    head, tail = a // w, (b - 1) // w
    if head == tail:
        return [x for x in [_segment_run(a, b, head, local0, a, w, r, o)] if x]
    runs = []
    if a % w:
        runs.append(_segment_run(a, (head + 1) * w, head, local0, a, w, r, o))
        head += 1
    last_full = tail if b % w == 0 else tail - 1
    if head <= last_full:
        first = _segment_run(head * w, (head + 1) * w, head, local0, a, w, r, o)
        if first:
            runs.append(dataclasses.replace(first, nseg=last_full - head + 1))
    if b % w:
        runs.append(_segment_run(tail * w, b, tail, local0, a, w, r, o))
    return [x for x in runs if x]


@functools.lru_cache(maxsize=1024)
def runs(pieces: Pieces, segment: int, rate: int, offset: int) -> tuple[Rows, ...]:
    """The rows of ``pieces`` that (segment, rate, offset) selects, as strided runs in local
    order. Local rows number the pieces' positions consecutively."""
    out, local0 = [], 0
    for a, b in pieces:
        out += _piece_runs(a, b, local0, segment, rate, offset)
        local0 += b - a
    return tuple(out)


@dataclass(frozen=True)
class Block:
    """One kernel call: rows q attend rows k (the same segments) for the query heads ``heads``
    and K/V heads ``kv_heads`` of one head group of one branch (see :func:`head_groups`);
    ``causal`` applies the causal mask on local rows (q is k).

    ``groups`` > 1 fuses consecutive head groups into the same call: group g reads the rows of
    the first shifted by g positions, its query heads shifted by g * head_step and its K/V
    heads by g * kv_step.
    """
    branch: int
    heads: slice
    kv_heads: slice
    q: Rows
    k: Rows
    causal: bool
    groups: int = 1
    head_step: int = 0
    kv_step: int = 0

    def pairs(self, num_heads: int) -> int:
        """Score pairs this block computes, over its heads and groups."""
        heads = len(range(num_heads)[self.heads])
        c = self.q.count
        per_seg = c * (c + 1) // 2 if self.causal else c * self.k.count
        return self.groups * heads * self.q.nseg * per_seg


def shifted(rows: Rows, by: int) -> Rows:
    """The rows of the offset ``by`` groups further on: every position one further per group."""
    return Rows(rows.start + by, rows.pos + by, rows.seg, rows.nseg, rows.count, rows.stride, rows.seg_stride)


def head_count(h: slice) -> int:
    """How many heads a slice of heads selects."""
    return len(range(h.start, h.stop, h.step or 1))


def fusable(a_rows: Rows, a_heads: slice, a_groups: int, a_step: int, b_rows: Rows, b_heads: slice,
            copy: bool = False) -> int | None:
    """The head step if the next group (rows b, heads b) extends a fused run of ``a_groups``
    groups (rows a, heads a) as a pure shift, else None. Single-segment runs fuse: their rows
    stay a view when the groups fold into the kernel's batch. Runs of many segments fuse only
    with ``copy``: no view folds both groups and segments into one batch dimension."""
    if ((a_rows.nseg == b_rows.nseg == 1 or (copy and a_rows.nseg == b_rows.nseg))
            and a_rows.count == b_rows.count and a_rows.seg == b_rows.seg
            and b_rows.start == a_rows.start + a_groups and b_rows.pos == a_rows.pos + a_groups):
        return head_shift(a_heads, a_groups, a_step, b_heads)
    return None


def head_shift(a_heads: slice, a_groups: int, a_step: int, b_heads: slice) -> int | None:
    """The step if heads b continue a fused run of ``a_groups`` groups of heads a (each group
    ``a_step`` further on) by one more shift, else None. Steps are >= 0 (strided views)."""
    step = b_heads.start - a_heads.start if a_groups == 1 else a_step
    if (step >= 0 and a_heads.step == b_heads.step and b_heads.start == a_heads.start + a_groups * step
            and head_count(a_heads) == head_count(b_heads)):
        return step
    return None


def pair_blocks(branch: int, heads: slice, kv_heads: slice, qs, ks, causal: bool, same_rank: bool):
    """Blocks between runs ``qs`` and ``ks`` that share a segment. On one rank a run meets
    itself under the causal mask; distinct runs meet fully, unless causal hides the later one."""
    for x in qs:
        for y in ks:
            if same_rank and x is y:
                yield Block(branch, heads, kv_heads, x, x, causal)
            elif x.nseg == y.nseg == 1 and x.seg == y.seg and not (causal and y.pos > x.pos):
                yield Block(branch, heads, kv_heads, x, y, False)


def _fuse_blocks(numbered, copy: bool) -> list[Block]:
    """Fuse the blocks of consecutive offset groups that are pure shifts of each other.
    ``numbered`` yields (offset group index, block) in group order; ``copy``: see :func:`fusable`."""
    out: list[Block] = []
    where: dict = {}  # shift-normalised identity of a run pair -> index in out
    for o, blk in numbered:
        key = (blk.q is blk.k, blk.causal, blk.q.start - o, blk.k.start - o)
        i = where.get(key)
        cur = out[i] if i is not None else None
        step = None
        kv_step = None
        if cur is not None:
            step = fusable(cur.q, cur.heads, cur.groups, cur.head_step, blk.q, blk.heads, copy)
            if step is not None and fusable(cur.k, cur.heads, cur.groups, cur.head_step, blk.k, blk.heads,
                                            copy) != step:
                step = None
            kv_step = head_shift(cur.kv_heads, cur.groups, cur.kv_step, blk.kv_heads)
        if step is None or kv_step is None:
            where[key] = len(out)
            out.append(blk)
        else:
            out[i] = dataclasses.replace(cur, groups=cur.groups + 1, head_step=step, kv_step=kv_step)
    return out


# Elements of q (batch x rows x heads x head_dim) a kernel call holds at the least on a GPU,
# however the quarter split below would cut it: there every call costs host time that a short
# call cannot hide (an H200 ran 32K-token dilated attention host-bound), and a temporary of
# 2^27 bf16 elements (256 MiB) is small. "meta" (the dry run) counts as CUDA.
MIN_CALL_ELEMENTS = {"cpu": 0, "cuda": 1 << 27}
# Whether the offset groups of a branch's many-segment runs share one call on a GPU, their rows
# copied into the kernel's batch: a LongNet branch of rate r is then one call, not r, and the
# copies (3 of its rows forward, 5 backward) cost less device time than r - 1 calls cost host
# time. CPU keeps one view per group, which its memory targets need.
COPY_TO_FUSE = {"cpu": False, "cuda": True}


def _device_kind(device_type: str) -> str:
    return "cpu" if device_type == "cpu" else "cuda"


def min_call_rows(device_type: str, batch: int, heads: int, head_dim: int) -> int:
    """The fewest query rows a dilated kernel call is cut to on ``device_type`` for q of
    (batch, N, heads, head_dim): the ``min_rows`` of :func:`local_blocks`."""
    floor = MIN_CALL_ELEMENTS[_device_kind(device_type)]
    return max(1, -(-floor // max(1, batch * heads * head_dim)))


def copies_to_fuse(device_type: str) -> bool:
    """Whether dilated calls on ``device_type`` fuse groups by copying: the ``copy`` of
    :func:`local_blocks`."""
    return COPY_TO_FUSE[_device_kind(device_type)]


@functools.lru_cache(maxsize=256)
def local_blocks(pieces: Pieces, num_heads: int, segment_lengths: tuple, dilation_rates: tuple,
                 head_offsets: str, causal: bool, heads: tuple[int, int] | None = None,
                 kv_group: int = 1, min_rows: int = 1, copy: bool = False) -> tuple[Block, ...]:
    """Every block of dilated attention among the rows in ``pieces`` (one rank's own work),
    for the heads ``heads`` (see :func:`head_groups`; default all). A block of many segments
    is cut into calls of at most a quarter of the rows, but not below ``min_rows``
    (see :func:`min_call_rows`). ``copy``: groups of many-segment runs fuse too
    (see :func:`copies_to_fuse`)."""
    blocks = []
    for i, (w, r) in enumerate(zip(segment_lengths, dilation_rates)):
        blocks += _fuse_blocks(((o, blk) for o, hs, kvs in head_groups(num_heads, r, head_offsets, heads, kv_group)
                                for blk in pair_blocks(i, hs, kvs, runs(pieces, w, r, o), runs(pieces, w, r, o),
                                                       causal, same_rank=True)), copy)
    # A kernel's temporaries (its output, or dq, dk, dv in the backward) are the size of its
    # rows: a block of many segments is cut into calls of at most a quarter of the rows.
    most = max(min_rows, sum(b - a for a, b in pieces) // 4)
    return tuple(part for blk in blocks for part in _split_segments(blk, most))


def _split_segments(blk: Block, most_rows: int):
    """``blk`` as blocks of whole segments holding at most ``most_rows`` query rows (at least
    one segment each)."""
    per_call = max(1, most_rows // max(1, blk.groups * blk.q.count))
    if blk.q.nseg <= per_call:
        yield blk
        return
    for i in range(0, blk.q.nseg, per_call):
        m = min(per_call, blk.q.nseg - i)
        yield dataclasses.replace(blk, q=_segments(blk.q, i, m), k=_segments(blk.k, i, m))


def _segments(rows: Rows, first: int, count: int) -> Rows:
    """Segments first .. first + count - 1 of a run of segments."""
    step = first * rows.seg_stride
    return Rows(rows.start + step, rows.pos + step, rows.seg + first, count, rows.count, rows.stride,
                rows.seg_stride)


def document_pieces(pieces: Pieces, documents: tuple[int, ...]):
    """Packed documents (boundaries ``documents``, as cu_seqlens): for each document that
    ``pieces`` reach, yield (its start, the pieces inside it counted from that start, the local
    row of its first position held). Positions increase along the local rows, so a document's
    rows are consecutive local rows; each document is its own sequence, its segments restarting
    at its start."""
    found: dict[int, list] = {}  # document index -> [start, relative pieces, first local row]
    local0 = 0
    for a, b in pieces:
        for i in range(bisect.bisect_right(documents, a) - 1, bisect.bisect_left(documents, b)):
            s, e = documents[i], documents[i + 1]
            lo, hi = max(a, s), min(b, e)
            found.setdefault(i, [s, [], local0 + lo - a])[1].append((lo - s, hi - s))
        local0 += b - a
    for s, inside, first in found.values():
        yield s, tuple(inside), first


def relocated(rows: Rows, start: int, pos: int) -> Rows:
    """``rows`` with their local rows moved on by ``start`` and their positions by ``pos``."""
    return dataclasses.replace(rows, start=rows.start + start, pos=rows.pos + pos)


@functools.lru_cache(maxsize=256)
def document_blocks(pieces: Pieces, documents: tuple[int, ...], num_heads: int, segment_lengths: tuple,
                    dilation_rates: tuple, head_offsets: str, causal: bool, heads: tuple[int, int] | None = None,
                    kv_group: int = 1, min_rows: int = 1, copy: bool = False) -> tuple[Block, ...]:
    """:func:`local_blocks` of the rows in ``pieces`` when the packed documents ``documents``
    (cu_seqlens boundaries; () for one document) are separate sequences. A rank's rows of one
    document are consecutive local rows (positions increase), so each document's blocks are its
    own sequence's blocks moved to those rows."""
    args = (num_heads, segment_lengths, dilation_rates, head_offsets, causal, heads, kv_group, min_rows, copy)
    if not documents:
        return local_blocks(pieces, *args)
    out = []
    for s, inside, local0 in document_pieces(pieces, documents):
        out += [dataclasses.replace(blk, q=relocated(blk.q, local0, s), k=relocated(blk.k, local0, s))
                for blk in local_blocks(inside, *args)]
    return tuple(out)


def multiplicity(seq_len: int, num_heads: int, segment_lengths, dilation_rates, *,
                 head_offsets: str = "interleaved", causal: bool = False) -> torch.Tensor:
    """m_h(q, k): in how many branches query q and key k interact, as an (H, N, N) int tensor."""
    p = torch.arange(seq_len)
    m = torch.zeros(num_heads, seq_len, seq_len, dtype=torch.int32)
    for w, r in zip(segment_lengths, dilation_rates):
        seg = p // w
        pair = seg[:, None] == seg[None, :]
        if causal:
            pair &= p[None, :] <= p[:, None]
        offs = torch.tensor([head_offset(h, num_heads, r, head_offsets) for h in range(num_heads)])
        sel = ((p % w) % r)[None, :] == offs[:, None]  # (H, N)
        m += pair[None] & sel[:, :, None] & sel[:, None, :]
    return m


def score_pairs(seq_len: int, num_heads: int, segment_lengths, dilation_rates, *,
                head_offsets: str = "interleaved", causal: bool = False) -> int:
    """Query-key pairs the engine scores, summed over heads and branches (a pair counted once
    per branch it appears in). Dense attention scores H * N^2 (H * N(N+1)/2 causal)."""
    blocks = local_blocks(((0, seq_len),), num_heads, tuple(segment_lengths),
                          tuple(dilation_rates), head_offsets, causal)
    return sum(blk.pairs(num_heads) for blk in blocks)


def row_pairs(lo: np.ndarray, hi: np.ndarray, length: np.ndarray, num_heads: int, segment_lengths: tuple,
              dilation_rates: tuple, head_offsets: str = "interleaved", causal: bool = False,
              heads: tuple[int, int] | None = None) -> np.ndarray:
    """Score pairs the queries at positions lo <= p < hi of a ``length``-token sequence (one
    document) compute, summed over heads (those h0 <= h < h1 of ``heads``, default all) and
    branches: :func:`score_pairs` of ranges of rows, elementwise over the arrays, in
    O(branches x offsets) numpy steps whatever the length (the planner counts billion-token
    runs over thousands of ranks). Exact: int64 where no count can overflow it, Python ints
    otherwise."""
    widest = max(segment_lengths)
    bound = 4 * num_heads * len(segment_lengths) * widest * max(widest, int(np.max(hi - lo, initial=0)))
    lo, hi, length = (np.asarray(x, dtype=exact_dtype(bound)) for x in (lo, hi, length))
    return sum(head_count(group) * _branch_rows(lo, hi, length, w, r, o, causal)
               for w, r in zip(segment_lengths, dilation_rates)
               for o, group in offset_groups(num_heads, r, head_offsets, heads))


def _branch_rows(lo, hi, length, w: int, r: int, o: int, causal: bool):
    """Pairs of the rows [lo, hi) for the heads of offset o in one branch (w, r). Segments wholly
    inside [lo, hi) and before the document's ragged last one all count the same."""
    first, last = lo // w, (hi - 1) // w

    def segment(s):
        start = s * w
        return _segment_rows(np.maximum(lo, start) - start, np.minimum(hi, start + w) - start,
                             np.minimum(w, length - start), r, o, causal)

    whole = np.full(1, w, lo.dtype)  # an array, so that Python ints stay exact in the object case
    ends = segment(first) + np.where(last > first, segment(last), 0)
    return ends + np.maximum(0, last - first - 1) * _segment_rows(whole * 0, whole, whole, r, o, causal)


def _segment_rows(x0, x1, size, r: int, o: int, causal: bool):
    """Pairs of the rows x0 <= x < x1 of one ``size``-row segment for offset o: its selected rows
    are x = o + t r, and each sees the keys o + t' r with t' <= t (causal) or every selected key."""
    t0, t1 = np.maximum(0, -((o - x0) // r)), (x1 - 1 - o) // r
    count = np.maximum(0, t1 - t0 + 1)
    if causal:
        return (t0 + t1 + 2) * count // 2
    return count * ((size - 1 - o) // r + 1)


def dilated_work_per_rank(layout: str, world_size: int, cu_seqlens, num_heads: int, segment_lengths,
                          dilation_rates, *, head_offsets: str = "interleaved", causal: bool = False,
                          heads: tuple[int, int] | None = None) -> list[int]:
    """Score pairs each rank's queries compute in ring-dilated attention (summed over heads,
    those of ``heads`` = (h0, h1) or all, and branches) when the packed documents
    ``cu_seqlens`` are separate sequences, each with its own segments; the dilated counterpart
    of :func:`ringlab.engine.layout.work_per_rank`."""
    docs = check_cu_seqlens(torch.as_tensor(cu_seqlens), None, None)
    lay = get(layout)
    lay.check_split(docs[-1], world_size, documents=docs)
    if lay.splits_documents and len(docs) > 2:
        return summed_by_length(docs, lambda n: dilated_work_per_rank(
            layout, world_size, [0, n], num_heads, segment_lengths, dilation_rates, head_offsets=head_offsets,
            causal=causal, heads=heads))
    ranges = []  # (rank, lo, hi, document length)
    for rank in range(world_size):
        for start, inside, _ in document_pieces(lay.pieces(docs[-1], rank, world_size, docs), docs):
            length = docs[bisect.bisect_right(docs, start)] - start
            ranges += [(rank, a, b, length) for a, b in inside]
    rank, lo, hi, length = np.array(ranges, dtype=np.int64).reshape(-1, 4).T
    pairs = row_pairs(lo, hi, length, num_heads, tuple(segment_lengths), tuple(dilation_rates), head_offsets,
                      causal, heads)
    work = [0] * world_size
    for x, n in zip(rank.tolist(), np.asarray(pairs).tolist()):
        work[x] += n
    return work


def receptive_field(seq_len: int, num_heads: int, segment_lengths, dilation_rates, layers: int, *,
                    head_offsets: str = "interleaved", causal: bool = True) -> torch.Tensor:
    """Fraction of the positions each query could draw on (its prefix when causal, else the
    whole sequence) that it reaches after 1..``layers`` stacked layers.

    A layer lets q read k if any head has m_h(q, k) > 0; stacking composes that relation.
    Returns a (layers, N) float tensor.
    """
    reach = (multiplicity(seq_len, num_heads, segment_lengths, dilation_rates,
                          head_offsets=head_offsets, causal=causal) > 0).any(0).float()
    possible = torch.arange(1, seq_len + 1).float() if causal else torch.full((seq_len,), float(seq_len))
    step, frac = reach.clone(), []
    for _ in range(layers):
        frac.append(step.sum(1) / possible)
        step = ((step @ reach) > 0).float()
    return torch.stack(frac)
