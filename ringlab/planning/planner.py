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

from ..engine.checks import HEAD_OFFSETS, check_branches, check_choice, check_int, dtype_name
from ..engine.dilation import dilated_work_per_rank, score_pairs
from ..engine.layout import LAYOUTS, max_over_mean, with_pieces, work_per_rank
from ..engine.ring_dilated import rank_plan
from .memory_model import DTYPE_BYTES, Problem, estimate

DEVICES_FILE = pathlib.Path(__file__).with_name("devices.json")
MAX_GPUS = 1 << 20
MAX_DOCUMENTS = 1 << 22  # of one exp:MEAN draw: each is a Python int, and the plan counts work per document


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


# What a profile's numbers may be: beyond these, a typo (units, a fraction as a percentage).
PROFILE_RANGES = {"hbm_gib": (2**-10, 2**20), "bf16_tflops": (1e-3, 1e6), "fp32_tflops": (1e-3, 1e6),
                  "nvlink_gb_s": (1e-3, 1e6), "ib_gb_s": (1e-3, 1e6), "gpus_per_node": (1, 1024),
                  "usable": (0.01, 1), "efficiency": (0.001, 1)}


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
        for f, (lo, hi) in PROFILE_RANGES.items():
            x = v[f]
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not lo <= x <= hi or \
                    (f == "gpus_per_node" and x != int(x)):
                raise ValueError(f"device profile {k!r} in {path}: {f} must be a number from {lo:g} to {hi:g}"
                                 f"{' (a whole number)' if f == 'gpus_per_node' else ''}, got {x!r}")
        out[k] = Device(key=k, **{**v, "gpus_per_node": int(v["gpus_per_node"])})
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
        width = max([38, *map(len, c["per_step"])])  # a long branch label widens its section
        for label, b in c["per_step"].items():
            lines.append(f"  {label:<{width}} {b / 2**20:>11,.1f} MiB")
        lines += [f"  {'total, forward':<{width}} {gib(c['total_forward']):>14}"]
        if c["backward"]:
            lines.append(f"  {'total, forward+backward':<{width}} {gib(c['total']):>14}")
        k = self.compute
        lines += ["", "compute per GPU" + (" (the busiest rank)" if "documents" in k else ""),
                  f"  {'FLOPs per ring step (forward)':<38} {k['flops_per_step']:>14.3e}",
                  f"  {'FLOPs, whole call':<38} {k['flops_total']:>14.3e}",
                  f"  {'time at the device rate':<38} {k['seconds_total']:>12.2f} s"]
        if "documents" in k:
            lengths = k["documents"]
            lines += [f"  {len(lengths):,} packed documents, {min(lengths):,} to {max(lengths):,} tokens; "
                      f"imbalance (max/mean work) {k['imbalance']:.3f}"]
            flops = k["flops_per_rank"]
            if len(flops) <= 16:
                lines += [f"  rank {r:<33} {f:>14.3e} FLOPs" for r, f in enumerate(flops)]
            else:  # every rank's is in --json
                busiest = max(range(len(flops)), key=flops.__getitem__)
                lines += [f"  {f'busiest rank ({busiest})':<38} {flops[busiest]:>14.3e} FLOPs",
                          f"  {f'mean of the {len(flops):,} ranks':<38} {sum(flops) / len(flops):>14.3e} FLOPs",
                          f"  {'least busy rank':<38} {min(flops):>14.3e} FLOPs"]
        lines += ["", "overlap: does a step's transfer hide behind its compute?"]
        if not self.overlap:
            lines.append("  every segment stays on its rank: nothing is sent")
        for link, o in self.overlap.items():
            lines.append(f"  {link:<18} compute {o['compute_s'] * 1e3:9.3f} ms  transfer {o['transfer_s'] * 1e3:9.3f} ms  "
                         f"{'hides' if o['hides'] else 'EXPOSED':<7}  (needs >= {o['tokens_per_gpu_needed']:,} tokens per GPU)")
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


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _communication(pb: Problem, backward: bool) -> dict:
    """Bytes one rank sends: per ring step (hop) and in total. Messages hold the K/V heads only
    (grouped-query attention: H_kv / H of the bytes)."""
    n, p, e = pb.local, pb.world_size, pb.item_bytes
    row = pb.batch * pb.head_dim
    per_step, fwd = {}, 0
    if not pb.segments:
        per_step[f"K/V block, each of {_count(p - 1, 'step')}"] = 2 * n * pb.kv_heads * row * e
        fwd = (p - 1) * 2 * n * pb.kv_heads * row * e
    else:
        plan = rank_plan(pb.ring_config(), 0)
        for b, ((w, r), subs) in enumerate(zip(zip(pb.segments, pb.rates), plan.subrings)):
            hop = sum(2 * s.sizes[s.members.index(0)] * row * e for s in subs)
            hops = max((s.hops() for s in subs), default=0)
            per_step[f"branch {b} (w={w}, r={r}), each of {_count(hops, 'hop')}"] = hop
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


