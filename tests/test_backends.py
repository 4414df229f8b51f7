"""Kernel backends: which one serves a block, per-case fallback, out-of-memory that propagates,
the private ops' schemas, the layout contract of their inputs, and memory near the minimum."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
import workers
from conftest import rand_qkv

import ringlab
from ringlab.engine import kernels
from ringlab.engine.launch import launch
from ringlab.planning.memory import track
from ringlab.planning.memory_model import Problem, estimate
from ringlab.reference import dense_attention, dense_dilated_attention, tolerance

# What ringlab passes to each private op (positional names, then keywords) and the outputs it reads.
# A torch release that renames, reorders or drops one of them fails here, on CPU.
SCHEMAS = {
    "_scaled_dot_product_flash_attention_for_cpu": (
        ["query", "key", "value", "dropout_p", "is_causal"], ["scale"], 2),
    "_scaled_dot_product_flash_attention_for_cpu_backward": (
        ["grad_out", "query", "key", "value", "out", "logsumexp", "dropout_p", "is_causal"], ["scale"], 3),
    "_scaled_dot_product_cudnn_attention": (
        ["query", "key", "value", "attn_bias", "compute_log_sumexp", "dropout_p", "is_causal", "return_debug_mask"],
        ["scale"], 2),
    "_scaled_dot_product_cudnn_attention_backward": (
        ["grad_out", "query", "key", "value", "out", "logsumexp", "philox_seed", "philox_offset", "attn_bias",
         "cum_seq_q", "cum_seq_k", "max_q", "max_k", "dropout_p", "is_causal"], ["scale"], 3),
    "_scaled_dot_product_flash_attention": (
        ["query", "key", "value", "dropout_p", "is_causal", "return_debug_mask"], ["scale"], 2),
    "_scaled_dot_product_flash_attention_backward": (
        ["grad_out", "query", "key", "value", "out", "logsumexp", "cum_seq_q", "cum_seq_k", "max_q", "max_k",
         "dropout_p", "is_causal", "philox_seed", "philox_offset"], ["scale"], 3),
    "_scaled_dot_product_efficient_attention": (
        ["query", "key", "value", "attn_bias", "compute_log_sumexp", "dropout_p", "is_causal"], ["scale"], 2),
    "_flash_attention_forward": (
        ["query", "key", "value", "cum_seq_q", "cum_seq_k", "max_q", "max_k", "dropout_p", "is_causal",
         "return_debug_mask"], ["scale"], 2),
    "_flash_attention_backward": (
        ["grad_out", "query", "key", "value", "out", "logsumexp", "cum_seq_q", "cum_seq_k", "max_q", "max_k",
         "dropout_p", "is_causal", "rng_state", "unused"], ["scale"], 3),
    "_scaled_dot_product_efficient_attention_backward": (
        ["grad_out_", "query", "key", "value", "attn_bias", "out", "logsumexp", "philox_seed", "philox_offset",
         "dropout_p", "grad_input_mask", "is_causal"], ["scale"], 3),
}


@pytest.fixture(autouse=True)
def _fresh_backends(monkeypatch):
    """Each test starts with no backend set aside or choice remembered, and leaves none behind."""
    monkeypatch.setattr(kernels, "_set_aside", {})
    monkeypatch.setattr(kernels, "_chosen", {})


def test_every_private_op_has_the_schema_ringlab_calls():
    used = {op for b in kernels.BACKENDS.values() for op in b.ops} | set(kernels.VARLEN_OPS)
    assert used == set(SCHEMAS)
    for op, (positional, keywords, outputs) in SCHEMAS.items():
        schema = getattr(torch.ops.aten, op).default._schema
        args = [a for a in schema.arguments if not a.kwarg_only]
        assert [a.name for a in args[:len(positional)]] == positional, op
        assert all(a.default_value is not None or a.type.kind() == "OptionalType" for a in args[len(positional):]), op
        assert set(keywords) <= {a.name for a in schema.arguments if a.kwarg_only}, op
        assert len(schema.returns) >= outputs, op


@pytest.mark.parametrize("dlse", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_backends_run_on_meta(causal, dlse):
    """Shapes and plumbing of cuDNN, flash and efficient (their meta kernels run on CPU)."""
    for name, dtype in [("cuda_cudnn", torch.bfloat16), ("cuda_flash", torch.float16),
                        ("cuda_efficient", torch.float32)]:
        q, k, v = (torch.empty(2, 40, 3, 64, dtype=dtype, device="meta") for _ in range(3))
        with kernels.use_backend(name), kernels.record_backends() as used:
            out, lse = kernels.block_attention(q, k, v, causal=causal, scale=0.125)
            grads = kernels.block_attention_backward(out, q, k, v, out, lse, causal=causal, scale=0.125,
                                                     dlse=lse if dlse else None)
        assert out.shape == q.shape and out.dtype == dtype
        assert lse.shape == (2, 3, 40) and lse.dtype == torch.float32
        assert [g.shape for g in grads] == [q.shape] * 3
        assert used[f"forward/{name}"] == 1 and used[f"backward/{name}"] == 1


@pytest.mark.parametrize("dtype,d,sq,sk,causal,expected", [
    (torch.bfloat16, 64, 40, 40, True, "cuda_cudnn"),
    (torch.float16, 128, 40, 60, False, "cuda_cudnn"),
    (torch.bfloat16, 64, 40, 60, True, "cuda_efficient"),   # bottom-right causal in cuDNN/flash
    (torch.bfloat16, 64, 1, 1, False, "cuda_flash"),        # cuDNN rejects s_q = s_kv = 1
    (torch.bfloat16, 200, 40, 40, False, "cuda_flash"),     # head_dim > 128 (meta: no Hopper)
    (torch.float32, 64, 40, 40, True, "cuda_efficient"),
    (torch.float32, 60, 40, 40, False, "math"),             # head_dim % 8
    (torch.float64, 64, 40, 40, False, "math"),
])
def test_auto_picks_the_fastest_backend_that_applies(dtype, d, sq, sk, causal, expected):
    q = torch.empty(1, sq, 2, d, dtype=dtype, device="meta")
    k = torch.empty(1, sk, 2, d, dtype=dtype, device="meta")
    assert kernels.select_backend(q, k, causal) == expected


def test_cpu_blocks_with_few_keys_take_the_math_path():
    q = torch.empty(1, 40, 2, 8)
    assert kernels.select_backend(q, torch.empty(1, 16, 2, 8), False) == "cpu_flash"
    assert kernels.select_backend(q, torch.empty(1, 15, 2, 8), False) == "math"


def _broken(backend, error, *, times=math.inf, pass_="forward", dtype=None):
    """``backend`` with one pass raising ``error`` (``times`` times; only for ``dtype`` if given)."""
    real = getattr(kernels.BACKENDS[backend], pass_)
    left = [times]

    def fn(*args):
        q = args[0] if pass_ == "forward" else args[1]
        if left[0] > 0 and (dtype is None or q.dtype == dtype):
            left[0] -= 1
            raise error
        return real(*args)
    return dataclasses.replace(kernels.BACKENDS[backend], **{pass_: fn})


def test_an_incompatible_backend_is_set_aside_for_that_case_only(monkeypatch):
    monkeypatch.setitem(kernels.BACKENDS, "cpu_flash",
                        _broken("cpu_flash", RuntimeError("Expected 9 arguments, got 8"), dtype=torch.float32))
    q, k, v = rand_qkv(1, 64, 2, 16)
    with pytest.warns(RuntimeWarning, match="'cpu_flash' set aside for cpu torch.float32 head_dim 16"):
        out = ringlab.attention(q.float(), k.float(), v.float())
    assert (out.double() - dense_attention(q.float(), k.float(), v.float())[0]).abs().max() < 2e-5
    assert list(kernels.set_aside()) == [("cpu_flash", "cpu", torch.float32, 16)]
    with kernels.record_backends() as used:
        ringlab.attention(q.float(), k.float(), v.float())           # the same case: math, no new warning
        ringlab.attention(q.bfloat16(), k.bfloat16(), v.bfloat16())  # another dtype: still the fast path
    assert used == {"forward/math": 1, "forward/cpu_flash": 1}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("fn", ["attention", "ring", "dilated"])
def test_a_loss_scaled_lse_gradient_stays_finite_in_fp16(fn, causal):
    """A fused backward takes dlse folded into an extra fp16 column: at GradScaler's 2^16 it
    once overflowed to inf and gave NaN gradients. Causal row 0 sees one key (P = 1), so the
    kernel's dS = P dlse itself reached 2^16 until (dout, dlse) were scaled down."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 32, 2, 16, generator=g, dtype=torch.float64).half() for _ in range(3))
    k = k * 0.1  # flat scores: dq and dk stay well inside fp16
    call = dict(attention=lambda *x: ringlab.attention(*x, causal=causal, return_lse=True),
                ring=lambda *x: ringlab.ring_attention(*x, ring_size=2, causal=causal, return_lse=True),
                dilated=lambda *x: ringlab.dilated_attention(*x, [16, 32], [1, 2], causal=causal,
                                                             return_lse=True))[fn]
    ref = dict(attention=lambda *x: dense_attention(*x, causal=causal),
               ring=lambda *x: dense_attention(*x, causal=causal),
               dilated=lambda *x: dense_dilated_attention(*x, [16, 32], [1, 2], causal=causal))[fn]
    xs = [x.requires_grad_() for x in (q, k, v)]
    with kernels.record_backends() as used:
        lse = call(*xs)[1]
        grads = torch.autograd.grad(lse, xs[:2], torch.full_like(lse, 2.0**16))  # lse does not depend on v
    assert used["backward/cpu_flash"] > 0
    rs = [x.detach().double().requires_grad_() for x in (q, k, v)]
    rlse = ref(*rs)[1]
    expected = torch.autograd.grad(rlse, rs[:2], torch.full_like(rlse, 2.0**16))
    for got, want in zip(grads, expected):
        assert torch.isfinite(got).all()
        assert (got.double() - want).abs().max() <= tolerance(torch.float16, want.abs().max().item(), grad=True)


