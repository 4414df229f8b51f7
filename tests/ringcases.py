"""The multi-rank test cases: one launch per world size runs every case on real gloo ranks;
the tests then compare the gathered shards with the float64 reference and the simulated ring."""

import functools
import itertools
import random

import torch
import workers
from conftest import assert_close, max_err

import ringlab
from ringlab.engine.launch import launch
from ringlab.engine.layout import LAYOUTS as REGISTRY, with_pieces
from ringlab.reference import dense_attention, dense_dilated_attention

# doc_zigzag without packed documents is zigzag (same chunks, same tiles): packed_cases test it.
LAYOUTS = [name for name in REGISTRY if name != "doc_zigzag"]
WORLD_SIZES = [1, 2, 3, 4, 8]


def ring_cases(p):
    """Every layout, causal or not, float64 and float32; a non-default scale in the float64
    cases, and a loss that uses lse (dlse) in the causal ones."""
    return [dict(fn="ring", n=2 * p * 5, batch=2, heads=3, head_dim=16, layout=layout,
                 causal=causal, dtype=dtype, seed=100 * p + i, scale=0.3 if dtype == "float64" else None,
                 dlse=causal)
            for i, (layout, causal, dtype) in enumerate(
                itertools.product(LAYOUTS, [False, True], ["float64", "float32"]))]


def dilated_cases(p):
    """Shard length 12. Segments smaller than a shard (4: local), equal to it (12), larger and
    unaligned (18, 30: segment edges inside shards, spans of 2-3 ranks), the whole sequence."""
    n = 2 * p * 6
    configs = [([4, 12, 30], [1, 2, 3], "interleaved"), ([18, n], [2, 4], "grouped")]
    return [dict(fn="ring_dilated", n=n, batch=2, heads=4, head_dim=8, layout=layout, causal=causal,
                 dtype=dtype, segments=segs, rates=rates, head_offsets=mode, seed=200 * p + i,
                 scale=0.3 if dtype == "float64" else None, dlse=causal)
            for i, ((segs, rates, mode), layout, causal, dtype) in enumerate(
                itertools.product(configs, ["contiguous", "zigzag"], [False, True],
                                  ["float64", "float32"]))]


GQA_WORLD_SIZES = [2, 4]


def gqa_cases(p):
    """Grouped-query attention (4 query heads; 1 or 2 K/V heads) in float64: the ring in every
    layout and ring-dilated in both of dilated_cases' configurations, causal or not, and the
    multi-head twin of the last ring case, to compare bytes per hop with."""
    ring = [dict(fn="ring", n=2 * p * 5, batch=2, heads=4, kv_heads=kv, head_dim=16, layout=layout, causal=causal,
                 dtype="float64", seed=300 * p + i, dlse=causal)
            for i, (layout, causal, kv) in enumerate(itertools.product(LAYOUTS, [False, True], [1, 2]))]
    dilated = [dict(case, kv_heads=2 if case["head_offsets"] == "interleaved" else 1, seed=400 * p + i)
               for i, case in enumerate(dilated_cases(p)) if case["dtype"] == "float64"]
    return ring + dilated + [dict(ring[-1], kv_heads=4)]


MESH_WORLD_SIZE = 4


