"""The experiments behind the notebooks and benchmarks: each runs the real engine and returns
plain data (dicts and lists) that ringlab.workbench.viz turns into figures."""

from __future__ import annotations

import itertools
import statistics
import time

import torch
import torch.distributed as dist

from ..planning import memory
from .baselines import materialized_attention, sdpa
from ..engine.layout import LAYOUTS, document_tiles, get, with_pieces, work_per_rank
from ..planning.memory_model import Problem, estimate


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
    q, k, v, go = (torch.randn(pb.batch, rows, h, pb.head_dim, generator=g).to(dtype).to(pb.device)
                   for h in (pb.heads, pb.kv_heads, pb.kv_heads, pb.heads))
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
        from ..engine.launch import launch
        measured = max(launch(_rank_peaks, pb.world_size, args=(pb, mode, backward), timeout=600))
    elif mode == "simulated_ring":  # one simulated rank's code, run alone
        from ..planning.dryrun import run_one_rank
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
    from ..planning.dryrun import run_one_rank
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


# ---------------------------------------------------------------- devices
def resolve_device(device: str = "auto") -> str:
    """"auto" means CUDA when available, else CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def default_world_size(device: str = "auto") -> int:
    """Ranks for multi-rank experiments: one per GPU where there are two or more, else 4 gloo
    ranks on CPU (a ring of one rank has nothing to rotate)."""
    gpus = torch.cuda.device_count()
    return gpus if resolve_device(device) == "cuda" and gpus >= 2 else 4


def _rank_device(device: str = "auto") -> str:
    """This rank's device: its own GPU on an NCCL group, else the CPU (gloo moves CPU tensors)."""
    if resolve_device(device) == "cuda" and dist.get_backend() == "nccl":
        return f"cuda:{torch.cuda.current_device()}"
    return "cpu"


# ---------------------------------------------------------------- K/V rotation traces
def _random_qkv(cfg: dict, rows: int, device, generator_seed: int = 0):
    g = torch.Generator().manual_seed(generator_seed)
    dtype = getattr(torch, cfg.get("dtype", "float32"))
    heads = (cfg["heads"], cfg["kv_heads"], cfg["kv_heads"])
    return [torch.randn(1, rows, h, cfg["head_dim"], generator=g).to(device, dtype) for h in heads]


def _traced_call(cfg: dict, q, k, v, **ring):
    import ringlab

    from ..engine.trace import record_events
    for x in (q, k, v):
        x.requires_grad_(cfg.get("backward", True))
    with record_events() as tr:
        kw = dict(causal=cfg["causal"], layout=cfg["layout"], **ring)
        if cfg.get("segments"):
            out = ringlab.ring_dilated_attention(q, k, v, cfg["segments"], cfg["rates"], **kw)
        else:
            out = ringlab.ring_attention(q, k, v, **kw)
        if cfg.get("backward", True):
            out.sum().backward()
    return tr.events


def _trace_rank(cfg: dict) -> list[dict]:
    """Run on every rank of a launched group: this rank's trace events."""
    import ringlab
    rank, p = dist.get_rank(), dist.get_world_size()
    device = _rank_device(cfg.get("device", "auto"))
    full = _random_qkv(cfg, cfg["seq_len"], "cpu")
    q, k, v = (ringlab.shard(x, rank, p, cfg["layout"]).contiguous().to(device) for x in full)
    return _traced_call(cfg, q, k, v, group=dist.group.WORLD)


def ring_trace(world_size: int = 4, seq_len: int = 2048, *, heads: int = 4, head_dim: int = 32,
               layout: str = "zigzag", causal: bool = True, segments=(), rates=(), backward: bool = True,
               simulated: bool = False, device: str = "auto", timeout: float = 300,
               kv_heads: int | None = None) -> list[dict]:
    """Trace events of one ring (or ring-dilated) call, forward and backward. ``simulated``
    runs the simulated ring in this process (same per-rank code, same records); otherwise
    ``world_size`` real ranks are launched (gloo on CPU, NCCL on GPUs) and their events merged.
    ``kv_heads`` (a divisor of ``heads``; None or 0: ``heads``) gives k, v fewer heads:
    grouped-query attention, where the ring's posts carry H_kv / H of the bytes."""
    cfg = dict(seq_len=seq_len, heads=heads, kv_heads=kv_heads or heads, head_dim=head_dim, layout=layout,
               causal=causal, segments=list(segments), rates=list(rates), backward=backward, device=device)
    if simulated:
        return _traced_call(cfg, *_random_qkv(cfg, seq_len, resolve_device(device)), ring_size=world_size)
    from ..engine.launch import launch
    return [e for events in launch(_trace_rank, world_size, args=(cfg,), timeout=timeout) for e in events]


