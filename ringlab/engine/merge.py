"""The one LSE merge: fold a partial attention result into a running one.

Two partial results over disjoint key sets, (o1, l1) and (o2, l2), combine exactly as

    l = logaddexp(l1, l2),   o = exp(l1 - l) * o1 + exp(l2 - l) * o2,

where exp(l2 - l) = sigmoid(l2 - l1) and exp(l1 - l) is one minus it. Both weights are <= 1,
so nothing overflows, and rows that have seen no key yet (l = -inf) get weight 0, not NaN.

Two implementations of that one formula: a single Triton kernel on CUDA (where triton is
installed), which reads out and the block once and writes out once; and plain torch
elsewhere, which takes two passes over out. A ring folds every block it computes into
its accumulators, so on a GPU the merge's memory traffic is a sizeable part of a ring step.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch

from .kernels import _transient, accum_dtype

# Device types that merge with the Triton kernel when triton is importable. CPU is off: the
# torch path is one loop per op there, and triton compiles for GPUs (tests run the kernel on
# CPU through triton's interpreter, TRITON_INTERPRET=1).
FUSED = {"cuda": True, "cpu": False}
_ROW_DIMS = 5  # (..., S, H) rows: up to three leading dims (dilated views are (B, G, nseg, S, H))
_set_aside: dict[tuple, str] = {}  # (device type, out dtype, block dtype) -> why


def merge(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor,
          block_lse: torch.Tensor) -> None:
    """In place: out (..., S, H, D) and lse (..., H, S) absorb block_out and block_lse.

    ``out`` and ``lse`` are the float32 (or float64) accumulators and may be strided views;
    ``block_out`` may have a narrower dtype. Leading dims (...) are any batch dims.
    """
    if (fused_merge_applies(out) and out.dim() <= _ROW_DIMS + 1 and out.numel()
            and block_out.shape == out.shape and block_lse.shape == lse.shape):
        key = (out.device.type, out.dtype, block_out.dtype)
        if key not in _set_aside:
            try:
                return _fused_merge(out, lse, block_out, block_lse)
            except Exception as err:  # noqa: BLE001 - sorted below: only an incompatibility sets it aside
                if _transient(err):
                    raise
                _set_aside[key] = why = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"
                warnings.warn(f"ringlab: the Triton LSE merge is set aside for {key[0]} {key[1]} accumulators "
                              f"and {key[2]} blocks: {why}; merging with torch ops", RuntimeWarning, stacklevel=2)
    _torch_merge(out, lse, block_out, block_lse)


def fused_merge_applies(x: torch.Tensor) -> bool:
    """Whether merges into accumulators on x's device use the Triton kernel (benchmarks print it)."""
    return FUSED.get(x.device.type, False) and _triton() is not None


def _torch_merge(out, lse, block_out, block_lse) -> None:
    # The block's weight exp(block_lse - new_lse) is sigmoid(block_lse - lse), and the old
    # result's is one minus it. Few kernels, and no temporary the size of out. NaN comes only
    # where both are -inf (no key yet), and there the block must weigh 0.
    w = torch.sub(block_lse, lse).sigmoid_().nan_to_num_(0.0)
    torch.logaddexp(lse, block_lse, out=lse)
    w = w.transpose(-1, -2).unsqueeze(-1)
    if block_out.dtype == out.dtype:
        out.lerp_(block_out, w)  # out + w (block_out - out): one kernel
    else:  # lerp takes one dtype, and a cast of the block would be an out-sized temporary
        out.mul_(torch.rsub(w, 1)).addcmul_(block_out, w)  # torch.rsub: no Python-level 1 - w