def mesh_cases(p):
    """Ulysses (4 x 1) and the hybrid (2 x 2) in float64, causal (zigzag over the ring, a loss
    using lse) or not, dense or dilated (segments inside a ring shard, across both, the whole
    sequence); 4 query heads on 2 K/V heads for the hybrid, 4 on 4 for Ulysses."""
    n = 4 * p * 2
    return [dict(fn=fn, mesh=(u, p // u), n=n, batch=2, heads=4, kv_heads=4 if u == 4 else 2, head_dim=8,
                 layout="zigzag" if causal else "contiguous", causal=causal, dtype="float64", seed=500 + i,
                 dlse=causal, **(dict(segments=[4, 12, n], rates=[1, 2, 3], head_offsets="interleaved")
                                 if fn == "ring_dilated" else {}))
            for i, (u, causal, fn) in enumerate(itertools.product([4, 2], [False, True], ["ring", "ring_dilated"]))]


PACKED_WORLD_SIZES = [2, 4]


def packed_documents(p, layout):
    """cu_seqlens of a packed sequence of 12P tokens (shards of 12): a document shorter than a
    segment, one spanning several ranks, one of a single token. doc_zigzag needs every document
    a multiple of 2P: lengths 1 : 3 : 1 : 1 of 2P."""
    lengths = [2 * p, 6 * p, 2 * p, 2 * p] if layout == "doc_zigzag" else [3, 6 * p + 2, 1, 6 * p - 8, 2]
    return [0, *itertools.accumulate(lengths)]


def packed_cases(p):
    """Packed documents (batch 1, float64, loss using lse): the ring in every layout and
    ring-dilated in every layout with pieces (segments restart at each document; 30 spans
    ranks), causal or not."""
    ring = [dict(fn="ring", layout=layout, causal=causal)
            for layout, causal in itertools.product(REGISTRY, [False, True])]
    dilated = [dict(fn="ring_dilated", layout=layout, causal=causal, segments=[4, 12, 30], rates=[1, 2, 3],
                    head_offsets="interleaved")
               for layout, causal in itertools.product(with_pieces(), [False, True])]
    return [dict(case, n=12 * p, batch=1, heads=2, head_dim=8, dtype="float64", seed=500 * p + i, dlse=True,
                 cu_seqlens=packed_documents(p, case["layout"]))
            for i, case in enumerate(ring + dilated)]


def packed_mesh_cases(p):
    """Packed documents on the hybrid (2 x 2 in doc_zigzag: shard_mesh cuts every document over
    the ring dimension) and on Ulysses (4 x 1), dense and dilated, causal, float64, a loss using
    lse; 4 query heads on 2 K/V heads for the hybrid, 4 on 4 for Ulysses."""
    return [dict(fn=fn, mesh=(u, p // u), n=12 * p, batch=1, heads=4, kv_heads=4 if u == 4 else 2, head_dim=8,
                 layout=layout, causal=True, dtype="float64", seed=700 + i, dlse=True,
                 cu_seqlens=packed_documents(p, layout),
                 **(dict(segments=[4, 12, 30], rates=[1, 2, 3], head_offsets="interleaved")
                    if fn == "ring_dilated" else {}))
            for i, ((u, layout), fn) in enumerate(itertools.product([(2, "doc_zigzag"), (4, "zigzag")],
                                                                    ["ring", "ring_dilated"]))]


RANDOM_CASES = 6


def draw_split(pick, *, ranks, dilated, packed, most=6):
    """A random layout that a ring (``dilated``: ring-dilated) call over ``ranks`` ranks accepts,
    drawn from the registry, and a sequence it splits, with packed documents when ``packed``.
    ``pick(options)`` returns one of a sequence: random.Random.choice for the gloo cases, a
    Hypothesis draw in test_properties. Returns (layout, n, cu_seqlens or None)."""
    layouts = [name for name, lay in REGISTRY.items()
               if (lay.has_pieces or not dilated) and (packed or not lay.splits_documents)]
    layout = REGISTRY[pick(layouts)]
    if layout.splits_documents:
        lengths = [layout.document_unit(ranks) * pick(range(1, 4)) for _ in range(pick(range(1, 4)))]
        docs = [0, *itertools.accumulate(lengths)]
        return layout.name, docs[-1], docs
    n = layout.unit * ranks * pick(range(1, most + 1))
    cuts = {pick(range(1, n)) for _ in range(pick(range(4)))} if packed and n > 1 else set()
    return layout.name, n, [0, *sorted(cuts), n] if packed else None


def random_cases(p):
    """Drawn configurations (seeded per world size): ring or ring-dilated, any layout that can
    split them, GQA, packed documents, ragged segments, scale, dlse, float64 or float32."""
    rng, cases = random.Random(p), []
    for i in range(RANDOM_CASES):
        fn = rng.choice(["ring", "ring_dilated"])
        heads = rng.choice([1, 2, 4])
        packed = rng.random() < 0.4
        layout, n, docs = draw_split(rng.choice, ranks=p, dilated=fn == "ring_dilated", packed=packed)
        case = dict(fn=fn, n=n, batch=1 if packed else rng.choice([1, 2]), heads=heads, head_dim=rng.choice([8, 16]),
                    kv_heads=rng.choice([x for x in (1, 2, heads) if heads % x == 0]), layout=layout,
                    causal=rng.random() < 0.5, dtype=rng.choice(["float64", "float32"]), seed=600 * p + i,
                    scale=rng.choice([None, 0.3]), dlse=rng.random() < 0.5)
        if docs:
            case["cu_seqlens"] = docs
        if fn == "ring_dilated":
            branches = rng.randint(1, 3)
            case |= dict(segments=[rng.randint(1, n + 4) for _ in range(branches)],
                         rates=[rng.randint(1, 4) for _ in range(branches)],
                         head_offsets=rng.choice(["interleaved", "grouped"]))
        cases.append(case)
    return cases


def all_cases(p):
    return (ring_cases(p) + dilated_cases(p) + random_cases(p) + (gqa_cases(p) if p in GQA_WORLD_SIZES else [])
            + (mesh_cases(p) + packed_mesh_cases(p) if p == MESH_WORLD_SIZE else [])
            + (packed_cases(p) if p in PACKED_WORLD_SIZES else []))


@functools.cache
def _launch_once(p):
    """One launch of p gloo ranks for every case, its failure kept too: the 28 cases of a world
    size that failed to launch report that one failure instead of relaunching 28 times."""
    try:
        return launch(workers.run_cases, p, args=(all_cases(p),), timeout=600)
    except Exception as err:  # noqa: BLE001 - re-raised by every case of this world size
        return err


def distributed_results(p):
    """Every case's per-rank results, from one launch of p gloo ranks."""
    results = _launch_once(p)
    if isinstance(results, Exception):
        raise results
    return {i: [rank_results[i] for rank_results in results] for i in range(len(all_cases(p)))}


def unsharded(case, per_rank):
    """The case's outputs and gradients reassembled from the per-rank results."""
    def whole(shards, dim):
        if "mesh" in case:
            return ringlab.unshard_mesh(shards, case["mesh"][0], case["layout"], dim,
                                        cu_seqlens=workers.cu_seqlens(case))
        return ringlab.unshard(shards, case["layout"], dim, cu_seqlens=workers.cu_seqlens(case))
    return {key: whole([r[key] for r in per_rank], 2 if key == "lse" else 1) for key in ("out", "lse", "dq", "dk", "dv")}


def gathered(p, case):
    """The case's outputs and gradients unsharded from every rank, and the per-rank results."""
    per_rank = distributed_results(p)[all_cases(p).index(case)]
    return unsharded(case, per_rank), per_rank


def reference(case, rounded):
    """The float64 reference; with packed documents, each document alone, concatenated."""
    if "cu_seqlens" in case:
        docs, alone = case["cu_seqlens"], {key: x for key, x in case.items() if key != "cu_seqlens"}
        parts = [reference(alone, [x[:, a:b] for x in rounded]) for a, b in zip(docs, docs[1:])]
        return torch.cat([o for o, _ in parts], 1), torch.cat([lse for _, lse in parts], 2)
    q, k, v = rounded
    group = q.shape[2] // k.shape[2]  # grouped-query attention: each K/V head serves `group` query heads
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    if case["fn"] == "ring":
        return dense_attention(q, k, v, causal=case["causal"], scale=case.get("scale"))
    return dense_dilated_attention(q, k, v, case["segments"], case["rates"], causal=case["causal"],
                                   scale=case.get("scale"), head_offsets=case["head_offsets"])


def check_case(case, got, per_rank):
    """Gathered results vs the float64 reference (docs/design.md §7) and vs the simulated ring."""
    dtype = getattr(torch, case["dtype"])
    q, k, v, go, gl = workers.case_inputs(case)
    rounded = [x.to(dtype).double().requires_grad_() for x in (q, k, v)]
    rout, rlse = reference(case, rounded)
    rgrads = torch.autograd.grad(workers.loss(case, rout, rlse, go, gl), rounded)
    assert_close(got["out"], rout, dtype, name="out")
    assert_close(got["lse"], rlse, dtype, name="lse")
    for name, e in zip(("dq", "dk", "dv"), rgrads):
        assert_close(got[name], e, dtype, grad=True, name=name)
    # The simulated ring runs the same per-rank code: equal up to float rounding.
    sq, sk, sv = (x.to(dtype).clone().requires_grad_() for x in (q, k, v))
    sout, slse = workers.call(case, sq, sk, sv, **workers.simulated(case, len(per_rank)))
    sgrads = torch.autograd.grad(workers.loss(case, sout, slse, go, gl), (sq, sk, sv))
    eps = torch.finfo(dtype).eps
    for name, s in zip(("out", "lse", "dq", "dk", "dv"), (sout, slse, *sgrads)):
        finite = s[torch.isfinite(s)]
        scale = max(1.0, finite.abs().max().item() if finite.numel() else 0.0)
        assert max_err(got[name], s) <= 8 * eps * scale, name
