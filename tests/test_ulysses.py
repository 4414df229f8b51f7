"""Ulysses and the Ulysses x ring hybrid: simulated meshes and 4 gloo ranks against the float64
reference, outputs and gradients; the traces; bad factorizations."""

import pytest
import torch
import torch.distributed as dist
from conftest import check_against
from ringcases import MESH_WORLD_SIZE, check_case, gathered, mesh_cases, ring_cases

import ringlab
from ringlab.engine.trace import record_events
from ringlab.planning import strategies
from ringlab.planning.memory_model import Problem
from ringlab.reference import dense_attention, dense_dilated_attention

MESHES = [(2, 1), (4, 1), (1, 2), (2, 2)]  # (ulysses_size, ring_size)


def _inputs(n, heads, kv_heads, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, n, h, 8, generator=g, dtype=torch.float64) for h in (heads, kv_heads, kv_heads)]


def _reference(segments=None, rates=None, **kw):
    """The float64 dense reference, K/V heads repeated for grouped-query attention."""
    def ref(q, k, v):
        k, v = (x.repeat_interleave(q.shape[2] // k.shape[2], 2) for x in (k, v))
        if segments is None:
            return dense_attention(q, k, v, **kw)
        return dense_dilated_attention(q, k, v, segments, rates, **kw)
    return ref


def _mesh_call(mesh, segments=None, rates=None, **kw):
    u, r = mesh
    if segments is None:
        return lambda q, k, v: ringlab.ulysses_attention(q, k, v, ulysses_size=u, ring_size=r, return_lse=True, **kw)
    return lambda q, k, v: ringlab.ulysses_dilated_attention(q, k, v, segments, rates, ulysses_size=u, ring_size=r,
                                                            return_lse=True, **kw)


@pytest.mark.parametrize("dilated", [False, True], ids=["dense", "dilated"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: f"{m[0]}x{m[1]}")
def test_simulated_mesh_matches_reference(mesh, causal, dilated):
    """Grouped-query (4 query heads on 2 K/V heads) where U allows; causal runs zigzag over the
    ring; dilated segments lie inside a Ulysses piece (4), across pieces and ring shards, and
    span the whole sequence."""
    u, r = mesh
    n = 8 * u * r
    kw = dict(causal=causal, scale=0.3)
    if dilated:
        kw |= dict(segments=[4, 12, n], rates=[1, 2, 3])
    inputs = _inputs(n, 4, 4 if u == 4 else 2, seed=10 * u + r)
    layout = "zigzag" if causal else "contiguous"
    check_against(_mesh_call(mesh, layout=layout, **kw), _reference(**kw), inputs, torch.float64, use_lse=causal)


def test_simulated_hybrid_float32_striped():
    check_against(_mesh_call((2, 2), causal=True, layout="striped"), _reference(causal=True),
                  _inputs(16, 4, 2, seed=3), torch.float32, use_lse=True)


def test_head_chunks_keep_global_head_index(monkeypatch):
    """Heads run in chunks (8 heads, 4 K/V heads, U = 2: two chunks of 4); each Ulysses rank
    gets its heads' global index, which the interleaved dilation offsets depend on."""
    monkeypatch.setattr("ringlab.engine.autograd.ACCUM_BUDGET", {"cuda": 0, "cpu": 0})
    monkeypatch.setattr("ringlab.engine.autograd.MIN_CHUNK_ELEMENTS", {"cuda": 1, "cpu": 1})
    kw = dict(segments=[8, 16], rates=[3, 5], causal=True)  # offsets differ between heads h and h + 4
    check_against(_mesh_call((2, 2), layout="zigzag", **kw), _reference(**kw), _inputs(16, 8, 4, seed=4),
                  torch.float64, use_lse=True)


def test_trace_records_all_to_alls_per_mesh_rank():
    """Every mesh rank sends (U-1)/U of each tensor it trades: forward q, k, v then out
    (input dtype) and lse; the ring hops go to the ring group."""
    u, r, b, n, h, kv, d = 2, 2, 2, 16, 4, 2, 8
    q, k, v = (x.float().requires_grad_() for x in _inputs(n, h, kv, seed=5))
    with record_events() as tr:
        out = ringlab.ulysses_attention(q, k, v, ulysses_size=u, ring_size=r)
        out.sum().backward()
    local = n // (u * r)
    sent = (u - 1) * b * local // u
    expect = {"a2a/q": sent * h * d * 4, "a2a/kv": 2 * sent * kv * d * 4, "a2a/out": sent * h * d * 4,
              "a2a/lse": sent * h * 4}
    for m in range(u * r):
        for label, nbytes in expect.items():
            assert tr.bytes_sent(mesh_rank=m, label=label, pass_="forward") == nbytes, (m, label)
        assert tr.bytes_sent(mesh_rank=m, label="kv", pass_="forward") == 2 * b * (n // r) * (kv // u) * d * 4
        assert {e["mesh_rank"] for e in tr.of(kind="wait")} == set(range(u * r))


def _sent(events) -> dict:
    """Bytes one rank's trace says it sent, by kind of transfer."""
    posts = [e for e in events if e["kind"] == "post"]
    a2a = sum(e["bytes"] for e in posts if e["label"].startswith("a2a/"))
    return {"all-to-all": a2a, "ring": sum(e["bytes"] for e in posts) - a2a}


@pytest.mark.parametrize("mesh", [(1, 4), (4, 1), (2, 2)], ids=["ring", "ulysses", "hybrid"])
def test_simulated_bytes_per_rank_equal_planner(mesh):
    """bfloat16: the all-to-alls carry out and the gradients in bfloat16 and lse in float32,
    the ring's dK/dV accumulators travel in float32."""
    u, r = mesh
    n, h, kv = 32, 4, 4
    q, k, v = (x.bfloat16().requires_grad_() for x in _inputs(n, h, kv, seed=6))
    with record_events() as tr:
        ringlab.ulysses_attention(q, k, v, ulysses_size=u, ring_size=r, causal=True, layout="zigzag").sum().backward()
    pb = Problem(seq_len=n, heads=h, head_dim=8, batch=2, dtype="bfloat16", kv_heads=kv, world_size=4, causal=True,
                 layout="zigzag")
    expected = strategies.traffic(pb, u, r)
    for m in range(4):
        assert _sent(e for e in tr.events if e["mesh_rank"] == m) == expected, m


@pytest.mark.parametrize("mesh", [(2, 2), (4, 1)])
def test_simulated_dilated_bytes_of_the_first_ring_rank_equal_planner(mesh):
    """Ring-dilated over the ring dimension: the planner counts ring rank 0's sub-ring hops."""
    u, r = mesh
    n, h, kv, segs, rates = 64, 4, 4, (8, 32, 64), (1, 2, 4)
    q, k, v = (x.bfloat16().requires_grad_() for x in _inputs(n, h, kv, seed=7))
    with record_events() as tr:
        ringlab.ulysses_dilated_attention(q, k, v, segs, rates, ulysses_size=u, ring_size=r, causal=True,
                                          layout="zigzag").sum().backward()
    pb = Problem(seq_len=n, heads=h, head_dim=8, batch=2, dtype="bfloat16", kv_heads=kv, world_size=u * r,
                 causal=True, layout="zigzag", segments=segs, rates=rates)
    assert _sent(e for e in tr.events if e["mesh_rank"] == 0) == strategies.traffic(pb, u, r)


@pytest.mark.distributed
@pytest.mark.parametrize("case", [c for c in mesh_cases(MESH_WORLD_SIZE) if c["fn"] == "ring"]
                         + [c for c in ring_cases(MESH_WORLD_SIZE) if c["layout"] == "zigzag"],
                         ids=lambda c: f"{c.get('mesh', (1, MESH_WORLD_SIZE))}-{c['dtype']}-{c['causal']}")
def test_gloo_bytes_per_rank_equal_planner(case):
    """Measured bytes per rank (the traces of the gloo runs) equal the planner's, per strategy."""
    u, r = case.get("mesh", (1, MESH_WORLD_SIZE))
    pb = Problem(seq_len=case["n"], heads=case["heads"], head_dim=case["head_dim"], batch=case["batch"],
                 dtype=case["dtype"], kv_heads=case.get("kv_heads", case["heads"]), world_size=u * r,
                 causal=case["causal"], layout=case["layout"])
    expected = strategies.traffic(pb, u, r, dlse=case["dlse"])
    for rank, got in enumerate(gathered(MESH_WORLD_SIZE, case)[1]):
        assert _sent(got["events"]) == expected, rank


@pytest.mark.parametrize("bad, match", [
    (dict(q_heads=6, kv_heads=6, ulysses_size=4), "Ulysses size 4 must divide the query heads"),
    (dict(q_heads=4, kv_heads=2, ulysses_size=4), r"K/V heads \(2\)"),
    (dict(n=12, ulysses_size=4, ring_size=2), "does not split over ulysses_size 4"),
    (dict(ulysses_size=0), "ulysses_size must be an int >= 1"),
    (dict(ulysses_size=None), "pass ulysses_group="),
])
def test_bad_factorization_raises_before_any_transfer(bad, match):
    n, h, kv = bad.pop("n", 16), bad.pop("q_heads", 4), bad.pop("kv_heads", 4)
    q, k, v = _inputs(n, h, kv, seed=0)
    with record_events() as tr, pytest.raises(ValueError, match=match):
        ringlab.ulysses_attention(q, k, v, **bad)
    assert tr.events == []


def test_groups_and_sizes_are_exclusive(one_rank_group):
    q, k, v = _inputs(8, 2, 2, seed=0)
    with pytest.raises(ValueError, match="not both"):
        ringlab.ulysses_attention(q, k, v, ulysses_group=one_rank_group, ring_size=2)


def test_mesh_groups_needs_world_of_u_times_r(one_rank_group, monkeypatch):
    made = []
    monkeypatch.setattr(dist, "new_group", lambda *a, **kw: made.append(a))
    with pytest.raises(ValueError, match=r"world size 1 is not ulysses_size x ring_size = 2 x 1"):
        ringlab.mesh_groups(2, 1)
    assert made == []


def test_distributed_one_rank_mesh_is_attention(one_rank_group):
    q, k, v = _inputs(8, 2, 2, seed=1)
    out = ringlab.ulysses_attention(q, k, v, ulysses_group=one_rank_group, causal=True)
    torch.testing.assert_close(out, ringlab.attention(q, k, v, causal=True), atol=1e-14, rtol=0)


@pytest.mark.distributed
@pytest.mark.parametrize("case", mesh_cases(MESH_WORLD_SIZE),
                         ids=lambda c: f"{c['mesh'][0]}x{c['mesh'][1]}-{c['fn']}-{'causal' if c['causal'] else 'full'}")
def test_gloo_mesh_matches_reference(case):
    got, per_rank = gathered(MESH_WORLD_SIZE, case)
    check_case(case, got, per_rank)


MEMORY_CASES = [(2, 1, False, "contiguous", "float32", 4), (4, 1, True, "contiguous", "bfloat16", 4),
                (2, 2, True, "zigzag", "float32", 2), (2, 2, False, "contiguous", "bfloat16", 4)]


@pytest.mark.parametrize("dilated", [False, True])
@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("u,r,causal,layout,dtype,kv_heads", MEMORY_CASES)
def test_memory_model_matches_each_mesh_ranks_measured_peak(u, r, causal, layout, dtype, kv_heads, backward, dilated):
    """Each mesh rank's own code, run alone with instant transfers on CPU, measured by the
    tracker: the planner's terms (the ring's on H/U heads plus the all-to-all copies, or the
    K/V join when that is larger) agree."""
    from ringlab.planning.dryrun import run_one_mesh_rank

    branches = dict(segments=(64, 256, 1024), rates=(1, 2, 4)) if dilated else {}
    pb = Problem(1024, 4, 32, dtype=dtype, world_size=u * r, causal=causal, layout=layout, kv_heads=kv_heads,
                 **branches)
    model = sum(strategies.memory(pb, u, r, backward=backward)["terms"].values())
    for rank in sorted({0, u * r - 1}):
        measured = run_one_mesh_rank(pb, u, r, rank, backward=backward)
        assert abs(model - measured) <= 0.1 * measured, (rank, model, measured)
