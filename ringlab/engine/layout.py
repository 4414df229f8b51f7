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
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from .checks import check_choice


@dataclass(frozen=True)
class Tile:
    """What one ring step computes: local query rows q against rows k of the held K/V block."""
    q: slice
    k: slice
    causal: bool

    def pairs(self) -> int:
        """Score pairs computed: the work of this tile."""
        rows, cols = self.q.stop - self.q.start, self.k.stop - self.k.start
        return rows * (rows + 1) // 2 if self.causal else rows * cols


@dataclass(frozen=True)
class Layout:
    """How a sequence is split over P ranks. ``unit``: N must be a multiple of unit * P.
    ``causal_tile(rank, src, world_size, n)``: see the module docstring."""
    name: str
    unit: int
    causal_tile: Callable[[int, int, int, int], Tile | None]

    # Whether each rank holds whole chunks (contiguous pieces): ring-dilated needs that.
    has_pieces = False

    def splits(self, seq_len: int, world_size: int) -> bool:
        """Whether ``seq_len`` positions split into equal shards over ``world_size`` ranks."""
        return seq_len % (self.unit * world_size) == 0

    def check_split(self, seq_len: int, world_size: int, what: str = "sequence length") -> None:
        """A ValueError that says how to pad unless ``splits``."""
        parts = self.unit * world_size
        if not self.splits(seq_len, world_size):
            raise ValueError(
                f"layout {self.name!r} cannot split {what} {seq_len} over {world_size} ranks: it "
                f"needs a multiple of {parts}. Pad the sequence to {-(-seq_len // parts) * parts} "
                "tokens or choose another world size")

    def positions(self, seq_len: int, rank: int, world_size: int) -> torch.Tensor:
        """Global positions held by ``rank``, in local order."""
        raise NotImplementedError

    def pieces(self, seq_len: int, rank: int, world_size: int) -> tuple[tuple[int, int], ...]:
        """The contiguous position ranges [start, stop) held by ``rank``."""
        raise ValueError(f"layout {self.name!r} has no contiguous pieces; use shard_positions")

    def shard(self, x: torch.Tensor, rank: int, world_size: int, dim: int) -> torch.Tensor:
        """This rank's shard of x along ``dim`` (>= 0, length already checked)."""
        raise NotImplementedError

    def unshard(self, shards: list[torch.Tensor], dim: int) -> torch.Tensor:
        """The whole tensor from every rank's shard (equal shapes, checked)."""
        raise NotImplementedError

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

    def pieces(self, seq_len, rank, world_size):
        self.check_split(seq_len, world_size)
        c = seq_len // (self.unit * world_size)
        merged: list[list[int]] = []
        for i in self.chunks(rank, world_size):
            if merged and merged[-1][1] == i * c:  # adjacent chunks: one piece
                merged[-1][1] = (i + 1) * c
            else:
                merged.append([i * c, (i + 1) * c])
        return tuple((a, b) for a, b in merged)

    def positions(self, seq_len, rank, world_size):
        return torch.cat([torch.arange(a, b) for a, b in self.pieces(seq_len, rank, world_size)])

    def shard(self, x, rank, world_size, dim):
        parts = [x.narrow(dim, a, b - a) for a, b in self.pieces(x.shape[dim], rank, world_size)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim)  # one piece: a view

    def unshard(self, shards, dim):
        p = len(shards)
        if shards[0].shape[dim] % self.unit:
            raise ValueError(f"{self.name} shards hold {self.unit} equal chunks, so their length along dim "
                             f"{dim} must be a multiple of {self.unit}; got {shards[0].shape[dim]}")
        chunk = [None] * (self.unit * p)
        for r, s in enumerate(shards):
            for i, part in zip(self.chunks(r, p), s.chunk(self.unit, dim)):
                chunk[i] = part
        return torch.cat(chunk, dim)

    def owners(self, world_size: int) -> tuple[int, ...]:
        """The rank holding each chunk."""
        return _owners(self, world_size)


@functools.lru_cache(maxsize=64)
def _owners(layout: ChunkLayout, world_size: int) -> tuple[int, ...]:
    owner = [0] * (layout.unit * world_size)
    for r in range(world_size):
        for i in layout.chunks(r, world_size):
            owner[i] = r
    return tuple(owner)


@dataclass(frozen=True)
class StripedLayout(Layout):
    """Rank r holds the positions p with p % P == r."""

    def positions(self, seq_len, rank, world_size):
        self.check_split(seq_len, world_size)
        return torch.arange(rank, seq_len, world_size)

    def shard(self, x, rank, world_size, dim):
        return x.unflatten(dim, (x.shape[dim] // world_size, world_size)).select(dim + 1, rank)

    def unshard(self, shards, dim):
        return torch.stack(shards, dim + 1).flatten(dim, dim + 1)


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


def get(name: str) -> Layout:
    """The registered layout called ``name``; a ValueError listing the names otherwise."""
    check_choice("layout", name, tuple(LAYOUTS))
    return LAYOUTS[name]


def with_pieces() -> tuple[str, ...]:
    """The names of the layouts whose ranks hold whole chunks (those ring-dilated accepts)."""
    return tuple(name for name, lay in LAYOUTS.items() if lay.has_pieces)


def check_split(layout: str, seq_len: int, world_size: int, what: str = "sequence length") -> None:
    """``layout`` must split ``seq_len`` into equal shards over ``world_size`` ranks."""
    get(layout).check_split(seq_len, world_size, what)


def shard_positions(seq_len: int, rank: int, world_size: int, layout: str) -> torch.Tensor:
    """Global positions held by ``rank``, in local order."""
    return get(layout).positions(seq_len, rank, world_size)


def shard_pieces(seq_len: int, rank: int, world_size: int, layout: str) -> tuple[tuple[int, int], ...]:
    """The contiguous position ranges [start, stop) held by ``rank`` (layouts with pieces)."""
    return get(layout).pieces(seq_len, rank, world_size)


def _seq_dim(dim, ndim: int, name: str) -> int:
    """``dim`` as a non-negative index into ``ndim`` dimensions (negative counts from the end)."""
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if not -ndim <= dim < ndim:
        raise ValueError(f"dim {dim} is out of range for {name} with {ndim} dims (use -{ndim} .. {ndim - 1})")
    return dim % ndim


def shard(x: torch.Tensor, rank: int, world_size: int, layout: str = "contiguous",
          dim: int = 1) -> torch.Tensor:
    """This rank's shard of x along ``dim`` (the sequence dimension by default; negative
    dims count from the end)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    dim = _seq_dim(dim, x.dim(), "x")
    lay = get(layout)
    lay.check_split(x.shape[dim], world_size, what=f"dim {dim} of length")
    return lay.shard(x, rank, world_size, dim)


def unshard(shards, layout: str = "contiguous", dim: int = 1) -> torch.Tensor:
    """Reassemble the full tensor from the list of every rank's shard (inverse of shard).
    Every shard must have the same shape (the layouts split evenly)."""
    shards = list(shards)
    if not shards:
        raise ValueError("unshard needs at least one shard")
    lay = get(layout)
    for r, s in enumerate(shards):
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"shards[{r}] must be a torch.Tensor, got {type(s).__name__}")
        if s.shape != shards[0].shape:
            raise ValueError(f"unshard needs shards of equal shape (every layout splits evenly); shard 0 "
                             f"has {tuple(shards[0].shape)}, shard {r} has {tuple(s.shape)}")
    return lay.unshard(shards, _seq_dim(dim, shards[0].dim(), "the shards"))
