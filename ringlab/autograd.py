"""The autograd glue every ringlab function shares.

An algorithm supplies ``forward(q, k, v) -> (out, lse)`` (out in the accumulation dtype) and
``backward(dout, q, k, v, out, lse, dlse) -> (dq, dk, dv)``. Only q, k, v, out and lse are
saved: the backward recomputes scores blockwise from the global lse, flash-style, so no
(Sq, Sk) matrix outlives the forward. ``dlse`` is None unless the caller's loss used lse.
"""

from __future__ import annotations

import torch

from . import trace


class _ExactAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, algorithm):
        with trace.in_pass("forward"):
            out, lse = algorithm.forward(q, k, v)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.algorithm = algorithm
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        with trace.in_pass("backward"):
            dq, dk, dv = ctx.algorithm.backward(dout, q, k, v, out, lse, dlse)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def exact_attention(q, k, v, algorithm):
    """(out, lse) of ``algorithm`` on q, k, v, differentiable in all three."""
    return _ExactAttention.apply(q, k, v, algorithm)
