"""Property tests: random dilated configs against the dense float64 reference."""

import torch
from conftest import check_against, rand_qkv
from hypothesis import given, settings
from hypothesis import strategies as st

import ringlab
from ringlab.reference import dense_dilated_attention


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
