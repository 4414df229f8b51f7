"""Packed variable-length documents (cu_seqlens, issue 14): every function (the Ulysses meshes
too) against the float64 reference of each document alone, the tiles a ring skips, the balance
of the layouts, and the errors of a wrong cu_seqlens."""

import itertools
import math

import pytest
import torch
from conftest import assert_close, check_against, dilated_pairs_by_row, per_document, rand_qkv
from ringcases import (MESH_WORLD_SIZE, PACKED_WORLD_SIZES, check_case, gathered, packed_cases, packed_documents,
                       packed_mesh_cases)

import ringlab
from ringlab.engine.config import ring_config
from ringlab.engine.layout import (LAYOUTS, balance, document_tiles, imbalance, ring_tiles, with_pieces,
                                  work_per_rank)
from ringlab.engine.trace import record_events
from ringlab.engine.ulysses import mesh_config
from ringlab.reference import dense_attention, dense_dilated_attention

# Ragged documents of a 40-token sequence: shorter than a segment (3, 1), spanning segments.
DOCS = [0, 3, 20, 21, 34, 40]
BRANCHES = ([4, 8, 16], [1, 2, 4])


def dense(causal):
    return lambda q, k, v: dense_attention(q, k, v, causal=causal)


def dense_dilated(causal, mode="interleaved"):
    return lambda q, k, v: dense_dilated_attention(q, k, v, *BRANCHES, causal=causal, head_offsets=mode)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_attention(dtype, causal):
    cu = torch.tensor(DOCS, dtype=torch.int32)
    fn = lambda q, k, v: ringlab.attention(q, k, v, causal=causal, cu_seqlens=cu, return_lse=True)  # noqa: E731
    check_against(fn, per_document(dense(causal), DOCS), rand_qkv(1, 40, 3, 16, seed=1), dtype, use_lse=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", ["interleaved", "grouped"])
def test_dilated_attention(dtype, causal, mode):
    cu = torch.tensor(DOCS)
    fn = lambda q, k, v: ringlab.dilated_attention(q, k, v, *BRANCHES, causal=causal, head_offsets=mode,  # noqa: E731
                                                   cu_seqlens=cu, return_lse=True)
    check_against(fn, per_document(dense_dilated(causal, mode), DOCS), rand_qkv(1, 40, 4, 8, seed=2), dtype,
                  use_lse=True)


def test_one_document_is_the_unpacked_call():
    q, k, v = rand_qkv(1, 24, 2, 8, seed=3)
    whole = torch.tensor([0, 24])
    assert torch.equal(ringlab.attention(q, k, v, causal=True, cu_seqlens=whole),
                       ringlab.attention(q, k, v, causal=True))
    assert torch.equal(ringlab.dilated_attention(q, k, v, *BRANCHES, cu_seqlens=whole),
                       ringlab.dilated_attention(q, k, v, *BRANCHES))


# ---------------------------------------------------------------- simulated rings
def _ring(p, layout, causal, docs, dilated, ulysses=None):
    """The packed call on a simulated ring of p ranks or, with ``ulysses`` = U, a U x p mesh."""
    kw = dict(ring_size=p, causal=causal, layout=layout, cu_seqlens=torch.tensor(docs), return_lse=True)
    if ulysses is None:
        dense_fn, dilated_fn = ringlab.ring_attention, ringlab.ring_dilated_attention
    else:
        dense_fn, dilated_fn = ringlab.ulysses_attention, ringlab.ulysses_dilated_attention
        kw["ulysses_size"] = ulysses
    if dilated:
        return lambda q, k, v: dilated_fn(q, k, v, *BRANCHES, **kw)
    return lambda q, k, v: dense_fn(q, k, v, **kw)


@pytest.mark.parametrize("p", [2, 3, 4])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("causal", [False, True])
def test_simulated_ring(p, layout, causal):
    docs = packed_documents(p, layout)
    check_against(_ring(p, layout, causal, docs, False), per_document(dense(causal), docs),
                  rand_qkv(1, docs[-1], 2, 8, seed=p), torch.float64, use_lse=True)


@pytest.mark.parametrize("p", [2, 3, 4])
@pytest.mark.parametrize("layout", with_pieces())
@pytest.mark.parametrize("causal", [False, True])
def test_simulated_ring_dilated(p, layout, causal):
    docs = packed_documents(p, layout)
    check_against(_ring(p, layout, causal, docs, True), per_document(dense_dilated(causal), docs),
                  rand_qkv(1, docs[-1], 4, 8, seed=10 + p), torch.float64, use_lse=True)


MESHES = [(2, 1), (2, 2), (1, 2)]  # (ulysses_size, ring_size)


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: f"{m[0]}x{m[1]}")
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("causal", [False, True])
def test_simulated_mesh(mesh, layout, causal):
    """Ulysses and the hybrid: 12 tokens per mesh rank, documents across Ulysses pieces and ring
    shards (doc_zigzag's are multiples of 2UR, so of the 2R it needs)."""
    u, r = mesh
    docs = packed_documents(u * r, layout)
    check_against(_ring(r, layout, causal, docs, False, ulysses=u), per_document(dense(causal), docs),
                  rand_qkv(1, docs[-1], 2, 8, seed=20 + u * r), torch.float64, use_lse=True)


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: f"{m[0]}x{m[1]}")
@pytest.mark.parametrize("layout", with_pieces())
@pytest.mark.parametrize("causal", [False, True])
def test_simulated_mesh_dilated(mesh, layout, causal):
    u, r = mesh
    docs = packed_documents(u * r, layout)
    check_against(_ring(r, layout, causal, docs, True, ulysses=u), per_document(dense_dilated(causal), docs),
                  rand_qkv(1, docs[-1], 4, 8, seed=30 + u * r), torch.float64, use_lse=True)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("causal", [False, True])
