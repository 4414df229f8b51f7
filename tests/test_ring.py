"""Ring attention: simulated ring and real gloo ranks against the float64 reference."""

import itertools
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import workers
from conftest import check_against, rand_qkv, simulated_forms
from ringcases import LAYOUTS, WORLD_SIZES, check_case, gathered, ring_cases

import ringlab
from ringlab.engine.launch import RankError, launch
from ringlab.reference import dense_attention
from ringlab.engine.trace import record_events


def _fn(p, causal, layout, scale=None):
    return lambda q, k, v: ringlab.ring_attention(q, k, v, ring_size=p, causal=causal,
                                                  layout=layout, scale=scale, return_lse=True)


def _ref(causal, scale=None):
    return lambda q, k, v: dense_attention(q, k, v, causal=causal, scale=scale)


# ---------------------------------------------------------------- simulated ring
@pytest.mark.parametrize("p", range(1, 9))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True])
def test_simulated_ring_f64(p, layout, causal):
    inputs = rand_qkv(2, 2 * p * 5, 3, 16, seed=p)
    check_against(_fn(p, causal, layout), _ref(causal), inputs, torch.float64, use_lse=True)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True])
def test_simulated_ring_scale(layout, causal):
    inputs = rand_qkv(2, 30, 3, 16, seed=21)
    check_against(_fn(3, causal, layout, scale=0.7), _ref(causal, scale=0.7), inputs, torch.float64,
                  use_lse=True)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_simulated_ring_f32_error_does_not_grow_with_ranks(layout):
    """docs/design.md §7: the float32 error (outputs, lse, gradients) at 8 ranks stays within 2x of the
    error at 1 rank."""
    inputs = rand_qkv(1, 512, 4, 64, seed=7)
    errs = {p: check_against(_fn(p, True, layout), _ref(True), inputs, torch.float32) for p in (1, 8)}
    assert errs[8] <= 2 * errs[1], errs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_simulated_ring_low_precision(dtype, causal):
    inputs = rand_qkv(1, 128, 4, 32, seed=9)
    check_against(_fn(4, causal, "zigzag"), _ref(causal), inputs, dtype)


