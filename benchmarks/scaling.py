"""Scaling: time and peak memory vs sequence length N and vs ring size P, with fitted exponents.

    python -m benchmarks.scaling [--quick]

vs N (one process): SDPA, ``attention`` and ``dilated_attention`` (LongNet rates 1, 2, 4, 8 on
segments 256-2048, so that every N is past the longest segment) forward; time ~ N^a and peak
live tensor bytes ~ N^b, a and b fitted by least squares on log-log. Exact attention should
give a ~ 2 and b ~ 1 (no N x N matrix kept); dilated attention a ~ 1.
vs P (real gloo ranks, fixed N): ring attention forward, the slowest rank's time and the
largest per-rank peak, which should fall as P^-1 from P = 2 on (the printed notes say why
P = 1 is printed but not fitted).
"""

from __future__ import annotations

import numpy as np
import torch

import ringlab
from ringlab.workbench.baselines import sdpa
from ringlab.engine.launch import launch

from .common import best_time, cli, peak_bytes, section
from .single_device import LONGNET

SEGMENTS = [s // 8 for s in LONGNET["segments"]]
from .ring import rank_bench


def exponent(xs, ys) -> float:
    """Least-squares slope of log(y) against log(x)."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def versus_n(sizes, *, heads=8, dim=64, repeats=2) -> list[dict]:
    rows = []
    for n in sizes:
        q, k, v = (torch.randn(1, n, heads, dim) for _ in range(3))
        calls = {"SDPA": lambda: sdpa(q, k, v), "attention": lambda: ringlab.attention(q, k, v),
                 "dilated": lambda: ringlab.dilated_attention(q, k, v, SEGMENTS, LONGNET["rates"])}
        with torch.no_grad():
            for name, fn in calls.items():
                rows.append(dict(axis="N", call=name, N=n, P=1, seconds=best_time(fn, repeats),
                                 peak_MiB=peak_bytes(fn) / 2**20))
    return rows


def versus_p(n, ring_sizes, *, repeats=2) -> list[dict]:
    rows = []
    for p in ring_sizes:
        per_rank = launch(rank_bench, p, args=(n, 8, 64, "contiguous", False, False, repeats, False), timeout=1800)
        slowest = min(max(r["ours"][i] for r in per_rank) for i in range(repeats))
        rows.append(dict(axis="P", call="ring attention (gloo)", N=n, P=p, seconds=slowest,
                         peak_MiB=max(r["peak"] for r in per_rank) / 2**20))
    return rows


def fits(rows) -> list[dict]:
    out = []
    for axis, call in dict.fromkeys((r["axis"], r["call"]) for r in rows):
        sel = [r for r in rows if r["axis"] == axis and r["call"] == call]
        xs = [r[axis] for r in sel]
        out.append(dict(call=call, axis=axis, range=f"{min(xs)}-{max(xs)}",
                        time_exponent=exponent(xs, [r["seconds"] for r in sel]),
                        memory_exponent=exponent(xs, [r["peak_MiB"] for r in sel])))
    return out


def run(quick: bool = False) -> dict:
    sizes, n_ring, ring_sizes, repeats = (([2048, 4096], 1024, [1, 2, 4], 1) if quick
                                          else ([4096, 8192, 16384, 32768], 16384, [1, 2, 4, 8], 2))
    torch.manual_seed(0)
    n_rows, p_rows = versus_n(sizes, repeats=repeats), versus_p(n_ring, ring_sizes, repeats=repeats)
    fitted = fits(n_rows) + fits([r for r in p_rows if r["P"] > 1])  # P = 1 is no ring: see the notes
    rows = n_rows + p_rows
    notes = ("Fitted exponents (least squares on log-log):\n\n"
             + "\n".join(f"- {f['call']} vs {f['axis']} ({f['range']}): time ~ {f['axis']}^{f['time_exponent']:.2f}, "
                         f"peak ~ {f['axis']}^{f['memory_exponent']:.2f}" for f in fitted)
             + f"\n\nDilated: segments {SEGMENTS}, rates {LONGNET['rates']}. "
             "Expected: exact attention time ~ N^2, peak ~ N^1; dilated time ~ N^1; "
             "ring per-rank peak ~ P^-1 from P = 2 on (six shard-sized tensors: two K/V blocks, the "
             "accumulators, a block's result). P = 1 sends nothing, and where its accumulators exceed the CPU "
             "head-chunk budget (ringlab.engine.autograd.ACCUM_BUDGET; at the full run's N) it runs its heads in "
             "chunks, so it is not fitted. Ring time vs P on a 2-core machine is bounded by the cores, not by the "
             "algorithm (P ranks share 2 cores).")
    return section("scaling", rows, ["axis", "call", "N", "P", "seconds", "peak_MiB"],
           notes=notes, extra=dict(fits=fitted))


def main(argv=None):
    return cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
