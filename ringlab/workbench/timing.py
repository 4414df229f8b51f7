"""Timing on shared machines, used by the benchmarks and the scaling notebook.

Times on a shared machine are noise; ratios taken side by side are the figure. Contestants run
interleaved (a, b, a, b, ...), so a slow spell hits every one of them in the same round, and a
comparison reports the median of the per-round ratios with their spread.
"""

from __future__ import annotations

import statistics
import time

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def side_by_side(contestants: dict, *, repeats: int = 3, warmup: int = 1, device="cpu") -> dict:
    """Time each zero-argument callable, interleaved; returns name -> list of seconds."""
    for _ in range(warmup):
        for fn in contestants.values():
            fn()
    times = {name: [] for name in contestants}
    for _ in range(repeats):
        for name, fn in contestants.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def ratio(times: dict, a: str, b: str) -> float:
    """Median over rounds of time(a) / time(b)."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def ratio_spread(times: dict, a: str, b: str) -> dict:
    """The per-round ratios time(a) / time(b): their median, lowest and highest, and spread
    (highest - lowest)."""
    rounds = [x / y for x, y in zip(times[a], times[b])]
    return dict(median=statistics.median(rounds), low=min(rounds), high=max(rounds),
                spread=max(rounds) - min(rounds))