def layout_work(world_size: int = 4, seq_len: int = 1024) -> dict:
    """Causal score pairs per rank for each layout, from simulated traces: {layout: {rank: pairs}}."""
    from ..engine.trace import Trace
    return {layout: Trace(ring_trace(world_size, seq_len, layout=layout, simulated=True, backward=False,
                                     heads=1, head_dim=8, device="cpu")).work_per_rank()
            for layout in LAYOUTS}


def packed_view(world_size: int, lengths) -> dict:
    """Packed documents of ``lengths`` tokens under a causal ring, per layout that can split
    them: {"work": {layout: {rank: score pairs}}, "skipped": {layout: fraction of the P^2 ring
    steps that no document crosses, which the ring skips}}."""
    cu = [0, *itertools.accumulate(lengths)]
    work, skipped = {}, {}
    for name, lay in LAYOUTS.items():
        if not lay.splits(cu[-1], world_size) or any(n % lay.document_unit(world_size) for n in lengths):
            continue
        work[name] = dict(enumerate(work_per_rank(name, world_size, cu)))
        steps = list(itertools.product(range(world_size), repeat=2))
        skipped[name] = sum(not document_tiles(name, r, s, world_size, tuple(cu), True) for r, s in steps) / len(steps)
    return dict(work=work, skipped=skipped)


def overlap_fraction(events) -> float | None:
    """Share of in-flight communication time the ranks spent computing instead of waiting."""
    waits = [e for e in events if e["kind"] == "wait"]
    flight = sum(e["t1"] - e["posted"] for e in waits)
    return None if flight <= 0 else 1.0 - sum(e["t1"] - e["t0"] for e in waits) / flight


# ---------------------------------------------------------------- dilation geometry
def dilation_geometry(seq_len: int = 64, heads: int = 4, segments=(8, 16, 64), rates=(1, 2, 4), *,
                      head_offsets: str = "interleaved", causal: bool = True, layers: int = 6) -> dict:
    """The multiplicity mask, per-head coverage, the engine's work vs dense, and the receptive
    field after stacked layers, for one dilated configuration."""
    from ..engine.dilation import multiplicity, receptive_field, score_pairs
    m = multiplicity(seq_len, heads, segments, rates, head_offsets=head_offsets, causal=causal)
    dense = seq_len * (seq_len + 1) // 2 if causal else seq_len * seq_len
    return dict(m=m, coverage=[(m[h] > 0).sum().item() / dense for h in range(heads)],
                pairs_ratio=score_pairs(seq_len, heads, segments, rates, head_offsets=head_offsets,
                                        causal=causal) / (heads * dense),
                receptive=receptive_field(seq_len, heads, segments, rates, layers, head_offsets=head_offsets,
                                          causal=causal))


