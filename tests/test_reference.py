"""The reference itself: the docs/design.md §3 rules by hand, LongNet's branch merge, the docs/design.md §7 numbers."""

import pytest
import torch
from conftest import check_against, rand_qkv

import ringlab
from ringlab.engine.dilation import head_offset, offset_groups
from ringlab.reference import (
    ABS_TOL,
    REL_TOL,
    branch_mask,
    dense_attention,
    dense_dilated_attention,
    spec_offset,
    tolerance,
)

# (heads, rate) -> offset of each head, worked out by hand from docs/design.md §3.
# interleaved: h % r. grouped: h // ceil(H / r) (torchscale's contiguous groups).
OFFSETS = {
    (6, 4): ([0, 1, 2, 3, 0, 1], [0, 0, 1, 1, 2, 2]),
    (5, 2): ([0, 1, 0, 1, 0], [0, 0, 0, 1, 1]),
    (8, 3): ([0, 1, 2, 0, 1, 2, 0, 1], [0, 0, 0, 1, 1, 1, 2, 2]),
    (4, 8): ([0, 1, 2, 3], [0, 1, 2, 3]),
    (3, 1): ([0, 0, 0], [0, 0, 0]),
    (7, 7): ([0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 6]),
}


@pytest.mark.parametrize("heads,rate", OFFSETS)
@pytest.mark.parametrize("mode", ["interleaved", "grouped"])
def test_offsets_match_the_hand_table(heads, rate, mode):
    expected = OFFSETS[heads, rate][mode == "grouped"]
    assert [spec_offset(h, heads, rate, mode) for h in range(heads)] == expected
    assert [head_offset(h, heads, rate, mode) for h in range(heads)] == expected
    engine = {h: o for o, s in offset_groups(heads, rate, mode) for h in range(heads)[s]}
    assert [engine[h] for h in range(heads)] == expected


def test_branch_mask_by_hand():
    """N=6, w=4, r=2: segments [0,4) and [4,6) (ragged). Offset 1 selects 1, 3 and 5."""
    m = branch_mask(6, 2, 4, 2)  # head 0: offset 0, head 1: offset 1
    pairs = lambda h: {(q, k) for q in range(6) for k in range(6) if m[h, q, k]}  # noqa: E731
    assert pairs(0) == {(q, k) for q in (0, 2) for k in (0, 2)} | {(4, 4)}
    assert pairs(1) == {(q, k) for q in (1, 3) for k in (1, 3)} | {(5, 5)}
    causal = branch_mask(6, 2, 4, 2, causal=True)
    assert {(q, k) for q in range(6) for k in range(6) if causal[1, q, k]} == {(1, 1), (3, 1), (3, 3), (5, 5)}
    assert branch_mask(5, 1, 100, 1).all()  # a segment longer than N is the whole sequence


def _per_branch_lse_merge(q, k, v, segs, rates, causal, mode):
    """LongNet's merge, written out: softmax attention per branch, outputs weighted by
    exp(lse_i - logsumexp_j lse_j); rows a branch does not reach take weight 0."""
    n, h = q.shape[1], q.shape[2]
    outs, lses = [], []
    for w, r in zip(segs, rates):
        hidden = ~branch_mask(n, h, w, r, head_offsets=mode, causal=causal)
        o, lse = dense_attention(q, k, v, bias=torch.zeros(h, n, n, dtype=torch.float64).masked_fill(hidden, -torch.inf))
        outs.append(o)
        lses.append(lse)
    lses = torch.stack(lses)  # (branches, B, H, N)
    total = torch.logsumexp(lses, 0)
    weights = torch.exp(lses - total).transpose(-1, -2).unsqueeze(-1)  # (branches, B, N, H, 1)
    return (weights * torch.stack(outs)).sum(0), total


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", ["interleaved", "grouped"])
def test_log_m_bias_is_the_lse_weighted_branch_merge(causal, mode):
    """docs/design.md §3: the bias log m equals the per-branch softmaxes merged by their LSE weights, outputs
    and gradients (the weights are differentiated, not held constant as in torchscale)."""
    segs, rates = [6, 12, 40], [1, 2, 4]  # rate 1 first: every row reaches some key
    inputs = rand_qkv(2, 29, 5, 8, seed=11)
    merged = lambda q, k, v: _per_branch_lse_merge(q, k, v, segs, rates, causal, mode)  # noqa: E731
    check_against(merged, lambda q, k, v: dense_dilated_attention(q, k, v, segs, rates, causal=causal,
                                                                  head_offsets=mode),
                  inputs, torch.float64, use_lse=True)
    check_against(lambda q, k, v: ringlab.dilated_attention(q, k, v, segs, rates, causal=causal,
                                                            head_offsets=mode, return_lse=True),
                  merged, inputs, torch.float64, use_lse=True)


def test_tolerances_are_the_documented_numbers():
    """docs/design.md §7, pinned: a change to the limits must change this test too."""
    assert ABS_TOL == {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 5e-5)}
    assert REL_TOL == {torch.float64: 1e-11, torch.float32: 2e-5}
    # The limit is the absolute limit in ABS_TOL (docs/design.md §7), tightened to REL_TOL times the reference's magnitude
    # (at least 1) where that is smaller.
    assert tolerance(torch.float64, 0.5) == 1e-11 and tolerance(torch.float64, 1e3, grad=True) == 1e-10
    assert tolerance(torch.float32, 1.0) == 2e-5 and tolerance(torch.float32, 10.0) == 2e-5
    assert tolerance(torch.float32, 1.0, grad=True) == 2e-5
    assert tolerance(torch.float32, 10.0, grad=True) == 5e-5
    assert tolerance(torch.bfloat16, 1.0) == 2 * 2**-7 and tolerance(torch.float16, 4.0) == 4 * 2 * 2**-10