def test_one_document_tiles_are_the_layout_tiles(layout, causal):
    """The tiles cut per document cover exactly the layout's own causal tile for one document."""
    for p in (1, 2, 3, 4):
        n = 4 * p
        for rank, src in itertools.product(range(p), repeat=2):
            packed = document_tiles(layout, rank, src, p, (0, n * p), causal)
            plain = ring_tiles(layout, rank, src, p, n, causal)
            assert sum(t.pairs() for t in packed) == sum(t.pairs() for t in plain), (p, rank, src)


def test_skipped_tiles_in_the_trace():
    """Documents that each lie inside one shard: every step but a rank's own block is skipped,
    and the pairs computed are exactly the documents' causal pairs."""
    p, docs = 4, [0, 5, 12, 20, 24, 30, 36, 41, 48]
    q, k, v = (x.requires_grad_() for x in rand_qkv(1, 48, 2, 8, seed=4))
    with record_events() as tr:
        ringlab.ring_attention(q, k, v, ring_size=p, causal=True, cu_seqlens=torch.tensor(docs)).sum().backward()
    for pass_ in ("forward", "backward"):
        computed, skipped = tr.of(kind="compute", pass_=pass_), tr.of(kind="skip", pass_=pass_)
        assert len(computed) == p and len(skipped) == p * (p - 1)
        assert all(e["src"] == e["rank"] for e in computed)
        assert sum(tr.work_per_rank(pass_).values()) == sum((b - a) * (b - a + 1) // 2 for a, b in zip(docs, docs[1:]))
    # A document across a shard boundary makes that one step compute, only its rows.
    with record_events() as tr:
        ringlab.ring_attention(q, k, v, ring_size=p, causal=True, cu_seqlens=torch.tensor([0, 10, 14, 48]))
    assert sorted((e["rank"], e["src"]) for e in tr.of(kind="compute") if e["src"] != e["rank"]) == [
        (1, 0), (2, 1), (3, 1), (3, 2)]
    assert tr.of(kind="compute", rank=1, src=0)[0]["q_rows"] == (0, 2)


def test_balance_of_a_skewed_mix():
    """One long document and many short ones: doc_zigzag stays within 1.1 of perfect balance,
    where zigzag (and contiguous, striped) does worse."""
    p = 4
    lengths = [256] + [8] * 32
    cu = torch.tensor([0, *itertools.accumulate(lengths)])
    got = balance(p, cu)
    assert got["doc_zigzag"] <= 1.1
    assert got["zigzag"] > 1.1 and got["contiguous"] > got["zigzag"]
    assert got == {name: imbalance(name, p, cu) for name in LAYOUTS}
    # The figure is the trace's: score pairs per rank of a real (simulated) call.
    q, k, v = rand_qkv(1, cu[-1].item(), 1, 4, seed=5)
    for layout, causal in itertools.product(LAYOUTS, [False, True]):
        with record_events() as tr:
            ringlab.ring_attention(q, k, v, ring_size=p, causal=causal, layout=layout, cu_seqlens=cu)
        work = tr.work_per_rank()
        assert [work[r] for r in range(p)] == work_per_rank(layout, p, cu, causal)


def test_doc_zigzag_shard_unshard():
    p, docs = 2, torch.tensor([0, 4, 16, 20])
    x = torch.arange(20)[None]
    shards = [ringlab.shard(x, r, p, "doc_zigzag", cu_seqlens=docs) for r in range(p)]
    assert shards[0].tolist() == [[0, 3, 4, 5, 6, 13, 14, 15, 16, 19]]
    assert torch.equal(ringlab.unshard(shards, "doc_zigzag", cu_seqlens=docs), x)
    assert torch.equal(ringlab.shard(x, 1, p, "doc_zigzag"), ringlab.shard(x, 1, p, "zigzag"))
    with pytest.raises(ValueError, match="document 1 .* has 10 tokens. Pad each document to a multiple of 4"):
        ringlab.shard(x, 0, p, "doc_zigzag", cu_seqlens=torch.tensor([0, 4, 14, 20]))
    # A 2 x 2 mesh: mesh ranks 2r and 2r + 1 hold the halves of ring shard r.
    mesh = [ringlab.shard_mesh(x, m, 2, p, "doc_zigzag", cu_seqlens=docs) for m in range(2 * p)]
    assert [torch.cat(mesh[2 * r:2 * r + 2], 1).tolist() for r in range(p)] == [s.tolist() for s in shards]
    assert torch.equal(ringlab.unshard_mesh(mesh, 2, "doc_zigzag", cu_seqlens=docs), x)


@pytest.mark.parametrize("checkpoint", [False, True])
def test_nn_modules_pass_cu_seqlens(checkpoint):
    """A packed call of the modules equals the module on each document alone (projections act
    per token), gradients included."""
    from ringlab.engine.nn import LongNetBlock, RingAttention

    torch.manual_seed(0)
    block = LongNetBlock(16, 4, *BRANCHES, num_kv_heads=2, checkpoint=checkpoint, dtype=torch.float64)
    x = torch.randn(1, 40, 16, dtype=torch.float64)

    def run(fn):
        block.zero_grad()
        out = fn()
        out.square().sum().backward()
        return [out.detach()] + [p.grad.clone() for p in block.parameters()]

    packed = run(lambda: block(x, cu_seqlens=torch.tensor(DOCS)))
    alone = run(lambda: torch.cat([block(x[:, a:b]) for a, b in zip(DOCS, DOCS[1:])], 1))
    for i, (got, want) in enumerate(zip(packed, alone)):
        assert_close(got, want, torch.float64, grad=i > 0)
    q, k, v = rand_qkv(1, 40, 2, 8, seed=6)
    ring = RingAttention(ring_size=2, layout="striped")(q, k, v, is_causal=True, cu_seqlens=torch.tensor(DOCS))
    assert_close(ring, per_document(dense(True), DOCS)(q, k, v)[0], torch.float64)


# ---------------------------------------------------------------- wrong cu_seqlens
WRONG = {
    "start at 0": (torch.tensor([1, 5, 8]), ValueError),
    "end at the sequence length 8": (torch.tensor([0, 5, 7]), ValueError),
    "increase strictly": (torch.tensor([0, 5, 3, 8]), ValueError),
    "int32 or int64": (torch.tensor([0.0, 5.0, 8.0]), TypeError),
    "1-D": (torch.tensor([[0, 8]]), ValueError),
    "torch.Tensor": ([0, 8], TypeError),
    "hold its boundaries' values": (torch.tensor([0, 5, 8], device="meta"), ValueError),
}
CALLS = {
    "attention": lambda q, k, v, cu: ringlab.attention(q, k, v, cu_seqlens=cu),
    "dilated_attention": lambda q, k, v, cu: ringlab.dilated_attention(q, k, v, [4], [1], cu_seqlens=cu),
    "ring_attention": lambda q, k, v, cu: ringlab.ring_attention(q, k, v, ring_size=2, cu_seqlens=cu),
    "ring_dilated_attention": lambda q, k, v, cu: ringlab.ring_dilated_attention(q, k, v, [4], [1], ring_size=2,
                                                                                 cu_seqlens=cu),
    "ulysses_attention": lambda q, k, v, cu: ringlab.ulysses_attention(q, k, v, ulysses_size=2, ring_size=2,
                                                                       cu_seqlens=cu),
    "ulysses_dilated_attention": lambda q, k, v, cu: ringlab.ulysses_dilated_attention(
        q, k, v, [4], [1], ulysses_size=2, ring_size=2, cu_seqlens=cu),
}


@pytest.mark.parametrize("fn", CALLS)
@pytest.mark.parametrize("why", WRONG)
def test_wrong_cu_seqlens_raise_before_any_work(fn, why):
    cu, kind = WRONG[why]
    with record_events() as tr, pytest.raises(kind, match=f"cu_seqlens must .*{why}"):
        CALLS[fn](*rand_qkv(1, 8, 2, 4), cu)
    assert tr.events == []


@pytest.mark.parametrize("fn", CALLS)
def test_batch_above_one_raises(fn):
    with record_events() as tr, pytest.raises(ValueError, match="cu_seqlens needs batch 1, got batch 2"):
        CALLS[fn](*rand_qkv(2, 8, 2, 4), torch.tensor([0, 3, 8]))
    assert tr.events == []


@pytest.mark.parametrize("docs, sizes, match", [
    ([0, 6, 24], (2, 2), r"document 0 \(cu_seqlens\[0:2\] = 0, 6\) has 6 tokens. Pad each document to a multiple of 4"),
    ([0, 8, 20], (4, 2), "a ring shard of 10 tokens .* does not split over ulysses_size 4"),
])
def test_mesh_split_errors_come_before_any_transfer(docs, sizes, match):
    """doc_zigzag over the ring dimension (R = 2) needs every document a multiple of 2R; the
    ring shard must then split over U."""
    q, k, v = rand_qkv(1, docs[-1], 4, 4)
    with record_events() as tr, pytest.raises(ValueError, match=match):
        ringlab.ulysses_attention(q, k, v, ulysses_size=sizes[0], ring_size=sizes[1], layout="doc_zigzag",
                                  cu_seqlens=torch.tensor(docs))
    assert tr.events == []


def test_ranks_agree_on_the_documents():
    """cu_seqlens is part of what the ranks of a group (ring, Ulysses or ring of a mesh) check
    before any K/V moves."""
    q, k, v = rand_qkv(1, 8, 2, 4)
    configs = [lambda cu: ring_config(q, k, v, group=None, ring_size=2, causal=True, layout="zigzag", scale=None,
                                      cu_seqlens=cu),
               lambda cu: mesh_config(q, k, v, ulysses_group=None, ring_group=None, ulysses_size=2, ring_size=2,
                                      causal=True, layout="zigzag", scale=None, cu_seqlens=cu)]
    for config in configs:
        meta = [config(torch.tensor(docs)).agreement(q, k) for docs in ([0, 3, 8], [0, 4, 8], [0, 8])]
        assert len({tuple(m) for m, _, _ in meta}) == 3
        assert "cu_seqlens digest" in meta[0][1]


# ---------------------------------------------------------------- real gloo ranks
@pytest.mark.distributed
@pytest.mark.parametrize("p", PACKED_WORLD_SIZES)
@pytest.mark.parametrize("i", range(len(packed_cases(2))))
def test_distributed_packed(p, i):
    case = packed_cases(p)[i]
    got, per_rank = gathered(p, case)
    check_case(case, got, per_rank)


@pytest.mark.distributed
@pytest.mark.parametrize("case", packed_mesh_cases(MESH_WORLD_SIZE),
                         ids=lambda c: f"{c['mesh'][0]}x{c['mesh'][1]}-{c['fn']}-{c['layout']}")
def test_distributed_packed_mesh(case):
    got, per_rank = gathered(MESH_WORLD_SIZE, case)
    check_case(case, got, per_rank)


# ---------------------------------------------------------------- planner
def test_plan_reports_compute_per_rank():
    from ringlab.planning.planner import document_lengths, plan

    lengths = [3072] + [64] * 16
    args = dict(heads=8, head_dim=64, gpus=4, layout="doc_zigzag")
    p = plan(4096, **args, documents=lengths)
    cu = [0, *itertools.accumulate(lengths)]
    assert p.compute["pairs_per_rank"] == [8 * x for x in work_per_rank("doc_zigzag", 4, cu)]
    assert p.compute["imbalance"] <= 1.1 and p.compute["flops_total"] == max(p.compute["flops_per_rank"])
    assert p.memory == plan(4096, **args).memory  # no mask: the memory of one sequence
    assert "rank 3" in p.table() and "17 packed documents" in p.table()
    drawn = document_lengths("exp:512", 8192, multiple=8)
    assert sum(drawn) == 8192 and all(n % 8 == 0 and n > 0 for n in drawn) and len(drawn) > 4
    with pytest.raises(ValueError, match="add up to 4,000 tokens, not the 4,096"):
        plan(4096, **args, documents=[4000])
    many = plan(2**16, **{**args, "gpus": 32, "layout": "contiguous"}, documents=[2**15] + [2**10] * 32)
    flops, table = many.compute["flops_per_rank"], many.table()  # 32 ranks: a summary, not 32 lines
    assert "rank 31" not in table and len(flops) == 32
    assert f"busiest rank ({flops.index(max(flops))})" in table and "mean of the 32 ranks" in table


def pairs_by_reference(layout, p, docs, heads, segments, rates, causal):
    """Score pairs of each rank's rows: every document's reference masks (ringlab.reference),
    summed over heads, branches and keys, at the positions the rank holds."""
    per_row = dilated_pairs_by_row(docs, heads, segments, rates, causal=causal).sum(0)
    positions = torch.arange(docs[-1])[None]
    return [int(per_row[ringlab.shard(positions, rank, p, layout, cu_seqlens=torch.tensor(docs))[0]].sum())
            for rank in range(p)]


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "doc_zigzag"])
@pytest.mark.parametrize("causal", [False, True])
def test_plan_reports_dilated_compute_per_rank(layout, causal):
    """With segments each document is its own LongNet sequence: every rank's pairs against the
    reference masks, the busiest rank's FLOPs as the time, and the memory of one sequence."""
    from ringlab.planning.planner import plan

    lengths, segments, rates = [768] + [16] * 15 + [8, 8], [64, 256], [1, 4]
    args = dict(heads=4, head_dim=64, gpus=4, layout=layout, segments=segments, rates=rates, causal=causal)
    p = plan(1024, **args, documents=lengths)
    cu = [0, *itertools.accumulate(lengths)]
    want = pairs_by_reference(layout, 4, cu, 4, segments, rates, causal)
    assert p.compute["pairs_per_rank"] == want
    q, k, v = rand_qkv(1, 1024, 4, 8, seed=9)
    with record_events() as tr:  # and the engine computes exactly those
        ringlab.ring_dilated_attention(q, k, v, segments, rates, ring_size=4, layout=layout, causal=causal,
                                       cu_seqlens=torch.tensor(cu))
    assert [tr.work_per_rank()[r] for r in range(4)] == want
    assert p.compute["flops_total"] == max(p.compute["flops_per_rank"])
    assert p.memory == plan(1024, **args).memory


