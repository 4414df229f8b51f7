"""A ring call's configuration: one frozen object, its checks, and the algorithm it builds.

    config = ring_config(q, k, v, group=None, ring_size=4, causal=True, layout="zigzag", scale=None)
    out, lse = run_ring(config, q, k, v, group=None, ring_size=4)

:func:`ringlab.ring_attention` and :func:`ringlab.ring_dilated_attention` check their arguments
into a :class:`RingConfig` and call :func:`run_ring`. The dry run, the memory model and the
planner build the same object from a problem (``Problem.ring_config()``). :func:`rank_functions`
is the one place that turns a configuration into per-rank generators: ring attention, or
ring-dilated when it has segments.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from dataclasses import dataclass

import torch.distributed as dist

from .autograd import exact_attention
from .checks import (DTYPES, HEAD_OFFSETS, check_causal, check_choice, check_cu_seqlens, check_qkv, check_ring,
                     resolve_scale)
from .comm import RingAlgorithm, check_group_agrees
from .dilated import check_dilated_args
from .layout import LAYOUTS, get, with_pieces


@dataclass(frozen=True)
class RingConfig:
    """Everything about one ring call but its tensors.

    ``seq_len`` is the whole sequence (all ranks together). ``kv_heads``: the K/V heads (a
    divisor of ``heads``; 0 means ``heads``). ``segments`` empty: ring attention; otherwise
    ring-dilated attention with one dilation rate per segment (see
    :func:`ringlab.dilated_attention` for ``head_offsets``). ``documents``: the boundaries of
    packed documents in the whole sequence (cu_seqlens as a tuple); () for one sequence.
    """
    seq_len: int
    world_size: int
    heads: int
    scale: float
    causal: bool = False
    layout: str = "contiguous"
    segments: tuple[int, ...] = ()
    rates: tuple[int, ...] = ()
    head_offsets: str = "interleaved"
    kv_heads: int = 0
    documents: tuple[int, ...] = ()

    def __post_init__(self):
        if not self.kv_heads:
            object.__setattr__(self, "kv_heads", self.heads)

    @property
    def dilated(self) -> bool:
        return bool(self.segments)

    @property
    def kv_group(self) -> int:
        """Query heads per K/V head."""
        return self.heads // self.kv_heads

    def model(self, simulated: bool) -> tuple[str, dict]:
        """(memory-model mode, problem fields beyond the shapes): explains an out-of-memory error."""
        fields = dict(seq_len=self.seq_len, world_size=self.world_size, causal=self.causal, layout=self.layout,
                      kv_heads=self.kv_heads)
        if self.dilated:
            return "ring_dilated", fields | dict(segments=self.segments, rates=self.rates,
                                                 head_offsets=self.head_offsets)
        return ("simulated_ring" if simulated else "ring"), fields

    def agreement(self, q, k) -> tuple[list[int], list[str], dict]:
        """What every rank of a group must pass alike, for ringlab.engine.comm.check_group_agrees:
        ints, their names, and how to show each one. The branch count comes before the
        per-branch values, so ranks with different counts disagree on it first."""
        layouts = tuple(LAYOUTS)
        meta = [*q.shape, k.shape[2], DTYPES.index(q.dtype), int(self.causal), layouts.index(self.layout),
                struct.unpack("<q", struct.pack("<d", self.scale))[0]]
        # Documents: their count and a 63-bit digest of the boundaries (equal on every rank).
        digest = hashlib.blake2b(struct.pack(f"<{len(self.documents)}q", *self.documents), digest_size=8).digest()
        meta += [max(len(self.documents) - 1, 0), int.from_bytes(digest, "little") >> 1]
        names = ["batch", "seq (shard length)", "heads", "head_dim", "kv_heads", "dtype", "causal", "layout", "scale",
                 "documents (cu_seqlens)", "cu_seqlens digest"]
        show = dict(dtype=lambda i: str(DTYPES[i]).removeprefix("torch."), causal=bool, layout=layouts.__getitem__,
                    scale=lambda b: struct.unpack("<d", struct.pack("<q", b))[0])
        if self.dilated:
            meta += [len(self.segments), HEAD_OFFSETS.index(self.head_offsets), *self.segments, *self.rates]
            names += (["branches", "head_offsets"] + [f"segment_lengths[{i}]" for i in range(len(self.segments))]
                      + [f"dilation_rates[{i}]" for i in range(len(self.rates))])
            show["head_offsets"] = HEAD_OFFSETS.__getitem__
        return meta, names, show


_RING = object()  # segment_lengths and dilation_rates left out: ring attention, not ring-dilated


def ring_config(q, k, v, *, group, ring_size, causal, layout, scale, segment_lengths=_RING,
                dilation_rates=_RING, head_offsets="interleaved", cu_seqlens=None,
                seq_len: int | None = None) -> RingConfig:
    """Check a ring call's arguments (no communication yet) and return its configuration.
    ``segment_lengths`` and ``dilation_rates`` left out: ring attention; otherwise ring-dilated
    (where None is an error, not the plain ring). ``cu_seqlens``: packed
    documents of the whole sequence. ``seq_len``: the whole sequence when q is not (a
    hybrid's Ulysses rank holds part of a ring shard)."""
    dilated = segment_lengths is not _RING or dilation_rates is not _RING
    if dilated:
        segs, rates, scale = check_dilated_args(q, k, v, segment_lengths, dilation_rates, causal, scale,
                                                head_offsets)
    else:
        check_qkv(q, k, v, same_length=True)
        check_causal(causal)
        segs = rates = ()
    lay = get(layout)
    check_ring(group, ring_size)
    if group is None and ring_size is None:
        raise ValueError("pass group= (a torch.distributed ProcessGroup; q, k, v are this rank's "
                         "shards) or ring_size= (simulate that many ranks on this device)")
    p = ring_size if group is None else dist.get_world_size(group)
    if seq_len is None:
        seq_len = q.shape[1] * (1 if group is None else p)
    docs = () if cu_seqlens is None else check_cu_seqlens(cu_seqlens, seq_len, q.shape[0])
    lay.check_split(seq_len, p, **({} if group is None else dict(what="sequence length (shard length x ranks)")),
                    documents=docs)
    if dilated:
        check_choice("layout", layout, with_pieces())
    else:
        scale = resolve_scale(scale, q.shape[-1])
    return RingConfig(seq_len, p, q.shape[2], scale, causal, layout, segs, rates, head_offsets, k.shape[2], docs)


def rank_functions(config: RingConfig):
    """(forward_rank, backward_rank): the per-rank generators of ``config`` (see ringlab.engine.comm)."""
    from . import ring, ring_dilated  # both import this module for RingConfig

    algo = ring_dilated if config.dilated else ring
    return (functools.partial(algo.forward_rank, config=config),
            functools.partial(algo.backward_rank, config=config))


def together_functions(config: RingConfig):
    """(forward, backward) of every simulated rank at once (see RingAlgorithm)."""
    from . import ring, ring_dilated

    algo = ring_dilated if config.dilated else ring
    return (functools.partial(algo.forward_together, config=config),
            functools.partial(algo.backward_together, config=config))


def run_ring(config: RingConfig, q, k, v, *, group, ring_size):
    """(out, lse) of the ring call ``config`` on q, k, v: this rank's shards with ``group``, the
    whole sequence with ``ring_size``. Ranks of a group first check that they agree."""
    if group is not None:
        check_group_agrees(group, q.device, *config.agreement(q, k))
    algorithm = RingAlgorithm(*rank_functions(config), group, ring_size, config.layout, config.documents,
                              together_functions(config))
    return exact_attention(q, k, v, algorithm, config.model(simulated=group is None))
