"""Host work per call: the CPU measure of what made the ring and dilated attention host-bound on a GPU.

    python -m benchmarks.host_overhead [--quick]

The H200 profile (benchmarks/results/h200-2026-11-27-gpu_check-run3.md) found the simulated
ring busy on the device 41% of a causal 32K forward and dilated attention 24%: the device
waits for the host. Host work is the same code on any device, so it can be measured here: at
shapes so small that the kernels cost little, a call's time is Python, the dispatcher and one
launch per op. For each call this prints the aten ops it dispatches (``kernels``: those that
are neither views nor allocations, one launch each on a GPU), the attention blocks among them,
and its time against one ``attention`` call, side by side in one run.
"""

from __future__ import annotations

import collections
import contextlib
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ringlab
from ringlab.engine import dilation, kernels

from .common import cli, rank_by_rank, section, side_by_side


# Ops that change metadata or take memory from the caching allocator but launch nothing.
_NO_LAUNCH = {"aten::set_", "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty",
              "aten::new_empty_strided", "aten::resize_"}


class _Dispatched(TorchDispatchMode):
    """Counts the aten ops dispatched inside it, and the kernels among them: neither views nor
    ops of :data:`_NO_LAUNCH`."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts["ops"] += 1
        self.counts["kernels"] += not (func.is_view or func._schema.name in _NO_LAUNCH)
        return func(*args, **(kwargs or {}))


def _dispatched(fn) -> collections.Counter:
    """Ops and kernels ``fn()`` dispatches, and its forward attention blocks (as the engine counts them)."""
    with _Dispatched() as counter, kernels.record_backends() as served:
        fn()
    return counter.counts + collections.Counter(blocks=sum(n for k, n in served.items() if k.startswith("forward/")))


def _as_on_a_gpu():
    """A context in which dilated calls on CPU are cut as on a GPU: no finer than its floor, and a
    branch's offset groups in one call (ringlab.engine.dilation.COPY_TO_FUSE)."""
    stack = contextlib.ExitStack()
    for table in (dilation.MIN_CALL_ELEMENTS, dilation.COPY_TO_FUSE):
        stack.enter_context(mock.patch.dict(table, {"cpu": table["cuda"]}))
    return stack


def run(quick: bool = False) -> dict:
    n, heads, dim, repeats = 256, 2, 16, (3 if quick else 30)
    segments, rates = [n // 8, n // 4, n // 2, n], [1, 2, 4, 8]
    def ring(q, k, v):
        return ringlab.ring_attention(q, k, v, ring_size=8, causal=True, layout="zigzag")

    def dilated(q, k, v):
        return ringlab.dilated_attention(q, k, v, segments, rates, causal=True)

    def ring_dilated(q, k, v):
        return ringlab.ring_dilated_attention(q, k, v, segments, rates, ring_size=8, causal=True, layout="zigzag")

    none = contextlib.nullcontext  # (call, the context it runs in, backward included)
    calls = {"attention": (lambda q, k, v: ringlab.attention(q, k, v, causal=True), none),
             "ring P=8 zigzag (simulated)": (ring, none),
             "ring P=8 zigzag (simulated, rank by rank)": (ring, rank_by_rank),
             "dilated (LongNet)": (dilated, none),
             "dilated (LongNet, cut as on a GPU)": (dilated, _as_on_a_gpu),
             "ring-dilated P=8 zigzag (simulated)": (ring_dilated, none),
             "ring-dilated P=8 zigzag (simulated, rank by rank)": (ring_dilated, rank_by_rank)}
    rows = []
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for backward in (False, True):
            leaves = [torch.randn(1, n, heads, dim, generator=g).to(dtype).requires_grad_(backward) for _ in range(3)]

            def step(fn, around):
                def call():
                    with around():
                        out = fn(*leaves)
                        return out.sum().backward() if backward else out
                return call

            runs = {name: step(fn, around) for name, (fn, around) in calls.items()}
            with torch.enable_grad() if backward else torch.no_grad():
                times = side_by_side(runs, repeats=repeats, warmup=1)
                counted = {name: _dispatched(run_) for name, run_ in runs.items()}
            base = min(times["attention"])
            for name in calls:
                c = counted[name]
                rows.append(dict(call=name, dtype=str(dtype).removeprefix("torch."),
                                 mode="fwd+bwd" if backward else "fwd", ops=c["ops"], kernels=c["kernels"],
                                 blocks=c["blocks"], ms=min(times[name]) * 1e3, vs_attention=min(times[name]) / base))
    notes = (f"N = {n}, H = {heads}, D = {dim}, causal; dilated segments {segments}, rates {rates}. kernels: "
             "dispatched ops that are neither views nor allocations (empty, set_); blocks: the forward's attention "
             "blocks (ringlab's block calls, any backend; the backward makes as many). The simulated ring runs "
             "its ranks together (a call per run of ranks with equal tiles); rank by rank: each rank's own "
             "generator, as while tracing. Dilated cut as on a GPU: calls no finer than the GPU's floor, "
             "a branch's offset groups in one call, their rows copied. The simulated ring-dilated runs its ranks "
             "together too (a call per block of a run of ranks whose blocks read alike). Times: best of the "
             "interleaved rounds, on this CPU.")
    return section("host_overhead", rows,
                   ["call", "dtype", "mode", "ops", "kernels", "blocks", "ms", "vs_attention"], notes=notes)


def main(argv=None):
    return cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
