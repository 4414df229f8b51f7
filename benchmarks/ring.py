"""Ring attention on real gloo ranks and simulated on one process (issue: ring).

    python -m benchmarks.ring [--quick]

1. Simulated ring (P = 8) / SDPA forward on one process, (1, 8192, 8, 64) fp32.
2. gloo ranks, P = 2 and 4, N = 8192 and 16384, (1, N, 8, 64) fp32, forward and
   forward+backward: the ring's time (slowest rank) / single-process ringlab.attention, and /
   ring-attention-pytorch on the same shards when that peer is installed; from the trace, the
   fraction of communication time hidden behind compute; peak live tensor bytes per rank.
3. Causal load balance: work (score pairs) and compute time per rank, max / mean, for each
   layout at P = 4.
"""

from __future__ import annotations

import statistics

import torch
import torch.distributed as dist

import ringlab
from ringlab.planning import memory
from ringlab.workbench.baselines import sdpa
from ringlab.workbench.experiments import overlap_fraction, rank_times
from ringlab.engine.launch import launch
from ringlab.engine.trace import record_events

from .common import cli, rank_by_rank, ratio, section, side_by_side
from .peers import peer_ring_attention


def rank_bench(n, heads, dim, layout, causal, backward, repeats, peer):
    """Run on every rank: time ringlab (and the peer) on this rank's shard; trace and memory."""
    rank, p = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(1, n, heads, dim, generator=g) for _ in range(3)]
    q, k, v = (ringlab.shard(x, rank, p, layout).clone().requires_grad_(backward) for x in full)

    def ours():
        out = ringlab.ring_attention(q, k, v, group=dist.group.WORLD, causal=causal, layout=layout)
        if backward:
            out.sum().backward()

    def theirs():
        out = peer_ring_attention(q, k, v, causal=causal)
        if backward:
            out.sum().backward()

    result = {"ours": rank_times(ours, repeats)}
    if peer:
        result["peer"] = rank_times(theirs, repeats)
    with record_events() as tr, memory.track() as mem:
        ours()
    result.update(events=tr.events, peak=mem.peak, work=tr.work_per_rank().get(rank, 0),
                  compute=sum(e["t1"] - e["t0"] for e in tr.of(kind="compute", pass_="forward")))
    return result


def distributed_rows(p, n, *, repeats, backward, causal=False, layout="contiguous", peer=False):
    per_rank = launch(rank_bench, p, args=(n, 8, 64, layout, causal, backward, repeats, peer), timeout=1800)
    slowest = [max(r["ours"][i] for r in per_rank) for i in range(repeats)]
    q, k, v = (torch.randn(1, n, 8, 64).requires_grad_(backward) for _ in range(3))

    def single():
        out = ringlab.attention(q, k, v, causal=causal)
        if backward:
            out.sum().backward()
    single()
    ref = [side_by_side({"single": single}, repeats=1, warmup=0)["single"][0] for _ in range(repeats)]
    row = dict(P=p, N=n, mode="forward+backward" if backward else "forward", layout=layout, causal=causal,
               ring_s=statistics.median(slowest), single_s=statistics.median(ref),
               ring_over_single=statistics.median(a / b for a, b in zip(slowest, ref)),
               hidden_comm=statistics.mean(x for x in (overlap_fraction(r["events"]) for r in per_rank) if x is not None),
               peak_MiB_per_rank=max(r["peak"] for r in per_rank) / 2**20)
    if peer:
        theirs = [max(r["peer"][i] for r in per_rank) for i in range(repeats)]
        row.update(peer_s=statistics.median(theirs),
                   ring_over_peer=statistics.median(a / b for a, b in zip(slowest, theirs)))
    work = [r["work"] for r in per_rank]
    compute = [r["compute"] for r in per_rank]
    row.update(work_imbalance=max(work) / statistics.mean(work),
               time_imbalance=max(compute) / statistics.mean(compute))
    return row


def simulated_row(n, repeats):
    """The simulated ring (all ranks at once), rank by rank, and SDPA, interleaved."""
    q, k, v = (torch.randn(1, n, 8, 64) for _ in range(3))

    def rank_by_rank_sim():
        with rank_by_rank():
            ringlab.ring_attention(q, k, v, ring_size=8)
    t = side_by_side({"sim": lambda: ringlab.ring_attention(q, k, v, ring_size=8), "sim rank by rank": rank_by_rank_sim,
                      "sdpa": lambda: sdpa(q, k, v)}, repeats=repeats)
    with memory.track() as mem:
        ringlab.ring_attention(q, k, v, ring_size=8)
    return dict(case="simulated ring P=8 / SDPA, forward", N=n, ratio=ratio(t, "sim", "sdpa"),
                rank_by_rank_ratio=ratio(t, "sim rank by rank", "sdpa"), sim_s=min(t["sim"]), sdpa_s=min(t["sdpa"]),
                process_peak_MiB=mem.peak / 2**20)


def run(quick: bool = False) -> dict:
    sizes, repeats = ((1024, 2048), 1) if quick else ((8192, 16384), 2)
    peer = peer_ring_attention.available
    sim = simulated_row(sizes[0], repeats + 1)
    rows = []
    for n in sizes:
        for p in (2, 4):
            for backward in (False, True):
                rows.append(distributed_rows(p, n, repeats=repeats, backward=backward, peer=peer))
    for layout in ("contiguous", "zigzag", "striped"):
        rows.append(distributed_rows(4, sizes[0], repeats=repeats, backward=False, causal=True, layout=layout))
    notes = (f"Simulated ring P=8 / SDPA forward at N={sizes[0]}: {sim['ratio']:.3f} (target <= 1.3; rank by "
             f"rank {sim['rank_by_rank_ratio']:.3f}; process peak {sim['process_peak_MiB']:.1f} MiB).\n"
             "ring_over_single: slowest rank's time / ringlab.attention in one process (2 threads) at the "
             "same N. hidden_comm: share of in-flight communication time the rank spent computing "
             "(target >= 0.8). work/time_imbalance: max / mean over ranks of score pairs and of compute "
             "time (target <= 1.1 for zigzag and striped, causal). "
             + ("ring_over_peer: vs ring-attention-pytorch's ring_flash_attn on the same shards."
                if peer else "ring-attention-pytorch is not installed (pip install ring-attention-pytorch): "
                "peer column skipped."))
    return section("ring", rows,
           ["P", "N", "mode", "layout", "causal", "ring_s", "single_s", "ring_over_single", "peer_s",
            "ring_over_peer", "hidden_comm", "work_imbalance", "time_imbalance", "peak_MiB_per_rank"],
           notes=notes, extra=dict(simulated=sim))


def main(argv=None):
    return cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
