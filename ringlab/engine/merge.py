"""The one LSE merge: fold a partial attention result into a running one.

Two partial results over disjoint key sets, (o1, l1) and (o2, l2), combine exactly as

    l = logaddexp(l1, l2),   o = exp(l1 - l) * o1 + exp(l2 - l) * o2,

where exp(l2 - l) = sigmoid(l2 - l1) and exp(l1 - l) is one minus it. Both weights are <= 1,
so nothing overflows, and rows that have seen no key yet (l = -inf) get weight 0, not NaN.
"""

from __future__ import annotations

import math

import torch

from .kernels import accum_dtype


def merge(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor,
          block_lse: torch.Tensor) -> None:
    """In place: out (..., S, H, D) and lse (..., H, S) absorb block_out and block_lse.

    ``out`` and ``lse`` are the float32 (or float64) accumulators and may be strided views;
    ``block_out`` may have a narrower dtype. Leading dims (...) are any batch dims.
    """
    # The block's weight exp(block_lse - new_lse) is sigmoid(block_lse - lse), and the old
    # result's is one minus it. Few kernels (on a GPU each launch costs host time that short
    # ring steps cannot hide), and no temporary the size of out. NaN comes only where both
    # are -inf (no key yet), and there the block must weigh 0.
    w = torch.sub(block_lse, lse).sigmoid_().nan_to_num_(0.0)
    torch.logaddexp(lse, block_lse, out=lse)
    w = w.transpose(-1, -2).unsqueeze(-1)
    if block_out.dtype == out.dtype:
        out.lerp_(block_out, w)  # out + w (block_out - out): one kernel
    else:  # lerp takes one dtype, and a cast of the block would be an out-sized temporary
        out.mul_(torch.rsub(w, 1)).addcmul_(block_out, w)  # torch.rsub: no Python-level 1 - w


def new_accumulators(q: torch.Tensor, into=None):
    """Running (out, lse) for the rows of q: zeros and -inf, float32 (float64 for float64).
    ``into`` = (out or None, lse): tensors to reset and use instead of allocating."""
    b, n, h, d = q.shape
    acc = accum_dtype(q.dtype)
    out, lse = into or (None, None)
    return (torch.zeros(b, n, h, d, dtype=acc, device=q.device) if out is None else out.zero_(),
            torch.full((b, h, n), -math.inf, dtype=acc, device=q.device) if lse is None else lse.fill_(-math.inf))