@pytest.mark.parametrize("fn", ["attention", "ring"])
def test_float32_under_autocast_stays_float32(fn):
    """Autocast once rounded the math path's matmuls (blocks of few keys) to bf16: 2e-2 errors."""
    q, k, v = (x.float().requires_grad_() for x in rand_qkv(1, 12, 2, 8))
    call = dict(attention=lambda *x: ringlab.attention(*x, causal=True),
                ring=lambda *x: ringlab.ring_attention(*x, ring_size=4, causal=True))[fn]
    with torch.autocast("cpu", dtype=torch.bfloat16), kernels.record_backends() as used:
        out = call(q, k, v)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert used["forward/math"] > 0 and out.dtype == torch.float32
    rs = [x.detach().double().requires_grad_() for x in (q, k, v)]
    rout = dense_attention(*rs, causal=True)[0]
    expected = torch.autograd.grad(rout.sum(), rs)
    assert (out.double() - rout).abs().max() <= tolerance(torch.float32, rout.abs().max().item())
    for got, want in zip(grads, expected):
        assert (got.double() - want).abs().max() <= tolerance(torch.float32, want.abs().max().item(), grad=True)


@pytest.mark.parametrize("pass_", ["forward", "backward"])
def test_out_of_memory_propagates_with_what_the_call_needed(monkeypatch, pass_):
    monkeypatch.setitem(kernels.BACKENDS, "cpu_flash",
                        _broken("cpu_flash", torch.OutOfMemoryError("CPU out of memory"), times=1, pass_=pass_))
    q, k, v = (x.float().requires_grad_() for x in rand_qkv(1, 64, 2, 16))
    est = estimate(Problem(64, 2, 16, segments=(16, 64), rates=(1, 2)), "dilated", backward=pass_ == "backward")
    inputs = (4 if pass_ == "backward" else 3) * q.nbytes  # q, k, v and, in the backward, the output gradient
    assert est.total - est.peak == inputs
    with pytest.raises(torch.OutOfMemoryError, match=r"(?s)CPU out of memory.*dilated .*N 64, heads 2, "
                                                     r"head_dim 16, float32.*memory model estimates") as raised:
        ringlab.dilated_attention(q, k, v, [16, 64], [1, 2]).sum().backward()
    kib = lambda n: f"{n / 1024:.2f} KiB"  # noqa: E731
    assert (f"estimates {kib(est.peak)} for the call on top of its inputs' {kib(inputs)}: {kib(est.total)}, "
            f"against the ") in str(raised.value)
    assert re.search(r"GiB of cpu \(\d+\.\d\d GiB free when it failed\)", str(raised.value))
    assert kernels.set_aside() == {}
    with kernels.record_backends() as used:  # the next call takes the fast path again
        ringlab.dilated_attention(q, k, v, [16, 64], [1, 2]).sum().backward()
    assert set(used) == {"forward/cpu_flash", "backward/cpu_flash"}


