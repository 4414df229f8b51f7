"""What an N-token run of ring (or ring-dilated) attention needs, per GPU.

    plan = planner.plan(2**30, heads=32, head_dim=128, dtype="bfloat16", gpu="h100",
                        segments=[4096, 65536, 2**30], rates=[1, 8, 64])
    print(plan.table());  plan.to_dict()

It answers: memory per rank by term (from :mod:`ringlab.planning.memory_model`, CUDA kernels), bytes
each rank sends per ring step and in total, FLOPs per step, whether a step's transfer hides
behind its compute on the device's links (NVLink inside a node, InfiniBand across nodes), the
smallest number of GPUs that fits N tokens, the largest N that fits a given number of GPUs,
and the shard size a ring step needs for its transfer to hide. Device profiles are editable
data in ``ringlab/planning/devices.json``.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import pathlib
from dataclasses import asdict, dataclass, field

import torch

from ..engine.checks import HEAD_OFFSETS, check_branches, check_choice
from ..engine.dilation import dilated_work_per_rank, score_pairs
from ..engine.layout import LAYOUTS, max_over_mean, work_per_rank
from ..engine.ring_dilated import rank_plan
from .memory_model import DTYPE_BYTES, Problem, estimate

DEVICES_FILE = pathlib.Path(__file__).with_name("devices.json")
MAX_GPUS = 1 << 20


@dataclass(frozen=True)
class Device:
    key: str
    name: str
    hbm_gib: float
    bf16_tflops: float
    fp32_tflops: float
    nvlink_gb_s: float
    ib_gb_s: float
    gpus_per_node: int
    usable: float
    efficiency: float

    @property
    def capacity(self) -> int:
        """Bytes a run may use on one GPU."""
        return int(self.hbm_gib * 2**30 * self.usable)

    def flops(self, dtype: str) -> float:
        """Attainable FLOP/s for attention in ``dtype``: peak x efficiency."""
        peak = self.bf16_tflops if DTYPE_BYTES[dtype] == 2 else self.fp32_tflops
        return peak * 1e12 * self.efficiency


def devices(path=DEVICES_FILE) -> dict[str, Device]:
    """The device profiles, by key (h100, h200, a100, ...). Raises ValueError naming the file
    when it is missing or malformed."""
    path = pathlib.Path(path)
    fields = [f for f in Device.__dataclass_fields__ if f != "key"]
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise ValueError(f"cannot read the device profiles {path}: {err.strerror or err}") from None
    except ValueError as err:
        raise ValueError(f"device profiles {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"device profiles {path} must be a JSON object of profiles by key, like {DEVICES_FILE}")
    out = {}
    for k, v in data.items():
        if k.startswith("_"):
            continue
        if not isinstance(v, dict) or set(v) != set(fields):
            raise ValueError(f"device profile {k!r} in {path} must have exactly the fields {', '.join(fields)}; "
                             f"got {sorted(v) if isinstance(v, dict) else type(v).__name__}")
        bad = [f for f in fields if f != "name" and (isinstance(v[f], bool) or not isinstance(v[f], (int, float))
                                                      or not math.isfinite(v[f]) or v[f] <= 0)]
        if bad:
            raise ValueError(f"device profile {k!r} in {path}: {', '.join(bad)} must be positive numbers")
        out[k] = Device(key=k, **v)
    return out


@dataclass
class Plan:
    problem: dict
    device: dict
    gpus: int
    tokens_per_gpu: int
    fits: bool
    memory: dict            # per rank: {"terms": {...}, "resident": {...}, "total": bytes, "capacity": bytes}
    communication: dict     # per rank: bytes per step, steps, totals
    compute: dict           # per rank: FLOPs per step and in total, seconds at the device's rate;
                            # with packed documents also score pairs and FLOPs of every rank
    overlap: dict           # per link: step compute vs transfer seconds, hides, shard needed
    min_gpus: int | None = None
    max_tokens: int | None = None
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """A readable report."""
        gib = lambda b: f"{b / 2**30:,.2f} GiB"  # noqa: E731
        p = self.problem
        kind = (f"ring-dilated, segments {list(p['segments'])}, rates {list(p['rates'])}"
                if p["segments"] else "ring (dense)")
        heads = f"H={p['heads']}" + (f", H_kv={p['kv_heads']}" if p["kv_heads"] != p["heads"] else "")
        lines = [f"{p['seq_len']:,} tokens, {kind}, {heads}, D={p['head_dim']}, {p['dtype']}, "
                 f"{'causal ' if p['causal'] else ''}{p['layout']}, "
                 f"{'forward+backward' if self.communication['backward'] else 'forward'}",
                 f"device: {self.device['name']} x {self.gpus} ({self.tokens_per_gpu:,} tokens per GPU)", "",
                 "memory per GPU"]
        for name, b in {**self.memory["resident"], **self.memory["terms"]}.items():
            lines.append(f"  {name:<38} {gib(b):>14}")
        lines += [f"  {'total':<38} {gib(self.memory['total']):>14}",
                  f"  {'usable HBM':<38} {gib(self.memory['capacity']):>14}   "
                  + ("fits" if self.fits else "DOES NOT FIT"), "",
                  "communication per GPU"]
        c = self.communication
        for label, b in c["per_step"].items():
            lines.append(f"  {label:<38} {b / 2**20:>11,.1f} MiB")
        lines += [f"  {'total, forward':<38} {gib(c['total_forward']):>14}"]
        if c["backward"]:
            lines.append(f"  {'total, forward+backward':<38} {gib(c['total']):>14}")
        k = self.compute
        lines += ["", "compute per GPU" + (" (the busiest rank)" if "documents" in k else ""),
                  f"  {'FLOPs per ring step (forward)':<38} {k['flops_per_step']:>14.3e}",
                  f"  {'FLOPs, whole call':<38} {k['flops_total']:>14.3e}",
                  f"  {'time at the device rate':<38} {k['seconds_total']:>12.2f} s"]
        if "documents" in k:
            lengths = k["documents"]
            lines += [f"  {len(lengths):,} packed documents, {min(lengths):,} to {max(lengths):,} tokens; "
                      f"imbalance (max/mean work) {k['imbalance']:.3f}"]
            lines += [f"  rank {r:<33} {f:>14.3e} FLOPs" for r, f in enumerate(k["flops_per_rank"])]
        lines += ["", "overlap: does a step's transfer hide behind its compute?"]
        if not self.overlap:
            lines.append("  every segment stays on its rank: nothing is sent")
        for link, o in self.overlap.items():
            lines.append(f"  {link:<18} compute {o['compute_s'] * 1e3:9.3f} ms  transfer {o['transfer_s'] * 1e3:9.3f} ms  "
                         f"{'hides' if o['hides'] else 'EXPOSED'}   (needs >= {o['tokens_per_gpu_needed']:,} tokens per GPU)")
        if self.min_gpus is not None:
            lines.append(f"\nminimum GPUs for {p['seq_len']:,} tokens: {self.min_gpus}")
        if self.max_tokens is not None:
            lines.append(f"largest sequence on {self.gpus} GPUs: {self.max_tokens:,} tokens")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _problem(tokens, heads, head_dim, dtype, segments, rates, gpus, batch, causal, layout, head_offsets, kv_heads):
    return Problem(seq_len=tokens, heads=heads, head_dim=head_dim, batch=batch, dtype=dtype, world_size=gpus,
                   causal=causal, segments=tuple(segments), rates=tuple(rates), head_offsets=head_offsets,
                   layout=layout, device="cuda", kv_heads=kv_heads)


def _splittable(pb: Problem) -> bool:
    return LAYOUTS[pb.layout].splits(pb.seq_len, pb.world_size)


def _memory(pb: Problem, backward: bool):
    mode, _ = pb.ring_config().model(simulated=False)
    return estimate(pb, mode, backward=backward)


def _fits(pb: Problem, dev: Device, backward: bool) -> bool:
    return _splittable(pb) and _memory(pb, backward).total <= dev.capacity


def _pairs_per_rank(pb: Problem) -> float:
    """Score pairs one rank computes in the forward (layouts balance causal work)."""
    if pb.segments:
        total = score_pairs(pb.seq_len, pb.heads, pb.segments, pb.rates, head_offsets=pb.head_offsets,
                            causal=pb.causal) / pb.heads
    else:
        n = pb.seq_len
        total = n * (n + 1) / 2 if pb.causal else n * n
    return total / pb.world_size


def flops_per_pair(pb: Problem, backward: bool) -> float:
    """FLOPs of one score pair of one head, over the batch: 4 per head dim forward (QK^T and
    PV), 3.5x that with the backward (5 matmuls to the forward's 2)."""
    return 4 * pb.batch * pb.head_dim * (3.5 if backward else 1.0)


def _communication(pb: Problem, backward: bool) -> dict:
    """Bytes one rank sends: per ring step (hop) and in total. Messages hold the K/V heads only
    (grouped-query attention: H_kv / H of the bytes)."""
    n, p, e = pb.local, pb.world_size, pb.item_bytes
    row = pb.batch * pb.head_dim
    per_step, fwd = {}, 0
    if not pb.segments:
        per_step[f"K/V block, each of {p - 1} steps"] = 2 * n * pb.kv_heads * row * e
        fwd = (p - 1) * 2 * n * pb.kv_heads * row * e
    else:
        plan = rank_plan(pb.ring_config(), 0)
        for b, ((w, r), subs) in enumerate(zip(zip(pb.segments, pb.rates), plan.subrings)):
            hop = sum(2 * s.sizes[s.members.index(0)] * row * e for s in subs)
            hops = max((s.hops() for s in subs), default=0)
            per_step[f"branch {b} (w={w}, r={r}), each of {hops} hops"] = hop
            fwd += hops * hop
    bwd = 0
    if backward:  # K/V again, and the dK/dV accumulators (float32; float64 for float64) riding along (and home)
        acc = pb.acc_bytes
        bwd = fwd + fwd * acc // e + (2 * n * pb.kv_heads * row * acc if not pb.segments and p > 1 else 0)
    return dict(per_step=per_step, total_forward=fwd, total=fwd + bwd, backward=backward)


def _overlap(pb: Problem, dev: Device) -> dict:
    """Per link: one ring step's compute vs its transfer (for ring-dilated, the branch whose
    transfer is hardest to hide). A step attends n/r selected rows to n/r rows, so compute
    falls as r^2 while the transfer falls as r: dilation needs larger shards to overlap.
    Grouped-query attention sends H_kv / H of the bytes for the same compute."""
    n, e, rate = pb.local, pb.item_bytes, dev.flops(pb.dtype)
    row = pb.batch * pb.heads * pb.head_dim
    kv = pb.kv_heads / pb.heads  # exactly 1.0 without grouped-query attention
    tile = 0.5 if pb.causal else 1.0  # balanced causal layouts compute half a tile per step
    piece = n // LAYOUTS[pb.layout].unit  # a segment crosses ranks unless it fits the pieces evenly
    rates = [1] if not pb.segments else [r for w, r in zip(pb.segments, pb.rates) if w > piece or piece % w]
    links = {"NVLink (in node)": dev.nvlink_gb_s * 1e9}
    if pb.world_size > dev.gpus_per_node:
        links["InfiniBand (nodes)"] = dev.ib_gb_s * 1e9
    out = {}
    for link, bw in links.items():
        for r in sorted(rates, reverse=True)[:1]:
            rows = math.ceil(n / r)
            compute = tile * 4 * row * rows * rows / rate
            transfer = 2 * rows * row * kv * e / bw
            out[link] = dict(compute_s=compute, transfer_s=transfer, hides=compute >= transfer, rate=r,
                             tokens_per_gpu_needed=math.ceil(r * e * rate * kv / (2 * bw * tile)))
    return out


def gpu_counts(pb: Problem) -> list[int]:
    """Every GPU count up to MAX_GPUS over which the layout splits pb.seq_len evenly."""
    unit = LAYOUTS[pb.layout].unit
    if pb.seq_len % unit:
        return []
    m = pb.seq_len // unit
    return [p for p in range(1, min(MAX_GPUS, m) + 1) if m % p == 0]


def _min_gpus(pb: Problem, dev: Device, backward: bool) -> tuple[int | None, str]:
    """The fewest GPUs that fit, among every count the layout allows, and if none does, why.

    Per-rank memory falls about as 1/P, so one cheap estimate on a single GPU gives a first
    guess; doubling from there brackets the answer and a binary search over the allowed counts
    between settles it. (Estimates of ring-dilated runs cost time in proportion to P.)"""
    at = lambda p: Problem(**{**asdict(pb), "world_size": p})  # noqa: E731
    fits = lambda i: _fits(at(counts[i]), dev, backward)  # noqa: E731
    counts = gpu_counts(pb)
    if not counts:
        unit = LAYOUTS[pb.layout].unit
        return None, (f"layout {pb.layout!r} cannot split {pb.seq_len:,} tokens evenly over any number of GPUs: "
                      f"it cuts the sequence into {unit} x GPUs equal chunks, so it needs a multiple of {unit}. "
                      f"Pad to {-(-pb.seq_len // unit) * unit:,} tokens, or use layout 'contiguous'")
    guess = _memory(at(1), backward).total / dev.capacity
    hi = min(bisect.bisect_left(counts, guess), len(counts) - 1)
    lo = -1  # below hi; -1: nothing below is known not to fit
    while not fits(hi):
        if hi == len(counts) - 1:
            need = _memory(at(counts[-1]), backward).total
            return None, (f"{pb.seq_len:,} tokens do not fit in memory on any GPU count up to {MAX_GPUS:,} "
                          f"that layout {pb.layout!r} can split them over ({len(counts)} counts; the largest, "
                          f"{counts[-1]:,} {dev.name}s, needs {need / 2**30:,.2f} GiB per GPU of "
                          f"{dev.capacity / 2**30:,.2f} GiB usable). Pad the sequence to a length with more "
                          "divisors (a multiple of a power of two), or shorten it")
        lo, hi = hi, min(bisect.bisect_left(counts, 2 * counts[hi]), len(counts) - 1)
    while lo == -1 and hi > 0:
        below = bisect.bisect_right(counts, counts[hi] // 2) - 1
        if fits(below):
            hi = below
        else:
            lo = below
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return counts[hi], ""


def _max_tokens(pb: Problem, dev: Device, backward: bool) -> int | None:
    """The longest sequence (a multiple of what the layout needs) that fits on pb.world_size
    GPUs. Memory grows about linearly in N at fixed P: scale from the current N, then step."""
    unit = LAYOUTS[pb.layout].unit * pb.world_size
    at = lambda m: Problem(**{**asdict(pb), "seq_len": m * unit})  # noqa: E731
    m = max(1, pb.seq_len // unit)
    m = max(1, int(m * dev.capacity / _memory(at(m), backward).total))
    while m > 1 and not _fits(at(m), dev, backward):
        m = max(1, int(m * 0.98))
    if not _fits(at(m), dev, backward):
        return None
    while _fits(at(int(m * 1.01) + 1), dev, backward):
        m = int(m * 1.01) + 1
    return m * unit


def document_lengths(spec, tokens: int, multiple: int = 1, seed: int = 0) -> list[int]:
    """The document lengths of a packed ``tokens``-token sequence. ``spec``: a list of lengths
    (adding up to ``tokens``), or "exp:MEAN": lengths drawn from an exponential distribution of
    mean MEAN (with ``seed``), each rounded to a positive multiple of ``multiple`` (what a layout
    that splits every document needs), the last one cut to what is left."""
    if isinstance(spec, str):
        kind, _, mean = spec.partition(":")
        if kind != "exp" or not mean:
            raise ValueError(f"documents must be a list of lengths or 'exp:MEAN', got {spec!r}")
        mean = parse_tokens(mean)
        g = torch.Generator().manual_seed(seed)
        lengths, left = [], tokens
        while left > 0:
            draw = float(torch.empty(1).exponential_(1 / mean, generator=g))
            n = min(left, max(1, round(draw / multiple)) * multiple)
            lengths.append(n)
            left -= n
        return lengths
    lengths = [parse_tokens(x) for x in spec]
    if sum(lengths) != tokens:
        raise ValueError(f"the document lengths add up to {sum(lengths):,} tokens, not the {tokens:,} planned")
    return lengths


def _packed_compute(pb: Problem, documents, per_pair: float, heads: tuple[int, int] | None = None) -> dict:
    """Score pairs (over the heads h0 <= h < h1 of ``heads``, default all) and FLOPs of every
    rank when packed documents are separate sequences: dense attention within each document,
    or its own dilated segments. ``per_pair``: the FLOPs of one pair (:func:`flops_per_pair`)."""
    multiple = LAYOUTS[pb.layout].document_unit(pb.world_size)
    lengths = document_lengths(documents, pb.seq_len, multiple)
    cu = [0, *itertools.accumulate(lengths)]
    h0, h1 = heads or (0, pb.heads)
    if pb.segments:
        pairs = dilated_work_per_rank(pb.layout, pb.world_size, cu, pb.heads, pb.segments, pb.rates,
                                      head_offsets=pb.head_offsets, causal=pb.causal, heads=heads)
    else:
        pairs = [(h1 - h0) * x for x in work_per_rank(pb.layout, pb.world_size, cu, pb.causal)]
    return dict(documents=lengths, pairs_per_rank=pairs, flops_per_rank=[per_pair * x for x in pairs],
                imbalance=max_over_mean(pairs))


def parse_tokens(text) -> int:
    """'1G' = 2**30, '512K' = 2**19, '1M', '65536', '1e9'."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(s[-1:], 1)
    body = s[:-1] if mult > 1 else s
    try:
        value = float(body) * mult
    except ValueError:
        raise ValueError(f"tokens must be a number like 65536, 1e9, 512K or 1G; got {text!r}") from None
    if not math.isfinite(value) or value != int(value) or value < 1:
        raise ValueError(f"tokens must be a positive whole number, got {text!r}")
    return int(value)


def plan(tokens, *, heads: int, head_dim: int, dtype: str = "bfloat16", segments=(), rates=(),
         gpu: str = "h100", gpus: int | None = None, batch: int = 1, causal: bool = True,
         layout: str = "zigzag", head_offsets: str = "interleaved", backward: bool = True,
         device_profiles=None, kv_heads: int | None = None, documents=None) -> Plan:
    """Plan ring (or, with segments and rates, ring-dilated) attention over ``tokens`` tokens.
    ``kv_heads``: K/V heads of grouped-query attention (a divisor of ``heads``; default
    ``heads``): k, v, their gradients and every message hold that many heads. ``documents``:
    packed documents, as :func:`document_lengths` takes them (with segments each document has
    its own); compute is then
    reported per rank, and the busiest rank's sets the time. Memory is the same as for one
    sequence: no mask is formed.

    Without ``gpus``, picks the fewest GPUs that fit, among every count the layout can split
    ``tokens`` over; if none fits, the ValueError says which rule failed (the layout's split or
    memory). With it, also reports the largest sequence that fits on that many GPUs.
    """
    tokens = parse_tokens(tokens)
    profiles = device_profiles or devices()
    if gpu not in profiles:
        raise ValueError(f"unknown gpu {gpu!r}; known: {', '.join(sorted(profiles))} (edit {DEVICES_FILE.name} to add one)")
    kv_heads = heads if kv_heads is None else kv_heads
    for name, val in (("heads", heads), ("head_dim", head_dim), ("batch", batch), ("kv_heads", kv_heads)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if heads % kv_heads:
        raise ValueError(f"kv_heads ({kv_heads}) must divide heads ({heads}): each K/V head serves "
                         "heads / kv_heads query heads")
    if gpus is not None and (isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1):
        raise ValueError(f"gpus must be a positive int, got {gpus!r}")
    check_choice("dtype", dtype, tuple(DTYPE_BYTES))
    check_choice("layout", layout, tuple(LAYOUTS))
    check_choice("head_offsets", head_offsets, HEAD_OFFSETS)
    if segments or rates:
        segments, rates = check_branches(segments, rates)
        if layout == "striped":
            raise ValueError("ring-dilated attention supports layouts 'contiguous' and 'zigzag'")
    dev = profiles[gpu]
    pb = _problem(tokens, heads, head_dim, dtype, segments, rates, gpus or 1, batch, causal, layout, head_offsets,
                  kv_heads)
    min_gpus, why = _min_gpus(pb, dev, backward)
    if gpus is None:
        if min_gpus is None:
            raise ValueError(why)
        pb = Problem(**{**asdict(pb), "world_size": min_gpus})
    elif not _splittable(pb):
        unit = (2 if layout == "zigzag" else 1) * gpus
        raise ValueError(f"layout {layout!r} cannot split {tokens:,} tokens over {gpus} GPUs: use a multiple of {unit}")
    est = _memory(pb, backward)
    per_pair = flops_per_pair(pb, backward)
    packed = _packed_compute(pb, documents, per_pair) if documents is not None else {}
    flops = max(packed["flops_per_rank"]) if packed else per_pair * pb.heads * _pairs_per_rank(pb)
    flops_fwd = flops / (3.5 if backward else 1.0)
    steps = pb.world_size
    return Plan(
        problem=asdict(pb), device=asdict(dev), gpus=pb.world_size, tokens_per_gpu=pb.local,
        fits=est.total <= dev.capacity,
        memory=dict(terms=est.terms, resident=est.resident, total=est.total, capacity=dev.capacity),
        communication=_communication(pb, backward),
        compute=dict(flops_per_step=flops_fwd / steps, flops_total=flops,
                     seconds_total=flops / dev.flops(dtype), **packed),
        overlap=_overlap(pb, dev), min_gpus=min_gpus,
        max_tokens=_max_tokens(pb, dev, backward) if gpus is not None else None,
        notes=["memory: per GPU for one attention layer (q, k, v and the output gradient resident, plus the "
               "call's peak); activations of other layers, weights and optimizer state come on top",
               "1G = 2**30 tokens; FLOPs: 4 per score pair per head dim forward, 3.5x that with backward"])
