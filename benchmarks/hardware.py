"""How close to the machine's limit: achieved FLOP/s of each attention call / measured matmul FLOP/s.

    python -m benchmarks.hardware [--quick]

The limit is measured in the same run: the best of a few square matmuls (the kernel every
attention implementation is built from) in the benchmark's dtype. An attention call's FLOPs
are counted from the score pairs it computes: 4 per pair per head dim forward (QK^T and PV),
3.5x that for forward+backward (five matmuls to the forward's two). Pairs come from
``ringlab.engine.dilation.score_pairs``, so dilated attention is credited only with the work it does.
"""

from __future__ import annotations

import time

import torch

import ringlab
from ringlab.workbench.baselines import sdpa
from ringlab.engine.dilation import score_pairs

from .common import best_time, cli, section, sync
from .single_device import LONGNET, fwd_bwd


def matmul_flops(device="cpu", dtype=torch.float32, size: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of ``size`` x ``size`` matmuls on ``device``: the machine's practical peak."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    a @ b  # warm-up (thread pools, cuBLAS handles)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def attention_flops(q, segments=None, rates=None, *, causal=False, backward=False) -> float:
    """FLOPs of exact attention over the pairs it scores; dense when ``segments`` is None."""
    b, n, h, d = q.shape
    pairs = score_pairs(n, h, segments or [n], rates or [1], causal=causal)
    return 4 * b * d * pairs * (3.5 if backward else 1.0)


def rows_for(n: int, heads: int, dim: int, segments, rates, *, repeats: int, device="cpu",
             dtype=torch.float32, ring_size: int = 8, peak: float | None = None) -> list[dict]:
    """One row per (call, mode): seconds, achieved FLOP/s and its fraction of the matmul peak."""
    peak = peak or matmul_flops(device, dtype)
    segs = [min(s, n) for s in segments]
    calls = {
        "SDPA": (lambda q, k, v: sdpa(q, k, v), None),
        "attention": (lambda q, k, v: ringlab.attention(q, k, v), None),
        "attention causal": (lambda q, k, v: ringlab.attention(q, k, v, causal=True), "causal"),
        f"simulated ring P={ring_size}": (lambda q, k, v: ringlab.ring_attention(q, k, v, ring_size=ring_size), None),
        "dilated (LongNet)": (lambda q, k, v: ringlab.dilated_attention(q, k, v, segs, rates), "dilated"),
    }
    rows = []
    for backward in (False, True):
        leaves = [torch.randn(1, n, heads, dim, device=device, dtype=dtype).requires_grad_(backward)
                  for _ in range(3)]
        for name, (fn, kind) in calls.items():
            if backward and name.startswith("simulated"):
                continue  # the simulated ring's backward is the distributed algorithm replayed; forward suffices
            flops = attention_flops(leaves[0], segs if kind == "dilated" else None,
                                    rates if kind == "dilated" else None, causal=kind == "causal",
                                    backward=backward)
            with torch.enable_grad() if backward else torch.no_grad():
                once = (lambda f=fn: f(*leaves))
                seconds = best_time(fwd_bwd(once) if backward else once, repeats, device)
            rows.append(dict(call=name, mode="forward+backward" if backward else "forward", N=n,
                             seconds=seconds, GFLOPs=flops / 1e9, achieved_TFLOPs=flops / seconds / 1e12,
                             fraction_of_matmul=flops / seconds / peak))
    return rows


def run(quick: bool = False) -> dict:
    n, repeats = (2048, 1) if quick else (16384, 2)
    segs = [s * n // 16384 for s in LONGNET["segments"]]
    torch.manual_seed(0)
    peak = matmul_flops()
    rows = rows_for(n, 8, 64, segs, LONGNET["rates"], repeats=repeats, peak=peak)
    notes = (f"Measured matmul peak (2048^3 fp32, best of 5): {peak / 1e12:.3f} TFLOP/s. "
             f"Shapes (1, {n}, 8, 64) fp32; dilated: segments {segs}, rates {LONGNET['rates']}. "
             "fraction_of_matmul = achieved FLOP/s / that peak; FLOPs = 4 per scored pair per head dim "
             "(x3.5 with backward); seconds = best of the rounds.")
    return section("hardware", rows,
           ["call", "mode", "N", "seconds", "GFLOPs", "achieved_TFLOPs", "fraction_of_matmul"],
           notes=notes, extra=dict(matmul_flops=peak))


def main(argv=None):
    return cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
