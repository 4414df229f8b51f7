"""ringlab.nn: shapes, masks, checkpointing, and 2-rank training equal to 1 rank."""

import pytest
import torch
import workers
from conftest import rand_qkv

import ringlab
from ringlab.launch import launch
from ringlab.nn import (
    DilatedAttention,
    LongNetLM,
    MultiheadDilatedAttention,
    RingAttention,
)


def test_dilated_attention_module_matches_function():
    q, k, v = rand_qkv(2, 40, 4, 8)
    mod = DilatedAttention([8, 16], [1, 2])
    for causal in (False, True):
        expected = ringlab.dilated_attention(q, k, v, [8, 16], [1, 2], causal=causal)
        assert torch.equal(mod(q, k, v, is_causal=causal), expected)


def test_ring_attention_module_simulated():
    q, k, v = rand_qkv(1, 32, 2, 8)
    out = RingAttention(ring_size=4, layout="zigzag")(q, k, v, is_causal=True)
    assert torch.allclose(out, ringlab.attention(q, k, v, causal=True), atol=1e-13)


def test_dropout_is_refused():
    with pytest.raises(ValueError, match="no attention dropout"):
        DilatedAttention([8], [1], attention_dropout=0.1)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_shapes_and_causality(batch_first):
    torch.manual_seed(0)
    mha = MultiheadDilatedAttention(32, 4, [8, 16], [1, 2], batch_first=batch_first, dtype=torch.float64)
    x = torch.randn(2, 24, 32, dtype=torch.float64)
    inp = x if batch_first else x.transpose(0, 1)
    out, weights = mha(inp, is_causal=True)
    assert out.shape == inp.shape and weights is None
    # causal: changing the last token leaves earlier outputs unchanged
    x2 = x.clone()
    x2[:, -1] += 1.0
    out2, _ = mha(x2 if batch_first else x2.transpose(0, 1), is_causal=True)
    if not batch_first:
        out, out2 = out.transpose(0, 1), out2.transpose(0, 1)
    assert torch.allclose(out[:, :-1], out2[:, :-1], atol=1e-13)
    assert not torch.allclose(out[:, -1], out2[:, -1])


def test_multihead_rejects_bad_heads():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        MultiheadDilatedAttention(30, 4, [8], [1])


def test_checkpointing_gives_identical_gradients():
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = LongNetLM(30, 16, 2, 2, [4, 16], [1, 2], max_seq_len=32, checkpoint=ckpt,
                          dtype=torch.float64)
        tokens = torch.randint(0, 30, (2, 17), generator=torch.Generator().manual_seed(1))
        model.loss(tokens[:, :-1], tokens[:, 1:]).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_two_ranks_train_like_one(layout):
    losses1, params1 = workers.train_longnet(3, 0, layout)
    results = launch(workers.train_longnet, 2, args=(3, 0, layout), timeout=300)
    for losses2, params2 in results:
        assert losses2 == pytest.approx(losses1, abs=1e-12, rel=0)
        for name, value in params1.items():
            assert torch.allclose(params2[name], value, atol=1e-12, rtol=0), name
    assert losses1[-1] < losses1[0]
