"""Ring-dilated attention on real gloo ranks (issue: ring-dilated).

    python -m benchmarks.ring_dilated [--quick]

P = 2 and 4, N = 16384 and 32768, (1, N, 8, 64) fp32, the LongNet config (segments 2048,
4096, 8192, 16384; rates 1, 2, 4, 8), forward: time of the slowest rank / single-device
ringlab.dilated_attention at the same N, and of the simulated ring (ring_size=P) / that call;
bytes each rank sends per branch and in total, next to plain ring attention at the same N and
P (target: a branch with rate r sends 1/r of the plain ring's bytes per hop); measured peak
live tensor bytes per rank.
"""

from __future__ import annotations

import functools
import statistics

import torch
import torch.distributed as dist

import ringlab
from ringlab.planning import memory
from ringlab.workbench.experiments import rank_times
from ringlab.engine.launch import launch
from ringlab.engine.trace import record_events

from .common import cli, section, side_by_side

SEGMENTS, RATES = [2048, 4096, 8192, 16384], [1, 2, 4, 8]


def rank_bench(n, segs, rates, repeats):
    rank, p = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    q, k, v = (ringlab.shard(torch.randn(1, n, 8, 64, generator=g), rank, p) for _ in range(3))
    run = lambda: ringlab.ring_dilated_attention(q, k, v, segs, rates, group=dist.group.WORLD)  # noqa: E731
    times = rank_times(run, repeats)
    with record_events() as tr, memory.track() as mem:
        run()
    return dict(times=times, peak=mem.peak, posts=tr.of(kind="post"))


def run(quick: bool = False) -> dict:
    scale = 8 if quick else 1
    segs = [s // scale for s in SEGMENTS]
    sizes, repeats = ([16384 // scale, 32768 // scale], 1) if quick else ([16384, 32768], 2)
    rows = []
    for n in sizes:
        q, k, v = (torch.randn(1, n, 8, 64) for _ in range(3))
        # The simulated ring (one process runs every rank) timed in the same rounds as the single call.
        calls = {"single": lambda: ringlab.dilated_attention(q, k, v, segs, RATES)}
        calls |= {p: functools.partial(ringlab.ring_dilated_attention, q, k, v, segs, RATES, ring_size=p)
                  for p in (2, 4)}
        times = side_by_side(calls, repeats=repeats)
        single = times["single"]
        for p in (2, 4):
            per_rank = launch(rank_bench, p, args=(n, segs, RATES, repeats), timeout=1800)
            slowest = [max(r["times"][i] for r in per_rank) for i in range(repeats)]
            plain_hop = 2 * (n // p) * 8 * 64 * 4  # bytes of one K/V block
            row = dict(P=p, N=n, ring_dilated_s=statistics.median(slowest),
                       single_dilated_s=statistics.median(single),
                       ratio=statistics.median(a / b for a, b in zip(slowest, single)),
                       simulated_ratio=statistics.median(a / b for a, b in zip(times[p], single)),
                       peak_MiB_per_rank=max(r["peak"] for r in per_rank) / 2**20)
            sent = max(sum(e["bytes"] for e in r["posts"]) for r in per_rank)
            row.update(bytes_per_rank_MiB=sent / 2**20, plain_ring_bytes_per_rank_MiB=(p - 1) * plain_hop / 2**20,
                       bytes_vs_plain=sent / ((p - 1) * plain_hop))
            for b, (w, r) in enumerate(zip(segs, RATES)):
                hops = [e["bytes"] for rr in per_rank for e in rr["posts"] if e["label"].startswith(f"kv/b{b}/")]
                row[f"b{b} w={w} r={r}: hop/plain"] = (statistics.mean(hops) / plain_hop) if hops else "local"
            rows.append(row)
    branch_cols = [f"b{b} w={w} r={r}: hop/plain" for b, (w, r) in enumerate(zip(segs, RATES))]
    notes = ("ratio: slowest rank / single-device dilated_attention (one process, 2 threads). simulated_ratio: "
             "ring_dilated_attention(ring_size=P), every rank in one process, / the same single call. "
             "hop/plain: mean bytes of one hop of that branch / one K/V block of plain ring attention "
             "(target 1/r); 'local' = segments fit in a shard, nothing sent. bytes_vs_plain: all bytes a rank "
             "sends in the forward / plain ring attention's (P - 1) blocks.")
    return section("ring_dilated", rows,
           ["P", "N", "ring_dilated_s", "single_dilated_s", "ratio", "simulated_ratio", *branch_cols,
            "bytes_per_rank_MiB", "plain_ring_bytes_per_rank_MiB", "bytes_vs_plain", "peak_MiB_per_rank"], notes=notes,)


def main(argv=None):
    return cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
