"""ringlab.dilated_attention against the dense float64 reference with bias log m (docs/design.md §3)."""

import dataclasses
import math

import pytest
import torch
from conftest import check_against, per_document, rand_qkv, repeated, uninitialized_is_nan

import ringlab
from ringlab.engine import dilation
from ringlab.engine.dilation import multiplicity, offset_groups, runs, score_pairs
from ringlab.engine.kernels import use_backend
from ringlab.reference import dense_dilated_attention

CONFIGS = [
    ([16, 32], [1, 2]),               # LongNet-style, rates divide segments
    ([7, 20, 64], [1, 3, 5]),          # rates that do not divide segments
    ([24, 1000], [2, 11]),            # a segment longer than N, rate > heads
    ([5], [1]),                        # one plain block-local branch
    ([50, 50], [2, 3]),                # equal segments, different rates
    ([40, 120], [4, 8]),               # no rate-1 branch: some rows see nothing
]


def _fn(segs, rates, causal, mode, scale=None):
    return lambda q, k, v: ringlab.dilated_attention(q, k, v, segs, rates, causal=causal,
                                                     head_offsets=mode, scale=scale, return_lse=True)


def _ref(segs, rates, causal, mode, scale=None):
    return lambda q, k, v: dense_dilated_attention(q, k, v, segs, rates, causal=causal,
                                                   head_offsets=mode, scale=scale)


@pytest.mark.parametrize("segs,rates", CONFIGS)
@pytest.mark.parametrize("n", [1, 7, 64, 100, 257])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", ["interleaved", "grouped"])
def test_against_reference_f64(segs, rates, n, causal, mode):
    inputs = rand_qkv(2, n, 6, 16, seed=n)
    check_against(_fn(segs, rates, causal, mode), _ref(segs, rates, causal, mode), inputs,
                  torch.float64, name=f"{segs}/{rates}")


@pytest.mark.parametrize("segs,rates", CONFIGS[:3])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [16, 64, 128])
def test_against_reference_f32(segs, rates, causal, d):
    inputs = rand_qkv(2, 200, 4, d, seed=d)
    check_against(_fn(segs, rates, causal, "interleaved"), _ref(segs, rates, causal, "interleaved"),
                  inputs, torch.float32)