def test_out_of_memory_in_a_mesh_says_what_the_estimate_covers(monkeypatch):
    monkeypatch.setitem(kernels.BACKENDS, "cpu_flash",
                        _broken("cpu_flash", torch.OutOfMemoryError("CPU out of memory"), times=1, pass_="forward"))
    q, k, v = (x.float() for x in rand_qkv(1, 64, 4, 16))
    with pytest.raises(torch.OutOfMemoryError, match=r"(?s)a 2 x 2 Ulysses x ring mesh \(estimate: its ring on 2 "
                                                     r"heads, all-to-all buffers not counted\) forward on q "
                                                     r"\(1, 64, 4, 16\).*memory model estimates .* GiB"):
        ringlab.ulysses_attention(q, k, v, ulysses_size=2, ring_size=2)


def _strided(x, how):
    """x (B, N, H, D) as a tensor of the same values with odd strides."""
    if how == "head_dim stride 2":
        return torch.stack([x, torch.zeros_like(x)], -1).flatten(-2)[..., ::2]
    if how == "transposed storage":
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    if how == "sequence-major":
        return x.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    if how == "expanded batch":
        return x[:1].expand(x.shape[0], -1, -1, -1)
    if how == "expanded head_dim":
        return x[..., :1].expand(-1, -1, -1, x.shape[-1])
    raise ValueError(how)