def _max_tokens(pb: Problem, dev: Device, backward: bool, total: int) -> int | None:
    """The longest sequence (a multiple of what the layout needs) that fits on pb.world_size
    GPUs, given pb's own estimate ``total``. Memory grows about linearly in N at fixed P: secant
    steps from pb.seq_len, then 1% steps (an estimate of a long ring-dilated run takes seconds)."""
    unit = LAYOUTS[pb.layout].unit * pb.world_size
    known = {pb.seq_len // unit: total}  # pb.seq_len splits: it is a multiple of unit

    def memory(m):
        if m not in known:
            known[m] = _memory(Problem(**{**asdict(pb), "seq_len": m * unit}), backward).total
        return known[m]

    m0 = pb.seq_len // unit
    m = max(1, int(m0 * dev.capacity / total))
    for _ in range(3):
        if abs(m - m0) <= m / 200 or memory(m) == memory(m0):
            break
        m0, m = m, max(1, int(m + (dev.capacity - memory(m)) * (m - m0) / (memory(m) - memory(m0))))
    while m > 1 and memory(m) > dev.capacity:
        m = max(1, int(m * 0.995))
    if memory(m) > dev.capacity:
        return None
    while memory(int(m * 1.01) + 1) <= dev.capacity:
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
        check_int("multiple", multiple)
        expected = tokens / max(mean, multiple)
        if expected > MAX_DOCUMENTS:
            raise ValueError(f"documents {spec!r} over {tokens:,} tokens would be about {expected:,.0f} documents; the "
                             f"planner takes up to {MAX_DOCUMENTS:,}: use a mean of at least "
                             f"{-(-tokens // MAX_DOCUMENTS):,}")
        g = torch.Generator().manual_seed(seed)
        chunks, left = [], tokens
        while left > 0:  # float32 draws in blocks: the same stream as one draw at a time
            draws = torch.empty(int(1.2 * left / mean) + 64).exponential_(1 / mean, generator=g)
            n = (draws.double() / multiple).round().clamp(min=1).long() * multiple
            end = n.cumsum(0)
            cut = int(torch.searchsorted(end, left))  # the document that reaches the end, if this block has it
            if cut < len(n):
                n = n[:cut + 1]
                n[-1] -= int(end[cut]) - left
            chunks.append(n)
            left -= int(n.sum())
        return torch.cat(chunks).tolist()
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
    """'1G' = 2**30, '512K' = 2**19, '1M', '65536', '1e9', or a positive int."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        s = str(text).strip().upper()
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(s[-1:], 1)
        body = s[:-1] if mult > 1 else s
        try:
            value = int(body) * mult  # exact, however long
        except ValueError:
            try:
                value = float(body) * mult
            except ValueError:
                raise ValueError(f"tokens must be a number like 65536, 1e9, 512K or 1G; got {text!r}") from None
    if not math.isfinite(value) or value != int(value) or value < 1:
        raise ValueError(f"tokens must be a positive whole number, got {text!r}")
    return int(value)


def check_problem(*, heads, head_dim, batch, kv_heads, dtype, causal, layout, head_offsets, segments, rates):
    """The checks every planner entry point makes (ValueError naming the argument; TypeError for
    a count that is not an int). Returns
    (kv_heads, defaulted to heads; dtype's torch name; segments; rates)."""
    kv_heads = heads if kv_heads is None else kv_heads
    for name, val in (("heads", heads), ("head_dim", head_dim), ("batch", batch), ("kv_heads", kv_heads)):
        check_int(name, val)
    if heads % kv_heads:
        raise ValueError(f"kv_heads ({kv_heads}) must divide heads ({heads}): each K/V head serves "
                         "heads / kv_heads query heads")
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be True or False, got {causal!r}")
    dtype = dtype_name(dtype)
    check_choice("layout", layout, tuple(LAYOUTS))
    check_choice("head_offsets", head_offsets, HEAD_OFFSETS)
    if segments or rates:
        segments, rates = check_branches(segments, rates)
        if not LAYOUTS[layout].has_pieces:
            raise ValueError(f"ring-dilated attention needs a layout whose ranks hold whole chunks "
                             f"({', '.join(with_pieces())}), got {layout!r}")
    return kv_heads, dtype, tuple(segments), tuple(rates)


def device_profile(gpu: str, profiles=None) -> Device:
    """The profile of ``gpu`` in ``profiles`` (default: :func:`devices`)."""
    profiles = profiles or devices()
    if gpu not in profiles:
        raise ValueError(f"unknown gpu {gpu!r}; known: {', '.join(sorted(profiles))} (edit {DEVICES_FILE.name} to add one)")
    return profiles[gpu]


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
    dev = device_profile(gpu, device_profiles)
    if gpus is not None:
        check_int("gpus", gpus)
    kv_heads, dtype, segments, rates = check_problem(
        heads=heads, head_dim=head_dim, batch=batch, kv_heads=kv_heads, dtype=dtype, causal=causal, layout=layout,
        head_offsets=head_offsets, segments=segments, rates=rates)
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
        max_tokens=_max_tokens(pb, dev, backward, est.total) if gpus is not None else None,
        notes=["memory: per GPU for one attention layer (q, k, v and the output gradient resident, plus the "
               "call's peak); activations of other layers, weights and optimizer state come on top",
               "1G = 2**30 tokens; FLOPs: 4 per score pair per head dim forward, 3.5x that with backward"])
