"""Analytic per-rank memory of every mode, term by term.

For a problem (batch B, sequence N, heads H, K/V heads H_kv, head_dim D, dtype, P ranks, ...)
and a mode,
:func:`estimate` returns the tensors live at the peak of one attention call, each a named term
in bytes, for the forward alone or forward+backward. It mirrors what the code allocates, so
``ringlab.planning.memory.track`` around the same call measures the same number (tests hold the two
within 10%). Inputs (q, k, v and the output gradient) exist before the call; they are listed
separately as ``resident`` and are not part of the call's peak.

Modes (per rank):
  dense           materialized softmax(q k^T) v: the (B, H, N, N) scores and probabilities
  sdpa            torch SDPA (flash kernels)
  attention       ringlab.attention
  dilated         ringlab.dilated_attention
  ring            ringlab.ring_attention on P real ranks: one rank's memory
  simulated_ring  ringlab.ring_attention(ring_size=P): what one simulated rank holds, the
                  same per-rank code and so the same terms as ``ring``. (The simulating
                  process holds all P ranks at once; that total is not a per-rank figure.)
  ring_dilated    ringlab.ring_dilated_attention on P real ranks: one rank's memory

Grouped-query attention (H_kv < H): every K/V-sized tensor (k, v, their gradients, the ring's
blocks, messages and dK/dV accumulators) holds H_kv heads. A kernel call runs the query heads
in H / H_kv calls of H_kv heads against the same K/V (ringlab.engine.kernels.block_attention),
so a block also holds one call's result next to the H-head one, and its backward sums dK/dV
over the calls in float32 (float64 for float64).

Kernel scratch: torch's CPU flash kernels allocate per-thread work buffers (threads x q-split
x kv-split); the CUDA flash backward keeps a float32 dQ accumulator and the row sums.

On CPU a block with under 16 keys (a dilated segment, or its piece on a ring rank, with
fewer selected keys) runs the math path instead: float32 copies of q, k, v and the scores.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

import torch

from ..engine import autograd, kernels
from ..engine.checks import DTYPE_NAMES
from ..engine.config import RingConfig
from ..engine.dilated import writes_first
from ..engine.dilation import copies_to_fuse, head_count, local_blocks, min_call_rows
from ..engine.layout import shard_pieces
from ..engine.ring_dilated import cross_blocks, rank_plan

MODES = ("dense", "sdpa", "attention", "dilated", "ring", "simulated_ring", "ring_dilated")
DTYPE_BYTES = {name: getattr(torch, name).itemsize for name in DTYPE_NAMES}


@dataclass(frozen=True)
class Problem:
    """One attention call. ``seq_len`` is the whole sequence; ranks hold seq_len / world_size."""
    seq_len: int
    heads: int
    head_dim: int
    batch: int = 1
    dtype: str = "float32"
    world_size: int = 1
    causal: bool = False
    segments: tuple = ()
    rates: tuple = ()
    head_offsets: str = "interleaved"
    layout: str = "contiguous"
    device: str = "cpu"      # "cpu" or "cuda": which kernels' scratch to count
    threads: int = 0         # CPU threads per rank; 0 = torch.get_num_threads()
    scratch: bool = True     # count kernel work buffers (the meta dry run allocates none)
    kv_heads: int = 0        # K/V heads (grouped-query attention); 0 = heads

    def __post_init__(self):
        if not self.kv_heads:
            object.__setattr__(self, "kv_heads", self.heads)
        if self.kv_heads < 0 or self.heads % self.kv_heads:
            raise ValueError(f"kv_heads ({self.kv_heads}) must divide heads ({self.heads})")

    @property
    def kv_group(self) -> int:
        """Query heads per K/V head (as RingConfig.kv_group)."""
        return self.heads // self.kv_heads

    def with_heads(self, heads: int) -> "Problem":
        """This problem for ``heads`` of its query heads (whole K/V groups): a head chunk."""
        return replace(self, heads=heads, kv_heads=heads // self.kv_group)

    @property
    def item_bytes(self) -> int:
        """Bytes of one element of q, k, v and the results."""
        return DTYPE_BYTES[self.dtype]

    @property
    def acc_bytes(self) -> int:
        """Bytes of one accumulator element: float64 stays float64, everything else float32."""
        return 8 if self.dtype == "float64" else 4

    def elements(self, rows: int, heads: int | None = None) -> int:
        """Elements of a (B, rows, H, D) tensor."""
        return self.batch * rows * (heads or self.heads) * self.head_dim

    def kv_elements(self, rows: int) -> int:
        """Elements of a (B, rows, H_kv, D) tensor: k, v and their gradients."""
        return self.elements(rows, self.kv_heads)

    def qkv_elements(self, rows: int) -> int:
        """Elements of q, k and v together (or of dq, dk and dv)."""
        return self.elements(rows) + 2 * self.kv_elements(rows)

    def lse_elements(self, rows: int, heads: int | None = None) -> int:
        """Elements of a (B, H, rows) lse."""
        return self.batch * rows * (heads or self.heads)

    @property
    def local(self) -> int:
        return self.seq_len // self.world_size

    def ring_config(self) -> RingConfig:
        """The ring (or ring-dilated, with segments) call of this problem, default scale."""
        return RingConfig(self.seq_len, self.world_size, self.heads, self.head_dim ** -0.5, self.causal,
                          self.layout, tuple(self.segments), tuple(self.rates), self.head_offsets, self.kv_heads)


@dataclass
class Estimate:
    mode: str
    backward: bool
    terms: dict = field(default_factory=dict)     # live at the peak of the call, bytes
    resident: dict = field(default_factory=dict)  # inputs held before the call, bytes

    @property
    def peak(self) -> int:
        return sum(self.terms.values())

    @property
    def total(self) -> int:
        """Peak of the call plus its resident inputs: what the rank needs for this layer."""
        return self.peak + sum(self.resident.values())


# ---------------------------------------------------------------- kernel scratch
def _threads(pb: Problem) -> int:
    return pb.threads or torch.get_num_threads()


def _q_split(rows: int) -> int:
    return min(rows, 256 if rows >= 768 else 64 if rows >= 192 else 32)


def kernel_scratch(pb: Problem, q_len: int, k_len: int, heads: int | None = None, *, backward: bool,
                   calls: int = 1) -> int:
    """Work buffers the flash kernel allocates for ``calls`` batched (q_len x k_len) problems
    of ``heads`` heads each (the batch of the call is pb.batch * calls)."""
    if q_len == 0 or k_len == 0 or not pb.scratch:
        return 0
    if pb.device == "cuda":
        if not backward:
            return 0
        pad = lambda x, m: -(-x // m) * m  # noqa: E731
        h = heads or pb.heads
        # float32 dQ accumulator and row sums of the flash backward
        return 4 * pb.batch * calls * h * pad(q_len, 128) * (pad(pb.head_dim, 32) + 1)
    if pb.device == "cpu" and k_len < kernels.CPU_FLASH_MIN_KEYS:
        return _math_scratch(pb, q_len, k_len, heads or pb.heads, pb.batch * calls, backward)
    qs, ks = _q_split(q_len), min(512, k_len)
    acc = 8 if pb.dtype == "float64" else 4
    reduced = pb.item_bytes if pb.item_bytes == 2 else 0
    if backward:
        return _threads(pb) * (2 * qs * ks * (acc + reduced) + qs * acc)
    return _threads(pb) * (qs * (ks + 2 + pb.head_dim) * acc + qs * ks * reduced)


def _math_scratch(pb: Problem, q_len: int, k_len: int, heads: int, batch: int, backward: bool) -> int:
    """The math path (ringlab.engine.kernels, CPU blocks with few keys) beyond the call's
    result: float32 copies of 16-bit inputs, its float32 results, and the (q_len x k_len)
    scores, probabilities and their gradients of every head. At its peak the forward holds
    out, the einsum's output and V's copy; the backward dq, dk, dv and the output of the dq or
    the dk product and its scaled copy."""
    eq, ek = batch * q_len * heads * pb.head_dim, batch * k_len * heads * pb.head_dim
    rows = batch * heads * q_len
    chunk = min(q_len, max(1, kernels.MATH_CHUNK_ELEMENTS // (batch * heads * k_len)))  # query rows per chunk
    scores = batch * heads * chunk * k_len
    narrow = pb.item_bytes != pb.acc_bytes
    if backward:
        upcast = 3 * eq + 2 * ek if narrow else 0
        peak = upcast + max(3 * eq + 2 * ek, eq + 4 * ek) + 4 * scores + rows
        return peak * pb.acc_bytes - (eq + 2 * ek) * pb.item_bytes
    upcast = eq + 2 * ek if narrow else 0
    peak = upcast + 2 * eq + ek + 2 * scores + 2 * rows
    return peak * pb.acc_bytes - eq * pb.item_bytes - rows * pb.acc_bytes


# ---------------------------------------------------------------- pieces shared by the modes
def _largest(phases: list[dict]) -> dict:
    """The phase with the most bytes live."""
    return max(phases, key=lambda t: sum(t.values())) if phases else {}


def _cudnn(pb: Problem) -> bool:
    """Whether the blocks run on cuDNN, by the backend's own rule on meta tensors (which take
    head_dim up to 128, as cards before Hopper do). Its backward reads the output gradient as
    a strided view: an H200 measured exactly the peak without the copy."""
    return pb.device == "cuda" and _cudnn_serves(pb.dtype, pb.batch, pb.heads, pb.head_dim)


@functools.lru_cache(maxsize=64)
def _cudnn_serves(dtype: str, batch: int, heads: int, head_dim: int) -> bool:
    q = torch.empty(batch, 2, heads, head_dim, dtype=getattr(torch, dtype), device="meta")
    return kernels.BACKENDS["cuda_cudnn"].applies(q, q, False)


def _block_forward(pb: Problem, rows: int, keys: int, heads: int, kv: int, q_len: int, k_len: int,
                   copied: bool = False, writes: bool = False) -> dict:
    """One kernel call (``heads`` query heads, ``kv`` K/V heads) merged into accumulators.
    Inside the kernel its scratch is live (and copies of q, k, v rows that no view can fold
    into the kernel's batch); after it, the torch merge's temporaries (new lse, shift, two weights;
    for 16-bit dtypes on CPU also the float32 upcast of the block output inside addcmul_; CUDA
    casts on the fly). The Triton merge makes none; the model keeps the torch merge's, since a
    plan cannot know whether its GPU machine has triton, and they are far below the kernel's phase. With kv < heads the kernel runs kv query heads at a time, each call's
    output next to the block output it is copied into. ``writes``: the block is copied into the
    accumulators (a dilated first branch), not merged: no temporaries."""
    base = {"block output": pb.elements(rows, heads) * pb.item_bytes, "block lse": pb.lse_elements(rows, heads) * pb.acc_bytes}
    upcast = pb.elements(rows, heads) * pb.acc_bytes if pb.item_bytes != pb.acc_bytes and pb.device == "cpu" else 0
    copies = (pb.elements(rows, heads) + 2 * pb.elements(keys, kv)) * pb.item_bytes if copied else 0
    scratch = kernel_scratch(pb, q_len, k_len, kv, backward=False, calls=rows // q_len)
    call = {"one call's output": pb.elements(rows, kv) * pb.item_bytes + pb.lse_elements(rows, kv) * pb.acc_bytes
            if kv < heads else 0}
    merging = 0 if writes else 4 * pb.lse_elements(rows, heads) * pb.acc_bytes + upcast
    return _largest([base | call | {"kernel scratch": scratch, "row copies": copies},
                     base | {"merge temporaries": merging}])


def _block_backward(pb: Problem, rows: int, keys: int, heads: int, kv: int, q_len: int, k_len: int,
                    copied: bool = False, writes: bool = False) -> dict:
    """One backward kernel call: the block's dq, dk, dv, the masked lse copy, and the kernel
    scratch and row copies (inside the kernel) or the float32 upcast of a gradient being
    accumulated (after it). The CUDA flash and efficient kernels also take a contiguous copy of
    the output gradient (cuDNN reads it strided: :func:`_cudnn`). With kv < heads see
    :func:`_gqa_backward`. ``writes``: the gradients are copied into the accumulators, not added
    (a dilated first branch): no upcast."""
    upcast = pb.item_bytes != pb.acc_bytes and pb.device == "cpu" and not writes
    copies = ((3 * pb.elements(rows, heads) + 2 * pb.elements(keys, kv)) * pb.item_bytes + pb.lse_elements(rows, heads) * pb.acc_bytes) if copied else 0
    scratch = kernel_scratch(pb, q_len, k_len, kv, backward=True, calls=rows // q_len)
    if kv < heads:
        return _gqa_backward(pb, rows, keys, heads, kv, scratch, copies, upcast)
    base = {"block gradients": (pb.elements(rows, heads) + 2 * pb.elements(keys, heads)) * pb.item_bytes,
            "lse copy": pb.lse_elements(rows, heads) * pb.acc_bytes}
    if pb.device == "cuda" and not _cudnn(pb):
        copies += pb.elements(rows, heads) * pb.item_bytes
    return _largest([base | {"kernel scratch": scratch, "row copies": copies},
                     base | {"accumulate upcast": pb.elements(max(rows, keys), heads) * pb.acc_bytes if upcast else 0}])


def _gqa_backward(pb: Problem, rows: int, keys: int, heads: int, kv: int, scratch: int, copies: int,
                  upcast: bool) -> dict:
    """A grouped-query backward block: dq of all heads and the float32 dK/dV sums, next to one
    call's dq, dk, dv and lse copy (inside its kernel), or its dk, dv being added to the sums
    (16-bit on CPU: through a float32 upcast). The block's dk, dv leave as float32, so the
    caller only upcasts dq. A call's output gradient takes every G-th head: the CPU kernel
    copies it contiguous, as the CUDA flash and efficient ones always do (cuDNN does not)."""
    base = {"block gradients": pb.elements(rows, heads) * pb.item_bytes + 2 * pb.elements(keys, kv) * pb.acc_bytes}
    call = (pb.elements(rows, kv) + 2 * pb.elements(keys, kv)) * pb.item_bytes
    copies += 0 if _cudnn(pb) else pb.elements(rows, kv) * pb.item_bytes
    return _largest([base | {"one call's gradients": call, "lse copy": pb.lse_elements(rows, kv) * pb.acc_bytes,
                             "kernel scratch": scratch, "row copies": copies},
                     base | {"one call's gradients": 2 * pb.elements(keys, kv) * pb.item_bytes, "row copies": copies,
                             "accumulate upcast": pb.elements(keys, kv) * pb.acc_bytes if upcast else 0},
                     base | {"accumulate upcast": pb.elements(rows, heads) * pb.acc_bytes if upcast else 0}])


def _blocks(pb: Problem, pieces, heads: slice | None = None, *, whole: bool = False) -> list:
    """The dilated blocks of ``pieces`` for the heads of one chunk (default all). ``whole``:
    dilated attention on one device, whose calls are cut no finer than the device's floor
    (ring-dilated ranks cut theirs by the quarter rule alone)."""
    count = pb.heads if heads is None else heads.stop - heads.start
    floor = min_call_rows(pb.device, pb.batch, count, pb.head_dim) if whole else 1
    return local_blocks(pieces, pb.heads, tuple(pb.segments), tuple(pb.rates), pb.head_offsets, pb.causal,
                        None if heads is None else (heads.start, heads.stop), pb.kv_group, floor,
                        whole and copies_to_fuse(pb.device))


def _chunks(pb: Problem, rows: int) -> list[slice]:
    """The head chunks ringlab.engine.autograd.head_chunks picks for q of (B, rows, H, D)."""
    from ..engine.autograd import head_chunks

    return head_chunks(pb.batch, rows, pb.heads, pb.head_dim, getattr(torch, pb.dtype), pb.device, pb.kv_heads)


def _chunked(pb: Problem, rows: int, backward: bool, inner, chunk_rows: int | None = None) -> dict:
    """A call whose heads run in chunks: the results in the input dtype for all heads (out, lse;
    with backward also the saved out and dq, dk, dv) and ``inner(chunk problem, heads, direct)``,
    the terms of the largest chunk. ``direct``: the accumulators are the results themselves
    (float32 and float64 inputs), so the inner terms leave them out. ``chunk_rows``: the rows
    of q that the chunks were chosen for, when not ``rows`` (a simulated ring)."""
    chunks = _chunks(pb, chunk_rows or rows)
    direct = pb.item_bytes == pb.acc_bytes
    full = {"out": pb.elements(rows) * pb.item_bytes, "lse": pb.lse_elements(rows) * pb.acc_bytes}
    if backward:
        full = _saved(pb, rows) | {"dq, dk, dv": pb.qkv_elements(rows) * pb.item_bytes}
    return full | _largest([inner(pb.with_heads(h.stop - h.start), h, direct) for h in chunks])


def _dims(pb: Problem, blk, local_len: int):
    """(rows, keys, heads, K/V heads, kernel q length, kernel k length, copied) of a dilated block.
    Its (batch, groups, segments) fold into the kernel's batch as a view when at most one of
    them exceeds 1, or when one group's segments tile the whole local sequence; otherwise the
    rows are copied."""
    tiles = blk.groups == 1 and (blk.q.nseg == 1 or blk.q.nseg * blk.q.seg_stride == local_len)
    copied = (pb.batch > 1 and not tiles) or (blk.groups > 1 and blk.q.nseg > 1)
    return (blk.groups * blk.q.num_rows, blk.groups * blk.k.num_rows, head_count(blk.heads),
            head_count(blk.kv_heads), blk.q.count, blk.k.count, copied)


def _saved(pb: Problem, rows: int) -> dict:
    """What the forward leaves for the backward: out (the float32 accumulator itself when the
    dtype is float32) and lse."""
    return {"saved out": pb.elements(rows) * pb.item_bytes, "saved lse": pb.lse_elements(rows) * pb.acc_bytes}


def _dense(pb: Problem, backward: bool) -> dict:
    """Materialized attention. K/V with fewer heads are repeated to H heads first, so the
    gradients reaching k and v have H heads before they are summed."""
    s = pb.batch * pb.heads * pb.seq_len * pb.seq_len * pb.item_bytes
    n = pb.seq_len
    if not backward:
        repeated = 2 * pb.elements(n) * pb.item_bytes if pb.kv_heads < pb.heads else 0
        return {"scores": s, "probabilities": s, "out": pb.elements(n) * pb.item_bytes, "K/V repeated": repeated}
    return {"saved probabilities": s, "grad probabilities": s, "grad scores": s,
            "saved out": pb.elements(n) * pb.item_bytes, "dq, dk, dv": 3 * pb.elements(n) * pb.item_bytes}


def _flash(pb: Problem, backward: bool, *, ours: bool) -> dict:
    """One fused kernel call; torch SDPA takes K/V with fewer heads directly. Ours runs a
    grouped-query call as H / H_kv calls (see :func:`_block_forward`, :func:`_block_backward`)
    and casts the float32 dK/dV sums to the input dtype at the end."""
    n = pb.seq_len
    out = {"out": pb.elements(n) * pb.item_bytes, "lse": pb.lse_elements(n) * pb.acc_bytes}
    if ours and pb.kv_heads < pb.heads:
        if not backward:  # the calls write the result: nothing to merge
            return _block_forward(pb, n, n, pb.heads, pb.kv_heads, n, n, writes=True)
        grads = pb.elements(n) * pb.item_bytes + 2 * pb.kv_elements(n) * pb.acc_bytes
        return _saved(pb, n) | _largest([_block_backward(pb, n, n, pb.heads, pb.kv_heads, n, n),
                                          {"block gradients": grads, "dk, dv": _cast(pb, 2 * pb.kv_elements(n))}])
    if not backward:
        return out | {"kernel scratch": kernel_scratch(pb, n, n, backward=False)}
    terms = {"saved out": out["out"], "saved lse": out["lse"], "dq, dk, dv": pb.qkv_elements(n) * pb.item_bytes,
             "kernel scratch": kernel_scratch(pb, n, n, backward=True)}
    if ours:
        terms["lse copy"] = pb.lse_elements(n) * pb.acc_bytes
    return terms


def _accumulators(pb: Problem, rows: int) -> dict:
    return {"out accumulator": pb.elements(rows) * pb.acc_bytes, "lse accumulator": pb.lse_elements(rows) * pb.acc_bytes}


def _cast(pb: Problem, elements: int) -> int:
    """The final cast of float32 accumulators to a narrower dtype (free when dtypes match)."""
    return elements * pb.item_bytes if pb.item_bytes != pb.acc_bytes else 0


def _dilated(pb: Problem, backward: bool) -> dict:
    n = pb.seq_len
    if len(_chunks(pb, n)) > 1:
        return _chunked(pb, n, backward, lambda ch, h, direct: _dilated_chunk(pb, ch, h, direct, backward))
    blocks = _blocks(pb, ((0, n),), whole=True)
    dims = _dilated_dims(pb, pb, blocks)
    acc = _accumulators(pb, n)
    phases = [acc | _largest([_block_forward(pb, *d) for d in dims]),
              acc | {"out": _cast(pb, pb.elements(n))}]
    if backward:
        saved = _saved(pb, n) | {"dq, dk, dv accumulators": pb.qkv_elements(n) * pb.acc_bytes}
        phases += [saved | _largest([_block_backward(pb, *d) for d in dims]),
                   saved | {"dq, dk, dv": _cast(pb, pb.qkv_elements(n))}]
    return _largest(phases)


def _dilated_dims(pb: Problem, ch: Problem, blocks) -> list[tuple]:
    """:func:`_dims` of each dilated block (of the head chunk ``ch``), and whether it writes the
    accumulators rather than merging (ringlab.engine.dilated.writes_first)."""
    first = writes_first(blocks, pb.rates)
    return [_dims(ch, b, pb.seq_len) + (first and b.branch == 0,) for b in blocks]


def _dilated_chunk(pb: Problem, ch: Problem, heads: slice, direct: bool, backward: bool) -> dict:
    """One head chunk of dilated attention: its accumulators (unless direct) and blocks."""
    n = pb.seq_len
    blocks = _dilated_dims(pb, ch, _blocks(pb, ((0, n),), heads, whole=True))
    if not backward:
        return ({} if direct else {"out accumulator": ch.elements(n) * ch.acc_bytes}) | _largest(
            [_block_forward(ch, *d) for d in blocks])
    return ({} if direct else {"dq, dk, dv accumulators": ch.qkv_elements(n) * ch.acc_bytes}) | _largest(
        [_block_backward(ch, *d) for d in blocks])


def _ring_rank(pb: Problem, backward: bool, simulated: bool = False) -> dict:
    """One rank of the ring. Heads run in chunks as the call sees q: the shard on a real rank,
    the whole sequence when simulated."""
    if len(_chunks(pb, pb.seq_len if simulated else pb.local)) > 1:
        return _chunked(pb, pb.local, backward, lambda ch, h, direct: _largest(_ring_phases(ch, backward, False)),
                        chunk_rows=pb.seq_len if simulated else pb.local)
    return _largest(_ring_phases(pb, backward, True))


def _ring_phases(pb: Problem, backward: bool, whole: bool) -> list[dict]:
    """The ring's phases; ``whole``: the call's only chunk, which also casts the accumulators
    to the results and holds the saved out (a chunk copies into results held outside)."""
    n, p, h, hkv = pb.local, pb.world_size, pb.heads, pb.kv_heads
    kv = 2 * pb.kv_elements(n) * pb.item_bytes
    buffers = {"K/V held": kv, "K/V receive buffer": kv if p > 1 else 0}
    acc = _accumulators(pb, n)
    if not backward:
        return [acc | buffers | _block_forward(pb, n, n, h, hkv, n, n)] + (
            [acc | {"out": _cast(pb, pb.elements(n))}] if whole else [])
    dkv = 2 * pb.kv_elements(n) * pb.acc_bytes
    saved = (_saved(pb, n) if whole else {}) | {"dq accumulator": pb.elements(n) * pb.acc_bytes}
    return [saved | buffers | {"dK/dV accumulator": dkv} | _block_backward(pb, n, n, h, hkv, n, n),
            # passing the accumulator on: the one sent and the one arriving
            saved | buffers | {"dK/dV accumulator": dkv, "dK/dV receive buffer": dkv if p > 1 else 0}] + (
            [saved | {"dq, dk, dv": _cast(pb, pb.qkv_elements(n))}] if whole else [])


def _ring_dilated_rank(pb: Problem, backward: bool, rank: int | None) -> dict:
    """One rank of ring-dilated attention; its heads run in chunks as the call sees its shard."""
    if len(_chunks(pb, pb.local)) > 1:
        return _chunked(pb, pb.local, backward,
                        lambda ch, h, direct: _ring_dilated_phases(pb, backward, rank, h, whole=False))
    return _ring_dilated_phases(pb, backward, rank, slice(0, pb.heads), whole=True)


def _ring_dilated_phases(pb: Problem, backward: bool, rank: int | None, heads: slice, whole: bool) -> dict:
    """Per branch and ring step: this rank's messages (held, and arriving while its sub-ring
    still rotates), the dK/dV accumulators in flight (a real P2P send keeps its buffer until
    waited on), and the largest block of the step: local blocks at step 0, cross blocks after.
    Ranks differ (zigzag joins the two middle chunks; segment edges fall differently): rank
    None takes the worst of the first, middle and last ranks."""
    n, row = pb.local, pb.batch * pb.head_dim
    full, pb = pb, pb.with_heads(heads.stop - heads.start)  # sizes below are of this chunk's heads
    phases = []
    for rank in sorted({0, pb.world_size // 2, pb.world_size - 1}) if rank is None else [rank]:
        plan = rank_plan(full.ring_config(), rank, (heads.start, heads.stop))
        blocks = _blocks(full, shard_pieces(pb.seq_len, rank, pb.world_size, pb.layout), heads)
        acc = _accumulators(pb, n)
        saved = (_saved(pb, n) if whole else {}) | {"dq, dk, dv accumulators": pb.qkv_elements(n) * pb.acc_bytes}
        for b, subs in enumerate(plan.subrings):
            me = [s.members.index(rank) for s in subs]

            def size(k, src):  # bytes per element of the message sub-ring k's member src sends
                return 2 * row * subs[k].sizes[src % len(subs[k].members)]

            def held(k, t):  # the message sub-ring k holds at step t (the last one once it stops)
                return size(k, me[k] - min(t, subs[k].hops()))

            def msgs(t):
                return {"messages held + arriving": pb.item_bytes * sum(
                    held(k, t) + (size(k, me[k] - t - 1) if t < s.hops() else 0) for k, s in enumerate(subs))}

            local = [_dims(pb, x, n) for x in blocks if x.branch == b]

            def cross(j, t):  # the distinct shapes of sub-ring j's blocks at step t, against the message held
                s, i = subs[j], me[j]
                return frozenset((g * q.rows.count, g * k.rows.count, head_count(q.heads), head_count(k.kv_heads),
                                  q.rows.count, k.rows.count, pb.batch > 1 and g > 1)
                                 for q, k in cross_blocks(s.parts[i], s.parts[(i - t) % len(s.members)], pb.causal)
                                 for g in [q.groups])

            @functools.cache
            def largest(block, shapes):  # the largest block of these shapes
                return _largest([block(pb, *d) for d in shapes])

            phases.append(acc | msgs(0) | _largest([_block_forward(pb, *d) for d in local]))
            phases += [acc | msgs(t) | largest(_block_forward, cross(j, t))
                       for t in range(1, plan.steps[b] + 1) for j, s in enumerate(subs) if t <= s.hops()]
            if not backward:
                continue
            phases.append(saved | msgs(0) | _largest([_block_backward(pb, *d) for d in local]))

            def in_flight(k, t):  # dK/dV sub-ring k passed on at step t: the one sent and the one arriving
                return held(k, t) + size(k, me[k] - t - 1) if t >= 1 else 0

            for t in range(1, plan.steps[b] + 1):
                for j, s in enumerate(subs):
                    if t > s.hops():
                        continue
                    # the other sub-rings' accumulators: passed on this step (k < j), last step
                    # (k > j), or on their way home; a real send keeps its buffer until waited on
                    others = sum(in_flight(k, min(t if k < j else t - 1, sk.hops()))
                                 for k, sk in enumerate(subs) if k != j) * pb.acc_bytes
                    phases.append(saved | msgs(t) | {"dK/dV of messages": others + held(j, t) * pb.acc_bytes}
                                  | largest(_block_backward, cross(j, t)))
                    phases.append(saved | msgs(t) | {"dK/dV of messages": others + in_flight(j, t) * pb.acc_bytes})
        if whole:
            phases.append(acc | {"out": _cast(pb, pb.elements(n))})
            if backward:
                phases.append(saved | {"dq, dk, dv": _cast(pb, pb.qkv_elements(n))})
    return _largest(phases)


def estimate(pb: Problem, mode: str, *, backward: bool = False, rank: int | None = None) -> Estimate:
    """Per-rank memory of ``mode`` on ``pb``: named terms at the peak, and resident inputs.
    ``rank`` picks one rank for ring_dilated (default: the worst); other modes are symmetric."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode in ("dilated", "ring_dilated") and not pb.segments:
        raise ValueError(f"mode {mode!r} needs segments and rates")
    single = mode in ("dense", "sdpa", "attention", "dilated")
    if single and pb.world_size != 1:
        pb = replace(pb, world_size=1)
    terms = {"dense": lambda: _dense(pb, backward),
             "sdpa": lambda: _flash(pb, backward, ours=False),
             "attention": lambda: _flash(pb, backward, ours=True),
             "dilated": lambda: _dilated(pb, backward),
             "ring": lambda: _ring_rank(pb, backward),
             "simulated_ring": lambda: _ring_rank(pb, backward, simulated=True),
             "ring_dilated": lambda: _ring_dilated_rank(pb, backward, rank)}[mode]()
    rows = pb.seq_len if single else pb.local
    resident = {"q, k, v": pb.qkv_elements(rows) * pb.item_bytes}
    if backward:
        resident["output gradient"] = pb.elements(rows) * pb.item_bytes
    return Estimate(mode, backward, {k: v for k, v in terms.items() if v}, resident)


def _need(mode: str, fields: dict, backward: bool) -> tuple[int, int]:
    est = estimate(Problem(**fields), mode, backward=backward)
    return est.peak, est.total - est.peak


autograd.memory_estimate = _need  # the engine's out-of-memory errors quote the model