def _fused_merge(out, lse, block_out, block_lse) -> None:
    """One Triton program per BLOCK_R rows of (..., S, H): it updates their lse and their D
    output columns in one read and one write. Rows are addressed through strides, so views
    need no copy; leading dims are padded to three with size 1."""
    pad = _ROW_DIMS + 1 - out.dim()
    sizes = (1,) * pad + tuple(out.shape[:-1])
    o_strides = (0,) * pad + out.stride()
    b_strides = (0,) * pad + block_out.stride()
    # lse is (..., H, S): its strides in the rows' (..., S, H) order
    l_strides = (0,) * pad + lse.stride()[:-2] + (lse.stride(-1), lse.stride(-2))
    c = block_lse.stride()
    c_strides = (0,) * pad + c[:-2] + (c[-1], c[-2])
    rows, d = math.prod(sizes), out.shape[-1]
    block_d = 1 << max(d - 1, 0).bit_length()
    block_r = max(1, 4096 // block_d)
    args = (out, lse, block_out, block_lse, rows, d, *sizes[1:], *o_strides, *b_strides, *l_strides, *c_strides)
    grid = (-(-rows // block_r),)
    if out.is_cuda and out.get_device() != torch.cuda.current_device():  # triton launches on the current one
        with torch.cuda.device(out.device):
            return _kernel()[grid](*args, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
    _kernel()[grid](*args, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)


@functools.cache
def _triton():
    try:
        import triton
    except ImportError:
        return None
    return triton


@functools.cache
def _kernel():
    """The jitted kernel, built on first use (triton reads TRITON_INTERPRET then)."""
    triton = _triton()
    tl = triton.language

    # Sizes vary with every ring step and dilated segment; specializing on them would compile
    # a kernel per shape. Strides stay specialized (a unit head_dim stride vectorizes).
    @triton.jit(do_not_specialize=["rows", "n1", "n2", "n3", "n4"])
    def lse_merge(out, lse, block, block_lse, rows, D, n1, n2, n3, n4,
                  o0, o1, o2, o3, o4, od, b0, b1, b2, b3, b4, bd,
                  l0, l1, l2, l3, l4, c0, c1, c2, c3, c4,
                  BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        live = r < rows
        i4 = r % n4
        t = r // n4
        i3 = t % n3
        t = t // n3
        i2 = t % n2
        t = t // n2
        i1 = t % n1
        i0 = t // n1
        at_lse = i0 * l0 + i1 * l1 + i2 * l2 + i3 * l3 + i4 * l4
        old = tl.load(lse + at_lse, mask=live, other=0.0)
        new = tl.load(block_lse + (i0 * c0 + i1 * c1 + i2 * c2 + i3 * c3 + i4 * c4), mask=live,
                      other=0.0).to(old.dtype)
        # the block's weight, 0 where it saw no key (also where neither has: no NaN)
        w = tl.where(new == float("-inf"), 0.0, tl.sigmoid(new - old))
        hi = tl.maximum(old, new)
        both = tl.where(hi == float("-inf"), hi, hi + tl.log(1.0 + tl.exp(-tl.abs(old - new))))
        tl.store(lse + at_lse, both, mask=live)
        cols = tl.arange(0, BLOCK_D).to(tl.int64)
        cell = live[:, None] & (cols < D)[None, :]
        at_out = (i0 * o0 + i1 * o1 + i2 * o2 + i3 * o3 + i4 * o4)[:, None] + cols[None, :] * od
        x = tl.load(out + at_out, mask=cell, other=0.0)
        y = tl.load(block + ((i0 * b0 + i1 * b1 + i2 * b2 + i3 * b3 + i4 * b4)[:, None] + cols[None, :] * bd),
                    mask=cell, other=0.0).to(x.dtype)
        tl.store(out + at_out, x + w[:, None] * (y - x), mask=cell)

    return lse_merge


def new_accumulators(q: torch.Tensor, into=None, *, reset: bool = True):
    """Running (out, lse) for the rows of q: zeros and -inf, float32 (float64 for float64).
    ``into`` = (out or None, lse): tensors to reset and use instead of allocating. ``reset``
    False: left as they are, for a caller whose first blocks write every row."""
    b, n, h, d = q.shape
    acc = accum_dtype(q.dtype)
    out, lse = into or (None, None)
    if not reset:
        return (torch.empty(b, n, h, d, dtype=acc, device=q.device) if out is None else out,
                torch.empty(b, h, n, dtype=acc, device=q.device) if lse is None else lse)
    return (torch.zeros(b, n, h, d, dtype=acc, device=q.device) if out is None else out.zero_(),
            torch.full((b, h, n), -math.inf, dtype=acc, device=q.device) if lse is None else lse.fill_(-math.inf))
