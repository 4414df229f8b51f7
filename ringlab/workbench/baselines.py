"""What ringlab is compared against, in ringlab's (B, N, H, D) layout. Both take k, v with
fewer heads than q (grouped-query attention: query head h reads K/V head h // (H / H_kv)).

  sdpa                   torch's scaled_dot_product_attention (flash on CPU and GPU when it can)
  materialized_attention softmax(q k^T) v with the (N, N) score matrix in memory: the
                         "standard attention" of the seed document's memory table
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sdpa(q, k, v, *, causal: bool = False, scale: float | None = None):
    """torch SDPA on (B, N, H, D) tensors; returns (B, N, H, D)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=causal, scale=scale, enable_gqa=k.shape[2] != q.shape[2])
    return out.transpose(1, 2)


def materialized_attention(q, k, v, *, causal: bool = False, scale: float | None = None):
    """Attention that builds the (B, H, N, N) scores and probabilities in the input dtype. K/V
    with fewer heads are repeated to H heads first, as Llama's eager attention does."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if k.shape[2] != q.shape[2]:
        k, v = (x.repeat_interleave(q.shape[2] // x.shape[2], dim=2) for x in (k, v))
    s = torch.matmul(q.transpose(1, 2), k.permute(0, 2, 3, 1)) * scale
    if causal:
        n, m = s.shape[-2:]
        s = s.masked_fill(torch.ones(n, m, dtype=torch.bool, device=s.device).triu(1), -math.inf)
    p = torch.softmax(s, dim=-1)
    return torch.matmul(p, v.transpose(1, 2)).transpose(1, 2)
