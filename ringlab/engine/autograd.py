"""The autograd glue every ringlab function shares.

An algorithm supplies ``forward(q, k, v, heads, into) -> (out, lse)`` (out in the accumulation
dtype) and ``backward(dout, q, k, v, out, lse, dlse, heads, into) -> (dq, dk, dv)``, where
q, k, v hold the heads ``heads`` (a slice of the call's heads; dilation needs their global
index). ``into`` is None or views of the call's results that an algorithm may accumulate in
and return instead of allocating its own: (out, lse) in the forward, out None when the input
dtype is narrower than the accumulators; (dq, dk, dv) in the backward, given only when the
dtypes match.
Only q, k, v, out and lse are saved: the backward recomputes scores blockwise from the global
lse, flash-style, so no (Sq, Sk) matrix outlives the forward. ``dlse`` is None unless the
caller's loss used lse.

Heads are independent, so a call whose float32 accumulators would be large runs its heads in
chunks (:func:`head_chunks`): the accumulators then cover one chunk at a time, and the results
land in tensors of the input dtype. That keeps the peak near the 4 input-sized tensors a
forward+backward must return (out, dq, dk, dv).
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Callable

import torch

from . import trace
from .kernels import accum_dtype

# Chunk heads when the float32 accumulators of the backward (dq, dk, dv) for all heads would
# exceed this; below it one chunk is fastest (on an H200 eight chunks made dilated attention
# 1.4-1.5x slower at 128K tokens) and memory is no question.
ACCUM_BUDGET = {"cuda": 4 << 30, "cpu": 64 << 20}
# Elements of q per chunk at the least, so each kernel still fills the device.
MIN_CHUNK_ELEMENTS = {"cuda": 1 << 25, "cpu": 1 << 20}


def head_chunks(batch: int, seq: int, heads: int, head_dim: int, dtype: torch.dtype, device_type: str,
                kv_heads: int | None = None) -> list[slice]:
    """The query-head slices a call on q (batch, seq, heads, head_dim) runs one after another.
    Each holds about 1/8 of the heads (so its accumulators are about 1/8 of the whole), but at
    least MIN_CHUNK_ELEMENTS of q, and whole groups of the ``kv_heads`` K/V heads (default
    ``heads``): chunk h reads the K/V heads of :func:`kv_slice`. ``device_type`` "meta"
    counts as CUDA (the dry run)."""
    b, s, h, d = batch, seq, heads, head_dim
    group = h // (kv_heads or h)
    acc = 8 if dtype == torch.float64 else 4
    per_head = b * s * d
    kind = "cpu" if device_type == "cpu" else "cuda"
    if h == group or 3 * acc * per_head * h <= ACCUM_BUDGET[kind]:
        return [slice(0, h)]
    floor = MIN_CHUNK_ELEMENTS[kind]
    size = min(h, max(math.ceil(h / 8), math.ceil(floor / per_head)))
    size = -(-size // group) * group
    return [slice(i, min(i + size, h)) for i in range(0, h, size)]


def kv_slice(heads: slice, group: int) -> slice:
    """The K/V heads that the query heads ``heads`` (whole groups of ``group``) read."""
    return slice(heads.start // group, heads.stop // group)


class _ExactAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, algorithm, chunks, model):
        ctx.algorithm, ctx.chunks, ctx.model = algorithm, chunks, model
        with trace.in_pass("forward"), _explained_oom(q, model, backward=False), _no_autocast(q.device):
            if len(chunks) == 1:
                out, lse = algorithm.forward(q, k, v, chunks[0], None)
                out = out.to(q.dtype)
            else:
                out = q.new_empty(*q.shape[:-1], v.shape[-1])
                lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=accum_dtype(q.dtype), device=q.device)
                direct = accum_dtype(q.dtype) == q.dtype
                group = q.shape[2] // k.shape[2]
                for h in chunks:
                    into = (out[:, :, h] if direct else None, lse[:, h])
                    kv = kv_slice(h, group)
                    o, l = algorithm.forward(q[:, :, h], k[:, :, kv], v[:, :, kv], h, into)
                    _store(out[:, :, h], o, into[0])
                    _store(lse[:, h], l, into[1])
                    del o, l  # free this chunk's accumulators before the next allocates
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        if torch.is_grad_enabled():  # backward(create_graph=True): a graph of this backward
            raise RuntimeError(
                "ringlab: double backward (create_graph=True) is not supported: ringlab's backward is "
                "a fused kernel with no graph of its own. For higher-order gradients use the plain "
                "torch references ringlab.reference.dense_attention / dense_dilated_attention "
                "(O(N^2) memory)")
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        algorithm, chunks = ctx.algorithm, ctx.chunks
        with trace.in_pass("backward"), _explained_oom(q, ctx.model, backward=True), _no_autocast(q.device):
            if len(chunks) == 1:
                dq, dk, dv = algorithm.backward(dout, q, k, v, out, lse, dlse, chunks[0], None)
                return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None
            grads = [torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v)]
            direct = accum_dtype(q.dtype) == q.dtype
            group = q.shape[2] // k.shape[2]
            for h in chunks:
                kv = kv_slice(h, group)
                views = [grads[0][:, :, h], grads[1][:, :, kv], grads[2][:, :, kv]]
                part = algorithm.backward(dout[:, :, h], q[:, :, h], k[:, :, kv], v[:, :, kv], out[:, :, h],
                                          lse[:, h], None if dlse is None else dlse[:, h], h,
                                          views if direct else None)
                for view, p in zip(views, part):
                    _store(view, p, view if direct else None)
                del part, p  # free this chunk's accumulators before the next allocates (p held the last)
        return (*grads, None, None, None)


def _no_autocast(device: torch.device):
    """The engine computes in its inputs' dtype: under autocast the math path's matmuls would
    round a float32 call to bf16 (and only the blocks with few keys, which take that path)."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _store(dst, src, into) -> None:
    """Copy a chunk's result into place, unless the algorithm accumulated there already."""
    if src is not into:
        dst.copy_(src)


