"""The Triton LSE merge (ringlab.engine.merge), run on CPU through triton's interpreter: equal
to the torch merge on every accumulator layout the engine makes, exact end to end against the
float64 reference, and set aside (with a warning) only for an incompatibility."""

import math

import pytest
import torch
from conftest import check_against, rand_qkv

import ringlab
from ringlab.engine import merge as merge_module
from ringlab.reference import dense_attention, dense_dilated_attention

triton = pytest.importorskip("triton", reason="the fused merge needs triton (the test extra installs it)")
# numpy warns on inf - inf inside the interpreter; the kernel masks those rows itself
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@pytest.fixture
def fused(monkeypatch):
    """Merges on CPU take the Triton kernel; the torch merge raises, so nothing falls back."""
    if not torch.cuda.is_available():
        assert triton.knobs.runtime.interpret, "conftest sets TRITON_INTERPRET before triton is imported"
    monkeypatch.setitem(merge_module.FUSED, "cpu", True)
    monkeypatch.setattr(merge_module, "_set_aside", {})
    torch_merge = merge_module._torch_merge

    def refuse(*args):
        raise AssertionError("the torch merge ran where the Triton kernel should")
    monkeypatch.setattr(merge_module, "_torch_merge", refuse)
    return torch_merge


def _partials(shape, block_dtype, acc, g):
    """Accumulators (..., S, H, D) and lse (..., H, S) with a block to merge; rows 0 have seen no
    key yet, the block's rows 1 see none, and row (0, 0) of the first head sees none in either."""
    *lead, s, h, d = shape
    out = torch.randn(shape, generator=g, dtype=acc)
    lse = torch.randn(*lead, h, s, generator=g, dtype=acc) * 3
    block = torch.randn(shape, generator=g, dtype=torch.float64).to(block_dtype)
    block_lse = torch.randn(*lead, h, s, generator=g, dtype=acc) * 3
    out[..., 0, :, :], lse[..., 0] = 0, -math.inf
    block[..., 1, :, :], block_lse[..., 1] = 0, -math.inf
    block[..., 0, 0, :], block_lse[..., 0, 0] = 0, -math.inf
    return out, lse, block, block_lse


