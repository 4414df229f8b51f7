"""The experiments behind the notebooks and benchmarks: each runs the real engine and returns
plain data (dicts and lists) that ringlab.viz turns into figures."""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import memory
from .baselines import materialized_attention, sdpa
from .memory_model import Problem, estimate


def _call(mode: str, pb: Problem, q, k, v, group=None):
    kw = dict(causal=pb.causal)
    if mode == "dense":
        return materialized_attention(q, k, v, **kw)
    if mode == "sdpa":
        return sdpa(q, k, v, **kw)
    import ringlab
    if mode == "attention":
        return ringlab.attention(q, k, v, **kw)
    if mode == "dilated":
        return ringlab.dilated_attention(q, k, v, pb.segments, pb.rates, head_offsets=pb.head_offsets, **kw)
    ring = dict(group=group) if group is not None else dict(ring_size=pb.world_size)
    if mode in ("ring", "simulated_ring"):
        return ringlab.ring_attention(q, k, v, layout=pb.layout, **ring, **kw)
    return ringlab.ring_dilated_attention(q, k, v, pb.segments, pb.rates, head_offsets=pb.head_offsets,
                                         layout=pb.layout, **ring, **kw)


def measure_peak(pb: Problem, mode: str, *, backward: bool = False, group=None, seed: int = 0) -> int:
    """Measured peak bytes of one call of ``mode`` (on this rank's shard when ``group`` is
    given), with inputs and output gradient allocated before the measured region."""
    dtype = getattr(torch, pb.dtype)
    rows = pb.local if group is not None else pb.seq_len
    g = torch.Generator().manual_seed(seed)
    q, k, v, go = (torch.randn(pb.batch, rows, pb.heads, pb.head_dim, generator=g).to(dtype).to(pb.device)
                   for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_(backward)
    with torch.set_grad_enabled(backward), memory.track(pb.device) as m:
        out = _call(mode, pb, q, k, v, group)
        if backward:
            out.backward(go)
        del out
    return m.peak


def _rank_peaks(pb: Problem, mode: str, backward: bool) -> int:
    return measure_peak(pb, mode, backward=backward, group=dist.group.WORLD)


def model_vs_measurement(pb: Problem, mode: str, *, backward: bool = False) -> dict:
    """The analytic estimate next to the measured peak (per rank for ring modes: the largest
    over ranks, measured on real gloo ranks)."""
    est = estimate(pb, mode, backward=backward)
    if mode in ("ring", "ring_dilated"):
        from .launch import launch
        measured = max(launch(_rank_peaks, pb.world_size, args=(pb, mode, backward), timeout=600))
    elif mode == "simulated_ring":  # one simulated rank's code, run alone
        from .dryrun import run_one_rank
        measured = max(run_one_rank(pb, r, backward=backward, device=pb.device)
                       for r in sorted({0, pb.world_size - 1}))
    else:
        measured = measure_peak(pb, mode, backward=backward)
    return dict(mode=mode, backward=backward, model=est.peak, measured=measured,
                ratio=est.peak / measured if measured else float("nan"), terms=est.terms)


# ---------------------------------------------------------------- the seed document's memory table
SEED_CLAIMS_MB = {  # the seed document's "standard" and "Ring-16" columns, and its ring-size sweep
    ("dense", 8192, 1): 2096, ("dense", 16384, 1): 8384, ("dense", 32768, 1): 33536,
    ("ring", 8192, 16): 176, ("ring", 16384, 16): 352, ("ring", 32768, 16): 704, ("ring", 131072, 16): 2816,
    ("ring", 8192, 1): 2096.1, ("ring", 8192, 2): 1072.1, ("ring", 8192, 4): 560.1, ("ring", 8192, 8): 304.1,
}


def available_bytes(device: str = "cpu") -> int:
    """Memory free for tensors now: CUDA's free memory, or MemAvailable on Linux."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info()[0]
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def ring_rank_peak(pb: Problem, *, backward: bool = False, rank: int = 0) -> int:
    """Measured peak of one rank of the ring (the simulated ring's per-rank code, run alone)."""
    from .dryrun import run_one_rank
    return run_one_rank(pb, rank, backward=backward, device=pb.device)


def seed_memory_table(sizes=(8192, 16384, 32768, 131072), ring_sizes=(1, 2, 4, 8, 16), *, heads: int = 8,
                      head_dim: int = 64, dtype: str = "float32", device: str = "cpu",
                      max_measured_tokens: int | None = None, memory_fraction: float = 0.5,
                      progress: bool = True) -> list[dict]:
    """The seed document's memory table, measured: dense materialized attention,
    ringlab.attention and one ring rank at the seed's sizes and ring sizes (forward, batch 1;
    the seed's numbers fit 8 heads of 64 in float32), next to the seed's claims and the model.

    A cell is measured when it fits in ``memory_fraction`` of the free memory and N is at most
    ``max_measured_tokens`` (CPU time grows as N^2); otherwise only the model's value is given.
    """
    from tqdm.auto import tqdm

    budget = available_bytes(device) * memory_fraction
    cells = [("dense", n, 1) for n in sizes] + [("attention", n, 1) for n in sizes] + \
        [("ring", n, p) for n in sizes for p in ring_sizes if n % p == 0]
    rows = []
    for mode, n, p in tqdm(cells, desc="seed memory table", disable=not progress):
        pb = Problem(n, heads, head_dim, dtype=dtype, world_size=p, device=device)
        model = estimate(pb, mode).total
        row = dict(mode=mode, tokens=n, ring_size=p, seed_claim_MB=SEED_CLAIMS_MB.get((mode, n, p)),
                   model_MB=model / 1e6, measured_MB=None)
        if model <= budget and (max_measured_tokens is None or n <= max_measured_tokens):
            resident = sum(estimate(pb, mode).resident.values())
            peak = ring_rank_peak(pb) if mode == "ring" else measure_peak(pb, mode)
            row["measured_MB"] = (peak + resident) / 1e6
        rows.append(row)
    return rows
