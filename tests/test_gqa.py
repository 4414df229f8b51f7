"""Grouped-query attention (k, v with H_kv < H heads) in every function, against the float64
dense reference with each K/V head repeated for its H / H_kv query heads (as Llama does)."""

import itertools

import pytest
import torch
from conftest import check_against, rand_qkv, repeated
from ringcases import GQA_WORLD_SIZES, check_case, gathered, gqa_cases

import ringlab
from ringlab.engine.layout import LAYOUTS
from ringlab.engine.trace import record_events
from ringlab.reference import dense_attention, dense_dilated_attention

H = 4


def gqa_inputs(kv_heads, n=24, seed=0):
    q, = rand_qkv(2, n, H, 8, seed=seed, count=1)
    k, v = rand_qkv(2, n, kv_heads, 8, seed=seed + 1, count=2)
    return [q, k, v]


SINGLE = {
    "attention": (lambda c: lambda q, k, v: ringlab.attention(q, k, v, causal=c, return_lse=True),
                  lambda c: lambda q, k, v: dense_attention(q, k, v, causal=c)),
    "dilated interleaved": (
        lambda c: lambda q, k, v: ringlab.dilated_attention(q, k, v, [6, 24], [1, 3], causal=c, return_lse=True),
        lambda c: lambda q, k, v: dense_dilated_attention(q, k, v, [6, 24], [1, 3], causal=c)),
    "dilated grouped": (
        lambda c: lambda q, k, v: ringlab.dilated_attention(q, k, v, [8, 24], [2, 4], causal=c, return_lse=True,
                                                            head_offsets="grouped"),
        lambda c: lambda q, k, v: dense_dilated_attention(q, k, v, [8, 24], [2, 4], causal=c,
                                                          head_offsets="grouped")),
}
for layout, p in itertools.product(LAYOUTS, (2, 3)):
    SINGLE[f"ring {layout} P={p}"] = (
        lambda c, lay=layout, p=p: lambda q, k, v: ringlab.ring_attention(q, k, v, ring_size=p, causal=c, layout=lay,
                                                                           return_lse=True),
        lambda c: lambda q, k, v: dense_attention(q, k, v, causal=c))
for layout in ("contiguous", "zigzag"):
    SINGLE[f"ring-dilated {layout}"] = (
        lambda c, lay=layout: lambda q, k, v: ringlab.ring_dilated_attention(
            q, k, v, [6, 12, 24], [1, 2, 3], ring_size=2, causal=c, layout=lay, return_lse=True),
        lambda c: lambda q, k, v: dense_dilated_attention(q, k, v, [6, 12, 24], [1, 2, 3], causal=c))


@pytest.mark.parametrize("kv_heads", [1, 2, H])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", SINGLE)
def test_gqa_matches_repeated_kv(name, dtype, causal, kv_heads):
    fn, ref = SINGLE[name]
    check_against(fn(causal), repeated(ref(causal)), gqa_inputs(kv_heads), dtype, use_lse=causal, name=name)


def _posted(kv_heads, call):
    q, k, v = (x.requires_grad_() for x in gqa_inputs(kv_heads))
    with record_events() as tr:
        call(q, k, v).sum().backward()
    return sum(e["bytes"] for e in tr.of(kind="post"))


def test_gqa_ring_rotates_only_kv_heads():
    """The simulated ring posts H_kv / H of the multi-head bytes (forward and backward)."""
    call = lambda q, k, v: ringlab.ring_attention(q, k, v, ring_size=3, causal=True, layout="zigzag")  # noqa: E731
    full = _posted(H, call)
    assert full > 0 and [_posted(kv, call) / full for kv in (1, 2)] == [1 / 4, 2 / 4]


def test_gqa_ring_dilated_sends_each_offsets_kv_heads_once():
    """A message holds, per offset, the K/V heads its query heads read, each once. With grouped
    offsets whose query heads fill whole K/V groups (here 2 per K/V head, H / r = 4 and 2), that is
    H_kv / H of the multi-head bytes. Interleaved offsets give a K/V head's query heads different
    offsets, so its rows travel once per offset: with r = H it saves nothing."""
    grouped = lambda q, k, v: ringlab.ring_dilated_attention(  # noqa: E731
        q, k, v, [6, 24], [1, 2], ring_size=2, head_offsets="grouped")
    assert _posted(2, grouped) / _posted(H, grouped) == 2 / 4
    interleaved = lambda q, k, v: ringlab.ring_dilated_attention(q, k, v, [24], [4], ring_size=2)  # noqa: E731
    assert _posted(1, interleaved) == _posted(H, interleaved) > 0


@pytest.mark.distributed
@pytest.mark.parametrize("p", GQA_WORLD_SIZES)
@pytest.mark.parametrize("i", range(len(gqa_cases(2))))
def test_distributed_gqa_against_reference(p, i):
    case = gqa_cases(p)[i]
    got, per_rank = gathered(p, case)
    check_case(case, got, per_rank)


@pytest.mark.distributed
@pytest.mark.parametrize("p", GQA_WORLD_SIZES)
def test_distributed_gqa_bytes_per_hop(p):
    """Measured on gloo ranks: every rank of the ring posts H_kv / H of the multi-head twin's bytes."""
    *cases, twin = gqa_cases(p)
    gqa = cases[list(LAYOUTS).index(twin["layout"]) * 4 + 3]
    assert {**gqa, "kv_heads": H} == twin
    for rank, (a, b) in enumerate(zip(gathered(p, gqa)[1], gathered(p, twin)[1])):
        sent = [sum(e["bytes"] for e in r["events"] if e["kind"] == "post") for r in (a, b)]
        assert sent[1] > 0 and sent[0] * H == sent[1] * gqa["kv_heads"], (rank, sent)
