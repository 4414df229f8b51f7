"""Sequence layouts over P ranks (SPEC §2) and the causal tile each ring step computes.

  contiguous  rank r holds chunk r of P equal chunks.
  zigzag      the sequence is cut into 2P chunks; rank r holds chunks r and 2P-1-r.
  striped     rank r holds the positions p with p % P == r.

Every layout gives each rank N / P positions in increasing order, so a causal mask on local
indices of one rank's own block is the causal mask on positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import LAYOUTS, check_choice, check_layout_split


def shard_positions(seq_len: int, rank: int, world_size: int, layout: str) -> torch.Tensor:
    """Global positions held by ``rank``, in local order."""
    check_layout_split(layout, seq_len, world_size)
    if layout == "striped":
        return torch.arange(rank, seq_len, world_size)
    pieces = shard_pieces(seq_len, rank, world_size, layout)
    return torch.cat([torch.arange(a, b) for a, b in pieces])


def shard_pieces(seq_len: int, rank: int, world_size: int, layout: str) -> tuple[tuple[int, int], ...]:
    """The contiguous position ranges [start, stop) held by ``rank`` (contiguous, zigzag)."""
    check_layout_split(layout, seq_len, world_size)
    if layout == "contiguous":
        n = seq_len // world_size
        return ((rank * n, (rank + 1) * n),)
    if layout == "zigzag":
        c = seq_len // (2 * world_size)
        lo, hi = rank, 2 * world_size - 1 - rank
        if hi == lo + 1:  # the two middle chunks are adjacent: one piece
            return ((lo * c, (hi + 1) * c),)
        return ((lo * c, (lo + 1) * c), (hi * c, (hi + 1) * c))
    raise ValueError(f"layout {layout!r} has no contiguous pieces; use shard_positions")


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
    n = x.shape[dim]
    check_layout_split(layout, n, world_size, what=f"dim {dim} of length")
    if layout == "contiguous":
        return x.narrow(dim, rank * (n // world_size), n // world_size)
    if layout == "zigzag":
        chunks = x.chunk(2 * world_size, dim)
        return torch.cat([chunks[rank], chunks[2 * world_size - 1 - rank]], dim)
    return x.unflatten(dim, (n // world_size, world_size)).select(dim + 1, rank)


def unshard(shards, layout: str = "contiguous", dim: int = 1) -> torch.Tensor:
    """Reassemble the full tensor from the list of every rank's shard (inverse of shard).
    Every shard must have the same shape (the layouts split evenly)."""
    shards = list(shards)
    if not shards:
        raise ValueError("unshard needs at least one shard")
    check_choice("layout", layout, LAYOUTS)
    for r, s in enumerate(shards):
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"shards[{r}] must be a torch.Tensor, got {type(s).__name__}")
        if s.shape != shards[0].shape:
            raise ValueError(f"unshard needs shards of equal shape (every layout splits evenly); shard 0 "
                             f"has {tuple(shards[0].shape)}, shard {r} has {tuple(s.shape)}")
    dim = _seq_dim(dim, shards[0].dim(), "the shards")
    if layout == "zigzag" and shards[0].shape[dim] % 2:
        raise ValueError(f"zigzag shards hold two equal chunks, so their length along dim {dim} must be "
                         f"even; got {shards[0].shape[dim]}")
    p = len(shards)
    if layout == "contiguous":
        return torch.cat(shards, dim)
    if layout == "zigzag":
        halves = [s.chunk(2, dim) for s in shards]
        return torch.cat([halves[r][0] for r in range(p)] + [halves[r][1] for r in reversed(range(p))], dim)
    return torch.stack(shards, dim + 1).flatten(dim, dim + 1)


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


def ring_tile(layout: str, rank: int, src: int, world_size: int, n: int, causal: bool) -> Tile | None:
    """The tile ``rank`` computes against the K/V block of ``src`` (n rows each); None = skip.

    Causal blocks wholly in the future are skipped, not masked. zigzag: an earlier rank's block
    is seen by all our rows through its first chunk; a later rank's block only by our second
    chunk. striped: key j of src precedes query i iff j < i, or j == i and src < rank, so a
    later rank's block is the causal triangle shifted down by one row.
    """
    full = Tile(slice(0, n), slice(0, n), False)
    if not causal:
        return full
    if src == rank:
        return Tile(slice(0, n), slice(0, n), True)
    if layout == "contiguous":
        return full if src < rank else None
    if layout == "zigzag":
        half = n // 2
        return Tile(slice(0, n), slice(0, half), False) if src < rank else Tile(slice(half, n), slice(0, n), False)
    if src < rank:
        return Tile(slice(0, n), slice(0, n), True)
    return Tile(slice(1, n), slice(0, n - 1), True) if n > 1 else None
