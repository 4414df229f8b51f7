"""Shared test helpers: random inputs, the docs/design.md §7 tolerances, comparison against float64."""

from __future__ import annotations

import contextlib
import os
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from hypothesis import settings

from ringlab.reference import branch_mask, tolerance

# Without a GPU, ringlab's Triton kernels run in triton's interpreter (tests/test_fused_merge.py).
# triton reads the switch when it is imported, so it is set before anything imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Property tests draw the same examples on every run (CI must not flake on a new draw) and keep
# no example database between runs.
settings.register_profile("ringlab", derandomize=True, database=None, deadline=None)
settings.load_profile("ringlab")


def rand_qkv(b, n, h, d, *, seed=0, nk=None, count=3):
    """Unit-normal float64 tensors (the reference precision); cast per test."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(b, n, h, d)] + [(b, nk or n, h, d)] * (count - 1)
    return [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]


def max_err(actual, expected) -> float:
    """Max abs error; -inf entries must match exactly (rows that see no key)."""
    a, e = actual.detach().double(), expected.detach().double()
    inf = torch.isinf(e)
    assert torch.equal(torch.isinf(a), inf), "inf pattern differs from the reference"
    assert torch.equal(a[inf], e[inf])
    assert not torch.isnan(a).any(), "NaN in result"
    return 0.0 if (~inf).sum() == 0 else (a[~inf] - e[~inf]).abs().max().item()


def magnitude(expected) -> float:
    finite = expected[torch.isfinite(expected)]
    return finite.abs().max().item() if finite.numel() else 0.0


def assert_close(actual, expected, dtype, *, grad=False, name="") -> float:
    """The docs/design.md §7 limit for one result (absolute and relative limits in ``tolerance``); returns the error."""
    err, tol = max_err(actual, expected), tolerance(dtype, magnitude(expected), grad=grad)
    assert err <= tol, f"{name}: max abs error {err:.3g} > {tol:.3g} ({dtype}, reference magnitude {magnitude(expected):.3g})"
    return err


def run_and_grad(fn, inputs, dtype, grad_out_seed=1, use_lse=False, grad_dtypes=(torch.float64, torch.float64)):
    """Run fn on inputs cast to dtype; backprop a random cotangent, rounded to ``grad_dtypes``
    (out's, lse's) as a result of those dtypes rounds it. Returns (out, lse, grads)."""
    xs = [x.to(dtype).clone().requires_grad_() for x in inputs]
    out, lse = fn(*xs)
    g = torch.Generator().manual_seed(grad_out_seed)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64).to(grad_dtypes[0]).double()
    loss = (out.double() * go).sum()
    if use_lse:
        gl = torch.randn(lse.shape, generator=g, dtype=torch.float64).to(grad_dtypes[1]).double()
        loss = loss + (lse.double().masked_fill(torch.isinf(lse), 0) * gl).sum()
    loss.backward()
    return out.detach(), lse.detach(), [x.grad for x in xs]


def check_against(fn, ref, inputs, dtype, *, use_lse=False, check_lse=True, name=""):
    """Compare fn (cast to dtype) with ref (float64, on the dtype-rounded inputs and output
    gradients). Returns the largest max-abs error over out, lse and the gradients."""
    out, lse, grads = run_and_grad(fn, inputs, dtype, use_lse=use_lse)
    rounded = [x.to(dtype).double() for x in inputs]
    rout, rlse, rgrads = run_and_grad(ref, rounded, torch.float64, use_lse=use_lse, grad_dtypes=(out.dtype, lse.dtype))
    assert out.dtype == dtype
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    errs = [assert_close(out, rout, dtype, name=f"{name} out")]
    if check_lse:
        errs.append(assert_close(lse, rlse, dtype, name=f"{name} lse"))
    errs += [assert_close(a, e, dtype, grad=True, name=f"{name} d{label}") for label, a, e in zip("qkv", grads, rgrads)]
    return max(errs)


def simulated_forms(fn, inputs):
    """``fn(q, k, v) -> (out, lse)`` on a simulated ring, all ranks at once and then rank by rank
    (ringlab.engine.comm.SIMULATE_TOGETHER), float64, forward+backward with a gradient through
    lse. Returns, per form, ([out, lse, dq, dk, dv], its kernel calls)."""
    from ringlab.engine import comm, kernels

    forms = []
    for together in (True, False):
        with mock.patch.object(comm, "SIMULATE_TOGETHER", together), kernels.record_backends() as calls:
            out, lse, grads = run_and_grad(fn, inputs, torch.float64, use_lse=True)
        forms.append(([out, lse, *grads], sum(calls.values())))
    return forms


def repeated(ref):
    """``ref`` on k, v repeated to q's heads: the semantics grouped-query attention must match."""
    def run(q, k, v):
        group = q.shape[2] // k.shape[2]
        return ref(q, k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2))
    return run


def per_document(ref, docs):
    """ref applied to each document alone, concatenated: what a packed call must equal."""
    def fn(q, k, v):
        parts = [ref(q[:, a:b], k[:, a:b], v[:, a:b]) for a, b in zip(docs, docs[1:])]
        return torch.cat([o for o, _ in parts], 1), torch.cat([lse for _, lse in parts], 2)
    return fn


def dilated_pairs_by_row(docs, heads, segments, rates, *, head_offsets="interleaved", causal=False):
    """(H, N) score pairs of each head's query rows in packed documents (cu_seqlens ``docs``),
    each its own LongNet sequence: the reference masks (ringlab.reference) summed over
    branches and keys."""
    return torch.cat([sum(branch_mask(b - a, heads, w, r, head_offsets=head_offsets, causal=causal).sum(2)
                          for w, r in zip(segments, rates)) for a, b in zip(docs, docs[1:])], 1)


@contextlib.contextmanager
def uninitialized_is_nan():
    """Fresh tensors (torch.empty) hold NaN inside: a row that nothing writes shows."""
    torch.use_deterministic_algorithms(True)
    assert torch.utils.deterministic.fill_uninitialized_memory
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_rank_group():
    """A gloo group of this process alone, as the default group while the test runs."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    yield dist.group.WORLD
    dist.destroy_process_group()
