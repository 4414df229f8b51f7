"""Sequence layouts over P ranks, one registry, and the causal tile each ring step computes.

Which positions each rank holds, P = 2 (N = 8; a digit is the rank holding that position):

    contiguous  unit 1   0 0 0 0 | 1 1 1 1             rank r holds chunk r of P
    zigzag      unit 2   0 0 | 1 1 | 1 1 | 0 0         rank r holds chunks r and 2P-1-r of 2P
    striped     -        0 1 0 1 0 1 0 1               rank r holds the positions p % P == r

Every layout gives each rank N / P positions in increasing order, so a causal mask on local
indices of one rank's own block is the causal mask on positions.

Adding a layout whose ranks hold whole chunks (the usual case) takes one ``ChunkLayout``:

    def reversed_tile(rank, src, world_size, n):   # rank r holds chunk P-1-r
        return Tile(slice(0, n), slice(0, n), False) if src > rank else None

    register(ChunkLayout("reversed", unit=1, chunks=lambda rank, p: (p - 1 - rank,),
                         causal_tile=reversed_tile))

* ``unit``: chunks per rank. The sequence is cut into unit * P equal chunks, so N must be a
  multiple of unit * P (checks, the planner and the CLI read the rule from here).
* ``chunks(rank, P)``: the indices of the chunks ``rank`` holds, increasing. Every chunk
  belongs to exactly one rank. Shard, unshard, the positions and the pieces follow from it,
  and ring-dilated attention accepts the layout (a segment then lies on few ranks).
* ``causal_tile(rank, src, P, n)``: under the causal mask, the part of the K/V block of
  ``src`` (n rows, src != rank) that ``rank``'s n query rows see, as a :class:`Tile`; None
  when every key of it lies in the future. Skip whole blocks: skipped work is the point of
  a balanced layout. The own block (src == rank) is always the causal triangle.

Then ``layout="reversed"`` works in every public function; add its tests (the simulated ring
against the float64 reference, forward and backward, is the one that catches a wrong tile).
A layout that interleaves positions, like striped, subclasses :class:`Layout` instead.

Packed documents (``cu_seqlens``; docs/design.md §13). Layout methods take the boundaries as
an optional ``documents`` tuple, which only a :class:`DocumentLayout` reads: "doc_zigzag"
applies zigzag to every document alone (each a multiple of 2P tokens), so every rank gets its
share of every document's causal work. A ring step then computes :func:`document_tiles`, each
shared document's rows as blocks, or nothing; :func:`balance` reports each layout's max/mean
work per rank for a given packing.
"""

from __future__ import annotations

import bisect
import collections
import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .checks import check_choice, check_cu_seqlens


@dataclass(frozen=True)
class Tile:
    """What one ring step computes: local query rows q against rows k of the held K/V block."""
    q: slice
    k: slice
    causal: bool

    def pairs(self) -> int:
        """Score pairs computed: the work of this tile (causal: query i sees keys 0..i)."""
        rows, cols = self.q.stop - self.q.start, self.k.stop - self.k.start
        if not self.causal:
            return rows * cols
        tri = min(rows, cols)
        return tri * (tri + 1) // 2 + (rows - tri) * cols


@dataclass(frozen=True)
class Run:
    """Positions pos, pos + stride, ... (``count`` of them) held at local rows local, local + 1, ..."""
    local: int
    pos: int
    count: int
    stride: int