def test_packed_calls_need_no_more_memory_than_one_sequence():
    """The memory model of the unpacked call covers the packed one: no (N, N) mask or other N^2
    term appears (an N^2 float32 matrix per head here is 8 MiB, 10x the modelled peak). Ragged
    documents cut blocks differently, which costs the dilated call about 8% of the peak."""
    from ringlab.planning.memory import track
    from ringlab.planning.memory_model import Problem, estimate

    n, docs = 1024, torch.tensor([0, 500, 512, 1024])
    q, k, v, go = (torch.randn(1, n, 2, 16) for _ in range(4))
    calls = {"attention": (lambda *x: ringlab.attention(*x, causal=True, cu_seqlens=docs), {}),
             "dilated": (lambda *x: ringlab.dilated_attention(*x, [128, 512], [1, 2], causal=True, cu_seqlens=docs),
                         dict(segments=(128, 512), rates=(1, 2)))}
    for mode, (fn, branches) in calls.items():
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        with track("cpu") as m:
            fn(*leaves).backward(go)
        model = estimate(Problem(seq_len=n, heads=2, head_dim=16, causal=True, **branches), mode, backward=True)
        assert m.peak <= 1.15 * model.peak, mode


@pytest.mark.parametrize("dilated", [False, True])
def test_grouped_query_attention(dilated):
    """4 query heads reading 2 K/V heads: the ring in doc_zigzag, ring-dilated in zigzag."""
    p, layout = 2, "doc_zigzag" if not dilated else "zigzag"
    docs = packed_documents(p, layout)
    q, = rand_qkv(1, docs[-1], 4, 8, seed=7, count=1)
    k, v = rand_qkv(1, docs[-1], 2, 8, seed=8, count=2)
    ref = dense_dilated(True) if dilated else dense(True)
    repeated = per_document(lambda a, b, c: ref(a, b.repeat_interleave(2, 2), c.repeat_interleave(2, 2)), docs)
    fn = _ring(p, layout, True, docs, dilated)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = fn(*leaves)
    grads = torch.autograd.grad(out.square().sum() + lse.sum(), leaves)
    rleaves = [x.clone().requires_grad_() for x in (q, k, v)]
    rout, rlse = repeated(*rleaves)
    rgrads = torch.autograd.grad(rout.square().sum() + rlse.sum(), rleaves)
    for i, (got, want) in enumerate(zip((out, lse, *grads), (rout, rlse, *rgrads))):
        assert_close(got, want, torch.float64, grad=i >= 2)


