"""LongNet dilated attention on one device, with the exact LSE merge of branches (docs/design.md §3).

Each :class:`ringlab.engine.dilation.Block` gathers the selected rows of equal-length segments for
the heads of one offset group, folds the segments into the batch dimension, runs one block
kernel and merges the result into the running (out, lse) of those rows. The backward reruns
the same blocks with the global out and lse, which is the exact gradient of the merged
softmax, branch weights included.

The block functions here also serve the ring-dilated engine for the rows a rank holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .autograd import exact_attention
from .checks import (
    HEAD_OFFSETS,
    check_branches,
    check_causal,
    check_choice,
    check_cu_seqlens,
    check_qkv,
    resolve_scale,
)
from .dilation import Rows, copies_to_fuse, document_blocks, min_call_rows
from .kernels import accum_dtype, block_attention, block_attention_backward
from .merge import merge, new_accumulators


def rows_view(x: torch.Tensor, rows: Rows, heads: slice, groups: int = 1, head_step: int = 0) -> torch.Tensor:
    """Strided view of x (B, S, H, D) at ``rows`` and ``heads``, for ``groups`` fused offset
    groups (group g: rows shifted by g, heads by g * head_step): (B, G, nseg, count, H_g, D)."""
    h = range(x.shape[2])[heads]
    s0, s1, s2, s3 = x.stride()
    return x.as_strided((x.shape[0], groups, rows.nseg, rows.count, len(h), x.shape[3]),
                        (s0, s1 + head_step * s2, rows.seg_stride * s1, rows.stride * s1, h.step * s2, s3),
                        x.storage_offset() + rows.start * s1 + h.start * s2)


def lse_view(lse: torch.Tensor, rows: Rows, heads: slice, groups: int = 1, head_step: int = 0) -> torch.Tensor:
    """Strided view of lse (B, H, S) matching :func:`rows_view`: (B, G, nseg, H_g, count)."""
    h = range(lse.shape[1])[heads]
    s0, s1, s2 = lse.stride()
    return lse.as_strided((lse.shape[0], groups, rows.nseg, len(h), rows.count),
                          (s0, s2 + head_step * s1, rows.seg_stride * s2, h.step * s1, rows.stride * s2),
                          lse.storage_offset() + rows.start * s2 + h.start * s1)


def _batch(x):
    """Fold (B, G, nseg) into the kernel's batch: a view when strides allow, else a copy."""
    return x.flatten(0, 2)


def attend(q, k, v, out, lse, *, causal: bool, scale: float, first: bool = False) -> None:
    """One block on views q (B, G, nseg, cq, Hg, D), k, v (B, G, nseg, ck, Hg, D); the result
    merges into the accumulator views out (like q) and lse (B, G, nseg, Hg, cq). ``first``:
    no block reached these rows before, so the result is written, not merged."""
    o, l = block_attention(_batch(q), _batch(k), _batch(v), causal=causal, scale=scale)
    if first:
        out.copy_(o.view(out.shape))
        lse.copy_(l.view(lse.shape))
    else:
        merge(out, lse, o.view(out.shape), l.view(lse.shape))


def attend_backward(dout, q, k, v, out, lse, dlse, dq, dk, dv, *, causal: bool, scale: float,
                    first: bool = False) -> None:
    """Gradients of one block (views as in :func:`attend`), added in place to the views dq, dk, dv
    (written, if ``first``)."""
    grads = block_attention_backward(
        _batch(dout), _batch(q), _batch(k), _batch(v), _batch(out), _batch(lse), causal=causal, scale=scale,
        dlse=None if dlse is None else _batch(dlse))
    for acc, g in zip((dq, dk, dv), grads):
        if first:
            acc.copy_(g.view(acc.shape))
        else:
            acc += g.view(acc.shape)


def writes_first(blocks, rates) -> bool:
    """Whether the first branch's blocks reach every row and head once, before any other block:
    a rate-1 branch whose blocks are all diagonal (each run against itself; runs are disjoint).
    Then those blocks write the accumulators, which need no initial values."""
    return rates[0] == 1 and all(blk.q == blk.k for blk in blocks if blk.branch == 0)


def blocks_forward(q, k, v, blocks, out, lse, *, scale: float, first: bool = False) -> None:
    """Run blocks among the rows of q, k, v and merge them into the accumulators out, lse.
    ``first``: the first branch's blocks write them (:func:`writes_first`)."""
    for blk in blocks:
        g, kv = (blk.heads, blk.groups, blk.head_step), (blk.kv_heads, blk.groups, blk.kv_step)
        attend(rows_view(q, blk.q, *g), rows_view(k, blk.k, *kv), rows_view(v, blk.k, *kv),
               rows_view(out, blk.q, *g), lse_view(lse, blk.q, *g), causal=blk.causal, scale=scale,
               first=first and blk.branch == 0)