def test_shard_unshard_roundtrip():
    x = torch.arange(2 * 24 * 3).reshape(2, 24, 3)
    for layout, p in itertools.product(LAYOUTS, [1, 2, 3, 4]):
        shards = [ringlab.shard(x, r, p, layout) for r in range(p)]
        assert torch.equal(ringlab.unshard(shards, layout), x)
        pos = torch.cat([s[0, :, 0] // 3 for s in shards])
        assert sorted(pos.tolist()) == list(range(24))
    assert ringlab.shard(x, 1, 4, "zigzag")[0, :, 0].div(3).tolist() == [3, 4, 5, 18, 19, 20]
    assert ringlab.shard(x, 1, 4, "striped")[0, :, 0].div(3).tolist() == [1, 5, 9, 13, 17, 21]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_trace_of_simulated_ring(layout):
    """Each rank computes or skips one tile per step; zigzag and striped balance causal work."""
    p, n = 4, 64
    q, k, v = (x.float().requires_grad_() for x in rand_qkv(1, n, 2, 8))
    with record_events() as tr:
        out = ringlab.ring_attention(q, k, v, ring_size=p, causal=True, layout=layout)
        out.sum().backward()
    for pass_ in ("forward", "backward"):
        tiles = [e for e in tr.events if e["kind"] in ("compute", "skip") and e["pass"] == pass_]
        assert sorted((e["rank"], e["step"]) for e in tiles) == sorted(itertools.product(range(p), range(p)))
        for e in tiles:
            assert e["src"] == (e["rank"] - e["step"]) % p
        work = tr.work_per_rank(pass_)
        assert sum(work.values()) == n * (n + 1) // 2  # exactly the causal triangle, nothing more
        imbalance = max(work.values()) / (sum(work.values()) / p)
        if layout == "contiguous":
            assert imbalance > 1.5
        else:
            assert imbalance <= 1.1
    kv_posts = tr.of(kind="post", label="kv", pass_="forward")
    assert len(kv_posts) == p * (p - 1)
    assert all(e["bytes"] == 2 * n // p * 2 * 8 * 4 for e in kv_posts)


@pytest.mark.parametrize("p", [2, 3, 4])
@pytest.mark.parametrize("layout", LAYOUTS + ["doc_zigzag"])
@pytest.mark.parametrize("causal", [False, True])
def test_simulated_ranks_together_give_what_each_rank_gives(p, layout, causal):
    """The simulated ring's all-ranks form equals the per-rank generators (packed documents and
    GQA too), with one kernel call per run of ranks with equal tiles instead of one per rank."""
    documents = torch.tensor([0, 4 * p, 12 * p, 16 * p]) if layout == "doc_zigzag" else None
    for batch, kv_heads in ((1, 4), (1, 2)) if documents is not None else ((1, 4), (2, 2)):  # packed: batch 1
        q, k, v = rand_qkv(batch, 2 * p * 8, 4, 8, seed=p)

        def fn(q, k, v):
            return ringlab.ring_attention(q, k, v, ring_size=p, causal=causal, layout=layout, return_lse=True,
                                          cu_seqlens=documents)

        (together, calls), (alone, per_rank) = simulated_forms(fn, (q, k[:, :, :kv_heads], v[:, :, :kv_heads]))
        for a, e in zip(together, alone):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
        assert calls < per_rank if documents is None else calls <= per_rank  # documents: ranks' tiles may all differ
        if layout in ("zigzag", "striped") and causal and kv_heads == 4:  # step 0 one run; then the ranks before and after the owner
            assert calls == 2 * (1 + 2 * (p - 1)) and per_rank == 2 * p * p


def test_stacked_shards_are_views_where_one_stride_steps_them():
    """Contiguous and striped shards of a batch of one stack without a copy; zigzag's (two chunks
    each) and those of a larger batch are gathered in one index_select, not copied per rank and
    joined (except lse-like tensors of a larger batch). The values are every rank's shard in
    order, packed documents too."""
    from ringlab.engine import comm
    from ringlab.engine.layout import get

    cases = [(layout, None) for layout in LAYOUTS] + [("doc_zigzag", (0, 8, 24)), ("contiguous", (0, 5, 24))]
    for (layout, docs), batch in itertools.product(cases, [1, 2]):
        x = torch.randn(batch, 24, 3, 2)
        for dim, y in ((1, x), (2, x.permute(0, 2, 1, 3))):  # q-like (B, N, H, D) and lse-like (B, H, N)
            lay = get(layout)
            one_run = layout in ("contiguous", "striped")
            with mock.patch.object(type(lay), "shard", wraps=lay.shard) as shard:
                stacked = comm._stacked_shards(lay, y, 4, dim, docs)
            expected = torch.cat([ringlab.shard(y, r, 4, layout, dim=dim, cu_seqlens=None if docs is None
                                                else torch.tensor(docs)) for r in range(4)], 0)
            assert torch.equal(stacked, expected), (layout, docs, batch, dim)
            view = stacked.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
            assert view == (one_run and batch == 1), (layout, batch, dim)
            assert shard.call_count == (0 if view or dim == 1 or batch == 1 else 4), (layout, batch, dim)


def test_simulated_delivery_hands_over_the_sent_tensor():
    """A simulated rank receives the tensor its neighbour sent, not a copy (on a GPU a copy is a
    memcpy per rank and step), into a buffer that holds no memory of its own until then; a
    message that does not fit the receive buffer is an engine bug."""
    from ringlab.engine.comm import Mailbox, SimComm, run_lockstep

    box = Mailbox()

    def rank(r):
        sent = torch.full((2, 3), float(r))
        got, pending = SimComm(r, 2, box).pass_on(sent, step=0, label="kv")
        assert got.shape == sent.shape and got.untyped_storage().nbytes() == sent.element_size()
        yield from pending.wait()
        return sent, got

    (s0, g0), (s1, g1) = run_lockstep([rank(0), rank(1)], box)
    assert g0.data_ptr() == s1.data_ptr() and g1.data_ptr() == s0.data_ptr() and g0[0, 0] == 1
    assert g0.stride() == s1.stride()

    def wrong(r):
        comm = SimComm(r, 2, box)
        pending = comm.exchange([(comm.next, torch.zeros(2, 3))], [(comm.prev, torch.empty(3, 2))], step=0,
                                label="kv")
        yield from pending.wait()

    with pytest.raises(RuntimeError, match=r"arrived for a receive buffer of \(3, 2\)"):
        run_lockstep([wrong(0), wrong(1)], box)


def test_ring_skips_future_blocks():
    q, k, v = rand_qkv(1, 32, 2, 8)
    with record_events() as tr:
        ringlab.ring_attention(q, k, v, ring_size=4, causal=True)
    skipped = {(e["rank"], e["src"]) for e in tr.of(kind="skip")}
    assert skipped == {(r, s) for r in range(4) for s in range(4) if s > r}


def test_no_events_when_not_recording(monkeypatch):
    """Outside record_events the engines never record (and a closed recorder gets nothing)."""
    from ringlab.engine import trace

    with record_events() as closed:
        pass

    def fail(**event):
        raise AssertionError(f"recorded while not recording: {event}")

    monkeypatch.setattr(trace, "record", fail)
    q, k, v = (x.requires_grad_() for x in rand_qkv(1, 16, 2, 8))
    ringlab.ring_attention(q, k, v, ring_size=2, causal=True).sum().backward()
    ringlab.ring_dilated_attention(q, k, v, [4, 16], [1, 2], ring_size=2, causal=True).sum().backward()
    assert closed.events == [] and not trace.recording()
    with pytest.raises(AssertionError, match="recorded while not recording"), record_events():
        ringlab.ring_attention(q, k, v, ring_size=2)  # the patched function is the one the engine calls


# ---------------------------------------------------------------- real gloo ranks
@pytest.mark.distributed
@pytest.mark.parametrize("p", WORLD_SIZES)
@pytest.mark.parametrize("i", range(len(ring_cases(1))))
def test_distributed_ring(p, i):
    case = ring_cases(p)[i]
    got, per_rank = gathered(p, case)
    check_case(case, got, per_rank)
    # Each rank's trace: P tiles per pass, K/V sent P-1 times forward.
    ev = per_rank[0]["events"]
    assert len([e for e in ev if e["kind"] in ("compute", "skip") and e["pass"] == "forward"]) == p
    assert len([e for e in ev if e["kind"] == "post" and e["label"] == "kv" and e["pass"] == "forward"]) == p - 1


@pytest.mark.distributed
def test_distributed_mismatched_shapes_raise_before_any_send():
    res = launch(workers.mismatched_shapes, 2, timeout=120)
    for msg, events in res:
        assert msg is not None and "disagree on seq (shard length)" in msg
        assert not [e for e in events if e["kind"] == "post"]


@pytest.mark.distributed
def test_distributed_rank_that_alone_changes_shape_raises_naming_it():
    with pytest.raises(RankError, match="rank 1") as err:
        launch(workers.diverged_shapes, 2, timeout=120)
    assert "'seq (shard length)': 6" in str(err.value) and "did not join the check within 2 s" in str(err.value)


def test_group_check_runs_once_per_group_and_call(one_rank_group, monkeypatch):
    gathers = []
    all_gather = dist.all_gather
    monkeypatch.setattr(dist, "all_gather", lambda *a, **kw: gathers.append(1) or all_gather(*a, **kw))
    q, k, v = rand_qkv(1, 8, 2, 4)
    calls = [lambda g: ringlab.ring_attention(q, k, v, group=g),
             lambda g: ringlab.ring_attention(q, k, v, group=g),                          # agreed: nothing
             lambda g: ringlab.ring_attention(q, k, v, group=g, causal=True),             # new options
             lambda g: ringlab.ring_attention(q[:, :4], k[:, :4], v[:, :4], group=g),     # new shapes
             lambda g: ringlab.ring_dilated_attention(q, k, v, [4], [2], group=g),
             lambda g: ringlab.ring_dilated_attention(q, k, v, [4], [2], group=g)]
    counts = []
    for call in calls:
        call(one_rank_group)
        counts.append(len(gathers))
    assert counts == [2, 2, 4, 6, 8, 8]
    calls[0](dist.new_group([0]))  # another group has agreed on nothing yet
    assert len(gathers) == 10


@pytest.mark.distributed
def test_distributed_layout_that_cannot_split():
    for msg in launch(workers.odd_zigzag_shard, 2, timeout=120):
        assert msg is not None and "cannot split" in msg and "multiple of 4" in msg