@pytest.mark.parametrize("block_dtype,acc", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                             (torch.float32, torch.float32), (torch.float64, torch.float64)])
@pytest.mark.parametrize("shape", [(2, 5, 3, 16), (1, 7, 2, 24), (2, 2, 3, 4, 2, 8)])  # ring (D 24: masked columns); dilated
@pytest.mark.parametrize("views", ["whole", "rows of larger accumulators", "block (B, H, S, D) transposed"])
def test_kernel_equals_the_torch_merge(fused, block_dtype, acc, shape, views):
    g = torch.Generator().manual_seed(sum(shape))
    out, lse, block, block_lse = _partials(shape, block_dtype, acc, g)
    if views == "rows of larger accumulators":  # as a ring tile merges into its query rows
        s = shape[-3]
        big, big_lse = torch.randn(*shape[:-3], s + 4, *shape[-2:], dtype=acc), torch.randn(*shape[:-3], shape[-2], s + 4, dtype=acc)
        big.narrow(-3, 3, s).copy_(out), big_lse.narrow(-1, 3, s).copy_(lse)
        out, lse = big.narrow(-3, 3, s), big_lse.narrow(-1, 3, s)
    elif views == "block (B, H, S, D) transposed":  # as the fused attention ops return it
        block = block.transpose(-2, -3).contiguous().transpose(-2, -3)
    expected, expected_lse = out.clone(), lse.clone()
    fused(expected, expected_lse, block, block_lse)
    untouched = (out._base.clone(), lse._base.clone()) if out._base is not None else None
    merge_module.merge(out, lse, block, block_lse)
    assert torch.equal(torch.isinf(lse), torch.isinf(expected_lse))
    torch.testing.assert_close(lse, expected_lse, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(out[..., 0, 0, :], torch.zeros_like(out[..., 0, 0, :]))  # neither saw a key: stays 0
    if untouched is not None:  # the rows around the view are not written
        s = shape[-3]
        for whole, before, dim in ((out._base, untouched[0], -3), (lse._base, untouched[1], -1)):
            assert torch.equal(whole.narrow(dim, 0, 3), before.narrow(dim, 0, 3))
            assert torch.equal(whole.narrow(dim, 3 + s, 1), before.narrow(dim, 3 + s, 1))


def test_kernel_is_exact_and_stable(fused):
    """Two partial results over disjoint keys merge into the whole with lse near 1e3 (exp
    overflows there), in float64."""
    q, k, v = rand_qkv(1, 6, 2, 4, nk=9)
    whole, whole_lse = dense_attention(q, k, v, scale=300.0)
    out, lse = dense_attention(q, k[:, :4], v[:, :4], scale=300.0)
    block, block_lse = dense_attention(q, k[:, 4:], v[:, 4:], scale=300.0)
    assert whole_lse.max() > 800
    merge_module.merge(out, lse, block, block_lse)
    assert torch.allclose(out, whole, atol=1e-12, rtol=0) and torch.allclose(lse, whole_lse, atol=1e-12, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_rings_and_dilated_through_the_kernel(fused, causal):
    """Every function that merges, with the kernel as its only merge, against float64."""
    inputs = rand_qkv(2, 24, 4, 8, seed=7)
    segs, rates = [6, 12, 24], [1, 2, 3]
    for dtype in (torch.float64, torch.float32):
        check_against(lambda q, k, v: ringlab.ring_attention(q, k, v, ring_size=3, causal=causal, layout="zigzag",
                                                             return_lse=True),
                      lambda q, k, v: dense_attention(q, k, v, causal=causal), inputs, dtype, use_lse=causal,
                      name="ring")
        check_against(lambda q, k, v: ringlab.dilated_attention(q, k, v, segs, rates, causal=causal, return_lse=True),
                      lambda q, k, v: dense_dilated_attention(q, k, v, segs, rates, causal=causal), inputs, dtype,
                      name="dilated")
        check_against(lambda q, k, v: ringlab.ring_dilated_attention(q, k, v, segs, rates, ring_size=2, causal=causal,
                                                                     return_lse=True),
                      lambda q, k, v: dense_dilated_attention(q, k, v, segs, rates, causal=causal), inputs, dtype,
                      name="ring_dilated")


def test_an_incompatible_kernel_is_set_aside_once_with_a_warning(fused, monkeypatch):
    """A kernel that fails to build (here: a TypeError) is set aside for that device and those
    dtypes with one warning; the merge is still exact. Out-of-memory propagates instead."""
    monkeypatch.setattr(merge_module, "_torch_merge", fused)
    g = torch.Generator().manual_seed(3)

    def broken(*args, **kwargs):
        raise TypeError("unexpected keyword argument")
    monkeypatch.setattr(merge_module, "_fused_merge", broken)
    out, lse, block, block_lse = _partials((1, 4, 2, 8), torch.bfloat16, torch.float32, g)
    expected, expected_lse = out.clone(), lse.clone()
    fused(expected, expected_lse, block, block_lse)
    with pytest.warns(RuntimeWarning, match="Triton LSE merge is set aside for cpu torch.float32 accumulators and torch.bfloat16 blocks"):
        merge_module.merge(out, lse, block, block_lse)
    assert torch.equal(out, expected) and torch.equal(lse, expected_lse)
    assert list(merge_module._set_aside) == [("cpu", torch.float32, torch.bfloat16)]

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(merge_module, "_fused_merge", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        merge_module.merge(out, lse, block.float(), block_lse)
    assert len(merge_module._set_aside) == 1


def test_cpu_merges_with_torch_unless_asked():
    """CPU keeps the torch merge (the kernel is a GPU kernel); CUDA takes the kernel."""
    assert merge_module.FUSED == {"cuda": True, "cpu": False}
    assert not merge_module.fused_merge_applies(torch.empty(0))