def blocks_backward(dout, q, k, v, out, lse, dlse, blocks, dq, dk, dv, *, scale: float, first: bool = False) -> None:
    """Accumulate the gradients of the blocks into dq, dk, dv (float32 or float64); ``first``:
    as in :func:`blocks_forward`."""
    for blk in blocks:
        g, kv, qr, kr = (blk.heads, blk.groups, blk.head_step), (blk.kv_heads, blk.groups, blk.kv_step), blk.q, blk.k
        attend_backward(rows_view(dout, qr, *g), rows_view(q, qr, *g), rows_view(k, kr, *kv),
                        rows_view(v, kr, *kv), rows_view(out, qr, *g), lse_view(lse, qr, *g),
                        None if dlse is None else lse_view(dlse, qr, *g),
                        rows_view(dq, qr, *g), rows_view(dk, kr, *kv), rows_view(dv, kr, *kv),
                        causal=blk.causal, scale=scale, first=first and blk.branch == 0)


def new_grads(q, k, v, into=None, *, reset: bool = True):
    """Zero gradient accumulators for q, k, v in the accumulation dtype (``into``, if given).
    ``reset`` False: left as they are, for a caller whose first blocks write every row."""
    if into is not None:
        return tuple(g.zero_() if reset else g for g in into)
    acc = accum_dtype(q.dtype)
    make = torch.zeros if reset else torch.empty
    return tuple(make(x.shape, dtype=acc, device=x.device) for x in (q, k, v))


@dataclass(frozen=True)
class _Dilated:
    num_heads: int
    segments: tuple
    rates: tuple
    head_offsets: str
    causal: bool
    scale: float
    documents: tuple[int, ...] = ()  # packed documents (cu_seqlens); () for one sequence

    def blocks(self, q, k, heads: slice):
        return document_blocks(((0, q.shape[1]),), self.documents, self.num_heads, self.segments, self.rates,
                               self.head_offsets, self.causal, (heads.start, heads.stop), q.shape[2] // k.shape[2],
                               min_call_rows(q.device.type, q.shape[0], q.shape[2], q.shape[3]),
                               copies_to_fuse(q.device.type))

    def forward(self, q, k, v, heads, into):
        blocks = self.blocks(q, k, heads)
        first = writes_first(blocks, self.rates)
        out, lse = new_accumulators(q, into, reset=not first)
        blocks_forward(q, k, v, blocks, out, lse, scale=self.scale, first=first)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, dlse, heads, into):
        blocks = self.blocks(q, k, heads)
        first = writes_first(blocks, self.rates)
        dq, dk, dv = new_grads(q, k, v, into, reset=not first)
        blocks_backward(dout, q, k, v, out, lse, dlse, blocks, dq, dk, dv, scale=self.scale, first=first)
        return dq, dk, dv


def check_dilated_args(q, k, v, segment_lengths, dilation_rates, causal, scale, head_offsets):
    """Shared argument checks of the dilated functions; returns (segments, rates, scale)."""
    check_qkv(q, k, v, same_length=True)
    check_causal(causal)
    segs, rates = check_branches(segment_lengths, dilation_rates)
    check_choice("head_offsets", head_offsets, HEAD_OFFSETS)
    return segs, rates, resolve_scale(scale, q.shape[-1])


def dilated_attention(q, k, v, segment_lengths, dilation_rates, *, causal: bool = False,
                      scale: float | None = None, head_offsets: str = "interleaved",
                      return_lse: bool = False, cu_seqlens=None):
    """LongNet dilated attention of q, k, v (B, N, H, D), branches merged exactly.

    Args:
        segment_lengths, dilation_rates: one (w_i, r_i) per branch. Any N works: a ragged last
            segment is a shorter segment and w_i > N means the whole sequence.
        causal: key k is visible to query q only if k <= q (within the segment).
        head_offsets: "interleaved" (head h reads offset h % r) or "grouped"
            (h // ceil(H / r)).
        cu_seqlens: packed documents (see :func:`ringlab.attention`; batch 1). Each document
            is its own LongNet sequence: its segments start at its first position and its last
            segment may be ragged.

    Returns:
        out (B, N, H, D), or (out, lse) with lse (B, H, N). Equals softmax attention with the
        additive bias log m_h(q, k) of :func:`ringlab.engine.dilation.multiplicity`.
    """
    segs, rates, scale = check_dilated_args(q, k, v, segment_lengths, dilation_rates, causal,
                                            scale, head_offsets)
    docs = () if cu_seqlens is None else check_cu_seqlens(cu_seqlens, q.shape[1], q.shape[0])
    out, lse = exact_attention(q, k, v, _Dilated(q.shape[2], segs, rates, head_offsets, causal, scale, docs),
                               ("dilated", dict(segments=segs, rates=rates, head_offsets=head_offsets,
                                                causal=causal, kv_heads=k.shape[2])))
    return (out, lse) if return_lse else out
