"""The strategy planner: ring, Ulysses and hybrid compared (its bytes equal the traces: test_ulysses.py),
with packed documents too."""

import itertools
import json

import pytest
import torch
from conftest import dilated_pairs_by_row

from ringlab.cli import main
from ringlab.engine.layout import shard_positions
from ringlab.planning import strategies
from ringlab.planning.memory_model import Problem
from ringlab.planning.planner import devices
from ringlab.planning.strategies import IB, NVLINK, STRATEGIES, compare


@pytest.fixture(scope="module")
def million():
    """The README's case: 1M tokens, 32 heads on 8 K/V heads, 4 nodes of 8 H100s."""
    return compare(2**20, heads=32, kv_heads=8, head_dim=128, gpus=32, gpu="h100")


def test_factorizations_and_links(million):
    ring, ulysses, hybrid = (million.plans[s] for s in ("ring", "ulysses", "hybrid"))
    assert (ring.ulysses, ring.ring) == (1, 32) and (hybrid.ulysses, hybrid.ring) == (8, 4)
    assert not ulysses.possible and "divide the 8 K/V heads" in ulysses.why
    # The hybrid's all-to-all stays in the node; its ring and the plain ring's edge hop cross nodes.
    assert hybrid.bytes[NVLINK] == strategies.traffic(_problem(million), 8, 4)["all-to-all"]
    assert hybrid.bytes[IB] == strategies.traffic(_problem(million), 8, 4)["ring"]
    assert ring.bytes == {NVLINK: 0, IB: strategies.traffic(_problem(million), 1, 32)["ring"]}
    # A hybrid hop carries as many bytes as a ring hop (H_kv / 8 heads of N / 4 tokens against
    # H_kv heads of N / 32), but its ring has 4 ranks, not 32.
    assert hybrid.bytes[IB] < ring.bytes[IB] / 8


def _problem(report):
    return Problem(**report.problem)


def test_best_is_the_fastest_that_fits(million):
    fitting = {s: p for s, p in million.plans.items() if p.possible and p.fits}
    assert million.best == min(fitting, key=lambda s: fitting[s].time_s)
    assert "ulysses is not possible" in million.why
    table = million.table()
    assert f"best: {million.best}" in table and "fewest GPUs for 1,048,576 tokens" in table


def test_short_sequences_favour_the_hybrid():
    """At 4K tokens per GPU a ring hop on InfiniBand no longer hides; the hybrid's ring is 8x
    shorter in bytes and steps, its all-to-all on NVLink."""
    report = compare(2**17, heads=32, kv_heads=8, head_dim=128, gpus=32)
    assert report.best == "hybrid"
    ring_hops = [t for t in report.plans["ring"].transfers if t["name"] == "ring hops"][0]
    assert not ring_hops["hides"] and ring_hops["link"] == IB


def test_ulysses_in_one_node():
    report = compare(2**17, heads=32, kv_heads=8, head_dim=128, gpus=8)
    ulysses = report.plans["ulysses"]
    assert ulysses.possible and ulysses.bytes[IB] == 0 and ulysses.fits
    assert not report.plans["hybrid"].possible  # one node: U = 8 leaves no ring


