"""Ulysses (head-parallel) attention and its 2-D hybrid with the ring (docs/design.md §12).

A U x R mesh: mesh rank m = r * U + u is rank u of its Ulysses group and rank r of its ring
group (so a Ulysses group is U consecutive ranks: one node, over NVLink). The sequence is
sharded over the R ring ranks by ``layout`` (zigzag and striped keep the causal balance), and
each ring shard is cut contiguously into U pieces: mesh rank m holds piece u of ring shard r,
all heads (:func:`ringlab.shard_mesh`).

Each rank, for each chunk of heads the autograd glue runs:
  1. all-to-all over its Ulysses group, sequence for heads: head group j of its tokens goes
     to Ulysses rank j, and the pieces it receives, joined in rank order, are its whole ring
     shard r for head group u: (B, N/R, H/U, D). K/V heads split the same way, so the query
     heads of group j read the K/V heads of group j (grouped-query attention needs U | H_kv).
  2. the ring over its ring group on those heads: ring attention, or ring-dilated. With R = 1
     there is no ring: a rank holds every segment whole, and dilation is local.
  3. all-to-all back, heads for sequence: out (cast to the input dtype first, as the autograd
     glue would) and lse.
The backward does the same around the ring's backward: dout, q, k, v, out, lse (and dlse)
go to heads, dq, dk, dv come back. The glue saves only the call's own shards, so the backward
moves q, k, v, out and lse again rather than keep a second, head-sharded copy of them.

Packed documents (``cu_seqlens``) are the ring dimension's business: the all-to-all moves
whole tokens, and a ring rank holds its whole ring shard, so the ring cuts its steps by
document as it does alone; only the placement (:func:`shard_mesh`) reads them.

What overlaps: the all-to-alls of one phase are posted together (k/v first), so their
transfers overlap each other; none overlaps attention, which needs every token of its heads
before it starts. The ring hops hide behind the block compute as in the ring.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import trace
from .autograd import exact_attention
from .checks import check_group, check_int, check_qkv
from .comm import Mailbox, P2PComm, RingAlgorithm, RingComm, SimComm, check_group_agrees, run_lockstep, run_rank
from .config import RingConfig, rank_functions, ring_config
from .layout import get, shard, unshard


@dataclass(frozen=True)
class MeshConfig:
    """A Ulysses or hybrid call: ``ring``, the call over the ring dimension (the whole
    sequence, R ranks, all the call's heads), run by each of the ``ulysses_size`` head groups."""
    ring: RingConfig
    ulysses_size: int

    @property
    def ring_size(self) -> int:
        return self.ring.world_size

    def model(self) -> tuple[str, dict]:
        """Memory-model mode for an out-of-memory error: after the all-to-all a rank runs the
        ring on H/U heads (the all-to-all buffers are not counted)."""
        mode, fields = self.ring.model(simulated=False)
        u, r = self.ulysses_size, self.ring_size
        return mode, fields | dict(heads=self.ring.heads // u, kv_heads=self.ring.kv_heads // u,
                                   call=f"a {u} x {r} Ulysses x ring mesh (estimate: its {mode} on "
                                        f"{self.ring.heads // u} heads, all-to-all buffers not counted)")

    def agreement(self, q, k) -> tuple[list[int], list[str], dict]:
        meta, names, show = self.ring.agreement(q, k)
        return meta + [self.ulysses_size, self.ring_size], names + ["ulysses_size", "ring_size"], show


def mesh_config(q, k, v, *, ulysses_group, ring_group, ulysses_size, ring_size, causal, layout, scale,
                cu_seqlens=None, **dilation) -> MeshConfig:
    """Check a Ulysses or hybrid call's arguments (no communication) and return its configuration.
    ``cu_seqlens``: packed documents of the whole sequence, checked by the ring's config (the
    ring dimension runs them). ``dilation``: segment_lengths, dilation_rates, head_offsets for
    the dilated mode."""
    distributed = ulysses_group is not None or ring_group is not None
    if distributed and (ulysses_size is not None or ring_size is not None):
        raise ValueError("pass process groups (ulysses_group=, ring_group=: q, k, v are this rank's shards) or "
                         "sizes (ulysses_size=, ring_size=: simulate the mesh on this device), not both")
    if distributed:
        check_group("ulysses_group", ulysses_group)
        check_group("ring_group", ring_group)
        u = 1 if ulysses_group is None else dist.get_world_size(ulysses_group)
        r = 1 if ring_group is None else dist.get_world_size(ring_group)
    else:
        if ulysses_size is None:
            raise ValueError("pass ulysses_group= (a torch.distributed ProcessGroup; q, k, v are this rank's "
                             "shards) or ulysses_size= (simulate that many Ulysses ranks on this device)")
        u, r = ulysses_size, 1 if ring_size is None else ring_size
        check_int("ulysses_size", u)
        check_int("ring_size", r)
    check_qkv(q, k, v, same_length=True)  # before q's length is read
    ring = ring_config(q, k, v, group=None, ring_size=r, causal=causal, layout=layout, scale=scale,
                       cu_seqlens=cu_seqlens, seq_len=q.shape[1] * (u * r if distributed else 1), **dilation)
    if ring.heads % u or ring.kv_heads % u:
        raise ValueError(
            f"the Ulysses size {u} must divide the query heads ({ring.heads}) and the K/V heads "
            f"({ring.kv_heads}): each Ulysses rank computes whole heads, and the query heads it holds must "
            "read K/V heads it holds. Use a Ulysses size that divides both, and put the other ranks in the ring")
    if not distributed and (ring.seq_len // r) % u:
        raise ValueError(f"a ring shard of {ring.seq_len // r} tokens (sequence {ring.seq_len} over ring size {r}) "
                         f"does not split over ulysses_size {u}: pad the sequence to a multiple of "
                         f"{get(layout).unit * r * u}")
    return MeshConfig(ring, u)


@dataclass(frozen=True)
class Mesh:
    """One rank's communicators: its Ulysses group and its ring group."""
    ulysses: RingComm
    ring: RingComm

    @property
    def rank(self) -> int:
        return self.ring.rank * self.ulysses.world_size + self.ulysses.rank


def _head_group(heads: slice, comm: RingComm) -> slice:
    """The call's heads this Ulysses rank holds after the all-to-all of the chunk ``heads``."""
    size = (heads.stop - heads.start) // comm.world_size
    start = heads.start + comm.rank * size
    return slice(start, start + size)


def _to_heads(comm: RingComm, named) -> list:
    """Post the sequence-for-heads all-to-alls of [(name, tensor, heads dim, sequence dim)]."""
    return [comm.all_to_all(x, h, s, step=0, label=f"a2a/{name}", tag=i) for i, (name, x, h, s) in enumerate(named)]


def forward_rank(mesh: Mesh, q, k, v, *, config: MeshConfig, heads: slice):
    """One mesh rank's forward (a generator; see ringlab.engine.comm): (out, lse) of its shard."""
    u, forward, dtype = mesh.ulysses, rank_functions(config.ring)[0], q.dtype
    kv, q = _to_heads(u, [("kv", torch.stack([k, v]), 3, 2), ("q", q, 2, 1)])
    kv = yield from kv.wait()
    q = yield from q.wait()
    out, lse = yield from forward(mesh.ring, q, kv[0], kv[1], heads=_head_group(heads, u))
    del q, kv  # the way back needs only out and lse
    out = u.all_to_all(out.to(dtype), 1, 2, step=1, label="a2a/out", tag=0)
    lse = u.all_to_all(lse, 2, 1, step=1, label="a2a/lse", tag=1)
    out = yield from out.wait()
    lse = yield from lse.wait()
    return out, lse


def backward_rank(mesh: Mesh, dout, q, k, v, out, lse, dlse, *, config: MeshConfig, heads: slice):
    """One mesh rank's backward (a generator): (dq, dk, dv) of its shard."""
    u, backward, dtype = mesh.ulysses, rank_functions(config.ring)[1], q.dtype
    named = [("kv", torch.stack([k, v]), 3, 2), ("q", q, 2, 1), ("dout", dout, 2, 1), ("out", out, 2, 1),
             ("lse", lse, 1, 2)] + ([] if dlse is None else [("dlse", dlse, 1, 2)])
    posted = _to_heads(u, named)
    got = []
    while posted:
        got.append((yield from posted.pop(0).wait()))
    kv, q, dout, out, lse, dlse = *got[:5], (got[5] if dlse is not None else None)
    del got
    dq, dk, dv = yield from backward(mesh.ring, dout, q, kv[0], kv[1], out, lse, dlse, heads=_head_group(heads, u))
    del kv, q, dout, out, lse, dlse  # the way back needs only the gradients
    dkv = u.all_to_all(torch.stack([dk, dv]).to(dtype), 2, 3, step=1, label="a2a/dkv", tag=0)
    del dk, dv
    dq = u.all_to_all(dq.to(dtype), 1, 2, step=1, label="a2a/dq", tag=1)
    dkv = yield from dkv.wait()
    dq = yield from dq.wait()
    return dq, dkv[0], dkv[1]


def shard_mesh(x: torch.Tensor, rank: int, ulysses_size: int, ring_size: int, layout: str = "contiguous",
               dim: int = 1, *, cu_seqlens=None) -> torch.Tensor:
    """Mesh rank ``rank``'s shard of x along ``dim``: piece u of U of its ring shard r, where
    rank = r * ulysses_size + u and the ring shards follow ``layout`` over ring_size ranks.
    ``cu_seqlens``: the packed documents of the whole sequence, for a layout that splits each
    document ("doc_zigzag"; see :func:`ringlab.shard`)."""
    check_int("ulysses_size", ulysses_size)
    r, u = divmod(rank, ulysses_size)
    ring_shard = shard(x, r, ring_size, layout, dim, cu_seqlens=cu_seqlens)
    if ring_shard.shape[dim] % ulysses_size:
        raise ValueError(f"a ring shard of {ring_shard.shape[dim]} along dim {dim} does not split over "
                         f"ulysses_size {ulysses_size}")
    return ring_shard.chunk(ulysses_size, dim)[u]


def unshard_mesh(shards, ulysses_size: int, layout: str = "contiguous", dim: int = 1, *,
                 cu_seqlens=None) -> torch.Tensor:
    """The whole tensor from every mesh rank's shard, in mesh rank order (inverse of shard_mesh,
    with the same ``cu_seqlens``)."""
    shards = list(shards)
    check_int("ulysses_size", ulysses_size)
    if not shards or len(shards) % ulysses_size:
        raise ValueError(f"unshard_mesh needs one shard per mesh rank, a multiple of ulysses_size "
                         f"{ulysses_size}; got {len(shards)}")
    ring_shards = [torch.cat(shards[i:i + ulysses_size], dim) for i in range(0, len(shards), ulysses_size)]
    return unshard(ring_shards, layout, dim, cu_seqlens=cu_seqlens)


@dataclass(frozen=True, eq=False)
class MeshAlgorithm(RingAlgorithm):
    """Per-rank generators on a U x R mesh. Real (``distributed``): q, k, v are this rank's
    shards and ``ulysses_group`` / ``group`` its groups (None for a dimension of size 1).
    Simulated: whole sequences, sharded by :func:`shard_mesh` for each of the U * R ranks (with
    the packed ``documents``, for a layout that splits each one)."""
    ulysses_group: object = None
    ulysses_size: int = 1
    distributed: bool = False

    def _run(self, rank_fn, tensors, dims, out_dims):
        if self.distributed:
            mesh = Mesh(_group_comm(self.ulysses_group), _group_comm(self.group))
            return run_rank(trace.tagged(rank_fn(mesh, *tensors), mesh_rank=mesh.rank))
        u, r, layout = self.ulysses_size, self.ring_size, self.layout
        docs = torch.tensor(self.documents) if self.documents else None
        box = Mailbox()
        gens = []
        for m in range(u * r):
            ring_rank, ulysses_rank = divmod(m, u)
            mesh = Mesh(SimComm(ulysses_rank, u, box, tuple(range(ring_rank * u, ring_rank * u + u))),
                        SimComm(ring_rank, r, box, tuple(range(ulysses_rank, u * r, u))))
            local = [None if t is None else shard_mesh(t, m, u, r, layout, d, cu_seqlens=docs)
                     for t, d in zip(tensors, dims)]
            gens.append(trace.tagged(rank_fn(mesh, *local), mesh_rank=m))
        results = run_lockstep(gens, box)
        return tuple(unshard_mesh([res[i] for res in results], u, layout, d, cu_seqlens=docs)
                     for i, d in enumerate(out_dims))


def _group_comm(group) -> RingComm:
    """The communicator of one mesh dimension; a dimension of size 1 has no group."""
    return SimComm(0, 1, Mailbox()) if group is None else P2PComm(group)


def run_mesh(config: MeshConfig, q, k, v, *, ulysses_group, ring_group):
    """(out, lse) of the mesh call ``config``; ranks of each group first check that they agree."""
    distributed = ulysses_group is not None or ring_group is not None
    for group in (ulysses_group, ring_group):
        if group is not None:
            check_group_agrees(group, q.device, *config.agreement(q, k))
    algorithm = MeshAlgorithm(functools.partial(forward_rank, config=config),
                              functools.partial(backward_rank, config=config), ring_group, config.ring_size,
                              config.ring.layout, config.ring.documents, ulysses_group=ulysses_group,
                              ulysses_size=config.ulysses_size, distributed=distributed)
    return exact_attention(q, k, v, algorithm, config.model(), kv_unit=config.ulysses_size)


def ulysses_attention(q, k, v, *, ulysses_group=None, ring_group=None, ulysses_size: int | None = None,
                      ring_size: int | None = None, causal: bool = False, layout: str = "contiguous",
                      scale: float | None = None, return_lse: bool = False, cu_seqlens=None):
    """Exact softmax attention with heads split over a Ulysses group and, optionally, the
    sequence over a ring: Ulysses (R = 1), the ring (U = 1) or their 2-D hybrid.

    Distributed: ``ulysses_group`` (and ``ring_group`` for a hybrid; see
    :func:`ringlab.mesh_groups`) are torch.distributed ProcessGroups, and q, k, v
    (B, N/(U R), H, D) are this rank's shards (:func:`ringlab.shard_mesh`); the result is this
    rank's shard of the output. Simulated: ``ulysses_size=U`` and ``ring_size=R`` (default 1),
    q, k, v (B, N, H, D) the whole sequence; one process runs what the U R ranks would.

    U must divide H and H_kv. ``causal``, ``layout`` (over the ring dimension), ``scale`` and
    ``return_lse`` are those of :func:`ringlab.ring_attention`, and so are the results.
    ``cu_seqlens``: packed documents (batch 1), the boundaries of the *whole* sequence as in
    :func:`ringlab.ring_attention`, the same on every rank. After the all-to-all a ring rank
    holds its whole ring shard, so the ring skips and cuts steps by document as it does alone;
    "doc_zigzag" cuts every document into 2R chunks (shard with ``shard_mesh(...,
    cu_seqlens=)``).
    """
    config = mesh_config(q, k, v, ulysses_group=ulysses_group, ring_group=ring_group, ulysses_size=ulysses_size,
                         ring_size=ring_size, causal=causal, layout=layout, scale=scale, cu_seqlens=cu_seqlens)
    out, lse = run_mesh(config, q, k, v, ulysses_group=ulysses_group, ring_group=ring_group)
    return (out, lse) if return_lse else out


def ulysses_dilated_attention(q, k, v, segment_lengths, dilation_rates, *, ulysses_group=None, ring_group=None,
                              ulysses_size: int | None = None, ring_size: int | None = None, causal: bool = False,
                              layout: str = "contiguous", scale: float | None = None,
                              head_offsets: str = "interleaved", return_lse: bool = False, cu_seqlens=None):
    """LongNet dilated attention on a U x R mesh: :func:`ringlab.dilated_attention`'s semantics
    with :func:`ulysses_attention`'s calling convention. After the all-to-all a rank holds its
    ring shard for H/U heads, each at its global head index (dilation offsets follow it), so
    with R = 1 every segment is whole on a rank and nothing but the all-to-alls moves.
    ``layout``: one whose ranks hold whole chunks ("contiguous", "zigzag", "doc_zigzag").
    ``cu_seqlens``: packed documents as in :func:`ulysses_attention`; each document is its own
    LongNet sequence."""
    config = mesh_config(q, k, v, ulysses_group=ulysses_group, ring_group=ring_group, ulysses_size=ulysses_size,
                         ring_size=ring_size, causal=causal, layout=layout, scale=scale, cu_seqlens=cu_seqlens,
                         segment_lengths=segment_lengths, dilation_rates=dilation_rates, head_offsets=head_offsets)
    out, lse = run_mesh(config, q, k, v, ulysses_group=ulysses_group, ring_group=ring_group)
    return (out, lse) if return_lse else out


def mesh_groups(ulysses_size: int, ring_size: int):
    """(ulysses_group, ring_group) of this rank in a U x R mesh over the default group, whose
    world size must be U * R: Ulysses groups are U consecutive ranks (a node), ring groups
    take one rank of each. Every rank must call it (it creates every group). A dimension of
    size 1 gives None."""
    check_int("ulysses_size", ulysses_size)
    check_int("ring_size", ring_size)
    world, me = dist.get_world_size(), dist.get_rank()
    if world != ulysses_size * ring_size:
        raise ValueError(f"world size {world} is not ulysses_size x ring_size = {ulysses_size} x {ring_size}: "
                         "choose sizes whose product is the number of ranks")
    mine = [None, None]
    if ulysses_size > 1:
        for r in range(ring_size):
            g = dist.new_group(list(range(r * ulysses_size, (r + 1) * ulysses_size)))
            if me // ulysses_size == r:
                mine[0] = g
    if ring_size > 1:
        for u in range(ulysses_size):
            g = dist.new_group(list(range(u, world, ulysses_size)))
            if me % ulysses_size == u:
                mine[1] = g
    return tuple(mine)
