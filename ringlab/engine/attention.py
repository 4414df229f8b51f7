"""Exact softmax attention on one device (docs/design.md §2), flash-style: the backward recomputes the
scores from the saved lse, so no (Sq, Sk) matrix is kept between forward and backward."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .autograd import exact_attention
from .checks import check_causal, check_cu_seqlens, check_qkv, resolve_scale
from .dilated import new_grads
from .kernels import (block_attention, block_attention_backward, varlen_applies, varlen_attention,
                      varlen_attention_backward)
from .merge import new_accumulators


@dataclass(frozen=True)
class _Dense:
    causal: bool
    scale: float
    need_lse: bool = True  # False: an inference call that returns no lse (the kernel may skip it)

    def forward(self, q, k, v, heads, into):
        return block_attention(q, k, v, causal=self.causal, scale=self.scale, need_lse=self.need_lse)

    def backward(self, dout, q, k, v, out, lse, dlse, heads, into):
        return block_attention_backward(dout, q, k, v, out, lse, causal=self.causal,
                                        scale=self.scale, dlse=dlse)


@dataclass(frozen=True)
class _Documents:
    """Attention inside each packed document (boundaries ``documents``): one native varlen
    call where the device has one (:func:`ringlab.engine.kernels.varlen_applies`), else one
    block per document; either way the work is the documents' own, with no (N, N) mask."""
    documents: tuple[int, ...]
    causal: bool
    scale: float

    def spans(self):
        return [slice(a, b) for a, b in zip(self.documents, self.documents[1:])]

    def forward(self, q, k, v, heads, into):
        if varlen_applies(q, k, self.causal):
            return varlen_attention(q, k, v, self.documents, causal=self.causal, scale=self.scale)
        out, lse = new_accumulators(q, into)
        for d in self.spans():
            out[:, d], lse[:, :, d] = block_attention(q[:, d], k[:, d], v[:, d], causal=self.causal,
                                                      scale=self.scale)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, dlse, heads, into):
        if varlen_applies(q, k, self.causal):
            return varlen_attention_backward(dout, q, k, v, out, lse, self.documents, causal=self.causal,
                                             scale=self.scale, dlse=dlse)
        grads = new_grads(q, k, v, into)
        for d in self.spans():
            part = block_attention_backward(dout[:, d], q[:, d], k[:, d], v[:, d], out[:, d], lse[:, :, d],
                                            causal=self.causal, scale=self.scale,
                                            dlse=None if dlse is None else dlse[:, :, d])
            for g, p in zip(grads, part):
                g[:, d] = p
        return grads


def attention(q, k, v, *, causal: bool = False, scale: float | None = None,
              return_lse: bool = False, cu_seqlens=None):
    """Softmax attention of q (B, Sq, H, D) over k, v (B, Sk, H_kv, D); H_kv divides H (grouped-query).

    Args:
        causal: query i sees keys j <= i (top-left aligned, as torch SDPA).
        scale: score scale, default 1/sqrt(D).
        return_lse: also return the log-sum-exp of the scores, (B, H, Sq), float32
            (float64 for float64 inputs).
        cu_seqlens: packed documents, as flash-attn's varlen API: a 1-D int32/int64 tensor
            0 = c_0 < ... < c_D = N (batch 1, Sq == Sk = N). Document i (positions
            [c_i, c_{i+1})) attends only to itself, as if each were a call of its own.

    Returns:
        out (B, Sq, H, D) in the input dtype, or (out, lse). A call with no gradient to come
        and no ``return_lse`` asks the kernel for no lse (cuDNN then runs its inference graph,
        as torch's SDPA does under no_grad).
    """
    check_qkv(q, k, v, same_length=cu_seqlens is not None)
    check_causal(causal)
    scale = resolve_scale(scale, q.shape[-1])
    if cu_seqlens is not None:
        docs = check_cu_seqlens(cu_seqlens, q.shape[1], q.shape[0])
        out, lse = exact_attention(q, k, v, _Documents(docs, causal, scale),
                                   ("attention", dict(causal=causal, kv_heads=k.shape[2])))
        return (out, lse) if return_lse else out
    # One kernel call: out, dq, dk, dv come straight from it, with no accumulators to chunk.
    need_lse = return_lse or (torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)))
    out, lse = exact_attention(q, k, v, _Dense(causal, scale, need_lse),
                               ("attention", dict(causal=causal, kv_heads=k.shape[2])), chunked=False)
    return (out, lse) if return_lse else out
