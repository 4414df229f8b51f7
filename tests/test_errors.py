"""Every bad input listed in docs/design.md §1 raises a clear ValueError/TypeError naming the argument."""

import pytest
import torch

import ringlab


def qkv(n=8, h=2, d=4, b=1, dtype=torch.float32):
    return [torch.randn(b, n, h, d, dtype=dtype) for _ in range(3)]


FUNCS = {
    "attention": lambda q, k, v, **kw: ringlab.attention(q, k, v, **kw),
    "dilated": lambda q, k, v, **kw: ringlab.dilated_attention(q, k, v, [4], [1], **kw),
    "ring": lambda q, k, v, **kw: ringlab.ring_attention(q, k, v, ring_size=2, **kw),
}


@pytest.mark.parametrize("fn", FUNCS.values(), ids=FUNCS.keys())
def test_wrong_rank_tensor(fn):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q must have shape \(batch, seq, heads, head_dim\)"):
        fn(q[0], k, v)


@pytest.mark.parametrize("fn", FUNCS.values(), ids=FUNCS.keys())
def test_dtype_mismatch(fn):
    q, k, v = qkv()
    with pytest.raises(TypeError, match="share a dtype"):
        fn(q, k.double(), v)


@pytest.mark.parametrize("fn", FUNCS.values(), ids=FUNCS.keys())
def test_integer_dtype(fn):
    q, k, v = qkv()
    with pytest.raises(TypeError, match="dtype torch.int64"):
        fn(q.long(), k.long(), v.long())


@pytest.mark.parametrize("fn", FUNCS.values(), ids=FUNCS.keys())
def test_not_a_tensor(fn):
    q, k, v = qkv()
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        fn(q, k.tolist(), v)


@pytest.mark.parametrize("fn", FUNCS.values(), ids=FUNCS.keys())
def test_kv_heads_must_divide_q_heads(fn):
    q, k, v = qkv(h=6)
    with pytest.raises(ValueError, match="q has 6 heads and k, v have 4: q's heads must be a multiple"):
        fn(q, k[:, :, :4], v[:, :, :4])
    with pytest.raises(ValueError, match="batch, heads and head_dim must be >= 1"):
        fn(q, k[:, :, :0], v[:, :, :0])


@pytest.mark.parametrize("fn", FUNCS.values(), ids=FUNCS.keys())
def test_kv_shape_mismatch(fn):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        fn(q, k, v[..., :2])


@pytest.mark.parametrize("name", ["dilated", "ring"])
def test_length_mismatch_for_self_attention(name):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="same sequence length"):
        FUNCS[name](q, k[:, :4], v[:, :4])


def test_empty_sequence():
    q, k, v = qkv(n=0)
    with pytest.raises(ValueError, match="must be >= 1"):
        ringlab.attention(q, k, v)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_scale_value(scale):
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        ringlab.attention(*qkv(), scale=scale)


def test_bad_scale_type():
    with pytest.raises(TypeError, match="scale must be a float"):
        ringlab.attention(*qkv(), scale="0.5")


def test_causal_not_bool():
    with pytest.raises(TypeError, match="causal must be a bool"):
        ringlab.attention(*qkv(), causal=1)


def test_segments_rates_length_mismatch():
    with pytest.raises(ValueError, match="same length"):
        ringlab.dilated_attention(*qkv(), [4, 8], [1])


def test_rate_below_one():
    with pytest.raises(ValueError, match="dilation_rates must be >= 1"):
        ringlab.dilated_attention(*qkv(), [4], [0])


def test_segment_below_one():
    with pytest.raises(ValueError, match="segment_lengths must be >= 1"):
        ringlab.dilated_attention(*qkv(), [0], [1])


def test_empty_branches():
    with pytest.raises(ValueError, match="segment_lengths must not be empty"):
        ringlab.dilated_attention(*qkv(), [], [])


def test_non_int_segment():
    with pytest.raises(TypeError, match="segment_lengths must hold ints"):
        ringlab.dilated_attention(*qkv(), [4.5], [1])


def test_bad_head_offsets():
    with pytest.raises(ValueError, match="head_offsets must be one of"):
        ringlab.dilated_attention(*qkv(), [4], [1], head_offsets="random")


def test_bad_layout():
    with pytest.raises(ValueError, match="layout must be one of"):
        ringlab.ring_attention(*qkv(), ring_size=2, layout="diagonal")


@pytest.mark.parametrize("layout,n,p", [("contiguous", 10, 4), ("zigzag", 12, 4), ("striped", 9, 2)])
def test_length_no_layout_can_split(layout, n, p):
    with pytest.raises(ValueError, match=f"cannot split sequence length {n} over {p} ranks"):
        ringlab.ring_attention(*qkv(n=n), ring_size=p, layout=layout)


def test_ring_size_and_group_together():
    with pytest.raises(ValueError, match="not both"):
        ringlab.ring_attention(*qkv(), ring_size=2, group=object())


@pytest.mark.parametrize("call", [
    lambda x: ringlab.ring_attention(x, x, x, group="world"),
    lambda x: ringlab.ring_dilated_attention(x, x, x, [4], [1], group=2),
    lambda x: ringlab.ulysses_attention(x, x, x, ulysses_group="world"),
], ids=["ring", "ring_dilated", "ulysses"])
def test_a_group_that_is_not_a_process_group(call):
    with pytest.raises(TypeError, match="group must be a torch.distributed ProcessGroup"):
        call(qkv()[0])


@pytest.mark.parametrize("call", [
    lambda x: ringlab.ring_dilated_attention(x, x, x, None, [2], ring_size=2),
    lambda x: ringlab.ring_dilated_attention(x, x, x, None, None, ring_size=2),
    lambda x: ringlab.ulysses_dilated_attention(x, x, x, None, [2], ulysses_size=2),
], ids=["ring_dilated", "ring_dilated-no-rates", "ulysses_dilated"])
def test_dilated_ring_functions_need_segments(call):
    """None is not "no dilation" here: it once ran the plain ring."""
    with pytest.raises(TypeError, match="segment_lengths must be a sequence of ints"):
        call(qkv()[0])


@pytest.mark.parametrize("call", [lambda x: ringlab.shard_mesh(x, 0, 0, 2), lambda x: ringlab.unshard_mesh([x, x], 0)],
                         ids=["shard_mesh", "unshard_mesh"])
def test_mesh_sharding_needs_a_ulysses_size(call):
    with pytest.raises(ValueError, match="ulysses_size must be an int >= 1"):
        call(qkv()[0])


def test_ring_needs_group_or_size():
    with pytest.raises(ValueError, match="pass group="):
        ringlab.ring_attention(*qkv())


@pytest.mark.parametrize("size,exc", [(0, ValueError), (2.0, TypeError), (True, TypeError)])
def test_bad_ring_size(size, exc):
    with pytest.raises(exc, match="ring_size"):
        ringlab.ring_attention(*qkv(), ring_size=size)


def test_shard_rank_out_of_range():
    with pytest.raises(ValueError, match="rank must be in"):
        ringlab.shard(torch.zeros(1, 8, 1, 1), 4, 4)
