"""Dense float64 references (docs/design.md §3, §7): the ground truth every test compares against.

They materialise the (B, H, Sq, Sk) score matrix, so keep N small (a few thousand at most).
Both are plain differentiable torch code, so autograd gives the reference gradients.
The dilated mask is built here from the rules of docs/design.md §3, written out again and independently of
:mod:`ringlab.engine.dilation` (which the engine uses), so that one slip cannot hide in both.
"""

from __future__ import annotations

import math

import torch

# docs/design.md §7: max abs error against the float64 dense reference (outputs, gradients).
ABS_TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 5e-5)}
# The same errors relative to the largest reference value: a wrong gradient term is O(1) there,
# however small the atol (a peer's wrong dK/dV hid behind atol 1e-2, docs/design.md §7).
REL_TOL = {torch.float64: 1e-11, torch.float32: 2e-5}
# bf16/fp16 have no fixed absolute limits (see docs/design.md §7). Inputs and results are rounded to 7 (bf16) or 10 (fp16)
# mantissa bits while the kernels accumulate in float32, so 2 units in the last place of the
# largest reference value are allowed. A limit for the tests' inputs, not a bound for all: over
# 300 random cases the worst is 1.6 ulps, as for torch's SDPA (benchmarks/low_precision.py),
# but rare inputs reach 2.3 in torch's own CPU flash kernel too (docs/design.md §7).
LOW_PRECISION_ULPS = 2


def tolerance(dtype: torch.dtype, magnitude: float, *, grad: bool = False) -> float:
    """Largest max-abs error allowed for a ``dtype`` result whose float64 reference has largest
    absolute value ``magnitude`` (taken as at least 1)."""
    scale = max(magnitude, 1.0)
    if dtype in ABS_TOL:
        return min(ABS_TOL[dtype][1 if grad else 0], REL_TOL[dtype] * scale)
    return LOW_PRECISION_ULPS * torch.finfo(dtype).eps * scale


def dense_attention(q, k, v, *, causal: bool = False, scale: float | None = None,
                    bias: torch.Tensor | None = None):
    """softmax(scale * q k^T + bias) v in float64. Returns (out (B,Sq,H,D), lse (B,H,Sq)).

    ``bias`` broadcasts to (B, H, Sq, Sk); -inf entries hide a key. A row that sees no key
    gets out 0 and lse -inf.
    """
    q, k, v = (x.to(torch.float64) for x in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        sq, sk = q.shape[1], k.shape[1]
        hidden = torch.arange(sk)[None, :] > torch.arange(sq)[:, None]
        s = s.masked_fill(hidden, -math.inf)
    if bias is not None:
        s = s + bias.to(torch.float64)
    empty = (s == -math.inf).all(-1)
    # logsumexp of an all -inf row has a NaN gradient; give such rows a harmless stand-in.
    lse = torch.logsumexp(s.masked_fill(empty[..., None], 0.0), dim=-1)
    p = torch.exp(s - lse.masked_fill(empty, 0.0)[..., None])
    out = torch.einsum("bhqk,bkhd->bqhd", p, v)
    return out, lse.masked_fill(empty, -math.inf)


def spec_offset(head: int, num_heads: int, rate: int, head_offsets: str) -> int:
    """docs/design.md §3: offset h % r (interleaved), or h // ceil(H / r) (grouped)."""
    if head_offsets == "interleaved":
        return head % rate
    if head_offsets == "grouped":
        return head // -(-num_heads // rate)
    raise ValueError(f"head_offsets must be 'interleaved' or 'grouped', got {head_offsets!r}")


def branch_mask(seq_len: int, num_heads: int, segment: int, rate: int, *, head_offsets: str = "interleaved",
                causal: bool = False) -> torch.Tensor:
    """(H, N, N) bool: query q and key k interact in the branch (segment, rate) for head h.

    The rules of docs/design.md §3, literally: same w-segment, both selected by (p - (p // w) * w) % r == o, and
    k <= q when causal.
    """
    pos = torch.arange(seq_len)
    segment_of = pos // segment
    selected = torch.stack([(pos - segment_of * segment) % rate == spec_offset(h, num_heads, rate, head_offsets)
                            for h in range(num_heads)])  # (H, N)
    same = segment_of[:, None] == segment_of[None, :]
    if causal:
        same &= pos[None, :] <= pos[:, None]
    return same & selected[:, :, None] & selected[:, None, :]


def dense_dilated_attention(q, k, v, segment_lengths, dilation_rates, *, causal: bool = False,
                            scale: float | None = None, head_offsets: str = "interleaved"):
    """Dilated attention as dense attention with bias log m_h(q, k) (docs/design.md §3), in float64,
    where m counts the branches whose :func:`branch_mask` holds."""
    n, h = q.shape[1], q.shape[2]
    m = sum(branch_mask(n, h, w, r, head_offsets=head_offsets, causal=causal).double()
            for w, r in zip(segment_lengths, dilation_rates))
    return dense_attention(q, k, v, scale=scale, bias=torch.log(m))