def exact_attention(q, k, v, algorithm, model: tuple[str, dict], *, chunked: bool = True, kv_unit: int = 1):
    """(out, lse) of ``algorithm`` on q, k, v, differentiable in all three (first order).

    ``model`` = (memory-model mode, its Problem fields beyond the shapes) explains an
    out-of-memory error with what the call needed. ``chunked=False`` runs all heads at once
    (for algorithms with no accumulators). Each chunk holds a multiple of ``kv_unit`` K/V
    heads (Ulysses splits every chunk's K/V heads over its ranks)."""
    chunks = (head_chunks(*q.shape, q.dtype, q.device.type, k.shape[2] // kv_unit) if chunked
              else [slice(0, q.shape[2])])
    return _ExactAttention.apply(q, k, v, algorithm, chunks, model)


# (mode, problem fields, backward) -> (the call's peak, its resident inputs) in bytes.
# ringlab.planning.memory_model sets it when imported (ringlab's __init__ does), so the engine
# explains out-of-memory errors without importing the planning layer above it.
memory_estimate: Callable[[str, dict, bool], tuple[int, int]] | None = None


class _explained_oom:
    """Re-raise an out-of-memory error with the call's size, the memory model's estimate and
    the free memory, so the user sees what to change. Nothing is retried or switched."""

    def __init__(self, q, model, backward: bool):
        self.q, self.model, self.backward = q, model, backward

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if kind is None or not issubclass(kind, torch.OutOfMemoryError):
            return False
        raise torch.OutOfMemoryError(f"{err}\n\nringlab: {self.describe()}") from err

    def describe(self) -> str:
        q, (mode, fields) = self.q, self.model
        fields = dict(fields)
        call = fields.pop("call", mode)  # what the call is, when the model's mode is only part of it
        b, n, h, d = q.shape
        dtype = str(q.dtype).removeprefix("torch.")
        text = (f"{call} {'forward+backward' if self.backward else 'forward'} on q {tuple(q.shape)} "
                f"(batch {b}, N {n}, heads {h}, head_dim {d}, {dtype}) ran out of memory on {q.device}")
        if memory_estimate is not None:
            try:
                base = dict(seq_len=n, heads=h, head_dim=d, batch=b, dtype=dtype,
                            device="cuda" if q.device.type == "cuda" else "cpu")
                need, inputs = memory_estimate(mode, {**base, **fields}, self.backward)
                text += (f". The memory model estimates {_size(need)} for the call on top of its inputs' "
                         f"{_size(inputs)}: {_size(need + inputs)}")
            except Exception as why:  # noqa: BLE001 - the explanation must not hide the real error
                text += f" (memory model unavailable: {why})"
        total, free = _capacity(q.device)
        if total is not None:
            # free is read after the failure, with the failed call's tensors still alive
            text += f", against the {_size(total)} of {q.device} ({_size(free)} free when it failed)"
        return text + ". Use fewer tokens per rank (more ranks), a smaller batch, or dilation."


def _size(nbytes: int) -> str:
    """Bytes in the largest binary unit under them, e.g. '79.27 GiB' or '24.00 KiB'."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift:
            return f"{nbytes / (1 << shift):.2f} {unit}"
    return f"{nbytes} B"


def _capacity(device) -> tuple[int | None, int | None]:
    """(total, free) bytes of ``device``: the GPU's, or this machine's physical memory."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return total, free
    if device.type != "cpu":
        return None, None
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page
    except (ValueError, OSError):
        return None, None
