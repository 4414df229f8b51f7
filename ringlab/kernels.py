"""Block attention kernels: one Q block against one K/V block, returning (out, lse).

Every algorithm in ringlab (single device, dilated, ring, ring-dilated) is a set of such
blocks whose partial results are combined by :func:`ringlab.merge.merge`, and whose backward
calls :func:`block_attention_backward` with the *global* out and lse of the query rows. That is
the flash-attention identity that makes blockwise gradients exact:

    dS = P * (dO V^T - rowsum(dO * O) + dlse),   P = exp(scale * Q K^T - lse)

where O and lse are the final merged values, not the block's own.

Layout at this boundary (SPEC §1): q (B, Sq, H, D); k, v (B, Sk, H, D); out (B, Sq, H, D);
lse (B, H, Sq), float32 (float64 for float64 inputs). ``causal`` masks key j from query i when
j > i (top-left aligned, as torch's SDPA). ``mask`` is an optional boolean tensor broadcastable
to (B, H, Sq, Sk), True where a query may attend a key; it forces the math path.

Backends:
  "cpu_flash"   torch.ops.aten._scaled_dot_product_flash_attention_for_cpu (+ backward)
  "cuda_flash"  torch.ops.aten._scaled_dot_product_flash_attention (fp16/bf16)
  "cuda_efficient"  torch.ops.aten._scaled_dot_product_efficient_attention (fp32, masks of
                one-sided causal, any length)
  "math"        plain torch, every dtype and device, chunked over query rows.
"auto" picks the fastest one that applies. Private ops change between torch releases: if one
fails, ringlab warns once and uses the math path from then on.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import torch

BACKENDS = ("auto", "cpu_flash", "cuda_flash", "cuda_efficient", "math")
_backend = "auto"
_broken: set[str] = set()  # private ops that raised once; never retried in this process

# Elements of one (B, H, rows, Sk) score chunk in the math path: 2^24 float32 = 64 MiB.
_MATH_CHUNK_ELEMENTS = 1 << 24


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend inside a ``with`` block, e.g. ``use_backend("math")`` in tests."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    previous, _backend = _backend, name
    try:
        yield
    finally:
        _backend = previous


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for partial outputs and lse: float64 stays float64, all else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def select_backend(q: torch.Tensor, k: torch.Tensor, causal: bool, mask) -> str:
    """The backend ``block_attention`` will use for these inputs."""
    if _backend != "auto":
        return _backend
    if mask is not None:
        return "math"
    if q.device.type == "cpu" and "cpu_flash" not in _broken:
        return "cpu_flash"
    if q.device.type in ("cuda", "meta"):  # meta: the dry run models a CUDA rank
        d = q.shape[-1]
        flash_ok = q.dtype in (torch.float16, torch.bfloat16) and d % 8 == 0 and d <= 256
        # The CUDA flash op aligns causal masks bottom-right; ours are top-left.
        if flash_ok and (not causal or q.shape[1] == k.shape[1]) and "cuda_flash" not in _broken:
            return "cuda_flash"
        if q.dtype != torch.float64 and d % 8 == 0 and "cuda_efficient" not in _broken:
            return "cuda_efficient"
    return "math"


def _empty_result(q, v):
    """(out, lse) of query rows that see no key: zeros and -inf."""
    b, sq, h, _ = q.shape
    out = q.new_zeros(b, sq, h, v.shape[-1])
    lse = torch.full((b, h, sq), -math.inf, dtype=accum_dtype(q.dtype), device=q.device)
    return out, lse


def block_attention(q, k, v, *, causal: bool = False, scale: float, mask=None):
    """Attend q (B, Sq, H, D) to k, v (B, Sk, H, D). Returns out (B, Sq, H, D), lse (B, H, Sq)."""
    if q.shape[1] == 0 or k.shape[1] == 0:
        return _empty_result(q, v)
    backend = select_backend(q, k, causal, mask)
    if backend != "math":
        try:
            return _FORWARD[backend](q, k, v, causal, scale)
        except RuntimeError as err:
            _mark_broken(backend, err)
    return _math_forward(q, k, v, causal, scale, mask)


def block_attention_backward(dout, q, k, v, out, lse, *, causal: bool = False, scale: float,
                             mask=None, dlse=None):
    """Gradients (dq, dk, dv) of one block, given the global ``out`` and ``lse`` of these rows.

    dout, out: (B, Sq, H, D); lse, dlse: (B, H, Sq). ``dlse`` (the gradient reaching lse, if
    the caller used it) may be None. Rows with lse = -inf saw no key and get zero gradients.
    """
    if q.shape[1] == 0 or k.shape[1] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    # exp(s - (+inf)) = 0: rows that saw no key anywhere contribute nothing.
    lse = torch.where(lse == -math.inf, math.inf, lse)
    backend = select_backend(q, k, causal, mask)
    if backend != "math":
        try:
            if dlse is not None:
                return _backward_with_dlse(_BACKWARD[backend], dout, q, k, v, out, lse, dlse,
                                           causal, scale)
            return _BACKWARD[backend](dout, q, k, v, out, lse, causal, scale)
        except RuntimeError as err:
            _mark_broken(backend, err)
    return _math_backward(dout, q, k, v, out, lse, dlse, causal, scale, mask)


def _mark_broken(backend: str, err: Exception) -> None:
    if backend in _broken or _backend != "auto":
        raise err
    _broken.add(backend)
    warnings.warn(f"ringlab: backend {backend!r} failed ({err}); using the math path instead",
                  RuntimeWarning, stacklevel=3)


def _bhsd(x):
    return x.transpose(1, 2)


# ---------------------------------------------------------------- CPU flash (torch private op)
def _cpu_flash_forward(q, k, v, causal, scale):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        _bhsd(q), _bhsd(k), _bhsd(v), 0.0, causal, scale=scale)
    return _bhsd(out), lse


def _cpu_flash_backward(dout, q, k, v, out, lse, causal, scale):
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        _bhsd(dout), _bhsd(q), _bhsd(k), _bhsd(v), _bhsd(out), lse, 0.0, causal, scale=scale)
    return tuple(_bhsd(g) for g in grads)


# ---------------------------------------------------------------- CUDA flash / efficient
def _cuda_flash_forward(q, k, v, causal, scale):
    res = torch.ops.aten._scaled_dot_product_flash_attention(
        _bhsd(q), _bhsd(k), _bhsd(v), 0.0, causal, False, scale=scale)
    return _bhsd(res[0]), res[1]


def _cuda_flash_backward(dout, q, k, v, out, lse, causal, scale):
    # No dropout, so the RNG state the op expects is never read.
    seed = torch.zeros(2, dtype=torch.uint64, device=q.device)
    offset = torch.zeros((), dtype=torch.uint64, device=q.device)
    grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        _bhsd(dout).contiguous(), _bhsd(q), _bhsd(k), _bhsd(v), _bhsd(out), lse.contiguous(),
        None, None, q.shape[1], k.shape[1], 0.0, causal, seed, offset, scale=scale)
    return tuple(_bhsd(g) for g in grads)


def _cuda_efficient_forward(q, k, v, causal, scale):
    res = torch.ops.aten._scaled_dot_product_efficient_attention(
        _bhsd(q), _bhsd(k), _bhsd(v), None, True, 0.0, causal, scale=scale)
    return _bhsd(res[0]), res[1][:, :, : q.shape[1]]  # lse comes padded to a multiple of 32


def _cuda_efficient_backward(dout, q, k, v, out, lse, causal, scale):
    sq = q.shape[1]
    padded = lse.new_full((*lse.shape[:2], -(-sq // 32) * 32), math.inf)
    padded[:, :, :sq] = lse
    seed = torch.zeros((), dtype=torch.int64, device=q.device)
    grads = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        _bhsd(dout).contiguous(), _bhsd(q), _bhsd(k), _bhsd(v), None, _bhsd(out), padded,
        seed, seed, 0.0, [True, True, True, False], causal, scale=scale)
    return tuple(_bhsd(g) for g in grads[:3])


_FORWARD = {"cpu_flash": _cpu_flash_forward, "cuda_flash": _cuda_flash_forward,
            "cuda_efficient": _cuda_efficient_forward}
_BACKWARD = {"cpu_flash": _cpu_flash_backward, "cuda_flash": _cuda_flash_backward,
             "cuda_efficient": _cuda_efficient_backward}


def _backward_with_dlse(backward, dout, q, k, v, out, lse, dlse, causal, scale):
    """Fold a gradient on lse into a fused backward that only knows rowsum(dO * O).

    The fused kernels compute D = rowsum(dO * O) themselves; we need D - dlse. Appending one
    head-dim column (zero in q, k, v; one in O; -dlse in dO) leaves the scores, P and dP
    unchanged and turns D into D - dlse. CUDA kernels want head_dim % 8 == 0, so pad by 8.
    """
    pad = 8 if q.device.type == "cuda" else 1
    d = q.shape[-1]

    def widen(x, last):
        extra = x.new_zeros(*x.shape[:-1], pad)
        extra[..., 0] = last
        return torch.cat([x, extra], dim=-1)

    row_dlse = dlse.transpose(1, 2).to(dout.dtype)  # (B, Sq, H)
    dq, dk, dv = backward(widen(dout, -row_dlse), widen(q, 0), widen(k, 0), widen(v, 0),
                          widen(out, 1), lse, causal, scale)
    return dq[..., :d], dk[..., :d], dv[..., :d]


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
    rows = max(1, _MATH_CHUNK_ELEMENTS // max(1, b * h * k.shape[1]))
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
