"""ringlab.attention against the float64 dense reference (docs/design.md §7)."""

import math

import pytest
import torch
from conftest import check_against, rand_qkv

import ringlab
from ringlab.engine.kernels import use_backend
from ringlab.reference import dense_attention


def _fn(causal, **kw):
    return lambda q, k, v: ringlab.attention(q, k, v, causal=causal, return_lse=True, **kw)


def _ref(causal, **kw):
    return lambda q, k, v: dense_attention(q, k, v, causal=causal, **kw)


@pytest.mark.parametrize("n", [1, 7, 64, 100, 257, 1024])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lengths(n, causal, dtype):
    inputs = rand_qkv(2, n, 3, 32, seed=n)
    check_against(_fn(causal), _ref(causal), inputs, dtype, name=f"n={n}")


@pytest.mark.parametrize("d", [16, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_head_dims_and_low_precision(d, dtype, causal):
    inputs = rand_qkv(2, 96, 4, d, seed=d)
    check_against(_fn(causal), _ref(causal), inputs, dtype, name=f"d={d}")


@pytest.mark.parametrize("backend", ["math", "cpu_flash"])
@pytest.mark.parametrize("causal", [False, True])
def test_backends_and_lse_gradient(backend, causal):
    """Both backends, with a loss that also uses lse (folds dlse into the backward)."""
    inputs = rand_qkv(2, 50, 3, 16, seed=3)
    with use_backend(backend):
        for dtype in (torch.float64, torch.float32):
            check_against(_fn(causal), _ref(causal), inputs, dtype, use_lse=True, name=backend)


@pytest.mark.parametrize("nk", [1, 13, 80])
def test_cross_attention_lengths(nk):
    """Sq != Sk; causal is top-left aligned like torch SDPA."""
    inputs = rand_qkv(1, 40, 2, 16, nk=nk, seed=nk)
    for causal in (False, True):
        check_against(_fn(causal), _ref(causal), inputs, torch.float64, name=f"nk={nk}")


@pytest.mark.parametrize("causal", [False, True])
def test_scale(causal):
    inputs = rand_qkv(1, 33, 2, 16)
    check_against(_fn(causal, scale=0.7), _ref(causal, scale=0.7), inputs, torch.float64, use_lse=True)


def test_return_shapes_and_default():
    q, k, v = rand_qkv(2, 10, 3, 8)
    out = ringlab.attention(q, k, v)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape
    out, lse = ringlab.attention(q, k, v, return_lse=True)
    assert lse.shape == (2, 3, 10) and lse.dtype == torch.float64


def test_math_path_with_masks_and_empty_rows():
    """The math path takes arbitrary boolean masks; rows that see nothing give 0 and -inf."""
    from ringlab.engine.kernels import block_attention, block_attention_backward

    q, k, v = (x.requires_grad_() for x in rand_qkv(1, 6, 2, 8))
    mask = torch.rand(6, 6, generator=torch.Generator().manual_seed(1)) > 0.5
    mask[2] = False
    out, lse = block_attention(q, k, v, scale=0.3, mask=mask)
    bias = torch.zeros(6, 6, dtype=torch.float64).masked_fill(~mask, -math.inf)
    rout, rlse = dense_attention(q, k, v, scale=0.3, bias=bias)
    assert torch.allclose(out, rout, atol=1e-12, rtol=0) and torch.equal(lse.isinf(), rlse.isinf())
    assert (out[:, 2] == 0).all() and (lse[:, :, 2] == -math.inf).all()
    g = torch.randn_like(out)
    grads = block_attention_backward(g, q, k, v, out, lse, scale=0.3, mask=mask)
    rgrads = torch.autograd.grad((rout * g).sum(), (q, k, v))
    for a, e in zip(grads, rgrads):
        assert torch.isfinite(a).all() and torch.allclose(a, e, atol=1e-12, rtol=0)


def test_merge_is_exact_and_stable():
    """Two partial results over disjoint keys merge into the whole, with lse near 1e3 (exp
    overflows float64 there); a row that has seen no key yet takes the other part, and a row
    that sees none in either stays 0 and -inf."""
    from ringlab.engine.merge import merge

    q, k, v = rand_qkv(1, 6, 2, 4, nk=9)
    whole, whole_lse = dense_attention(q, k, v, scale=300.0)
    assert whole_lse.max() > 800
    out, lse = dense_attention(q, k[:, :4], v[:, :4], scale=300.0)
    block, block_lse = dense_attention(q, k[:, 4:], v[:, 4:], scale=300.0)
    out[:, :2], lse[:, :, :2] = 0, -math.inf          # rows 0, 1 have seen nothing yet
    block[:, 0], block_lse[:, :, 0] = 0, -math.inf    # and row 0 sees nothing in the block either
    expected, expected_lse = whole.clone(), whole_lse.clone()
    expected[:, 0], expected_lse[:, :, 0] = 0, -math.inf
    expected[:, 1] = dense_attention(q, k[:, 4:], v[:, 4:], scale=300.0)[0][:, 1]
    expected_lse[:, :, 1] = block_lse[:, :, 1]
    merge(out, lse, block, block_lse)
    assert torch.equal(out[:, 0], expected[:, 0]) and torch.equal(lse[:, :, 0], expected_lse[:, :, 0])
    assert torch.allclose(out, expected, atol=1e-12, rtol=0)
    assert torch.allclose(lse, expected_lse, atol=1e-12, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_math_path_in_many_row_chunks(monkeypatch, causal):
    """The math path splits the query rows into chunks of MATH_CHUNK_ELEMENTS scores; with a
    small limit the same inputs take many chunks, forward and backward (with dlse), and the
    causal mask is cut at chunk edges."""
    from ringlab.engine import kernels

    monkeypatch.setattr(kernels, "MATH_CHUNK_ELEMENTS", 2 * 3 * 40 * 7)  # 7 rows per chunk
    inputs = rand_qkv(2, 50, 3, 16, nk=40, seed=8)
    with use_backend("math"):
        for dtype in (torch.float64, torch.float32):
            check_against(_fn(causal), _ref(causal), inputs, dtype, use_lse=True, name="chunked")