@dataclass(frozen=True)
class Layout:
    """How a sequence is split over P ranks. ``unit``: N must be a multiple of unit * P.
    ``causal_tile(rank, src, world_size, n)``: see the module docstring."""
    name: str
    unit: int
    causal_tile: Callable[[int, int, int, int], Tile | None]

    # Whether each rank holds whole chunks (contiguous pieces): ring-dilated needs that.
    has_pieces = False
    # Whether packed documents are each split alone: then a rank's work is the sum of its work
    # on each document alone.
    splits_documents = False

    def splits(self, seq_len: int, world_size: int) -> bool:
        """Whether ``seq_len`` positions split into equal shards over ``world_size`` ranks."""
        return seq_len % (self.unit * world_size) == 0

    def document_unit(self, world_size: int) -> int:
        """Every packed document's length must be a multiple of this (1 unless the layout
        splits each document)."""
        return 1

    def check_split(self, seq_len: int, world_size: int, what: str = "sequence length", documents=None) -> None:
        """A ValueError that says how to pad unless ``splits``. ``documents`` (cu_seqlens
        boundaries, a tuple) matter only to a layout that splits each document."""
        parts = self.unit * world_size
        if not self.splits(seq_len, world_size):
            raise ValueError(
                f"layout {self.name!r} cannot split {what} {seq_len} over {world_size} ranks: it "
                f"needs a multiple of {parts}. Pad the sequence to {-(-seq_len // parts) * parts} "
                "tokens or choose another world size")

    def positions(self, seq_len: int, rank: int, world_size: int, documents=None) -> torch.Tensor:
        """Global positions held by ``rank``, in local order."""
        raise NotImplementedError

    def pieces(self, seq_len: int, rank: int, world_size: int, documents=None) -> tuple[tuple[int, int], ...]:
        """The contiguous position ranges [start, stop) held by ``rank``."""
        raise ValueError(f"layout {self.name!r} has no contiguous pieces; use shard_positions")

    def runs(self, seq_len: int, rank: int, world_size: int, documents=None) -> tuple[Run, ...]:
        """The positions held by ``rank`` as strided runs, in local order."""
        local = 0
        out = []
        for a, b in self.pieces(seq_len, rank, world_size, documents):
            out.append(Run(local, a, b - a, 1))
            local += b - a
        return tuple(out)

    def shard(self, x: torch.Tensor, rank: int, world_size: int, dim: int, documents=None) -> torch.Tensor:
        """This rank's shard of x along ``dim`` (>= 0, length already checked)."""
        raise NotImplementedError

    def unshard(self, shards: list[torch.Tensor], dim: int, documents=None) -> torch.Tensor:
        """The whole tensor from every rank's shard (equal shapes, checked)."""
        raise NotImplementedError

    def work(self, world_size: int, documents: tuple[int, ...], causal: bool) -> list[int]:
        """Score pairs of each rank when the packed ``documents`` (checked cu_seqlens, which
        this layout splits) attend within themselves (see :func:`work_per_rank`): per rank,
        its runs cut at the documents, each cut counted in closed form."""
        bounds = np.asarray(documents, dtype=np.int64)
        exact = _exact_dtype(documents)
        starts, stops = bounds[:-1].astype(exact), bounds[1:].astype(exact)
        work = []
        for rank in range(world_size):
            total = 0
            for r in self.runs(documents[-1], rank, world_size, documents):
                i, first, stop = _document_cuts(r, bounds)
                first, n = first.astype(exact), (stop - first).astype(exact)
                if causal:  # sum over the run's positions p of p - start + 1
                    total += int((n * (r.pos + first * r.stride - starts[i] + 1) + r.stride * n * (n - 1) // 2).sum())
                else:
                    total += int((n * (stops[i] - starts[i])).sum())
            work.append(total)
        return work

    def tile(self, rank: int, src: int, world_size: int, n: int, causal: bool) -> Tile | None:
        """The tile ``rank`` computes against the K/V block of ``src`` (n rows each); None = skip."""
        if not causal:
            return Tile(slice(0, n), slice(0, n), False)
        if src == rank:
            return Tile(slice(0, n), slice(0, n), True)
        return self.causal_tile(rank, src, world_size, n)


@dataclass(frozen=True)
class ChunkLayout(Layout):
    """Rank r holds the chunks ``chunks(r, P)`` (increasing) of the unit * P equal chunks."""
    chunks: Callable[[int, int], tuple[int, ...]]

    has_pieces = True

    def pieces(self, seq_len, rank, world_size, documents=None):
        self.check_split(seq_len, world_size)
        c = seq_len // (self.unit * world_size)
        return _merged((i * c, (i + 1) * c) for i in self.chunks(rank, world_size))

    def positions(self, seq_len, rank, world_size, documents=None):
        return torch.cat([torch.arange(a, b) for a, b in self.pieces(seq_len, rank, world_size, documents)])

    def shard(self, x, rank, world_size, dim, documents=None):
        parts = [x.narrow(dim, a, b - a) for a, b in self.pieces(x.shape[dim], rank, world_size, documents)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim)  # one piece: a view

    def unshard(self, shards, dim, documents=None):
        p = len(shards)
        if shards[0].shape[dim] % self.unit:
            raise ValueError(f"{self.name} shards hold {self.unit} equal chunks, so their length along dim "
                             f"{dim} must be a multiple of {self.unit}; got {shards[0].shape[dim]}")
        chunk = [None] * (self.unit * p)
        for r, s in enumerate(shards):
            for i, part in zip(self.chunks(r, p), s.chunk(self.unit, dim)):
                chunk[i] = part
        return torch.cat(chunk, dim)


@dataclass(frozen=True)
class StripedLayout(Layout):
    """Rank r holds the positions p with p % P == r."""

    def positions(self, seq_len, rank, world_size, documents=None):
        self.check_split(seq_len, world_size)
        return torch.arange(rank, seq_len, world_size)

    def runs(self, seq_len, rank, world_size, documents=None):
        self.check_split(seq_len, world_size)
        return (Run(0, rank, seq_len // world_size, world_size),)

    def shard(self, x, rank, world_size, dim, documents=None):
        return x.unflatten(dim, (x.shape[dim] // world_size, world_size)).select(dim + 1, rank)

    def unshard(self, shards, dim, documents=None):
        return torch.stack(shards, dim + 1).flatten(dim, dim + 1)

    def work(self, world_size, documents, causal):
        """Every rank at once, in O(documents + P) rather than O(documents x P): rank x holds
        the positions = x (mod P), so a document of length L = qP + m starting at s puts
        c = q + [a < m] rows on x, a = (x - s) mod P the offset of the first; causally they
        see a + 1, a + 1 + P, ... keys, c (a + 1) + P c (c - 1) / 2 in all; else c L."""
        p, bounds = world_size, np.asarray(documents, dtype=np.int64)
        exact = _exact_dtype(documents)
        length = np.diff(bounds).astype(exact)
        q, m, home = length // p, length % p, bounds[:-1] % p  # home: the rank of a document's first row
        x = np.arange(p).astype(exact)
        # [a < m]: x in the cyclic window [home, home + m). There a = x - home, and x - home + P
        # in the part that wraps past rank P - 1, [0, home + m - P).
        ends = home + m.astype(np.int64)
        lo = np.concatenate([home, np.zeros_like(home)])
        hi = np.concatenate([np.minimum(ends, p), ends - p])
        shift = np.repeat([0, p], len(home))
        keep = lo < hi
        slope, const = (np.zeros(p + 1, exact) for _ in range(2))
        if causal:  # the window's extra row: a + 1 + P q = x + (1 - home + shift + P q) keys
            extra = np.tile(1 + p * q - home.astype(exact), 2) + shift.astype(exact)
            np.add.at(slope, lo[keep], 1)
            np.add.at(slope, hi[keep], -1)
        else:
            extra = np.tile(length, 2)
        np.add.at(const, lo[keep], extra[keep])
        np.add.at(const, hi[keep], -extra[keep])
        work = np.cumsum(slope)[:p] * x + np.cumsum(const)[:p]
        if causal:  # the q rows every document puts on x: q (a + 1) + P q (q - 1) / 2, where
            # a + 1 = x + 1 - home, plus P for the documents whose home is past x
            at = np.zeros(p + 1, exact)
            np.add.at(at, home, q)
            after = q.sum() - np.cumsum(at)[:p]
            work += x * q.sum() + (q * (1 - home.astype(exact)) + p * q * (q - 1) // 2).sum() + p * after
        else:
            work += (q * length).sum()
        return [int(w) for w in work]


def _merged(pieces) -> tuple[tuple[int, int], ...]:
    """Sorted [start, stop) ranges with the adjacent ones joined."""
    out: list[list[int]] = []
    for a, b in pieces:
        if out and out[-1][1] == a:
            out[-1][1] = b
        else:
            out.append([a, b])
    return tuple((a, b) for a, b in out)


@dataclass(frozen=True)
class DocumentLayout(ChunkLayout):
    """A chunk layout applied to every packed document on its own: each document is cut into
    unit * P equal chunks and rank r holds ``chunks(r, P)`` of each, so every rank gets its
    share of every document's causal work. Without documents it is the plain chunk layout."""

    splits_documents = True

    def document_unit(self, world_size):
        return self.unit * world_size

    def check_split(self, seq_len, world_size, what="sequence length", documents=None):
        super().check_split(seq_len, world_size, what)
        parts = self.document_unit(world_size)
        for i, (a, b) in enumerate(zip(documents or (), (documents or ())[1:])):
            if (b - a) % parts:
                raise ValueError(
                    f"layout {self.name!r} cuts every document into {parts} equal chunks ({world_size} ranks), but "
                    f"document {i} (cu_seqlens[{i}:{i + 2}] = {a}, {b}) has {b - a} tokens. Pad each document to a "
                    f"multiple of {parts} tokens, or choose another layout")

    def pieces(self, seq_len, rank, world_size, documents=None):
        if not documents:
            return super().pieces(seq_len, rank, world_size)
        self.check_split(seq_len, world_size, documents=documents)
        chunked = super().pieces  # each document split alone
        return _merged((a + x, a + y) for a, b in zip(documents, documents[1:])
                       for x, y in chunked(b - a, rank, world_size))

    def unshard(self, shards, dim, documents=None):
        if not documents:
            return super().unshard(shards, dim)
        p, seq_len = len(shards), shards[0].shape[dim] * len(shards)
        parts = []
        for r, x in enumerate(shards):
            for run in self.runs(seq_len, r, p, documents):
                parts.append((run.pos, x.narrow(dim, run.local, run.count)))
        return torch.cat([x for _, x in sorted(parts, key=lambda t: t[0])], dim)


def _contiguous_tile(rank, src, world_size, n):
    return Tile(slice(0, n), slice(0, n), False) if src < rank else None


def _zigzag_chunks(rank, world_size):
    return rank, 2 * world_size - 1 - rank


def _zigzag_tile(rank, src, world_size, n):
    """An earlier rank's block is seen by all our rows through its first chunk; a later rank's
    block only by our second chunk."""
    half = n // 2
    return Tile(slice(0, n), slice(0, half), False) if src < rank else Tile(slice(half, n), slice(0, n), False)


def _striped_tile(rank, src, world_size, n):
    """Key j of src precedes query i iff j < i, or j == i and src < rank, so a later rank's
    block is the causal triangle shifted down by one row."""
    if src < rank:
        return Tile(slice(0, n), slice(0, n), True)
    return Tile(slice(1, n), slice(0, n - 1), True) if n > 1 else None


LAYOUTS: dict[str, Layout] = {}


def register(layout: Layout) -> Layout:
    """Make ``layout`` available by name to every function that takes ``layout=``."""
    if layout.name in LAYOUTS:
        raise ValueError(f"a layout named {layout.name!r} is already registered")
    LAYOUTS[layout.name] = layout
    return layout


register(ChunkLayout("contiguous", 1, _contiguous_tile, lambda rank, world_size: (rank,)))
register(ChunkLayout("zigzag", 2, _zigzag_tile, _zigzag_chunks))
register(StripedLayout("striped", 1, _striped_tile))
register(DocumentLayout("doc_zigzag", 2, _zigzag_tile, _zigzag_chunks))


def get(name: str) -> Layout:
    """The registered layout called ``name``; a ValueError listing the names otherwise."""
    check_choice("layout", name, tuple(LAYOUTS))
    return LAYOUTS[name]


def with_pieces() -> tuple[str, ...]:
    """The names of the layouts whose ranks hold whole chunks (those ring-dilated accepts)."""
    return tuple(name for name, lay in LAYOUTS.items() if lay.has_pieces)


def check_split(layout: str, seq_len: int, world_size: int, what: str = "sequence length", documents=None) -> None:
    """``layout`` must split ``seq_len`` into equal shards over ``world_size`` ranks (and
    the packed ``documents``, cu_seqlens as a tuple, where the layout splits each one)."""
    get(layout).check_split(seq_len, world_size, what, documents)


def shard_positions(seq_len: int, rank: int, world_size: int, layout: str, documents=None) -> torch.Tensor:
    """Global positions held by ``rank``, in local order."""
    return get(layout).positions(seq_len, rank, world_size, documents)


def shard_pieces(seq_len: int, rank: int, world_size: int, layout: str, documents=None) -> tuple[tuple[int, int], ...]:
    """The contiguous position ranges [start, stop) held by ``rank`` (layouts with pieces)."""
    return get(layout).pieces(seq_len, rank, world_size, documents)


def exact_dtype(largest: int):
    """The numpy dtype that counts exactly up to ``largest``: int64 while it fits with room to
    spare, object (Python ints) beyond."""
    return np.int64 if largest < 2**62 else object


def _exact_dtype(documents: tuple[int, ...]):
    """A rank's pairs reach N x the longest document."""
    return exact_dtype(2 * documents[-1] * max(b - a for a, b in zip(documents, documents[1:])))


def _document_cuts(r: Run, documents: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run ``r`` cut at the document boundaries (an int64 array, as cu_seqlens): arrays
    (document index i, first, stop) over the documents it reaches, its elements first <= j < stop
    lying in document i. Vectorised: a striped run reaches every document."""
    last = r.pos + (r.count - 1) * r.stride
    i = np.arange(np.searchsorted(documents, r.pos, "right") - 1, np.searchsorted(documents, last, "right"))
    first = np.maximum(0, -((r.pos - documents[i]) // r.stride))
    stop = np.minimum(r.count, -((r.pos - documents[i + 1]) // r.stride))
    keep = first < stop
    return i[keep], first[keep], stop[keep]


def _document_runs(runs, documents) -> dict[int, list[Run]]:
    """``runs`` cut at the document boundaries: {document index: its runs}."""
    out: dict[int, list[Run]] = {}
    docs = np.asarray(documents, dtype=np.int64)
    for r in runs:
        for i, lo, hi in zip(*(x.tolist() for x in _document_cuts(r, docs))):
            out.setdefault(i, []).append(Run(r.local + lo, r.pos + lo * r.stride, hi - lo, r.stride))
    return out


def _visible(q: Run, k: Run, causal: bool) -> list[Tile]:
    """Query run q against key run k (one document, one stride): everything, or under the causal
    mask the keys at or before each query, which is a full block and a triangle at most."""
    qs, ks = slice(q.local, q.local + q.count), slice(k.local, k.local + k.count)
    if not causal:
        return [Tile(qs, ks, False)]
    off = (q.pos - k.pos) // q.stride  # key j precedes query i iff j <= i + off
    tiles = [Tile(qs, slice(k.local, k.local + min(off, k.count)), False)] if off > 0 else []
    q0, k0 = max(0, -off), max(0, off)
    if q0 < q.count and k0 < k.count:
        rows = q.count - q0
        tiles.append(Tile(slice(q.local + q0, qs.stop), slice(k.local + k0, k.local + min(k.count, k0 + rows)), True))
    return tiles


@functools.lru_cache(maxsize=1024)
def document_tiles(layout: str, rank: int, src: int, world_size: int, documents: tuple[int, ...],
                   causal: bool) -> tuple[Tile, ...]:
    """What ``rank`` computes against the K/V block of ``src`` when the packed ``documents``
    (cu_seqlens as a tuple) attend only within themselves: for each document both hold, its
    query rows against its key rows, as blocks. () when they share no document (a skip)."""
    lay = get(layout)
    mine, theirs = (_document_runs(lay.runs(documents[-1], r, world_size, documents), documents) for r in (rank, src))
    return tuple(t for d, qs in mine.items() for q in qs for k in theirs.get(d, ()) for t in _visible(q, k, causal))


def ring_tiles(layout: str, rank: int, src: int, world_size: int, n: int, causal: bool,
               documents: tuple[int, ...] = ()) -> tuple[Tile, ...]:
    """The tiles ``rank`` computes against the K/V block of ``src`` (n rows each) at one ring
    step: the layout's causal tile, or with packed ``documents`` their :func:`document_tiles`.
    () means skip the step."""
    if documents:
        return document_tiles(layout, rank, src, world_size, documents, causal)
    tile = get(layout).tile(rank, src, world_size, n, causal)
    return () if tile is None else (tile,)


def work_per_rank(layout: str, world_size: int, cu_seqlens, causal: bool = True) -> list[int]:
    """Score pairs each rank computes in one ring pass (the trace's ``pairs``, summed) when the
    packed documents ``cu_seqlens`` (a tensor or a list of boundaries) attend within themselves.
    The tiles compute exactly the visible pairs, so each query row counts the keys of its
    document it sees: all of them, or causally those up to its own position."""
    docs = check_cu_seqlens(torch.as_tensor(cu_seqlens), None, None)
    lay = get(layout)
    lay.check_split(docs[-1], world_size, documents=docs)
    if lay.splits_documents and len(docs) > 2:
        return summed_by_length(docs, lambda n: work_per_rank(layout, world_size, [0, n], causal))
    return lay.work(world_size, docs, causal)


def summed_by_length(documents: tuple[int, ...], work: Callable[[int], list[int]]) -> list[int]:
    """Per-rank work of packed ``documents`` under a layout that splits each one alone: the sum
    of ``work(length)`` (one document alone), computed once per distinct length."""
    counts = collections.Counter(b - a for a, b in zip(documents, documents[1:]))
    return [sum(per_rank) for per_rank in zip(*([c * x for x in work(n)] for n, c in counts.items()))]


def imbalance(layout: str, world_size: int, cu_seqlens, causal: bool = True) -> float:
    """max / mean of :func:`work_per_rank`: 1.0 is a perfect balance."""
    return max_over_mean(work_per_rank(layout, world_size, cu_seqlens, causal))


def max_over_mean(work) -> float:
    """The imbalance of per-rank work: max / mean."""
    return max(work) * len(work) / sum(work)


def balance(world_size: int, cu_seqlens, causal: bool = True) -> dict[str, float | None]:
    """:func:`imbalance` of every registered layout; None where a layout cannot split them."""
    out = {}
    for name in LAYOUTS:
        try:
            out[name] = imbalance(name, world_size, cu_seqlens, causal)
        except ValueError:
            out[name] = None
    return out


def _seq_dim(dim, ndim: int, name: str) -> int:
    """``dim`` as a non-negative index into ``ndim`` dimensions (negative counts from the end)."""
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if not -ndim <= dim < ndim:
        raise ValueError(f"dim {dim} is out of range for {name} with {ndim} dims (use -{ndim} .. {ndim - 1})")
    return dim % ndim


def shard(x: torch.Tensor, rank: int, world_size: int, layout: str = "contiguous",
          dim: int = 1, *, cu_seqlens=None) -> torch.Tensor:
    """This rank's shard of x along ``dim`` (the sequence dimension by default; negative
    dims count from the end). ``cu_seqlens``: the packed documents of the whole sequence,
    for a layout that splits each document ("doc_zigzag")."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    dim = _seq_dim(dim, x.dim(), "x")
    lay = get(layout)
    docs = None if cu_seqlens is None else check_cu_seqlens(cu_seqlens, x.shape[dim], None)
    lay.check_split(x.shape[dim], world_size, what=f"dim {dim} of length", documents=docs)
    return lay.shard(x, rank, world_size, dim, docs)


def unshard(shards, layout: str = "contiguous", dim: int = 1, *, cu_seqlens=None) -> torch.Tensor:
    """Reassemble the full tensor from the list of every rank's shard (inverse of shard, with
    the same ``cu_seqlens``). Every shard must have the same shape (the layouts split evenly)."""
    shards = list(shards)
    if not shards:
        raise ValueError("unshard needs at least one shard")
    lay = get(layout)
    for r, s in enumerate(shards):
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"shards[{r}] must be a torch.Tensor, got {type(s).__name__}")
        if s.device != shards[0].device:
            raise ValueError(f"unshard needs shards on one device; shard 0 is on {shards[0].device}, shard {r} on "
                             f"{s.device}: move them first, e.g. [s.cpu() for s in shards]")
        if s.shape != shards[0].shape:
            raise ValueError(f"unshard needs shards of equal shape (every layout splits evenly); shard 0 "
                             f"has {tuple(shards[0].shape)}, shard {r} has {tuple(s.shape)}")
    dim = _seq_dim(dim, shards[0].dim(), "the shards")
    seq_len = shards[0].shape[dim] * len(shards)
    docs = None
    if cu_seqlens is not None:
        docs = check_cu_seqlens(cu_seqlens, seq_len, None)
        lay.check_split(seq_len, len(shards), what=f"dim {dim} of length", documents=docs)
    return lay.unshard(shards, dim, docs)