# ---------------------------------------------------------------- memory curves
def memory_curves(sizes=(1024, 2048, 4096), ring_sizes=(2, 4), *, heads: int = 8, head_dim: int = 64,
                  dtype: str = "float32", device: str = "auto", segments_fraction=(1 / 8, 1 / 4, 1 / 2, 1),
                  rates=(1, 2, 4, 8), modes=("dense", "attention", "dilated", "ring", "ring_dilated"),
                  dense_limit: int = 4096, progress: bool = True) -> list[dict]:
    """Measured peak bytes per rank (one ring rank's code for ring modes) and the model, forward
    and forward+backward, over sequence lengths and ring sizes. Dilated modes use segments
    N * segments_fraction with ``rates``."""
    from tqdm.auto import tqdm
    device = resolve_device(device)
    cells = []
    for n, mode, backward in itertools.product(sizes, modes, (False, True)):
        ps = ring_sizes if mode in ("ring", "ring_dilated") else (1,)
        cells += [(n, mode, backward, p) for p in ps
                  if get("contiguous").splits(n, p) and not (mode == "dense" and n > dense_limit)]
    rows = []
    for n, mode, backward, p in tqdm(cells, desc="memory curves", disable=not progress):
        dilated = mode in ("dilated", "ring_dilated")
        pb = Problem(n, heads, head_dim, dtype=dtype, world_size=p, device=device, layout="contiguous",
                     segments=tuple(max(1, int(n * f)) for f in segments_fraction) if dilated else (),
                     rates=tuple(rates) if dilated else ())
        measured = ring_rank_peak(pb, backward=backward) if p > 1 else measure_peak(pb, mode, backward=backward)
        rows.append(dict(mode=mode, tokens=n, ring_size=p, backward=backward, measured=measured,
                         model=estimate(pb, mode, backward=backward).peak))
    return rows


# ---------------------------------------------------------------- correctness
def correctness_grid(seq_len: int = 96, *, world_sizes=(1, 2, 4, 8), layouts=None,
                     dtypes=("float64", "float32", "bfloat16"), backends=("auto", "math"), heads: int = 4,
                     head_dim: int = 32, dilated=((12, 48, 96), (1, 2, 4)), progress: bool = True) -> list[dict]:
    """Max abs error of outputs and gradients vs the float64 dense reference, over kernels
    (backend), dtypes, world sizes and layouts of the simulated ring (the per-rank code real
    ranks run), plus dilated and ring-dilated attention. ``layouts``: the ring's (default every
    registered one); ring-dilated runs every registered layout that it accepts."""
    from tqdm.auto import tqdm

    import ringlab

    from ..engine.kernels import use_backend
    from ..reference import dense_attention, dense_dilated_attention, tolerance
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(2, seq_len, heads, head_dim, generator=g, dtype=torch.float64) for _ in range(4)]
    segs, rates = dilated
    layouts = tuple(LAYOUTS) if layouts is None else tuple(layouts)
    strictest_first = sorted(map(get, dict.fromkeys([*layouts, *with_pieces()])), key=lambda lay: -lay.unit)
    for p in world_sizes:  # every world size asked for is run, or the call says why not
        for lay in strictest_first:
            lay.check_split(seq_len, p, what="seq_len")
    cases = [("ring", p, lay) for p in world_sizes for lay in layouts]
    cases += [("ring_dilated", p, lay) for p in world_sizes for lay in with_pieces()]
    rows = []
    for (kind, p, lay), dtype, backend in tqdm(list(itertools.product(cases, dtypes, backends)),
                                               desc="correctness", disable=not progress):
        dt = getattr(torch, dtype)
        xs = [x.to(dt).clone().requires_grad_() for x in full[:3]]
        ref_in = [x.to(dt).double().requires_grad_() for x in full[:3]]
        with use_backend(backend):
            if kind == "ring":
                out = ringlab.ring_attention(*xs, ring_size=p, layout=lay, causal=True)
                ref = dense_attention(*ref_in, causal=True)[0]
            else:
                out = ringlab.ring_dilated_attention(*xs, segs, rates, ring_size=p, layout=lay, causal=True)
                ref = dense_dilated_attention(*ref_in, segs, rates, causal=True)[0]
            grads = torch.autograd.grad((out.double() * full[3]).sum(), xs)
        rgrads = torch.autograd.grad((ref * full[3]).sum(), ref_in)
        label = f"{kind} P={p} {lay} [{backend}]"
        # (error, the tolerance the tests enforce for this reference); grads: the worst of dq, dk, dv
        out_err = ((out.double() - ref).abs().max().item(), tolerance(dt, ref.abs().max().item()))
        grad_err = max((((a.double() - b).abs().max().item(), tolerance(dt, b.abs().max().item(), grad=True))
                        for a, b in zip(grads, rgrads)), key=lambda e: e[0] / e[1])
        for quantity, (error, tol) in (("out", out_err), ("grads", grad_err)):
            rows.append(dict(label=label, kind=kind, world_size=p, layout=lay, backend=backend, dtype=dtype,
                             quantity=quantity, error=error, tolerance=tol))
    return rows