def test_fewest_gpus_fit_and_half_as_many_do_not():
    report = compare(2**24, heads=32, kv_heads=8, head_dim=128, gpus=64)
    fewest = {name: sp.fewest_gpus for name, sp in report.plans.items()}
    assert fewest["ulysses"] is None  # 16M tokens need more than the 8 GPUs Ulysses can use
    for name in ("ring", "hybrid"):
        at = lambda g: compare(2**24, heads=32, kv_heads=8, head_dim=128, gpus=g, strategies=(name,)).plans[name]  # noqa: E731
        assert at(fewest[name]).fits and not at(fewest[name] // 2).fits, name


def test_cli_strategy(capsys):
    args = ["plan", "--tokens", "128K", "--heads", "32", "--kv-heads", "8", "--head-dim", "128", "--gpus", "32"]
    assert main([*args, "--strategy", "best"]) == 0
    assert "best: hybrid" in capsys.readouterr().out
    assert main([*args, "--strategy", "hybrid", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert list(printed["plans"]) == ["hybrid"] and printed["plans"]["hybrid"]["ulysses"] == 8
    with pytest.raises(SystemExit):
        main(["plan", "--tokens", "128K", "--heads", "32", "--head-dim", "128", "--strategy", "best"])
    assert "pass --gpus" in capsys.readouterr().err


def test_dilated_strategies_plan_ring_dilated_on_the_ring_dimension(capsys):
    """Dilation cuts the compute by the score pairs it skips; every strategy still plans, and
    the ring dimension's layout must hold whole pieces."""
    kw = dict(heads=32, kv_heads=8, head_dim=128, gpus=32)
    dense = compare(2**20, **kw)
    dilated = compare(2**20, segments=(4096, 65536, 2**20), rates=(1, 4, 16), **kw)
    for name in ("ring", "hybrid"):
        assert dilated.plans[name].compute_s < dense.plans[name].compute_s / 4, name
        assert dilated.plans[name].memory["total"] < dense.plans[name].memory["total"], name
    assert "dilated, segments [4096, 65536, 1048576]" in dilated.table()
    with pytest.raises(ValueError, match="layout"):
        compare(2**20, segments=(4096,), rates=(1,), layout="striped", **kw)
    args = ["plan", "--tokens", "1M", "--heads", "32", "--kv-heads", "8", "--head-dim", "128", "--gpus", "32"]
    assert main([*args, "--strategy", "best", "--segments", "4096,65536,1M", "--rates", "1,4,16"]) == 0
    assert "best: " in capsys.readouterr().out


@pytest.mark.parametrize("layout", ["zigzag", "doc_zigzag"])
@pytest.mark.parametrize("causal", [False, True])
def test_packed_compute_is_the_busiest_ring_ranks(layout, causal):
    """A skewed mix on 2 nodes of 4: each strategy's compute, counted here from the positions a
    ring rank holds (a query sees the keys of its document: up to itself when causal), is the
    busiest ring rank's pairs for H/U heads at 4 D FLOPs each, 3.5x with the backward; memory
    and bytes are those of one sequence."""
    n, lengths = 4096, [2048] + [128] * 16
    kw = dict(heads=16, kv_heads=8, head_dim=64, gpus=8, gpus_per_node=4, layout=layout, causal=causal)
    plain, packed = compare(n, **kw), compare(n, documents=lengths, **kw)
    cu = torch.tensor([0, *itertools.accumulate(lengths)])
    rate = devices()["h100"].flops("bfloat16")
    assert packed.documents == lengths and packed.plans.keys() == set(STRATEGIES)
    for name, sp in packed.plans.items():
        u, r = sp.ulysses, sp.ring
        pairs = []
        for rank in range(r):
            pos = shard_positions(n, rank, r, layout, tuple(cu.tolist()))
            doc = torch.searchsorted(cu, pos, right=True) - 1
            pairs.append(int((pos - cu[doc] + 1 if causal else cu[doc + 1] - cu[doc]).sum()))
        assert sp.packed["pairs_per_rank"] == [16 // u * x for x in pairs], name  # over its H/U heads
        assert sp.compute_s == pytest.approx(max(pairs) * 16 // u * 4 * 64 * 3.5 / rate, rel=1e-12, abs=0), name
        same = plain.plans[name]
        assert (sp.memory, sp.bytes, sp.transfers, sp.exposed_s) == (same.memory, same.bytes, same.transfers,
                                                                     same.exposed_s), name
    assert "17 packed documents, 128 to 2,048 tokens" in packed.table()


def test_documents_move_best_through_compute_only():
    """One node, zigzag, half the sequence one document: the ring's busiest rank computes 1.8x
    the mean while Ulysses stays balanced, so best moves from the ring to Ulysses; one document
    is the unpacked plan."""
    n, kw = 2**17, dict(heads=32, kv_heads=8, head_dim=128, gpus=8, fewest=False)
    plain, packed = compare(n, **kw), compare(n, documents=[2**16] + [2**12] * 16, **kw)
    assert (plain.best, packed.best) == ("ring", "ulysses")
    assert packed.plans["ring"].packed["imbalance"] > 1.8 and packed.plans["ulysses"].packed["imbalance"] == 1.0
    for name in ("ring", "ulysses"):
        a, b = plain.plans[name], packed.plans[name]
        assert (a.memory, a.bytes, a.exposed_s) == (b.memory, b.bytes, b.exposed_s), name
        assert b.compute_s != a.compute_s
        assert compare(n, documents=[n], **kw).plans[name].compute_s == pytest.approx(a.compute_s, rel=1e-12, abs=0)


@pytest.mark.parametrize("causal", [False, True])
def test_dilated_packed_compute_is_the_busiest_head_group(causal):
    """Dilated and packed on a 2 x 2 hybrid, 4 Ulysses ranks and a 4-rank ring: a GPU computes
    its ring rank's rows for its head group's offsets ("grouped": the groups differ), counted
    here from the reference masks of each document; the busiest GPU sets the time."""
    n, heads, lengths, segs, rates = 1024, 8, [600, 8, 200, 216], (64, 256), (1, 4)
    kw = dict(heads=heads, kv_heads=4, head_dim=64, gpus=4, gpus_per_node=2, layout="zigzag", causal=causal,
              segments=segs, rates=rates, head_offsets="grouped", fewest=False)
    report = compare(n, documents=lengths, **kw)
    cu = [0, *itertools.accumulate(lengths)]
    per_row = dilated_pairs_by_row(cu, heads, segs, rates, head_offsets="grouped", causal=causal)  # (H, N)
    for name, sp in report.plans.items():
        u, r, size = sp.ulysses, sp.ring, heads // sp.ulysses
        rows = [shard_positions(n, rank, r, "zigzag") for rank in range(r)]
        groups = [[int(per_row[i * size:(i + 1) * size, pos].sum()) for pos in rows] for i in range(u)]
        busiest = max(groups, key=max)
        assert sp.packed["pairs_per_rank"] == busiest, name
        assert sp.compute_s == pytest.approx(max(busiest) * 4 * 64 * 3.5 / devices()["h100"].flops("bfloat16"),
                                             rel=1e-12, abs=0), name
    assert len({tuple(sp.packed["pairs_per_rank"]) for sp in report.plans.values()}) == 3


def test_packed_strategy_errors_and_cli(capsys):
    kw = dict(heads=16, kv_heads=8, head_dim=64, gpus=8, fewest=False)
    with pytest.raises(ValueError, match="add up to 4,000 tokens, not the 4,096"):
        compare(4096, documents=[4000], **kw)
    # doc_zigzag cuts every document into 2R chunks: 8 tokens do not split over the ring's 8 ranks.
    report = compare(4096, layout="doc_zigzag", documents=[4088, 8], **kw)
    assert not report.plans["ring"].possible and "multiples of 16" in report.plans["ring"].why
    assert report.plans["ulysses"].possible
    args = ["plan", "--tokens", "4K", "--heads", "16", "--kv-heads", "8", "--head-dim", "64", "--gpus", "8"]
    assert main([*args, "--strategy", "best", "--documents", "exp:512"]) == 0
    assert "packed documents" in capsys.readouterr().out
    assert main([*args, "--strategy", "best", "--documents", "exp:512", "--segments", "1024", "--rates", "1"]) == 0
    assert "packed documents" in capsys.readouterr().out
