"""Property tests: random configs against the dense float64 reference."""

import contextlib
from unittest import mock

import pytest
import torch
from conftest import check_against, per_document, rand_qkv, repeated, uninitialized_is_nan
from hypothesis import given, settings
from hypothesis import strategies as st
from ringcases import RANDOM_CASES, WORLD_SIZES, check_case, draw_split, gathered, random_cases

import ringlab
from ringlab.engine import autograd, comm, dilation
from ringlab.reference import dense_attention, dense_dilated_attention


@st.composite
def configs(draw):
    n = draw(st.integers(1, 90))
    branches = draw(st.integers(1, 3))
    segs = draw(st.lists(st.integers(1, 120), min_size=branches, max_size=branches))
    rates = draw(st.lists(st.integers(1, 9), min_size=branches, max_size=branches))
    return dict(n=n, b=draw(st.integers(1, 2)), h=draw(st.integers(1, 5)),
                d=draw(st.sampled_from([8, 16, 24])), segs=segs, rates=rates,
                causal=draw(st.booleans()), mode=draw(st.sampled_from(["interleaved", "grouped"])),
                seed=draw(st.integers(0, 2**16)))


@settings(max_examples=60, deadline=None)
@given(configs())
def test_dilated_matches_reference(c):
    inputs = rand_qkv(c["b"], c["n"], c["h"], c["d"], seed=c["seed"])
    fn = lambda q, k, v: ringlab.dilated_attention(q, k, v, c["segs"], c["rates"], causal=c["causal"],
                                                   head_offsets=c["mode"], return_lse=True)
    ref = lambda q, k, v: dense_dilated_attention(q, k, v, c["segs"], c["rates"], causal=c["causal"],
                                                  head_offsets=c["mode"])
    check_against(fn, ref, inputs, torch.float64, use_lse=True, name=str(c))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 200), nk=st.integers(1, 200), causal=st.booleans(), seed=st.integers(0, 999))
def test_attention_matches_reference(n, nk, causal, seed):
    from ringlab.reference import dense_attention
    inputs = rand_qkv(1, n, 2, 16, nk=nk, seed=seed)
    check_against(lambda q, k, v: ringlab.attention(q, k, v, causal=causal, return_lse=True),
                  lambda q, k, v: dense_attention(q, k, v, causal=causal), inputs, torch.float64)


# The engine's switches, each a different path through the same math: dilated calls cut and
# fused as on a GPU, head chunks, and the simulated ring rank by rank instead of all at once.
SWITCHES = {
    "gpu_cut": lambda: [mock.patch.dict(dilation.COPY_TO_FUSE, {"cpu": True}),
                        mock.patch.dict(dilation.MIN_CALL_ELEMENTS, {"cpu": 256})],
    "head_chunks": lambda: [mock.patch.dict(autograd.ACCUM_BUDGET, {"cpu": 1}),
                            mock.patch.dict(autograd.MIN_CHUNK_ELEMENTS, {"cpu": 1})],
    "rank_by_rank": lambda: [mock.patch.object(comm, "SIMULATE_TOGETHER", False)],
}

# Memory layouts a caller's tensors may have: the strides differ, the values do not.
STRIDES = {
    "contiguous": lambda x: x,
    "head_dim_strided": lambda x: x.transpose(-1, -2).contiguous().transpose(-1, -2),
    "heads_outer": lambda x: x.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3),
    "sliced": lambda x: torch.cat([x, x], -1)[..., :x.shape[-1]],
}


@st.composite
def sharded_configs(draw):
    """A simulated ring, ring-dilated or Ulysses/hybrid call: ranks, layout, GQA, packed documents."""
    fn = draw(st.sampled_from(["ring", "ring_dilated", "ulysses", "ulysses_dilated"]))
    dilated, mesh = fn.endswith("dilated"), fn.startswith("ulysses")
    ulysses = draw(st.sampled_from([1, 2])) if mesh else 1
    ring = draw(st.integers(1, 2 if mesh else 4))
    h = draw(st.sampled_from([2, 4] if mesh else [1, 2, 4, 6]))
    kv_heads = draw(st.sampled_from([x for x in (1, 2, h) if h % x == 0 and x % ulysses == 0]))
    layout, n, docs = draw_split(lambda options: draw(st.sampled_from(options)), ranks=ring * ulysses,
                                 dilated=dilated, packed=draw(st.booleans()), most=10)
    branches = draw(st.integers(1, 3))
    return dict(fn=fn, ulysses=ulysses, ring=ring, h=h, kv_heads=kv_heads, n=n, layout=layout, docs=docs,
                b=1 if docs else draw(st.integers(1, 2)), d=draw(st.sampled_from([8, 16])),
                segs=draw(st.lists(st.integers(1, n + 4), min_size=branches, max_size=branches)),
                rates=draw(st.lists(st.integers(1, 5), min_size=branches, max_size=branches)),
                causal=draw(st.booleans()), mode=draw(st.sampled_from(["interleaved", "grouped"])),
                scale=draw(st.sampled_from([None, 0.3])), dtype=draw(st.sampled_from([torch.float64, torch.float32])),
                switches=draw(st.sets(st.sampled_from(sorted(SWITCHES)))),
                strides=draw(st.lists(st.sampled_from(sorted(STRIDES)), min_size=3, max_size=3)),
                seed=draw(st.integers(0, 2**16)))


@settings(max_examples=200, deadline=None)
@given(sharded_configs())
def test_sharded_functions_match_reference(c):
    q, k, v = rand_qkv(c["b"], c["n"], c["h"], c["d"], seed=c["seed"])
    group = c["h"] // c["kv_heads"]
    k, v = k[:, :, ::group].contiguous(), v[:, :, ::group].contiguous()
    cu = None if c["docs"] is None else torch.tensor(c["docs"], dtype=torch.int32)
    kw = dict(causal=c["causal"], layout=c["layout"], scale=c["scale"], return_lse=True, cu_seqlens=cu)
    branches = (c["segs"], c["rates"]) if c["fn"].endswith("dilated") else ()
    if branches:
        kw["head_offsets"] = c["mode"]
        ref = lambda q, k, v: dense_dilated_attention(q, k, v, *branches, causal=c["causal"], scale=c["scale"],
                                                      head_offsets=c["mode"])
    else:
        ref = lambda q, k, v: dense_attention(q, k, v, causal=c["causal"], scale=c["scale"])
    ref = repeated(ref) if c["docs"] is None else per_document(repeated(ref), c["docs"])
    call = getattr(ringlab, c["fn"] + "_attention")
    kw["ring_size"] = c["ring"]
    if c["fn"].startswith("ulysses"):
        kw["ulysses_size"] = c["ulysses"]

    def fn(*xs):
        return call(*(STRIDES[s](x) for s, x in zip(c["strides"], xs)), *branches, **kw)

    with contextlib.ExitStack() as stack:
        stack.enter_context(uninitialized_is_nan())
        for name in c["switches"]:
            for patch in SWITCHES[name]():
                stack.enter_context(patch)
        check_against(fn, ref, [q, k, v], c["dtype"], use_lse=True, name=str(c))


@pytest.mark.parametrize("i", range(RANDOM_CASES))
@pytest.mark.parametrize("p", WORLD_SIZES)
def test_random_cases_on_gloo_ranks(p, i):
    """Drawn configurations on real gloo ranks (ringcases.random_cases) against float64 and
    the simulated ring."""
    case = random_cases(p)[i]
    check_case(case, *gathered(p, case))