# ---------------------------------------------------------------- the native varlen kernel
def _scores(query, key, a, b, scale, causal):
    """Scores (H, L, L) of document [a, b) in float64, each query head reading its K/V head;
    hidden keys -inf (bottom-right causal, which is top-left for equal lengths)."""
    group = query.shape[1] // key.shape[1]
    q, k = query[a:b].double(), key[a:b].double().repeat_interleave(group, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    if causal:
        s = s.masked_fill(~torch.ones(b - a, b - a, dtype=torch.bool).tril(), -math.inf)
    return s


@pytest.fixture
def cpu_varlen_op(monkeypatch):
    """torch's CUDA varlen flash ops as documented (packed (T, H, D) inputs, lse (H, T)), in
    float64 on CPU, with ringlab's varlen path allowed on CPU: checks what ringlab passes to
    the ops and reads from them, here, where no GPU runs the real ones."""
    from ringlab.engine import kernels

    calls = []

    def forward(query, key, value, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, return_debug_mask, *,
                scale=None, **_):
        assert cu_q.dtype == cu_k.dtype == torch.int32 and torch.equal(cu_q, cu_k) and dropout_p == 0.0
        docs = cu_q.tolist()
        assert max_q == max_k == max(b - a for a, b in zip(docs, docs[1:]))
        out, lse = torch.empty_like(query), torch.empty(query.shape[1], query.shape[0])
        for a, b in zip(docs, docs[1:]):
            s = _scores(query, key, a, b, scale, is_causal)
            lse[:, a:b] = s.logsumexp(-1).float()
            v = value[a:b].double().repeat_interleave(query.shape[1] // value.shape[1], 1)
            out[a:b] = torch.einsum("hqk,khd->qhd", s.softmax(-1), v).to(query.dtype)
        calls.append("forward")
        return out, lse, torch.zeros(2, dtype=torch.uint64), torch.zeros((), dtype=torch.uint64), query.new_empty(0)

    def backward(grad_out, query, key, value, out, logsumexp, cu_q, cu_k, max_q, max_k, dropout_p, is_causal,
                 rng_state, unused, *, scale=None, **_):
        group = query.shape[1] // key.shape[1]
        dq, dk, dv = (torch.zeros(x.shape, dtype=torch.float64) for x in (query, key, value))
        for a, b in zip(cu_q.tolist(), cu_q.tolist()[1:]):
            p = (_scores(query, key, a, b, scale, is_causal) - logsumexp[:, a:b, None].double()).exp()
            do, o = grad_out[a:b].double(), out[a:b].double()
            v, k = (x[a:b].double().repeat_interleave(group, 1) for x in (value, key))
            ds = p * (torch.einsum("qhd,khd->hqk", do, v) - (do * o).sum(-1).T[:, :, None])
            dq[a:b] = torch.einsum("hqk,khd->qhd", ds, k) * scale
            dk[a:b] = (torch.einsum("hqk,qhd->khd", ds, query[a:b].double()) * scale).unflatten(1, (-1, group)).sum(2)
            dv[a:b] = torch.einsum("hqk,qhd->khd", p, do).unflatten(1, (-1, group)).sum(2)
        calls.append("backward")
        return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype)

    lib = torch.library.Library("aten", "IMPL")
    lib.impl("_flash_attention_forward", forward, "CPU")
    lib.impl("_flash_attention_backward", backward, "CPU")
    monkeypatch.setattr(kernels, "VARLEN_DEVICES", ("cpu",))
    yield calls
    lib._destroy()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_native_varlen_kernel(cpu_varlen_op, dtype, causal, kv_heads):
    """Where a varlen kernel serves packed documents, attention makes one call for all of them
    (forward and backward, lse folded in) and equals each document alone."""
    from ringlab.engine import kernels

    cu = torch.tensor(DOCS)
    q, = rand_qkv(1, 40, 4, 16, seed=11, count=1)
    k, v = rand_qkv(1, 40, kv_heads, 16, seed=12, count=2)
    rep = 4 // kv_heads
    ref = per_document(lambda a, b, c: dense(causal)(a, b.repeat_interleave(rep, 2), c.repeat_interleave(rep, 2)),
                       DOCS)
    with kernels.record_backends() as used:
        check_against(lambda *x: ringlab.attention(*x, causal=causal, cu_seqlens=cu, return_lse=True), ref,
                      [q, k, v], dtype, use_lse=True)
    assert cpu_varlen_op == ["forward", "backward"]
    assert used == {"forward/cuda_flash_varlen": 1, "backward/cuda_flash_varlen": 1}


def test_native_varlen_kernel_only_where_flash_serves(cpu_varlen_op):
    """float32 (flash takes half precision only) and a forced block backend keep the
    per-document blocks."""
    from ringlab.engine import kernels

    q, k, v = rand_qkv(1, 40, 2, 16, seed=13)
    cu = torch.tensor(DOCS)
    ringlab.attention(q.float(), k.float(), v.float(), causal=True, cu_seqlens=cu)
    with kernels.use_backend("math"):
        ringlab.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True, cu_seqlens=cu)
    assert cpu_varlen_op == []


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_native_varlen_kernel_on_meta(kv_heads):
    """torch's own meta kernels of the varlen ops (the shapes the CUDA ops return) through
    attention's packed path, forward and backward with the lse used."""
    from ringlab.engine import kernels

    q = torch.empty(1, 40, 4, 64, dtype=torch.bfloat16, device="meta", requires_grad=True)
    k, v = (torch.empty(1, 40, kv_heads, 64, dtype=torch.bfloat16, device="meta", requires_grad=True)
            for _ in range(2))
    with kernels.record_backends() as used:
        out, lse = ringlab.attention(q, k, v, causal=True, cu_seqlens=torch.tensor(DOCS), return_lse=True)
        (out.sum() + lse.sum()).backward()
    assert used == {"forward/cuda_flash_varlen": 1, "backward/cuda_flash_varlen": 1}
    assert out.shape == q.shape and lse.shape == (1, 4, 40) and lse.dtype == torch.float32
    assert (q.grad.shape, k.grad.shape, v.grad.shape) == (q.shape, k.shape, v.shape)