def test_long_sequence_f32():
    segs, rates = [128, 256, 512, 1024], [1, 2, 4, 8]
    inputs = rand_qkv(1, 1024, 8, 64, seed=5)
    check_against(_fn(segs, rates, True, "interleaved"), _ref(segs, rates, True, "interleaved"),
                  inputs, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", ["interleaved", "grouped"])
def test_low_precision(dtype, causal, mode):
    segs, rates = [16, 64], [1, 4]
    inputs = rand_qkv(2, 128, 4, 32, seed=2)
    check_against(_fn(segs, rates, causal, mode), _ref(segs, rates, causal, mode), inputs, dtype)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", ["interleaved", "grouped"])
def test_scale(causal, mode):
    segs, rates = [7, 20, 64], [1, 3, 5]
    inputs = rand_qkv(2, 50, 6, 16, seed=6)
    check_against(_fn(segs, rates, causal, mode, scale=0.7), _ref(segs, rates, causal, mode, scale=0.7),
                  inputs, torch.float64, use_lse=True)


@pytest.mark.parametrize("causal", [False, True])
def test_math_backend_and_lse_gradient(causal):
    segs, rates = [12, 40], [2, 3]
    inputs = rand_qkv(2, 70, 4, 16, seed=4)
    with use_backend("math"):
        check_against(_fn(segs, rates, causal, "grouped"), _ref(segs, rates, causal, "grouped"),
                      inputs, torch.float64, use_lse=True)
    check_against(_fn(segs, rates, causal, "interleaved"), _ref(segs, rates, causal, "interleaved"),
                  inputs, torch.float64, use_lse=True)


def test_rows_that_see_nothing_are_zero_and_finite():
    """No rate-1 branch: for head 0 (offset 0) odd positions are never selected."""
    q, k, v = (x.requires_grad_() for x in rand_qkv(1, 16, 2, 8))
    out, lse = ringlab.dilated_attention(q, k, v, [8], [2], return_lse=True)
    assert (out[0, 1::2, 0] == 0).all() and (lse[0, 0, 1::2] == -math.inf).all()
    assert (lse[0, 0, 0::2] > -math.inf).all()
    (out.sum() + lse.masked_fill(lse.isinf(), 0).sum()).backward()
    for x in (q, k, v):
        assert torch.isfinite(x.grad).all()
    assert (q.grad[0, 1::2, 0] == 0).all()


def test_dilated_with_single_full_branch_is_attention():
    q, k, v = rand_qkv(2, 37, 3, 16)
    for causal in (False, True):
        a = ringlab.dilated_attention(q, k, v, [37], [1], causal=causal)
        b = ringlab.attention(q, k, v, causal=causal)
        assert torch.allclose(a, b, atol=1e-13, rtol=0)


# ---------------------------------------------------------------- geometry
def test_offset_groups_cover_every_head_once():
    for h in range(1, 10):
        for r in range(1, 12):
            for mode in ("interleaved", "grouped"):
                heads = [i for _, s in offset_groups(h, r, mode) for i in range(h)[s]]
                assert sorted(heads) == list(range(h))


@pytest.mark.parametrize("pieces", [((0, 23),), ((5, 17),), ((0, 6), (30, 41)), ((12, 13),)])
@pytest.mark.parametrize("w,r,o", [(10, 3, 1), (4, 1, 0), (7, 2, 1), (100, 5, 4), (1, 1, 0)])
def test_runs_enumerate_exactly_the_selected_rows(pieces, w, r, o):
    pos = torch.cat([torch.arange(a, b) for a, b in pieces])
    expected = [(i, p) for i, p in enumerate(pos.tolist()) if (p % w) % r == o]
    got = sorted((x.start + i * x.seg_stride + j * x.stride, x.pos + i * x.seg_stride + j * x.stride)
                 for x in runs(pieces, w, r, o) for i in range(x.nseg) for j in range(x.count))
    assert got == expected
    for x in runs(pieces, w, r, o):  # one run never spans two segments' worth of rows
        assert (x.count - 1) * x.stride < w and x.pos // w == x.seg


def test_multiplicity_counts_branches():
    m = multiplicity(8, 2, [4, 8], [1, 2])
    # head 0: offset 0 in the rate-2 branch; q=0,k=2 share both segments and are selected twice
    assert m[0, 0, 2] == 2 and m[0, 0, 1] == 1 and m[0, 0, 5] == 0 and m[1, 1, 3] == 2
    assert (multiplicity(8, 2, [4], [1], causal=True)[0].triu(1) == 0).all()


def test_score_pairs_dense_case():
    assert score_pairs(10, 3, [10], [1]) == 3 * 100
    assert score_pairs(10, 3, [10], [1], causal=True) == 3 * 55


@pytest.mark.parametrize("causal", [False, True])
def test_work_per_rank_stays_exact_past_int64(causal):
    """Per-rank pairs of one dense 2**40-token segment (2**82 pairs a rank) are counted
    exactly, not wrapped around in int64; a small case on the int64 path agrees with the masks."""
    n, h, p = 2**40, 16, 4
    rows = n // p
    want = [h * (rows * (x * rows + 1) + rows * (rows - 1) // 2) if causal else h * rows * n for x in range(p)]
    assert dilation.dilated_work_per_rank("contiguous", p, [0, n], h, [n], [1], causal=causal) == want
    m = multiplicity(96, 3, [32, 96], [2, 3], causal=causal)
    assert dilation.dilated_work_per_rank("zigzag", 3, [0, 96], 3, [32, 96], [2, 3], causal=causal) == [
        int(m[:, [*range(16 * x, 16 * x + 16), *range(80 - 16 * x, 96 - 16 * x)]].sum()) for x in range(3)]


def test_gpu_calls_are_cut_no_finer_than_the_floor():
    """On CUDA (meta, the dry run's stand-in, dispatches alike) the quarter-of-rows split stops
    at dilation.MIN_CALL_ELEMENTS and a branch's offset groups share a call (COPY_TO_FUSE):
    fewer, larger kernel calls, the same pairs, and the memory model counts the engine's blocks
    on each device."""
    from ringlab.engine import kernels
    from ringlab.planning.memory_model import Problem, _blocks

    n, h, d, segs, rates = 4096, 4, 16, (256, 512, 1024, 4096), (1, 2, 4, 8)
    geometry = (((0, n),), h, segs, rates, "interleaved", True)
    cpu, gpu = (dilation.local_blocks(*geometry, None, 1, dilation.min_call_rows(dev, 1, h, d),
                                      dilation.copies_to_fuse(dev)) for dev in ("cpu", "cuda"))
    assert dilation.min_call_rows("cpu", 1, h, d) == 1 and dilation.min_call_rows("meta", 2, h, d) == (1 << 27) // 128
    assert not dilation.copies_to_fuse("cpu") and dilation.copies_to_fuse("meta")
    assert len(gpu) == len(segs) < len(cpu) and max(b.groups * b.q.num_rows for b in gpu) > n // 4
    assert sum(b.pairs(h) for b in gpu) == sum(b.pairs(h) for b in cpu) == dilation.score_pairs(n, h, segs, rates,
                                                                                               causal=True)
    for device, expected in (("cpu", cpu), ("meta", gpu)):
        q, k, v = (torch.empty(1, n, h, d, dtype=torch.bfloat16, device=device) for _ in range(3))
        with kernels.record_backends() as served:
            ringlab.dilated_attention(q, k, v, list(segs), list(rates), causal=True)
        assert sum(c for key, c in served.items() if key.startswith("forward/")) == len(expected)
        pb = Problem(n, h, d, dtype="bfloat16", causal=True, segments=segs, rates=rates,
                     device="cpu" if device == "cpu" else "cuda")
        assert tuple(_blocks(pb, ((0, n),), whole=True)) == expected


# ---------------------------------------------------------------- groups fused by copying (a GPU's calls)
def _gpu_calls(monkeypatch, floor):
    """CPU blocks cut as on a GPU: offset groups of many-segment runs share a call, their rows
    copied into the kernel's batch (dilation.COPY_TO_FUSE), with the floor ``floor``."""
    monkeypatch.setitem(dilation.COPY_TO_FUSE, "cpu", True)
    monkeypatch.setitem(dilation.MIN_CALL_ELEMENTS, "cpu", floor)


def _copies(n, h, d, segs, rates, mode, causal, kv_group=1):
    """How many of the blocks the engine runs on CPU fold copied rows: many groups and segments."""
    blocks = dilation.local_blocks(((0, n),), h, tuple(segs), tuple(rates), mode, causal, None, kv_group,
                                   dilation.min_call_rows("cpu", 1, h, d), dilation.copies_to_fuse("cpu"))
    return sum(b.groups > 1 and b.q.nseg > 1 for b in blocks)


def test_groups_fuse_by_copy_only_when_allowed_and_alike():
    """Runs of many segments fuse only with ``copy``, and only runs of as many segments and rows."""
    a, b = dilation.Rows(0, 0, 0, 4, 8, 2, 16), dilation.Rows(1, 1, 0, 4, 8, 2, 16)
    heads = slice(0, 4, 2), slice(1, 4, 2)
    assert dilation.fusable(a, heads[0], 1, 0, b, heads[1]) is None
    assert dilation.fusable(a, heads[0], 1, 0, b, heads[1], copy=True) == 1
    for other in (dilation.Rows(1, 1, 0, 3, 8, 2, 16), dilation.Rows(1, 1, 0, 4, 7, 2, 16)):
        assert dilation.fusable(a, heads[0], 1, 0, other, heads[1], copy=True) is None


@pytest.mark.parametrize("segs,rates,floor", [([16, 32], [1, 2], 1 << 27), ([7, 20, 64], [1, 3, 5], 1 << 27),
                                              ([40, 120], [4, 8], 1 << 27), ([50, 50], [2, 3], 1 << 27),
                                              ([16, 32], [1, 2], 0)])
@pytest.mark.parametrize("batch,kv_heads", [(1, 6), (2, 6), (2, 3)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", ["interleaved", "grouped"])
def test_groups_fused_by_copy_against_reference_f64(monkeypatch, segs, rates, floor, batch, kv_heads, causal, mode):
    """The GPU's dilated calls (one per branch, copied rows) run on CPU, outputs, lse and gradients
    against float64; floor 0 also cuts the fused calls by the quarter rule."""
    _gpu_calls(monkeypatch, floor)
    n, h, d = 257, 6, 16
    assert _copies(n, h, d, segs, rates, mode, causal, h // kv_heads) > 0
    q, = rand_qkv(batch, n, h, d, seed=3, count=1)
    k, v = rand_qkv(batch, n, kv_heads, d, seed=4, count=2)
    check_against(_fn(segs, rates, causal, mode), repeated(_ref(segs, rates, causal, mode)), [q, k, v],
                  torch.float64, use_lse=causal, name=f"{segs}/{rates}")


@pytest.mark.parametrize("causal", [False, True])
def test_groups_fused_by_copy_in_packed_documents_bf16(monkeypatch, causal):
    """Packed documents, each its own sequence of many segments, in bfloat16 (the GPU's dtype)."""
    _gpu_calls(monkeypatch, 1 << 27)
    docs, segs, rates = [0, 3, 70, 71, 160, 200], [4, 8, 16], [1, 2, 4]
    blocks = dilation.document_blocks(((0, 200),), tuple(docs), 4, tuple(segs), tuple(rates), "interleaved",
                                      causal, None, 1, dilation.min_call_rows("cpu", 1, 4, 8), True)
    assert any(b.groups > 1 and b.q.nseg > 1 for b in blocks)
    fn = lambda q, k, v: ringlab.dilated_attention(q, k, v, segs, rates, causal=causal, cu_seqlens=torch.tensor(docs),  # noqa: E731
                                                   return_lse=True)
    check_against(fn, per_document(_ref(segs, rates, causal, "interleaved"), docs), rand_qkv(1, 200, 4, 8, seed=7),
                  torch.bfloat16, use_lse=True)


# ---------------------------------------------------------------- the first branch writes, not merges
@pytest.mark.parametrize("case", ["plain", "ragged", "gqa", "batch", "chunks", "packed", "gpu calls"])
@pytest.mark.parametrize("causal", [False, True])
def test_first_branch_writes_every_row_and_head(monkeypatch, case, causal):
    """With a rate-1 first branch the accumulators start uninitialized and its blocks write them
    (dilated.writes_first): every row, head and gradient must still equal the float64 reference."""
    segs, rates, mode = [16, 32, 64], [1, 2, 4], "interleaved"
    n, batch, kv_heads, docs = {"ragged": 101}.get(case, 96), 2 if case == "batch" else 1, 2 if case == "gqa" else 4, None
    if case == "chunks":
        monkeypatch.setattr("ringlab.engine.autograd.MIN_CHUNK_ELEMENTS", {"cuda": 1, "cpu": 1})
    if case == "gpu calls":
        _gpu_calls(monkeypatch, 1 << 27)
    blocks = dilation.local_blocks(((0, n),), 4, tuple(segs), tuple(rates), mode, causal, None, 4 // kv_heads)
    assert ringlab.engine.dilated.writes_first(blocks, rates)
    q, = rand_qkv(batch, n, 4, 8, seed=11, count=1)
    k, v = rand_qkv(batch, n, kv_heads, 8, seed=12, count=2)
    ref = repeated(_ref(segs, rates, causal, mode))
    if case == "packed":
        docs = [0, 5, 40, 96]
        ref = per_document(ref, docs)

    fn = lambda q, k, v: ringlab.dilated_attention(  # noqa: E731
        q, k, v, segs, rates, causal=causal, return_lse=True, cu_seqlens=None if docs is None else torch.tensor(docs))
    with uninitialized_is_nan():
        check_against(fn, ref, [q, k, v], torch.float64, use_lse=True, name=case)


def test_first_branch_writes_only_when_it_reaches_every_row_first():
    """No rate-1 first branch: merge from zeros and -inf as before."""
    blocks = dilation.local_blocks(((0, 96),), 4, (16, 32), (1, 2), "interleaved", True)
    assert ringlab.engine.dilated.writes_first(blocks, (1, 2))
    assert not ringlab.engine.dilated.writes_first(dilation.local_blocks(((0, 96),), 4, (16, 32), (2, 4),
                                                                        "interleaved", True), (2, 4))
    crossed = [dataclasses.replace(blocks[0], k=dataclasses.replace(blocks[0].k, start=1))] + list(blocks[1:])
    assert not ringlab.engine.dilated.writes_first(crossed, (1, 2))
