"""The one LSE merge: fold a partial attention result into a running one.

Two partial results over disjoint key sets, (o1, l1) and (o2, l2), combine exactly as

    l = logaddexp(l1, l2),   o = exp(l1 - l) * o1 + exp(l2 - l) * o2.

Both weights are <= 1, so nothing overflows, and rows that have seen no key yet (l = -inf) get
weight 0 instead of NaN.
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
    new_lse = torch.logaddexp(lse, block_lse)
    # Where both are -inf, new_lse is -inf too; shifting by 0 there keeps both weights at 0.
    shift = torch.where(new_lse == -math.inf, 0.0, new_lse)
    w_old = torch.exp(lse - shift).transpose(-1, -2).unsqueeze(-1)
    w_block = torch.exp(block_lse - shift).transpose(-1, -2).unsqueeze(-1)
    out.mul_(w_old).addcmul_(block_out, w_block)
    lse.copy_(new_lse)


def new_accumulators(q: torch.Tensor, into=None):
    """Running (out, lse) for the rows of q: zeros and -inf, float32 (float64 for float64).
    ``into`` = (out or None, lse): tensors to reset and use instead of allocating."""
    b, n, h, d = q.shape
    acc = accum_dtype(q.dtype)
    out, lse = into or (None, None)
    return (torch.zeros(b, n, h, d, dtype=acc, device=q.device) if out is None else out.zero_(),
            torch.full((b, h, n), -math.inf, dtype=acc, device=q.device) if lse is None else lse.fill_(-math.inf))
