"""ringlab.engine.nn against a float64 einsum re-implementation written here (explicit projections,
explicit layer norm), checkpointing, and 2-rank training equal to 1 rank."""

import math

import pytest
import torch
import workers
from conftest import assert_close, rand_qkv
from ringcases import check_case, dilated_cases, ring_cases, unsharded

import ringlab
from ringlab.engine.launch import launch
from ringlab.engine.nn import (
    DilatedAttention,
    LongNetLM,
    MultiheadDilatedAttention,
    RingAttention,
)


# The modules are compared in float64 with atol 1e-12 and rtol 0: only summation order differs.
def einsum_attention(q, k, v, *, causal=False, scale=None, segments=None, rates=None,
                     head_offsets="interleaved"):
    """softmax(scale q k^T + log m) v over (B, N, H, D), every branch's mask spelled out (docs/design.md §3).
    Dense attention when ``segments`` is None. Every row must see some key (a rate-1 branch)."""
    n, h, d = q.shape[1], q.shape[2], q.shape[3]
    pos = torch.arange(n)
    m = torch.ones(h, n, n, dtype=torch.float64)
    if segments is not None:
        m = torch.zeros(h, n, n, dtype=torch.float64)
        for w, r in zip(segments, rates):
            for head in range(h):
                o = head % r if head_offsets == "interleaved" else head // math.ceil(h / r)
                sel = (pos % w) % r == o
                m[head] += ((pos[:, None] // w == pos[None, :] // w) & sel[:, None] & sel[None, :]).double()
    if causal:
        m = m * (pos[None, :] <= pos[:, None])
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * (d ** -0.5 if scale is None else scale) + torch.log(m)
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v)


def einsum_multihead(mod, query, key, value, *, causal, segments, rates, head_offsets):
    """MultiheadDilatedAttention by hand: x W^T + b, heads, attention, layer norm, out projection
    (batch-first inputs)."""
    lin = lambda layer, x: x @ layer.weight.T + (0 if layer.bias is None else layer.bias)  # noqa: E731
    heads = lambda x: x.unflatten(-1, (mod.num_heads, -1))  # noqa: E731
    # grouped-query attention: each K/V head repeated for its num_heads / num_kv_heads query heads
    kv_heads = lambda x: x.unflatten(-1, (mod.num_kv_heads, -1)).repeat_interleave(  # noqa: E731
        mod.num_heads // mod.num_kv_heads, dim=2)
    x = einsum_attention(heads(lin(mod.q_proj, query)), kv_heads(lin(mod.k_proj, key)),
                         kv_heads(lin(mod.v_proj, value)), causal=causal, segments=segments, rates=rates,
                         head_offsets=head_offsets).flatten(2)
    if mod.norm is not None:
        mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        x = (x - mean) / torch.sqrt(var + mod.norm.eps) * mod.norm.weight + mod.norm.bias
    return lin(mod.out_proj, x)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", ["interleaved", "grouped"])
@pytest.mark.parametrize("scale", [None, 0.7])
def test_dilated_attention_module_against_einsum(causal, mode, scale):
    q, k, v = rand_qkv(2, 40, 6, 8)
    mod = DilatedAttention([8, 16, 64], [1, 2, 4], softmax_scale=scale, head_offsets=mode)
    expected = einsum_attention(q, k, v, causal=causal, scale=scale, segments=[8, 16, 64], rates=[1, 2, 4],
                                head_offsets=mode)
    assert torch.allclose(mod(q, k, v, is_causal=causal), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scale", [None, 0.7])
def test_ring_attention_module_simulated(causal, scale):
    q, k, v = rand_qkv(1, 32, 2, 8)
    out = RingAttention(ring_size=4, layout="zigzag", softmax_scale=scale)(q, k, v, is_causal=causal)
    assert torch.allclose(out, einsum_attention(q, k, v, causal=causal, scale=scale), atol=1e-12, rtol=0)


@pytest.mark.parametrize("layer_norm", [True, False])
@pytest.mark.parametrize("separate_kv", [False, True])
@pytest.mark.parametrize("mode", ["interleaved", "grouped"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kv_heads", [6, 2, 1])
def test_multihead_against_einsum(layer_norm, separate_kv, mode, bias, kv_heads):
    segs, rates = [8, 24], [1, 3]
    torch.manual_seed(0)
    mha = MultiheadDilatedAttention(24, 6, segs, rates, num_kv_heads=kv_heads, layer_norm=layer_norm,
                                    head_offsets=mode, bias=bias, dtype=torch.float64)
    if layer_norm:  # non-trivial affine parameters, so that their use is checked
        torch.nn.init.normal_(mha.norm.weight)
        torch.nn.init.normal_(mha.norm.bias)
    x, y, z = (torch.randn(2, 20, 24, dtype=torch.float64) for _ in range(3))
    key, value = (y, z) if separate_kv else (x, x)
    for causal in (False, True):
        out, weights = mha(x, y, z, is_causal=causal) if separate_kv else mha(x, is_causal=causal)
        expected = einsum_multihead(mha, x, key, value, causal=causal, segments=segs, rates=rates, head_offsets=mode)
        assert weights is None and torch.allclose(out, expected, atol=1e-12, rtol=0)


def test_dropout_is_refused():
    with pytest.raises(ValueError, match="no attention dropout"):
        DilatedAttention([8], [1], attention_dropout=0.1)


def test_multihead_sequence_first_checkpointed_against_einsum():
    """batch_first=False and checkpoint=True change the plumbing, not the result; gradients too."""
    segs, rates = [8, 24], [1, 3]
    torch.manual_seed(0)
    mha = MultiheadDilatedAttention(24, 6, segs, rates, batch_first=False, checkpoint=True, dtype=torch.float64)
    x = torch.randn(2, 20, 24, dtype=torch.float64, requires_grad=True)
    out, _ = mha(x.transpose(0, 1), is_causal=True)
    expected = einsum_multihead(mha, x, x, x, causal=True, segments=segs, rates=rates, head_offsets="interleaved")
    assert torch.allclose(out.transpose(0, 1), expected, atol=1e-12, rtol=0)
    g = torch.randn_like(expected)
    got = torch.autograd.grad((out.transpose(0, 1) * g).sum(), [x, mha.q_proj.weight])
    want = torch.autograd.grad((expected * g).sum(), [x, mha.q_proj.weight])
    for a, e in zip(got, want):
        assert torch.allclose(a, e, atol=1e-12, rtol=0)


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
    assert torch.allclose(out[:, :-1], out2[:, :-1], atol=1e-13, rtol=0)
    assert (out[:, -1] - out2[:, -1]).abs().max() > 1e-3


def test_multihead_rejects_bad_heads():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        MultiheadDilatedAttention(30, 4, [8], [1])
    with pytest.raises(ValueError, match=r"num_heads \(6\) must be a multiple of num_kv_heads \(4\)"):
        MultiheadDilatedAttention(24, 6, [8], [1], num_kv_heads=4)


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


@pytest.mark.parametrize("layout", ["zigzag", "doc_zigzag"])
def test_a_layout_without_a_group_changes_nothing(layout):
    """One process holds the whole sequence in order: a layout (for sequence parallelism) must
    not shard the positions, so any length runs and the logits are the contiguous ones."""
    logits = []
    for lay in ("contiguous", layout):
        torch.manual_seed(0)
        model = LongNetLM(30, 16, 2, 2, [4, 16], [1, 2], max_seq_len=16, layout=lay, dtype=torch.float64)
        logits.append(model(torch.arange(7)[None] % 30))
    assert torch.equal(*logits)


def test_packed_documents_are_separate_sequences():
    """LongNetLM with cu_seqlens: logits and gradients of each document run alone, positions
    restarting at each document (the packed sequence is longer than max_seq_len)."""
    torch.manual_seed(0)
    model = LongNetLM(30, 16, 2, 2, [4, 16], [1, 2], max_seq_len=16, dtype=torch.float64)
    docs = [0, 5, 16, 19, 32]
    tokens = torch.randint(0, 30, (1, 33), generator=torch.Generator().manual_seed(1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    grads = []
    for packed in (True, False):
        model.zero_grad()
        if packed:
            logits = model(x, cu_seqlens=torch.tensor(docs))
            model.loss(x, y, cu_seqlens=torch.tensor(docs)).backward()
        else:
            logits = torch.cat([model(x[:, a:b]) for a, b in zip(docs, docs[1:])], 1)
            sum(model.loss(x[:, a:b], y[:, a:b], total_tokens=32) for a, b in zip(docs, docs[1:])).backward()
        grads.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert_close(grads[0][0], grads[1][0], torch.float64)
    for name, g in grads[0][1].items():
        assert_close(g, grads[1][1][name], torch.float64, grad=True)
    with pytest.raises(ValueError, match="longest document has 24 tokens"):
        model(x, cu_seqlens=torch.tensor([0, 24, 32]))
    with pytest.raises(ValueError, match="needs batch 1"):
        model(x.expand(2, -1), cu_seqlens=torch.tensor(docs))


@pytest.mark.distributed
@pytest.mark.parametrize("layout, packed", [("contiguous", False), ("zigzag", False), ("doc_zigzag", True)])
def test_two_ranks_train_like_one(layout, packed):
    losses1, params1 = workers.train_longnet(3, 0, layout, packed)
    results = launch(workers.train_longnet, 2, args=(3, 0, layout, packed), timeout=300)
    for losses2, params2 in results:
        assert losses2 == pytest.approx(losses1, abs=1e-12, rel=0)
        for name, value in params1.items():
            assert torch.allclose(params2[name], value, atol=1e-12, rtol=0), name
    assert losses1[-1] < losses1[0]


@pytest.mark.distributed
def test_subgroup_ring_with_lse_loss_and_modules():
    """On global ranks 0 and 2 of 3 (a sub-group, so group ranks are not global ranks): ring and
    ring-dilated cases whose loss uses lse, and the nn modules with a group, against the
    references (the modules against the einsum re-implementation)."""
    layout, scale = "zigzag", 0.3
    cases = [c for c in ring_cases(2) + dilated_cases(2) if c["dlse"] and c["layout"] in ("zigzag", "striped")]
    results = launch(workers.on_subgroup, 3, args=([0, 2], cases, layout, scale), timeout=300)
    assert results[1] is None
    members = [results[0], results[2]]
    for i, case in enumerate(cases):
        per_rank = [r[0][i] for r in members]
        check_case(case, unsharded(case, per_rank), per_rank)
    q, k, v, x = workers.nn_inputs(layout, 0, 1)
    torch.manual_seed(0)
    mha = MultiheadDilatedAttention(24, 6, [8, 24], [1, 3], dtype=torch.float64)
    expected = dict(
        ring=einsum_attention(q, k, v, causal=True, scale=scale),
        dilated=einsum_attention(q, k, v, causal=True, scale=scale, segments=[8, 24], rates=[1, 3],
                                 head_offsets="grouped"),
        multihead=einsum_multihead(mha, x, x, x, causal=True, segments=[8, 24], rates=[1, 3],
                                   head_offsets="interleaved"))
    for name, want in expected.items():
        got = ringlab.unshard([r[1][name] for r in members], layout)
        assert torch.allclose(got, want, atol=1e-12, rtol=0), name