FUNCTIONS = {
    "attention": lambda q, k, v: ringlab.attention(q, k, v, causal=True, return_lse=True),
    "dilated": lambda q, k, v: ringlab.dilated_attention(q, k, v, [16, 48], [1, 4], return_lse=True),
    "ring striped": lambda q, k, v: ringlab.ring_attention(q, k, v, ring_size=2, causal=True, layout="striped",
                                                           return_lse=True),
    "ring zigzag": lambda q, k, v: ringlab.ring_attention(q, k, v, ring_size=2, layout="zigzag", return_lse=True),
    "ring-dilated": lambda q, k, v: ringlab.ring_dilated_attention(q, k, v, [16, 48], [1, 4], ring_size=2,
                                                                   causal=True, return_lse=True),
}


@pytest.mark.parametrize("how", ["head_dim stride 2", "transposed storage", "sequence-major", "expanded batch",
                                 "expanded head_dim"])
@pytest.mark.parametrize("fn", list(FUNCTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_any_strides_give_what_contiguous_inputs_give(fn, how, dtype):
    g = torch.Generator().manual_seed(7)
    base = [torch.randn(2, 48, 4, 16, generator=g).to(dtype) for _ in range(3)]
    results = []
    for make in (lambda x: _strided(x, how), lambda x: _strided(x, how).contiguous()):
        leaves = [x.clone().requires_grad_() for x in base]
        out, lse = FUNCTIONS[fn](*(make(x) for x in leaves))
        out.sum().backward()  # an all-zero-stride output gradient as well
        results.append([out, lse.masked_fill(torch.isinf(lse), 0), *(x.grad for x in leaves)])
    for a, b in zip(*results):  # the same up to summation order (the layout can change it)
        a, b = a.detach().double(), b.detach().double()
        assert (a - b).abs().max() <= tolerance(dtype, b.abs().max().item()), (fn, how)


@pytest.mark.distributed
def test_strided_shards_on_two_gloo_ranks():
    assert max(launch(workers.strided_matches_contiguous, 2, timeout=120)) == 0.0


@pytest.mark.parametrize("fn", ["ring", "dilated"])
def test_nan_in_a_query_of_a_tiny_block_stays_nan(fn):
    q, k, v = (x.float() for x in rand_qkv(1, 16, 2, 8))
    q[0, 5, 1, 0] = math.nan
    if fn == "ring":
        out = ringlab.ring_attention(q, k, v, ring_size=4)  # blocks of 4 keys
        ref = dense_attention(q, k, v)[0]
    else:
        out = ringlab.dilated_attention(q, k, v, [8], [2])  # blocks of 4 rows
        ref = dense_dilated_attention(q, k, v, [8], [2])[0]
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.isnan(out[0, 5, 1]).all()


def test_double_backward_says_it_is_not_supported():
    q, k, v = (x.requires_grad_() for x in rand_qkv(1, 32, 2, 8))
    (dq,) = torch.autograd.grad(ringlab.attention(q, k, v).sum(), q, create_graph=False)
    with pytest.raises(RuntimeError, match="double backward .* not supported.*ringlab.reference.dense_attention"):
        torch.autograd.grad(ringlab.attention(q, k, v).sum(), q, create_graph=True)


@pytest.mark.parametrize("dtype,most", [(torch.bfloat16, 5.5), (torch.float32, 5.0)])
def test_dilated_forward_backward_peaks_near_its_results(dtype, most):
    """Outputs and gradients (out, dq, dk, dv) are 4 inputs' bytes; the rest is overhead."""
    n, h, d = 16384, 8, 64
    segs, rates = [n // 8, n // 4, n // 2, n], [1, 2, 4, 8]
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(1, n, h, d, generator=g).to(dtype) for _ in range(4))
    leaves = [x.requires_grad_() for x in (q, k, v)]
    with track() as m:
        out = ringlab.dilated_attention(*leaves, segs, rates)
        out.backward(dout)
    assert m.peak <= most * q.nbytes, m.peak / q.nbytes
    model = estimate(Problem(n, h, d, dtype=str(dtype).removeprefix("torch."), segments=tuple(segs),
                             rates=tuple(rates)), "dilated", backward=True).peak
    assert abs(model - m.peak) <= 0.1 * m.peak, (model / m.peak)


def test_inference_calls_ask_the_kernel_for_no_lse(monkeypatch):
    """``attention`` under no_grad without return_lse tells the kernel it needs no lse (cuDNN
    then runs its inference graph, as torch's SDPA does without grad); with return_lse, or a
    gradient to come, it asks for one. The CUDA wrappers then return None for it (meta)."""
    seen = []
    real = kernels.BACKENDS["cpu_flash"]

    def spy(q, k, v, causal, scale, need_lse):
        seen.append(need_lse)
        return real.forward(q, k, v, causal, scale, need_lse)

    monkeypatch.setitem(kernels.BACKENDS, "cpu_flash", dataclasses.replace(real, forward=spy))
    q, k, v = rand_qkv(1, 64, 2, 16)
    with torch.no_grad():
        out = ringlab.attention(q, k, v, causal=True)
    ref, lse = ringlab.attention(q, k, v, causal=True, return_lse=True)
    q.requires_grad_()
    ringlab.attention(q, k, v, causal=True).sum().backward()
    assert seen == [False, True, True] and torch.equal(out, ref) and lse.shape == (1, 2, 64)
    assert q.grad is not None and q.grad.shape == q.shape
    m = torch.empty(1, 64, 2, 16, dtype=torch.bfloat16, device="meta")
    for forward in (kernels._cudnn_forward, kernels._cuda_efficient_forward):
        o, no_lse = forward(m, m, m, True, 0.25, False)
        assert o.shape == m.shape and no_lse is None
        assert forward(m, m, m, True, 0.25, True)[1].shape == (1, 2, 64)