# ---------------------------------------------------------------- scaling
def rank_times(fn, repeats: int) -> list[float]:
    """On one rank of a process group: warm up, then time ``fn`` ``repeats`` times, every
    rank starting together (a barrier before each round)."""
    fn()
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _time_ring_rank(n: int, heads: int, head_dim: int, causal: bool, repeats: int) -> list[float]:
    import ringlab
    q, k, v = (torch.randn(1, n // dist.get_world_size(), heads, head_dim, device=_rank_device())
               for _ in range(3))
    return rank_times(lambda: ringlab.ring_attention(q, k, v, group=dist.group.WORLD, causal=causal,
                                                     layout="zigzag"), repeats)


def scaling(sizes=(1024, 2048, 4096), *, heads: int = 8, head_dim: int = 64, causal: bool = True,
            world_size: int = 4, segments_fraction=(1 / 8, 1 / 4, 1 / 2, 1), rates=(1, 2, 4, 8),
            device: str = "auto", repeats: int = 5, real_ring: bool = True, progress: bool = True) -> list[dict]:
    """Seconds per forward call vs N for SDPA, ringlab.attention, the simulated ring and dilated
    attention, timed interleaved (ringlab.workbench.timing, as the benchmarks do), and for the ring on
    ``world_size`` real ranks (slowest rank; its own processes, so not interleaved).

    Each row: method, tokens, seconds (median over rounds), low and high (fastest and slowest
    round) and, for the interleaved methods, ``over_sdpa``: the median, low, high and spread
    of the per-round ratios to SDPA.
    """
    from tqdm.auto import tqdm

    import ringlab

    from .baselines import sdpa
    from ..engine.launch import launch
    from .timing import ratio_spread, side_by_side
    device = resolve_device(device)
    for n in sizes if real_ring else ():  # before any timing: every size runs on the real ring too
        LAYOUTS["zigzag"].check_split(n, world_size, what="scaling size")
    rows = []
    for n in tqdm(sizes, desc="scaling", disable=not progress):
        q, k, v = (torch.randn(1, n, heads, head_dim, device=device) for _ in range(3))
        segs = [max(1, int(n * f)) for f in segments_fraction]
        methods = {"sdpa": lambda: sdpa(q, k, v, causal=causal),
                   "attention": lambda: ringlab.attention(q, k, v, causal=causal),
                   f"simulated ring P={world_size}": lambda: ringlab.ring_attention(
                       q, k, v, ring_size=world_size, causal=causal, layout="zigzag"),
                   "dilated": lambda: ringlab.dilated_attention(q, k, v, segs, rates, causal=causal)}
        times = side_by_side(methods, repeats=repeats, device=device)
        rows += [dict(method=method, tokens=n, seconds=statistics.median(t), low=min(t), high=max(t),
                      over_sdpa=ratio_spread(times, method, "sdpa")) for method, t in times.items()]
        if real_ring:
            per_rank = launch(_time_ring_rank, world_size, args=(n, heads, head_dim, causal, repeats), timeout=1800)
            slowest = [max(r[i] for r in per_rank) for i in range(repeats)]
            rows.append(dict(method=f"ring, {world_size} ranks", tokens=n, seconds=statistics.median(slowest),
                             low=min(slowest), high=max(slowest)))
    return rows


def over_sdpa(rows: list[dict], method: str) -> dict:
    """The per-round ratio of ``method`` to SDPA at the largest size: median, low, high, spread."""
    return max((r for r in rows if r["method"] == method), key=lambda r: r["tokens"])["over_sdpa"]


# ---------------------------------------------------------------- billion tokens
def planner_sweep(tokens=(2**20, 2**24, 2**27, 2**30), *, gpus=("h100", "h200", "a100"), heads: int = 32,
                  head_dim: int = 128, dtype: str = "bfloat16", segments=(), rates=(), causal: bool = True,
                  layout: str = "zigzag") -> list[dict]:
    """ringlab.planning.planner.plan over sequence lengths and device profiles (the fewest GPUs that fit).
    Segments longer than N are clipped to N."""
    from ..planning.planner import plan
    rows = []
    for gpu in gpus:
        for n in tokens:
            segs = tuple(min(s, n) for s in segments)
            p = plan(n, heads=heads, head_dim=head_dim, dtype=dtype, segments=segs, rates=rates, gpu=gpu,
                     causal=causal, layout=layout)
            # the slowest link a step crosses; no entry when every segment stays on its rank
            link = next((k for k in ("InfiniBand (nodes)", "NVLink (in node)") if k in p.overlap), None)
            ratio = p.overlap[link]["compute_s"] / p.overlap[link]["transfer_s"] if link else None
            rows.append(dict(tokens=n, gpu=gpu, gpus=p.gpus, terms={**p.memory["resident"], **p.memory["terms"]},
                             total=p.memory["total"], capacity=p.memory["capacity"], overlap_ratio=ratio,
                             link=link, seconds=p.compute["seconds_total"]))
    return rows


# ---------------------------------------------------------------- ring, Ulysses and hybrid
MESH_STRATEGIES = {"ring": lambda p: (1, p), "ulysses": lambda p: (p, 1), "hybrid": lambda p: (2, p // 2)}


def _mesh_call(cfg: dict, q, k, v, **mesh) -> list[dict]:
    """Trace events of one Ulysses / hybrid call (forward and backward) on q, k, v."""
    import ringlab

    from ..engine.trace import record_events
    for x in (q, k, v):
        x.requires_grad_()
    with record_events() as tr:
        ringlab.ulysses_attention(q, k, v, causal=cfg["causal"], layout=cfg["layout"], **mesh).sum().backward()
    return tr.events


def mesh_trace(ulysses_size: int = 2, ring_size: int = 2, seq_len: int = 64, *, heads: int = 4, kv_heads: int = 0,
               head_dim: int = 16, causal: bool = True, layout: str = "zigzag", device: str = "auto") -> list[dict]:
    """Trace events of a simulated U x R mesh (ringlab.ulysses_attention), forward and backward;
    every event carries its ``mesh_rank``."""
    cfg = dict(seq_len=seq_len, heads=heads, kv_heads=kv_heads or heads, head_dim=head_dim, causal=causal,
               layout=layout)
    return _mesh_call(cfg, *_random_qkv(cfg, seq_len, resolve_device(device)), ulysses_size=ulysses_size,
                      ring_size=ring_size)


def mesh_frames(events, ulysses_size: int, ring_size: int, seq_len: int, heads: int, layout: str) -> list[dict]:
    """The forward of a mesh trace as frames: what each mesh rank holds in each phase.

    Phases come from the trace: the all-to-all to heads, each ring step (the K/V block a rank
    attends, by its source ring rank) and the all-to-all back. Each frame: ``label``,
    ``holds`` (mesh rank x token: 0 nothing, 1 its query tokens, 2 a visiting K/V block),
    ``heads`` (per mesh rank, the [start, stop) of the heads it holds) and ``bytes`` (sent by
    mesh rank 0 in that phase)."""
    from ..engine.layout import shard_positions
    u_size, r_size = ulysses_size, ring_size
    ring_pos = [shard_positions(seq_len, r, r_size, layout).tolist() for r in range(r_size)]
    own = {m: ring_pos[m // u_size] for m in range(u_size * r_size)}
    piece = {m: own[m][(m % u_size) * len(own[m]) // u_size:(m % u_size + 1) * len(own[m]) // u_size] for m in own}
    forward = [e for e in events if e.get("pass") == "forward"]
    sent = lambda pred: sum(e["bytes"] for e in forward if e["kind"] == "post" and e["mesh_rank"] == 0 and pred(e))  # noqa: E731
    group = heads // u_size

    def frame(label, tokens, visiting, head_of, nbytes):
        holds = [[0] * seq_len for _ in own]
        for m in own:
            for t in tokens[m]:
                holds[m][t] = 1
            for t in visiting.get(m, ()):
                holds[m][t] = max(holds[m][t], 2)
        return dict(label=label, holds=holds, heads=[head_of(m) for m in own], bytes=nbytes)

    frames = [frame("start: sequence pieces, all heads", piece, {}, lambda m: (0, heads), 0)]
    split = lambda m: ((m % u_size) * group, (m % u_size + 1) * group)  # noqa: E731
    frames.append(frame("all-to-all: sequence for heads", own, {}, split,
                        sent(lambda e: e["label"] in ("a2a/q", "a2a/kv"))))
    for step in range(r_size):
        visiting = {e["mesh_rank"]: ring_pos[e["src"]] for e in forward
                    if e["kind"] in ("compute", "skip") and e["step"] == step and "src" in e}
        frames.append(frame(f"ring step {step}", own, visiting, split,
                            sent(lambda e, s=step: not e["label"].startswith("a2a/") and e["step"] == s)))
    frames.append(frame("all-to-all back: heads for sequence", piece, {}, lambda m: (0, heads),
                        sent(lambda e: e["label"] in ("a2a/out", "a2a/lse"))))
    return frames


def _mesh_bytes_rank(cfg: dict) -> dict:
    """On every rank of a launched group: bytes this rank sent per strategy, by transfer kind."""
    import ringlab
    rank, p = dist.get_rank(), dist.get_world_size()
    full = _random_qkv(cfg, cfg["seq_len"], "cpu")
    sent = {}
    for name, mesh in MESH_STRATEGIES.items():
        u, r = mesh(p)
        ulysses_group, ring_group = ringlab.mesh_groups(u, r)
        q, k, v = (ringlab.shard_mesh(x, rank, u, r, cfg["layout"]).contiguous() for x in full)
        posts = [e for e in _mesh_call(cfg, q, k, v, ulysses_group=ulysses_group, ring_group=ring_group)
                 if e["kind"] == "post"]
        a2a = sum(e["bytes"] for e in posts if e["label"].startswith("a2a/"))
        sent[name] = {"all-to-all": a2a, "ring": sum(e["bytes"] for e in posts) - a2a}
    return sent


def mesh_bytes(world_size: int = 4, seq_len: int = 256, *, heads: int = 4, kv_heads: int = 0, head_dim: int = 16,
               causal: bool = True, layout: str = "zigzag", timeout: float = 300) -> list[dict]:
    """Bytes each rank sends in one call (forward and backward) on ``world_size`` gloo ranks, as
    the ring (1 x P), Ulysses (P x 1) and the hybrid (2 x P/2), measured from their traces and
    from the planner (ringlab.planning.strategies.traffic): one row per strategy, rank, kind."""
    from ..engine.launch import launch
    from ..planning.strategies import traffic
    cfg = dict(seq_len=seq_len, heads=heads, kv_heads=kv_heads or heads, head_dim=head_dim, causal=causal,
               layout=layout)
    measured = launch(_mesh_bytes_rank, world_size, args=(cfg,), timeout=timeout)
    pb = Problem(seq_len=seq_len, heads=heads, head_dim=head_dim, dtype="float32", world_size=world_size,
                 causal=causal, layout=layout, kv_heads=kv_heads or heads)
    rows = []
    for name, mesh in MESH_STRATEGIES.items():
        planned = traffic(pb, *mesh(world_size))
        rows += [dict(strategy=name, rank=rank, kind=kind, measured=sent[name][kind], planned=planned[kind])
                 for rank, sent in enumerate(measured) for kind in planned]
    return rows


def strategy_map(tokens=(2**17, 2**18, 2**19, 2**20, 2**21), gpus=(8, 16, 32, 64), *, gpu: str = "h100",
                 gpus_per_node: int = 8, heads: int = 32, kv_heads: int = 8, head_dim: int = 128) -> list[dict]:
    """The planner's best strategy on each (N, GPUs): one row per cell with each strategy's time."""
    from ..planning.strategies import compare
    rows = []
    for n in tokens:
        for g in gpus:
            rep = compare(n, heads=heads, kv_heads=kv_heads, head_dim=head_dim, gpus=g, gpu=gpu,
                          gpus_per_node=gpus_per_node, fewest=False)
            rows.append(dict(tokens=n, gpus=g, best=rep.best, why=rep.why,
                             seconds={s: p.time_s for s, p in rep.plans.items() if p.possible and p.fits}))
    return rows
