"""The layout registry: a layout defined only here runs end to end through the public functions."""

import pytest
import torch
from conftest import check_against, rand_qkv

import ringlab
from ringlab.engine.layout import LAYOUTS, ChunkLayout, Tile, register
from ringlab.reference import dense_attention, dense_dilated_attention


def _reversed_tile(rank, src, world_size, n):
    """Rank r holds chunk P-1-r: a higher rank's block lies wholly in the past."""
    return Tile(slice(0, n), slice(0, n), False) if src > rank else None


REVERSED = ChunkLayout("reversed", 1, _reversed_tile, lambda rank, world_size: (world_size - 1 - rank,))


@pytest.fixture
def reversed_layout():
    register(REVERSED)
    yield REVERSED.name
    del LAYOUTS[REVERSED.name]


def test_a_registered_layout_shards_as_defined(reversed_layout):
    x = torch.arange(12.0).view(1, 12)
    shards = [ringlab.shard(x, r, 3, reversed_layout) for r in range(3)]
    assert [s.tolist() for s in shards] == [[[8.0, 9, 10, 11]], [[4.0, 5, 6, 7]], [[0.0, 1, 2, 3]]]
    assert torch.equal(ringlab.unshard(shards, reversed_layout), x)
    with pytest.raises(ValueError, match="needs a multiple of 3"):
        ringlab.shard(x[:, :10], 0, 3, reversed_layout)


@pytest.mark.parametrize("p", [1, 2, 3, 4])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("batch", [1, 2])  # a batch of one stacks the shards as a view where it can
def test_a_registered_layout_runs_the_ring(reversed_layout, p, causal, batch):
    def fn(q, k, v):
        return ringlab.ring_attention(q, k, v, ring_size=p, causal=causal, layout=reversed_layout, return_lse=True)
    check_against(fn, lambda q, k, v: dense_attention(q, k, v, causal=causal), rand_qkv(batch, 4 * p, 3, 8),
                  torch.float64, use_lse=True)


@pytest.mark.parametrize("p", [2, 3])
def test_a_registered_chunk_layout_runs_ring_dilated(reversed_layout, p):
    segs, rates = [4, 12], [1, 2]
    def fn(q, k, v):
        return ringlab.ring_dilated_attention(q, k, v, segs, rates, ring_size=p, causal=True, layout=reversed_layout,
                                              return_lse=True)
    check_against(fn, lambda q, k, v: dense_dilated_attention(q, k, v, segs, rates, causal=True),
                  rand_qkv(1, 6 * p, 4, 8), torch.float64, use_lse=True)


def test_a_name_registers_once():
    with pytest.raises(ValueError, match="'zigzag' is already registered"):
        register(ChunkLayout("zigzag", 2, _reversed_tile, lambda rank, world_size: (rank,)))


@pytest.mark.parametrize("causal", [False, True])
def test_work_per_rank_stays_exact_past_int64(causal):
    """One striped 2**40-token document: each rank's ~2**78 pairs counted exactly; and a
    striped layout over many small documents (every rank's run reaches each of them) agrees
    with counting position by position."""
    from ringlab.engine.layout import work_per_rank

    n, p = 2**40, 4
    c = n // p
    want = [c * (x + 1) + p * c * (c - 1) // 2 if causal else c * n for x in range(p)]
    assert work_per_rank("striped", p, [0, n], causal) == want
    cu = [0, 3, 8, 20, 21, 32]
    doc = [next(d for d in range(5) if cu[d] <= q < cu[d + 1]) for q in range(32)]
    seen = [(q - cu[doc[q]] + 1) if causal else cu[doc[q] + 1] - cu[doc[q]] for q in range(32)]
    assert work_per_rank("striped", p, cu, causal) == [sum(seen[x::p]) for x in range(p)]


def test_striped_work_in_closed_form_equals_counting_each_rank():
    """StripedLayout.work counts every rank at once from the documents' starts mod P; the
    generic Layout.work cuts each rank's run at every document. Both, on random documents,
    world sizes above and below the document lengths, causal and not."""
    import random

    from ringlab.engine.layout import LAYOUTS, Layout

    striped, rng = LAYOUTS["striped"], random.Random(0)
    for _ in range(300):
        p = rng.choice([1, 2, 3, 5, 8, 16])
        n = p * rng.randint(1, 10)
        docs = (0, *sorted(rng.sample(range(1, n), rng.randint(0, min(n - 1, 9)))), n)
        for causal in (False, True):
            assert striped.work(p, docs, causal) == Layout.work(striped, p, docs, causal), (p, docs, causal)
