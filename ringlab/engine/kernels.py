"""Block attention kernels: one Q block against one K/V block, returning (out, lse).

Every algorithm in ringlab (single device, dilated, ring, ring-dilated) is a set of such
blocks whose partial results are combined by :func:`ringlab.engine.merge.merge`, and whose backward
calls :func:`block_attention_backward` with the *global* out and lse of the query rows. That is
the flash-attention identity that makes blockwise gradients exact:

    dS = P * (dO V^T - rowsum(dO * O) + dlse),   P = exp(scale * Q K^T - lse)

where O and lse are the final merged values, not the block's own.

Layout at this boundary (docs/design.md §1): q (B, Sq, H, D); k, v (B, Sk, H_kv, D) with H a
multiple of H_kv (grouped-query attention); out (B, Sq, H, D);
lse (B, H, Sq), float32 (float64 for float64 inputs). ``causal`` masks key j from query i when
j > i (top-left aligned, as torch's SDPA). ``mask`` is an optional boolean tensor broadcastable
to (B, H, Sq, Sk), True where a query may attend a key; it forces the math path.

Backends (:data:`BACKENDS`, in order of preference; "auto" takes the first that applies):
  cpu_flash       torch's CPU flash op
  cuda_cudnn      torch's cuDNN attention op (fp16/bf16; the fastest on Hopper)
  cuda_flash      torch's CUDA flash op (fp16/bf16)
  cuda_efficient  torch's memory-efficient op (fp32 too)
and, outside it, the fallback when none applies:
  math            plain torch, every dtype and device, chunked over query rows.
Private ops change between torch releases. A backend is set aside only for a real
incompatibility (an op missing, a schema or shape it rejects), and only for that
(backend, device type, dtype, head dim), with one warning. Out-of-memory and device errors
propagate: they say nothing about the backend, and a silent switch would make every later
call slower and larger.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

# Elements of one (B, H, rows, Sk) score chunk in the math path: 2^24 float32 = 64 MiB.
MATH_CHUNK_ELEMENTS = 1 << 24
# torch's CPU flash op turns a NaN query row into a finite one when a block has under 8 keys;
# such blocks are tiny, so the math path (which propagates NaN) costs nothing there.
CPU_FLASH_MIN_KEYS = 16
# cuDNN takes batch and heads up to 2^16 - 1 each.
_CUDNN_MAX_DIM = 65535


@dataclass(frozen=True)
class Backend:
    """One fused kernel family. ``applies(q, k, causal)`` holds its dtype, head-dim and shape
    rules; ``forward(q, k, v, causal, scale, need_lse) -> (out, lse)`` (``need_lse`` False: the
    caller needs no lse; a kernel that can skip it returns None there) and ``backward(dout, q, k, v, out,
    lse, causal, scale) -> (dq, dk, dv)`` take the (B, S, H, D) layout of this module."""
    name: str
    device: str            # device type it runs on; "cuda" backends also serve "meta" (dry run)
    ops: tuple[str, ...]   # the private torch.ops.aten ops it calls (tests check their schemas)
    applies: Callable
    forward: Callable
    backward: Callable


def _bhsd(x):
    return x.transpose(1, 2)


def _low_precision(q):
    return q.dtype in (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------- CPU flash (torch private op)
def _cpu_flash_forward(q, k, v, causal, scale, need_lse):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        _bhsd(q), _bhsd(k), _bhsd(v), 0.0, causal, scale=scale)
    return _bhsd(out), lse


def _cpu_flash_backward(dout, q, k, v, out, lse, causal, scale):
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        _bhsd(dout), _bhsd(q), _bhsd(k), _bhsd(v), _bhsd(out), lse, 0.0, causal, scale=scale)
    return tuple(_bhsd(g) for g in grads)


@functools.cache
def _unused_rng_state(shape, dtype, device):
    """The dropout RNG seed or offset a fused backward expects. Without dropout it is never
    read, so one zero tensor per device serves every call (no allocation per block)."""
    return torch.zeros(shape, dtype=dtype, device=device)


# ---------------------------------------------------------------- CUDA cuDNN
@functools.cache
def _cudnn_head_dim_limit(device: torch.device) -> int:
    """cuDNN 9.10+ takes head_dim up to 256 on Hopper (sm 9.0), 128 elsewhere."""
    if device.type == "cuda" and (torch.backends.cudnn.version() or 0) >= 91000 \
            and torch.cuda.get_device_capability(device) == (9, 0):
        return 256
    return 128


def _cudnn_applies(q, k, causal):
    d, b, h = q.shape[-1], q.shape[0], q.shape[2]
    return (_low_precision(q) and d % 8 == 0 and d <= _cudnn_head_dim_limit(q.device)
            and b <= _CUDNN_MAX_DIM and h <= _CUDNN_MAX_DIM
            # cuDNN 9.19 rejects s_q = s_kv = 1 ("not supported"; seen on an H200)
            and min(q.shape[1], k.shape[1]) > 1
            # its causal mask is top-left; we only use it where both alignments agree
            and (not causal or q.shape[1] == k.shape[1]))


def _cudnn_forward(q, k, v, causal, scale, need_lse):
    # Without lse cuDNN runs its inference graph, as torch's SDPA does under no_grad.
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(
        _bhsd(q), _bhsd(k), _bhsd(v), None, need_lse, 0.0, causal, False, scale=scale)
    return _bhsd(res[0]), res[1].squeeze(-1) if need_lse else None  # lse comes as (B, H, Sq, 1)


def _cudnn_backward(dout, q, k, v, out, lse, causal, scale):
    seed = _unused_rng_state((), torch.int64, q.device)
    grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        _bhsd(dout), _bhsd(q), _bhsd(k), _bhsd(v), _bhsd(out), lse.unsqueeze(-1), seed, seed, None,
        None, None, q.shape[1], k.shape[1], 0.0, causal, scale=scale)
    return tuple(_bhsd(g) for g in grads)


# ---------------------------------------------------------------- CUDA flash / efficient
def _flash_applies(q, k, causal):
    d = q.shape[-1]
    # The CUDA flash op aligns causal masks bottom-right; ours are top-left.
    return _low_precision(q) and d % 8 == 0 and d <= 256 and (not causal or q.shape[1] == k.shape[1])


def _cuda_flash_forward(q, k, v, causal, scale, need_lse):
    res = torch.ops.aten._scaled_dot_product_flash_attention(
        _bhsd(q), _bhsd(k), _bhsd(v), 0.0, causal, False, scale=scale)
    return _bhsd(res[0]), res[1]


def _cuda_flash_backward(dout, q, k, v, out, lse, causal, scale):
    seed = _unused_rng_state((2,), torch.uint64, q.device)
    offset = _unused_rng_state((), torch.uint64, q.device)
    grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        _bhsd(dout).contiguous(), _bhsd(q), _bhsd(k), _bhsd(v), _bhsd(out), lse.contiguous(),
        None, None, q.shape[1], k.shape[1], 0.0, causal, seed, offset, scale=scale)
    return tuple(_bhsd(g) for g in grads)


def _efficient_applies(q, k, causal):
    return q.dtype != torch.float64 and q.shape[-1] % 8 == 0


def _cuda_efficient_forward(q, k, v, causal, scale, need_lse):
    res = torch.ops.aten._scaled_dot_product_efficient_attention(
        _bhsd(q), _bhsd(k), _bhsd(v), None, need_lse, 0.0, causal, scale=scale)
    return _bhsd(res[0]), res[1][:, :, : q.shape[1]] if need_lse else None  # lse padded to a multiple of 32


def _cuda_efficient_backward(dout, q, k, v, out, lse, causal, scale):
    sq = q.shape[1]
    padded = lse.new_full((*lse.shape[:2], -(-sq // 32) * 32), math.inf)
    padded[:, :, :sq] = lse
    seed = _unused_rng_state((), torch.int64, q.device)
    grads = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        _bhsd(dout).contiguous(), _bhsd(q), _bhsd(k), _bhsd(v), None, _bhsd(out), padded,
        seed, seed, 0.0, [True, True, True, False], causal, scale=scale)
    return tuple(_bhsd(g) for g in grads[:3])


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("cpu_flash", "cpu", ("_scaled_dot_product_flash_attention_for_cpu",
                                 "_scaled_dot_product_flash_attention_for_cpu_backward"),
            lambda q, k, causal: k.shape[1] >= CPU_FLASH_MIN_KEYS, _cpu_flash_forward, _cpu_flash_backward),
    Backend("cuda_cudnn", "cuda", ("_scaled_dot_product_cudnn_attention",
                                   "_scaled_dot_product_cudnn_attention_backward"),
            _cudnn_applies, _cudnn_forward, _cudnn_backward),
    Backend("cuda_flash", "cuda", ("_scaled_dot_product_flash_attention",
                                   "_scaled_dot_product_flash_attention_backward"),
            _flash_applies, _cuda_flash_forward, _cuda_flash_backward),
    Backend("cuda_efficient", "cuda", ("_scaled_dot_product_efficient_attention",
                                       "_scaled_dot_product_efficient_attention_backward"),
            _efficient_applies, _cuda_efficient_forward, _cuda_efficient_backward),
)}
CHOICES = ("auto", *BACKENDS, "math")

_forced = "auto"
_set_aside: dict[tuple, str] = {}    # (backend, device type, dtype, head dim) -> why
_chosen: dict[tuple, str] = {}       # (device, dtype, q shape, k shape, causal) -> backend
_served: list[collections.Counter] = []  # open record_backends() counters


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend inside a ``with`` block, e.g. ``use_backend("math")`` in tests."""
    global _forced
    if name not in CHOICES:
        raise ValueError(f"backend must be one of {CHOICES}, got {name!r}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


@contextlib.contextmanager
def record_backends():
    """Count which backend served each block inside the ``with`` block:
    ``Counter({"forward/cuda_cudnn": 12, "backward/cuda_cudnn": 12})``."""
    counts: collections.Counter = collections.Counter()
    _served.append(counts)
    try:
        yield counts
    finally:
        _served.remove(counts)


def set_aside() -> dict[tuple, str]:
    """The backends set aside in this process: {(backend, device type, dtype, head dim): why}."""
    return dict(_set_aside)


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for partial outputs and lse: float64 stays float64, all else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _key(name, q):
    return name, q.device.type, q.dtype, q.shape[-1]


def select_backend(q: torch.Tensor, k: torch.Tensor, causal: bool, mask=None) -> str:
    """The backend ``block_attention`` will use for these inputs."""
    if _forced != "auto":
        return _forced
    if mask is not None:
        return "math"
    # Remembered per case: a ring or dilated call repeats a few shapes many times, and on a
    # GPU the host time of choosing again would show in every short step.
    case = (q.device, q.dtype, q.shape, k.shape, causal)
    name = _chosen.get(case)
    if name is None:
        if len(_chosen) >= 4096:
            _chosen.clear()
        name = _chosen[case] = _first_backend(q, k, causal)
    return name


def _first_backend(q, k, causal) -> str:
    device = "cuda" if q.device.type == "meta" else q.device.type  # meta: the dry run models a CUDA rank
    for b in BACKENDS.values():
        if b.device == device and _key(b.name, q) not in _set_aside and b.applies(q, k, causal):
            if not _has_ops(b.ops):
                _set_aside_now(b.name, q, f"this torch ({torch.__version__}) has no {b.ops}")
                continue
            return b.name
    return "math"


@functools.cache
def _has_ops(ops: tuple[str, ...]) -> bool:
    return all(hasattr(torch.ops.aten, op) for op in ops)


def _transient(err: Exception) -> bool:
    """Errors that say nothing about a backend's fitness: memory, and the device itself."""
    text = str(err)
    return (isinstance(err, torch.OutOfMemoryError) or "out of memory" in text
            or type(err).__name__ == "AcceleratorError" or "CUDA error" in text)


def _set_aside_now(name: str, q, why: str) -> None:
    key = _key(name, q)
    _set_aside[key] = why
    _chosen.clear()
    warnings.warn(f"ringlab: backend {name!r} set aside for {key[1]} {key[2]} head_dim {key[3]}: "
                  f"{why}; using the next backend for these inputs", RuntimeWarning, stacklevel=4)


def _kernel_layout(x):
    """Private ops read only unit-stride, non-overlapping rows: torch's CPU flash op ignores
    the head_dim stride and gives wrong results otherwise. Copy just the tensors that need it."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.is_contiguous():
        return x
    if x.stride(-1) == 1 and all(s != 0 for s, n in zip(x.stride(), x.shape) if n > 1):
        return x
    return x.contiguous()


def _fused(pass_: str, q, k, causal: bool, mask, args):
    """One pass on the first fused backend that serves these inputs, or None: then the caller
    runs the math path. A backend that rejects the case is set aside and the next one tried."""
    while (backend := select_backend(q, k, causal, mask)) != "math":
        fn = getattr(BACKENDS[backend], pass_)
        try:
            result = fn(*map(_kernel_layout, args))
        except (RuntimeError, NotImplementedError, TypeError) as err:
            if _forced != "auto" or _transient(err):
                raise
            _set_aside_now(backend, q, f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}")
            continue
        _count(pass_, backend)
        return result
    _count(pass_, "math")
    return None


def _count(pass_: str, backend: str) -> None:
    for counts in _served:
        counts[f"{pass_}/{backend}"] += 1


def _empty_result(q, v):
    """(out, lse) of query rows that see no key: zeros and -inf."""
    b, sq, h, _ = q.shape
    out = q.new_zeros(b, sq, h, v.shape[-1])
    lse = torch.full((b, h, sq), -math.inf, dtype=accum_dtype(q.dtype), device=q.device)
    return out, lse


def block_attention(q, k, v, *, causal: bool = False, scale: float, mask=None, need_lse: bool = True):
    """Attend q (B, Sq, H, D) to k, v (B, Sk, H_kv, D). Returns out (B, Sq, H, D), lse (B, H, Sq).
    ``need_lse`` False (an inference call that neither merges nor saves lse): kernels that can
    skip it do, and lse may come back None.

    With H_kv < H (grouped-query attention) query head h reads K/V head h // (H / H_kv). The
    kernels want equal head counts, so the query heads run in H / H_kv calls of H_kv heads each
    (heads g, g + G, ...), every call against the same K/V: K/V is never repeated.
    """
    group = q.shape[-2] // k.shape[-2]
    if group == 1:
        return _block_forward(q, k, v, causal, scale, mask, need_lse)
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=accum_dtype(q.dtype), device=q.device)
    for g in range(group):
        out[:, :, g::group], lse[:, g::group] = _block_forward(q[:, :, g::group], k, v, causal, scale,
                                                               _heads_of(mask, slice(g, None, group)), True)
    return out, lse


def block_attention_backward(dout, q, k, v, out, lse, *, causal: bool = False, scale: float,
                             mask=None, dlse=None):
    """Gradients (dq, dk, dv) of one block, given the global ``out`` and ``lse`` of these rows.

    dout, out: (B, Sq, H, D); lse, dlse: (B, H, Sq); k, v (B, Sk, H_kv, D). ``dlse`` (the
    gradient reaching lse, if the caller used it) may be None. Rows with lse = -inf saw no key
    and get zero gradients. With H_kv < H, dk and dv sum over each K/V head's query heads, in
    the accumulation dtype.
    """
    group = q.shape[-2] // k.shape[-2]
    if group == 1:
        return _block_backward(dout, q, k, v, out, lse, causal, scale, mask, dlse)
    dq = torch.empty_like(q)
    dk, dv = (torch.zeros(x.shape, dtype=accum_dtype(x.dtype), device=x.device) for x in (k, v))
    for g in range(group):
        heads = slice(g, None, group)
        dq[:, :, heads], gk, gv = _block_backward(dout[:, :, heads], q[:, :, heads], k, v, out[:, :, heads],
                                                  lse[:, heads], causal, scale, _heads_of(mask, heads),
                                                  None if dlse is None else dlse[:, heads])
        dk += gk
        dv += gv
        del gk, gv  # free them before the next call's kernel allocates its own
    return dq, dk, dv


def _heads_of(mask, heads: slice):
    """The part of a (.., H or 1, Sq, Sk) mask for some query heads."""
    return mask if mask is None or mask.dim() < 3 or mask.shape[-3] == 1 else mask[..., heads, :, :]


def _block_forward(q, k, v, causal, scale, mask, need_lse=True):
    if q.shape[1] == 0 or k.shape[1] == 0:
        return _empty_result(q, v)
    result = _fused("forward", q, k, causal, mask, (q, k, v, causal, scale, need_lse))
    return result if result is not None else _math_forward(q, k, v, causal, scale, mask)


def _block_backward(dout, q, k, v, out, lse, causal, scale, mask, dlse):
    if q.shape[1] == 0 or k.shape[1] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    # exp(s - (+inf)) = 0: rows that saw no key anywhere contribute nothing.
    lse = torch.where(lse == -math.inf, math.inf, lse)
    if dlse is not None and select_backend(q, k, causal, mask) != "math":
        return _backward_with_dlse(dout, q, k, v, out, lse, dlse, causal, scale)
    result = _fused("backward", q, k, causal, mask, (dout, q, k, v, out, lse, causal, scale))
    return result if result is not None else _math_backward(dout, q, k, v, out, lse, dlse, causal, scale, mask)


def _backward_with_dlse(dout, q, k, v, out, lse, dlse, causal, scale):
    """Fold a gradient on lse into a fused backward that only knows rowsum(dO * O).

    The fused kernels compute D = rowsum(dO * O) themselves; we need D - dlse. Appending one
    head-dim column (zero in q, k, v; one in O; -dlse in dO) leaves the scores, P and dP
    unchanged and turns D into D - dlse. CUDA kernels want head_dim % 8 == 0, so pad by 8;
    the backend is then chosen for the wider head dim.
    """
    d = q.shape[-1]
    folded, s = _dlse_folded(dout, q, k, v, out, dlse, pad=8 if q.device.type in ("cuda", "meta") else 1)
    grads = block_attention_backward(*folded, lse, causal=causal, scale=scale)
    return tuple(_loss_scale_restored(g[..., :d], s) for g in grads)


def _dlse_folded(dout, q, k, v, out, dlse, pad: int):
    """((dout, q, k, v, out) widened by ``pad`` head-dim columns that fold dlse into D (see
    :func:`_backward_with_dlse`), s): in fp16, dout and dlse are divided by s, the power of two
    that brings |dlse| under 2^12; elsewhere s is None.

    A fused fp16 kernel holds dS = P (dP - D + dlse) in fp16: GradScaler's 2^16 on lse overflows
    it where one key takes a whole row (P = 1). The backward is linear in (dout, dlse), and a
    power of two scales exactly, so the gradients are the kernel's times s.
    """
    def widen(x, last):
        extra = x.new_zeros(*x.shape[:-1], pad)
        extra[..., 0] = last
        return torch.cat([x, extra], dim=-1)

    s = None
    if dout.dtype == torch.float16:
        s = torch.exp2(torch.log2(dlse.abs().amax() * 2**-12).ceil().clamp(min=0))
        dlse = dlse / s
    folded_dout = widen(dout, -dlse.transpose(1, 2).to(dout.dtype))  # dlse: (B, H, Sq)
    if s is not None:
        folded_dout[..., :-pad].div_(s)
    return (folded_dout, widen(q, 0), widen(k, 0), widen(v, 0), widen(out, 1)), s


def _loss_scale_restored(grad, s):
    """A gradient of :func:`_dlse_folded`'s scaled inputs, times s (in place)."""
    return grad if s is None else grad.mul_(s)


# ---------------------------------------------------------------- packed documents: one varlen call
# torch's CUDA flash op takes packed documents natively (cumulative lengths); "meta" is the dry run.
VARLEN_OPS = ("_flash_attention_forward", "_flash_attention_backward")
VARLEN_DEVICES = ("cuda", "meta")


def varlen_applies(q, k, causal: bool) -> bool:
    """Whether the packed documents of q (1, N, H, D), k, v (1, N, H_kv, D) go to one native
    varlen call: on a device that has one, where the CUDA flash op may serve these inputs
    ("auto" or "cuda_flash" forced, not set aside, dtype and head dim it takes)."""
    return (q.device.type in VARLEN_DEVICES and _forced in ("auto", "cuda_flash")
            and _key("cuda_flash", q) not in _set_aside and _flash_applies(q, k, causal) and _has_ops(VARLEN_OPS))


def _cumulative(documents: tuple[int, ...], device):
    """(cu_seqlens as int32 on ``device``, the longest document) for the varlen op."""
    longest = max(b - a for a, b in zip(documents, documents[1:]))
    return torch.tensor(documents, dtype=torch.int32, device=device), longest


def varlen_attention(q, k, v, documents: tuple[int, ...], *, causal: bool, scale: float):
    """(out (1, N, H, D), lse (1, H, N)) of every packed document (boundaries ``documents``)
    attending within itself, in one call (see :func:`varlen_applies`). Documents have equal
    query and key lengths, so the op's bottom-right causal mask is the top-left one."""
    cu, longest = _cumulative(documents, q.device)
    res = torch.ops.aten._flash_attention_forward(*(_kernel_layout(x)[0] for x in (q, k, v)), cu, cu, longest,
                                                  longest, 0.0, causal, False, scale=scale)
    _count("forward", "cuda_flash_varlen")
    return res[0][None], res[1][None]  # the op's lse is (H, N) for packed input


def varlen_attention_backward(dout, q, k, v, out, lse, documents: tuple[int, ...], *, causal: bool, scale: float,
                              dlse=None):
    """(dq, dk, dv) of :func:`varlen_attention`, given its out and lse; ``dlse`` folded in as
    in :func:`block_attention_backward`."""
    d = q.shape[-1]
    s = None
    if dlse is not None:
        (dout, q, k, v, out), s = _dlse_folded(dout, q, k, v, out, dlse, pad=8)
    cu, longest = _cumulative(documents, q.device)
    rng, unused = _unused_rng_state((2,), torch.uint64, q.device), _unused_rng_state((), torch.uint64, q.device)
    grads = torch.ops.aten._flash_attention_backward(
        dout[0].contiguous(), *(_kernel_layout(x)[0] for x in (q, k, v, out)), lse[0].contiguous(), cu, cu, longest,
        longest, 0.0, causal, rng, unused, scale=scale)
    _count("backward", "cuda_flash_varlen")
    return tuple(_loss_scale_restored(g[None, ..., :d], s) for g in grads)


# ---------------------------------------------------------------- math path
def _visible(sq_rows: range, sk: int, causal: bool, mask, device):
    """Boolean (.., rows, Sk) visibility for a chunk of query rows, or None for all-visible."""
    vis = None
    if causal:
        i = torch.arange(sq_rows.start, sq_rows.stop, device=device)[:, None]
        vis = torch.arange(sk, device=device)[None, :] <= i
    if mask is not None:
        m = mask[..., sq_rows.start:sq_rows.stop, :] if mask.shape[-2] != 1 else mask
        vis = m if vis is None else (vis & m)
    return vis


def _row_chunks(q, k):
    b, sq, h, _ = q.shape
    rows = max(1, MATH_CHUNK_ELEMENTS // max(1, b * h * k.shape[1]))
    return [range(s, min(sq, s + rows)) for s in range(0, sq, rows)]


def _scores(qc, k, scale, vis):
    s = torch.einsum("bqhd,bkhd->bhqk", qc, k) * scale
    return s if vis is None else s.masked_fill(~vis, -math.inf)


def _math_forward(q, k, v, causal, scale, mask):
    acc = accum_dtype(q.dtype)
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    b, sq, h, _ = q.shape
    out = torch.empty(b, sq, h, v.shape[-1], dtype=acc, device=q.device)
    lse = torch.empty(b, h, sq, dtype=acc, device=q.device)
    for rows in _row_chunks(q, k):
        s = _scores(qf[:, rows.start:rows.stop], kf, scale, _visible(rows, k.shape[1], causal, mask, q.device))
        chunk_lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - torch.where(chunk_lse == -math.inf, 0.0, chunk_lse)[..., None])
        out[:, rows.start:rows.stop] = torch.einsum("bhqk,bkhd->bqhd", p, vf)
        lse[:, :, rows.start:rows.stop] = chunk_lse
    return out.to(q.dtype), lse


def _math_backward(dout, q, k, v, out, lse, dlse, causal, scale, mask):
    acc = accum_dtype(q.dtype)
    qf, kf, vf, of, gf = (x.to(acc) for x in (q, k, v, out, dout))
    dq = torch.empty_like(qf)
    dk = torch.zeros_like(kf)
    dv = torch.zeros_like(vf)
    delta = torch.einsum("bqhd,bqhd->bhq", gf, of)
    if dlse is not None:
        delta = delta - dlse.to(acc)
    for rows in _row_chunks(q, k):
        r = slice(rows.start, rows.stop)
        s = _scores(qf[:, r], kf, scale, _visible(rows, k.shape[1], causal, mask, q.device))
        p = torch.exp(s - lse[:, :, r, None].to(acc))
        dp = torch.einsum("bqhd,bkhd->bhqk", gf[:, r], vf)
        ds = p * (dp - delta[:, :, r, None])
        dq[:, r] = torch.einsum("bhqk,bkhd->bqhd", ds, kf) * scale
        dk += torch.einsum("bhqk,bqhd->bkhd", ds, qf[:, r]) * scale
        dv += torch.einsum("bhqk,bqhd->bkhd", p, gf[:, r])
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
