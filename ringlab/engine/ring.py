"""Ring attention (Liu et al. 2023; docs/design.md §4): Q, K and V sharded, K/V blocks rotating.

Each rank keeps its Q block and output accumulator. At step t it holds the K/V block of rank
(rank - t) mod P, posts the transfer of that block to rank+1 (and the receive of the next one
from rank-1) *before* computing on it, so the transfer hides behind the compute. Partial
results merge through the LSE. The backward rotates K/V again, with the dK/dV accumulators of
the held block travelling alongside it, and recomputes each tile from the saved global lse;
dQ stays local. After P steps each dK/dV accumulator is one hop from home: a last transfer
delivers it.

A simulated ring (one device) runs all ranks at once instead (:func:`forward_together`): the
same tiles, with a kernel call per run of ranks whose tiles are equal rather than per rank.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from . import trace
from .config import RingConfig, ring_config, run_ring
from .kernels import accum_dtype, block_attention, block_attention_backward
from .layout import ring_tiles
from .merge import merge, new_accumulators


def _traced_tiles(rank, step, src, tiles):
    """A context that records the tiles computed inside the block (or that the step was
    skipped): rows are the range the tiles cover, ``blocks`` how many kernel calls they take."""
    if not trace.recording():
        return contextlib.nullcontext()
    if not tiles:
        trace.record(kind="skip", rank=rank, step=step, src=src)
        return contextlib.nullcontext()
    return trace.span(kind="compute", rank=rank, step=step, src=src, causal=any(t.causal for t in tiles),
                      q_rows=(min(t.q.start for t in tiles), max(t.q.stop for t in tiles)),
                      k_rows=(min(t.k.start for t in tiles), max(t.k.stop for t in tiles)),
                      pairs=sum(t.pairs() for t in tiles), blocks=len(tiles))


def _rows(x, rows: slice, dim: int):
    """Rows ``rows`` of x along ``dim``; x itself when that is all of them, since on a GPU
    every view costs host time that a short ring step cannot hide."""
    if rows.start == 0 and rows.stop == x.shape[dim]:
        return x
    return x.narrow(dim, rows.start, rows.stop - rows.start)


def _attend(tiles, q, k, v, out, lse, scale) -> None:
    """Compute ``tiles`` of q (B, n, H, D) against the held block k, v and merge each into the
    accumulators out and lse (B, H, n)."""
    for tile in tiles:
        qr, kr = tile.q, tile.k
        merge(_rows(out, qr, 1), _rows(lse, qr, 2),
              *block_attention(_rows(q, qr, 1), _rows(k, kr, 1), _rows(v, kr, 1), causal=tile.causal, scale=scale))


def _attend_backward(tiles, dout, q, k, v, out, lse, dlse, dq, dk, dv, scale) -> None:
    """The gradients of ``tiles``, added to the accumulators dq (of q's rows) and dk, dv (of the
    held block's rows)."""
    for tile in tiles:
        qr, kr = tile.q, tile.k
        gq, gk, gv = block_attention_backward(
            _rows(dout, qr, 1), _rows(q, qr, 1), _rows(k, kr, 1), _rows(v, kr, 1), _rows(out, qr, 1),
            _rows(lse, qr, 2), causal=tile.causal, scale=scale, dlse=None if dlse is None else _rows(dlse, qr, 2))
        _rows(dq, qr, 1).add_(gq)
        _rows(dk, kr, 1).add_(gk)
        _rows(dv, kr, 1).add_(gv)
        del gq, gk, gv  # free them before the next kernel allocates its own


def forward_rank(comm, q, k, v, *, config: RingConfig, heads: slice):
    """One rank's forward (a generator; see ringlab.engine.comm). Returns (out, lse) accumulators.
    Every head attends alike, so ``heads`` (which of the call's heads q holds) is not needed."""
    p, rank, n, scale = comm.world_size, comm.rank, q.shape[1], config.scale
    out, lse = new_accumulators(q)
    kv = torch.stack([k, v])  # one buffer, one transfer per step
    for step in range(p):
        src = (rank - step) % p
        if step + 1 < p:
            incoming, pending = comm.pass_on(kv, step=step, label="kv")
        tiles = ring_tiles(config.layout, rank, src, p, n, config.causal, config.documents)
        with _traced_tiles(rank, step, src, tiles):
            _attend(tiles, q, kv[0], kv[1], out, lse, scale)
        if step + 1 < p:
            yield from pending.wait()
            kv = incoming
    return out, lse


def backward_rank(comm, dout, q, k, v, out, lse, dlse, *, config: RingConfig, heads: slice):
    """One rank's backward (a generator). Returns (dq, dk, dv) in the accumulation dtype."""
    p, rank, n, scale = comm.world_size, comm.rank, q.shape[1], config.scale
    acc = accum_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    kv = torch.stack([k, v])
    dkv_incoming = dkv_pending = None  # the dK/dV accumulator arriving with the next block
    for step in range(p):
        src = (rank - step) % p
        if step + 1 < p:
            incoming, kv_pending = comm.pass_on(kv, step=step, label="kv")
        if step == 0:  # our own block starts a fresh accumulator
            dkv = torch.zeros(kv.shape, dtype=acc, device=kv.device)
        else:
            yield from dkv_pending.wait()
            dkv = dkv_incoming
        tiles = ring_tiles(config.layout, rank, src, p, n, config.causal, config.documents)
        with _traced_tiles(rank, step, src, tiles):
            _attend_backward(tiles, dout, q, kv[0], kv[1], out, lse, dlse, dq, dkv[0], dkv[1], scale)
        if p == 1:
            return dq, dkv[0], dkv[1]
        dkv_incoming, dkv_pending = comm.pass_on(dkv, step=step, label="dkv", tag=1)
        if step + 1 < p:
            yield from kv_pending.wait()
            kv = incoming
    yield from dkv_pending.wait()  # our own block's dK/dV, home from its last holder
    return dq, dkv_incoming[0], dkv_incoming[1]


# ------------------------------------------------------------- all simulated ranks at once
@functools.lru_cache(maxsize=1024)  # a model's layers repeat the same configuration
def _runs(config: RingConfig, step: int, n: int) -> tuple[tuple[slice, slice, tuple], ...]:
    """One simulated step's ranks in runs that compute together: (ranks, their held blocks'
    ranks, tiles) for consecutive ranks holding consecutive ranks' blocks, with equal tiles.
    A causal zigzag step is two runs: the ranks before the block's owner and those after."""
    p, runs = config.world_size, []
    for rank in range(p):
        src = (rank - step) % p
        tiles = ring_tiles(config.layout, rank, src, p, n, config.causal, config.documents)
        if runs and runs[-1][2] == tiles and runs[-1][0].stop == rank and runs[-1][1].stop == src:
            ranks, srcs, _ = runs[-1]
            runs[-1] = (slice(ranks.start, rank + 1), slice(srcs.start, src + 1), tiles)
        else:
            runs.append((slice(rank, rank + 1), slice(src, src + 1), tiles))
    return tuple(run for run in runs if run[2])


def of_ranks(ranks: slice, batch: int, *xs):
    """The rows of ``ranks`` in tensors that stack the ranks' shards in dim 0, ``batch`` each."""
    return [None if x is None else _rows(x, slice(ranks.start * batch, ranks.stop * batch), 0) for x in xs]


def forward_together(q, k, v, *, config: RingConfig, heads: slice):
    """Every rank of a simulated ring at once; q, k, v (P*B, n, H, D) stack the ranks' shards
    (rank r: rows r*B to (r+1)*B). Returns (out, lse) stacked alike.

    The tiles of :func:`forward_rank`, merged in the same order per rank, but each run of
    ranks with equal tiles (:func:`_runs`) takes one kernel call and one merge per step, not
    one per rank: on a GPU each call costs host time that the small tiles of P ranks on one
    device cannot hide. Nothing travels: a rank reads its step's block where its owner holds it.
    """
    p, b, n = config.world_size, q.shape[0] // config.world_size, q.shape[1]
    out, lse = new_accumulators(q)
    for step in range(p):
        for ranks, srcs, tiles in _runs(config, step, n):
            _attend(tiles, *of_ranks(ranks, b, q), *of_ranks(srcs, b, k, v), *of_ranks(ranks, b, out, lse),
                    config.scale)
    return out, lse


def backward_together(dout, q, k, v, out, lse, dlse, *, config: RingConfig, heads: slice):
    """The backward of :func:`forward_together` (tensors stacked as there): the gradients of
    :func:`backward_rank`, added in the same order per accumulator. Returns (dq, dk, dv) in
    the accumulation dtype."""
    p, b, n = config.world_size, q.shape[0] // config.world_size, q.shape[1]
    acc = accum_dtype(q.dtype)
    dq, dk, dv = (torch.zeros(x.shape, dtype=acc, device=x.device) for x in (q, k, v))
    for step in range(p):
        for ranks, srcs, tiles in _runs(config, step, n):
            rdout, rq, rout, rlse, rdlse, rdq = of_ranks(ranks, b, dout, q, out, lse, dlse, dq)
            _attend_backward(tiles, rdout, rq, *of_ranks(srcs, b, k, v), rout, rlse, rdlse, rdq,
                             *of_ranks(srcs, b, dk, dv), config.scale)
    return dq, dk, dv


def ring_attention(q, k, v, *, group=None, ring_size: int | None = None, causal: bool = False,
                   layout: str = "contiguous", scale: float | None = None,
                   return_lse: bool = False, cu_seqlens=None):
    """Exact softmax attention with the sequence split over a ring of ranks.

    Distributed: ``group`` is a torch.distributed ProcessGroup and q, k, v (B, N/P, H, D) are
    this rank's shards in ``layout`` order (see :func:`ringlab.shard`); the result is this
    rank's shard of the output. Simulated: ``ring_size=P`` and q, k, v (B, N, H, D) are the
    whole sequence; one process runs what P ranks would, step by step.

    Args:
        causal: key k visible to query q only if k <= q (global positions).
        layout: a name in ringlab.engine.layout.LAYOUTS: "contiguous", "zigzag" or "striped" (the
            last two balance causal work), or one you registered.
        scale: default 1/sqrt(D).
        return_lse: also return lse (B, H, S) for the same rows as out.
        cu_seqlens: packed documents (batch 1): boundaries 0 = c_0 < ... < c_D = N of the
            *whole* sequence, the same on every rank whatever the layout. Documents attend only
            within themselves; a step whose query and key rows share no document is skipped.
            "doc_zigzag" balances causal work by cutting every document into 2P chunks.

    Equals ``ringlab.attention`` on the whole sequence, outputs and gradients.
    """
    config = ring_config(q, k, v, group=group, ring_size=ring_size, causal=causal, layout=layout, scale=scale,
                         cu_seqlens=cu_seqlens)
    out, lse = run_ring(config, q, k, v, group=group, ring_size=ring_size)
    return (out, lse) if return_lse else out
