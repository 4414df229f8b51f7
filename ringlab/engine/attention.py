"""Exact softmax attention on one device (docs/design.md §2), flash-style: the backward recomputes the
scores from the saved lse, so no (Sq, Sk) matrix is kept between forward and backward."""

from __future__ import annotations

from dataclasses import dataclass

from .autograd import exact_attention
from .checks import check_causal, check_qkv, resolve_scale
from .kernels import block_attention, block_attention_backward


@dataclass(frozen=True)
class _Dense:
    causal: bool
    scale: float

    def forward(self, q, k, v, heads, into):
        return block_attention(q, k, v, causal=self.causal, scale=self.scale)

    def backward(self, dout, q, k, v, out, lse, dlse, heads, into):
        return block_attention_backward(dout, q, k, v, out, lse, causal=self.causal,
                                        scale=self.scale, dlse=dlse)


def attention(q, k, v, *, causal: bool = False, scale: float | None = None,
              return_lse: bool = False):
    """Softmax attention of q (B, Sq, H, D) over k, v (B, Sk, H, D).

    Args:
        causal: query i sees keys j <= i (top-left aligned, as torch SDPA).
        scale: score scale, default 1/sqrt(D).
        return_lse: also return the log-sum-exp of the scores, (B, H, Sq), float32
            (float64 for float64 inputs).

    Returns:
        out (B, Sq, H, D) in the input dtype, or (out, lse).
    """
    check_qkv(q, k, v, same_length=False)
    check_causal(causal)
    scale = resolve_scale(scale, q.shape[-1])
    # One kernel call: out, dq, dk, dv come straight from it, with no accumulators to chunk.
    out, lse = exact_attention(q, k, v, _Dense(causal, scale), ("attention", dict(causal=causal, kv_heads=k.shape[2])), chunked=False)
    return (out, lse) if return_lse else out
