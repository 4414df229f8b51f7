"""Which way to spread a sequence over G GPUs: the ring, Ulysses or their hybrid (dense or dilated).

    report = strategies.compare(2**20, heads=32, kv_heads=8, head_dim=128, gpus=32, gpu="h100")
    print(report.table());  report.best

A strategy is a U x R mesh (ringlab.engine.ulysses): ring = 1 x G, Ulysses = G x 1, hybrid =
U x G/U with U the largest divisor of H_kv and of the GPUs per node (Ulysses inside a node).
For each it reports, per GPU: memory by term, the bytes of each transfer and the link it
takes (NVLink inside a node, InfiniBand across nodes; the worst GPU), whether it hides behind
compute, and the fewest GPUs that fit N tokens. ``best`` is the strategy that fits with the
least time, compute plus the transfer time that does not hide. Link and device numbers come
from the editable profiles (``devices.json``).

With packed documents a GPU's compute is that of the busiest rank: its ring rank's score
pairs (``layout.work_per_rank``, or ``dilation.dilated_work_per_rank``, over the R ring ranks)
for the H/U heads it holds. Ulysses alone is balanced whatever the documents; a ring is as
balanced as its layout keeps them. Memory and bytes do not change (no mask is formed), so
documents move ``best`` through compute only.

The bytes are the engine's, message for message (tests compare them with traces):
  * all-to-all: each of the forward's q, k/v, out (input dtype) and lse (accumulation dtype),
    and the backward's k/v, q, dout, out, lse (dlse) then dq, dk/dv, sends (U-1)/U of the tensor;
    it cannot overlap attention, which needs all tokens of its heads first;
  * ring: the ring's K/V hops and dK/dV accumulators (``planner``) on H/U heads over R ranks,
    each hop hiding behind one step's compute when the link is fast enough.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, replace

from ..engine.checks import check_int
from ..engine.layout import LAYOUTS, get
from .memory_model import Problem, estimate
from .planner import (Device, _communication, _overlap, _packed_compute, _pairs_per_rank, check_problem,
                      device_profile, document_lengths, flops_per_pair, parse_tokens)

STRATEGIES = ("ring", "ulysses", "hybrid")
NVLINK, IB = "NVLink", "InfiniBand"


def mesh_problem(pb: Problem, ulysses: int, ring: int) -> Problem:
    """What one rank runs after the all-to-all: the ring on H/U heads over R ranks."""
    return replace(pb, heads=pb.heads // ulysses, kv_heads=pb.kv_heads // ulysses, world_size=ring)


def traffic(pb: Problem, ulysses: int, ring: int, *, backward: bool = True, dlse: bool = False) -> dict:
    """Bytes one GPU sends in one call on a ``ulysses`` x ``ring`` mesh over ``pb.seq_len``
    tokens, as the engine's trace counts them: {"all-to-all": ..., "ring": ...}. ``dlse``: the
    loss used lse (the backward then also trades its gradient)."""
    u, n = ulysses, pb.seq_len // (ulysses * ring)
    e, acc = pb.item_bytes, pb.acc_bytes
    q, kv, lse = pb.elements(n), 2 * pb.kv_elements(n), pb.lse_elements(n)
    sent = lambda elements: elements // u * (u - 1)  # noqa: E731 - all but one's own piece
    a2a = sent(2 * q + kv) * e + sent(lse) * acc  # q, k/v; out, lse
    if backward:  # k/v, q, dout, out, lse (dlse) to heads; dq, dk/dv back
        a2a += sent(3 * q + kv) * e + sent(lse) * acc * (2 if dlse else 1) + sent(q + kv) * e
    return {"all-to-all": a2a, "ring": _communication(mesh_problem(pb, u, ring), backward)["total"]}


def memory(pb: Problem, ulysses: int, ring: int, backward: bool = True) -> dict:
    """Per-GPU memory by term: the ring's (or ring-dilated's) on H/U heads over R ranks (the
    same resident inputs: N/(U R) tokens of H heads is N/R tokens of H/U), plus the
    all-to-all's head-sharded copies that live through it: k/v and q received; in the backward
    also dout, out and lse, and k/v stacked once more. When that ring is small (dilated
    attention), the peak comes earlier instead, as K/V joins its pieces: k/v stacked to send,
    the pieces of k/v and q received, and the joined k/v. Tests measure both."""
    small = mesh_problem(pb, ulysses, ring)
    est = estimate(small, "ring_dilated" if pb.segments else "ring", backward=backward)
    terms = dict(est.terms)
    if ulysses > 1:
        u, n = ulysses, pb.seq_len // ring
        kv, q = 2 * small.kv_elements(n) * pb.item_bytes, small.elements(n) * pb.item_bytes
        terms["all-to-all copies"] = (2 * kv + 3 * q + small.lse_elements(n) * pb.acc_bytes) if backward else kv + q
        joining = kv * (3 * u - 1) // u + q * (u - 1) // u
        if joining > sum(terms.values()):
            terms = {"all-to-all: K/V joining": joining}
    return dict(terms=terms, resident=est.resident, total=sum(terms.values()) + sum(est.resident.values()))


def factorization(strategy: str, gpus: int, kv_heads: int, per_node: int) -> tuple[int, int] | str:
    """(U, R) of ``strategy`` on ``gpus`` GPUs, or why it has none."""
    if strategy == "ring":
        return 1, gpus
    if strategy == "ulysses":
        if kv_heads % gpus:
            return (f"Ulysses on {gpus} GPUs needs {gpus} to divide the {kv_heads} K/V heads "
                    f"(at most {kv_heads} GPUs)")
        return gpus, 1
    u = max(d for d in range(1, per_node + 1) if kv_heads % d == 0 and per_node % d == 0 and gpus % d == 0)
    if u == 1 or u == gpus:
        return (f"no hybrid on {gpus} GPUs: the Ulysses size must divide the {kv_heads} K/V heads, the "
                f"{per_node} GPUs per node and {gpus}, and leave a ring of at least 2")
    return u, gpus // u


def _splits(pb: Problem, u: int, r: int, documents=None) -> bool:
    """Whether the layout splits the sequence over R ring ranks (and every packed document, of
    the lengths ``documents``, where it cuts each one), and a ring shard over U."""
    lay = LAYOUTS[pb.layout]
    return (lay.splits(pb.seq_len, r) and (pb.seq_len // r) % u == 0
            and all(n % lay.document_unit(r) == 0 for n in documents or ()))


def _links(dev: Device, u: int, r: int, per_node: int, nbytes: dict) -> dict:
    """Per link, the bytes the worst GPU sends on it. Ulysses groups are U consecutive ranks:
    inside a node when U <= GPUs per node, else (U - per node) / (U - 1) of each GPU's
    all-to-all peers sit in other nodes. Ring neighbours are U ranks apart: the ring crosses
    nodes when U R > GPUs per node, and the GPU at a node's edge sends all its hops on IB."""
    a2a, hops = nbytes["all-to-all"], nbytes["ring"]
    off = max(0, u - per_node) * a2a // (u - 1) if u > 1 else 0
    ring_ib = u * r > per_node
    return {NVLINK: a2a - off + (0 if ring_ib else hops), IB: off + (hops if ring_ib else 0)}


@dataclass
class StrategyPlan:
    strategy: str
    possible: bool
    why: str = ""
    ulysses: int = 0
    ring: int = 0
    memory: dict = field(default_factory=dict)   # terms, resident, total (bytes per GPU)
    fits: bool = False
    bytes: dict = field(default_factory=dict)    # per link: bytes the worst GPU sends in one call
    transfers: list = field(default_factory=list)  # one per transfer kind: bytes, link, seconds, hides
    compute_s: float = 0.0
    exposed_s: float = 0.0                       # transfer time that does not hide behind compute
    fewest_gpus: int | None = None
    packed: dict = field(default_factory=dict)   # packed documents: pairs_per_rank, flops_per_rank (ring
                                                 # ranks, H/U heads each) and their imbalance

    @property
    def time_s(self) -> float:
        return self.compute_s + self.exposed_s


def _plan_one(pb: Problem, dev: Device, strategy: str, gpus: int, per_node: int, backward: bool,
              fewest: bool, documents=None) -> StrategyPlan:
    mesh = factorization(strategy, gpus, pb.kv_heads, per_node)
    fewest = fewest_gpus(pb, dev, strategy, per_node, backward, documents=documents) if fewest else None
    if isinstance(mesh, str):
        return StrategyPlan(strategy, False, mesh, fewest_gpus=fewest)
    u, r = mesh
    if not _splits(pb, u, r, documents):
        unit = LAYOUTS[pb.layout].document_unit(r)
        each = f", every packed document into multiples of {unit}" if documents and unit > 1 else ""
        return StrategyPlan(strategy, False, f"layout {pb.layout!r} cannot split {pb.seq_len:,} tokens over "
                            f"{r} ring ranks and then {u} Ulysses ranks{each}", u, r, fewest_gpus=fewest)
    mem = memory(pb, u, r, backward)
    nbytes = traffic(pb, u, r, backward=backward)
    links = _links(dev, u, r, per_node, nbytes)
    small, packed = mesh_problem(pb, u, r), {}
    if documents is None:  # dilated or dense: every GPU computes 1/G of the pairs
        flops = flops_per_pair(pb, backward) * pb.heads * _pairs_per_rank(replace(pb, world_size=1)) / gpus
    else:  # the busiest rank's pairs: its ring rank's rows for the H/U heads it holds after the
        # all-to-all (dilated: each head group has its own offsets, so each is counted)
        size, ring_pb = pb.heads // u, replace(pb, world_size=r)
        groups = [_packed_compute(ring_pb, documents, flops_per_pair(pb, backward), heads=(i * size, i * size + size))
                  for i in range(u if pb.segments else 1)]
        packed = max(groups, key=lambda x: max(x["pairs_per_rank"]))
        del packed["documents"]  # the report holds them once
        flops = max(packed["flops_per_rank"])
    compute = flops / dev.flops(pb.dtype)
    transfers, exposed = [], 0.0
    if u > 1:
        off = links[IB] - (nbytes["ring"] if u * r > per_node else 0)
        seconds = (nbytes["all-to-all"] - off) / (dev.nvlink_gb_s * 1e9) + off / (dev.ib_gb_s * 1e9)
        transfers.append(dict(name="all-to-all", bytes=nbytes["all-to-all"], link=IB if off else NVLINK,
                              seconds=seconds, hides=False, why="attention needs all tokens of its heads first"))
        exposed += seconds
    if r > 1:
        # Ring hops: one step's compute against one hop, on the slowest link a ring step uses.
        step = _overlap(small, replace(dev, gpus_per_node=max(1, per_node // u)))
        link, o = (IB, step.get("InfiniBand (nodes)")) if u * r > per_node else (NVLINK, step.get("NVLink (in node)"))
        hops = 2 * r - 1 if backward else r - 1  # forward hops, then the backward's
        bandwidth = (dev.ib_gb_s if link == IB else dev.nvlink_gb_s) * 1e9
        if o is None:  # dilated, every segment inside a rank's pieces: no hop to hide
            o = dict(compute_s=0.0, transfer_s=0.0, hides=True)
        transfers.append(dict(name="ring hops", bytes=nbytes["ring"], link=link, seconds=nbytes["ring"] / bandwidth,
                              hides=o["hides"], why=f"a step's compute {o['compute_s'] * 1e3:.3f} ms vs its hop "
                              f"{o['transfer_s'] * 1e3:.3f} ms"))
        exposed += max(0.0, o["transfer_s"] - o["compute_s"]) * hops
    return StrategyPlan(strategy, True, "", u, r, mem, mem["total"] <= dev.capacity, links, transfers, compute,
                        exposed, fewest, packed)


def fewest_gpus(pb: Problem, dev: Device, strategy: str, per_node: int, backward: bool,
                most: int = 1 << 16, *, documents=None) -> int | None:
    """The fewest GPUs on which ``strategy`` fits N tokens in memory (None: none up to ``most``),
    among the counts whose mesh splits the sequence (and the packed ``documents``, lengths).
    Memory per GPU falls as GPUs are added, so a binary search over those counts settles it."""
    meshes = [factorization(strategy, g, pb.kv_heads, per_node)
              for g in (range(1, pb.kv_heads + 1) if strategy == "ulysses" else _powers_and_multiples(most))]
    counts = [u * r for u, r in (m for m in meshes if not isinstance(m, str)) if _splits(pb, u, r, documents)]

    def fits(g):
        return memory(pb, *factorization(strategy, g, pb.kv_heads, per_node), backward)["total"] <= dev.capacity
    lo, hi = 0, len(counts)
    while lo < hi:  # the first count that fits
        mid = (lo + hi) // 2
        if fits(counts[mid]):
            hi = mid
        else:
            lo = mid + 1
    return counts[lo] if lo < len(counts) and fits(counts[lo]) else None


def _powers_and_multiples(most: int) -> list[int]:
    """GPU counts worth trying: 1..8, then multiples of 8 (whole nodes) up to ``most``."""
    return [g for g in range(1, most + 1) if g <= 8 or g % 8 == 0]


@dataclass
class Report:
    problem: dict
    device: dict
    gpus: int
    gpus_per_node: int
    plans: dict            # strategy -> StrategyPlan
    best: str | None
    why: str
    documents: list | None = None  # packed documents' lengths

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def table(self) -> str:
        gib = lambda b: f"{b / 2**30:,.2f} GiB"  # noqa: E731
        p = self.problem
        dilated = (f"dilated, segments {list(p['segments'])}, rates {list(p['rates'])}, " if p["segments"] else "")
        lines = [f"{p['seq_len']:,} tokens, {dilated}H={p['heads']}, H_kv={p['kv_heads']}, D={p['head_dim']}, {p['dtype']}, "
                 f"{'causal ' if p['causal'] else ''}{p['layout']}, on {self.gpus} x {self.device['name']} "
                 f"({self.gpus_per_node} per node; NVLink {self.device['nvlink_gb_s']:g} GB/s, "
                 f"InfiniBand {self.device['ib_gb_s']:g} GB/s per GPU)"]
        if self.documents:
            lines.append(f"{len(self.documents):,} packed documents, {min(self.documents):,} to "
                         f"{max(self.documents):,} tokens: compute is the busiest ring rank's")
        for name, sp in self.plans.items():
            lines += ["", f"{name}" + (f"  (U={sp.ulysses} x R={sp.ring})" if sp.possible else "")]
            if not sp.possible:
                lines.append(f"  not possible: {sp.why}")
            else:
                lines.append("  memory per GPU")
                for term, b in {**sp.memory["resident"], **sp.memory["terms"]}.items():
                    lines.append(f"    {term:<36} {gib(b):>12}")
                lines.append(f"    {'total':<36} {gib(sp.memory['total']):>12}   "
                             + ("fits" if sp.fits else "DOES NOT FIT"))
                lines.append(f"  bytes per GPU: NVLink {gib(sp.bytes[NVLINK])}, InfiniBand {gib(sp.bytes[IB])}")
                for t in sp.transfers:
                    lines.append(f"    {t['name']:<12} {gib(t['bytes']):>12} on {t['link']:<10} {t['seconds'] * 1e3:10.2f} ms  "
                                 f"{'hides' if t['hides'] else 'EXPOSED'} ({t['why']})")
                lines.append(f"  compute {sp.compute_s * 1e3:,.1f} ms + exposed transfers {sp.exposed_s * 1e3:,.1f} ms "
                             f"= {sp.time_s * 1e3:,.1f} ms")
                if sp.packed:
                    lines.append(f"  imbalance of the ring ranks' work (max/mean) {sp.packed['imbalance']:.3f}")
            lines.append(f"  fewest GPUs for {p['seq_len']:,} tokens: "
                         + (f"{sp.fewest_gpus}" if sp.fewest_gpus else "none (memory or head count)"))
        lines += ["", f"best: {self.best}: {self.why}" if self.best else f"best: none. {self.why}"]
        return "\n".join(lines)


def compare(tokens, *, heads: int, head_dim: int, gpus: int, kv_heads: int | None = None, dtype: str = "bfloat16",
            gpu: str = "h100", gpus_per_node: int | None = None, batch: int = 1, causal: bool = True,
            layout: str = "zigzag", backward: bool = True, strategies=STRATEGIES, device_profiles=None,
            fewest: bool = True, segments=(), rates=(), head_offsets: str = "interleaved", documents=None) -> Report:
    """Plan attention over ``tokens`` on ``gpus`` GPUs for each of ``strategies`` and name the
    best (see the module doc): dense, or dilated with ``segments`` and ``rates`` (the ring
    dimension then runs ring-dilated attention, and needs a layout with whole pieces).
    ``gpus_per_node`` defaults to the device profile's. ``fewest=False`` skips the search for
    each strategy's fewest GPUs (a map of many cells). ``documents``: packed documents, lengths
    or "exp:MEAN" as :func:`ringlab.planning.planner.document_lengths` takes
    them; every strategy plans the same lengths."""
    tokens = parse_tokens(tokens)
    kv_heads, dtype, segments, rates = check_problem(
        heads=heads, head_dim=head_dim, batch=batch, kv_heads=kv_heads, dtype=dtype, causal=causal, layout=layout,
        head_offsets=head_offsets, segments=segments, rates=rates)
    dev = device_profile(gpu, device_profiles)
    per_node = dev.gpus_per_node if gpus_per_node is None else gpus_per_node
    for name, val in (("gpus", gpus), ("gpus_per_node", per_node)):
        check_int(name, val)
    if gpus > per_node and gpus % per_node:
        raise ValueError(f"gpus ({gpus}) must fill whole nodes of {per_node}")
    for s in strategies:
        if s not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {s!r}")
    if documents is not None:
        # One draw in multiples of what the longest ring (R = G) needs, which every shorter ring accepts.
        documents = document_lengths(documents, tokens, get(layout).document_unit(gpus))
    pb = Problem(seq_len=tokens, heads=heads, head_dim=head_dim, batch=batch, dtype=dtype, world_size=gpus,
                 causal=causal, layout=layout, device="cuda", kv_heads=kv_heads, segments=segments, rates=rates,
                 head_offsets=head_offsets)
    plans = {s: _plan_one(pb, dev, s, gpus, per_node, backward, fewest, documents) for s in strategies}
    best, why = _best(plans, gpus)
    return Report(dataclasses.asdict(pb), dataclasses.asdict(dev), gpus, per_node, plans, best, why, documents)


def _best(plans: dict, gpus: int) -> tuple[str | None, str]:
    """The fitting strategy with the least time, and a sentence on why."""
    ok = {s: p for s, p in plans.items() if p.possible and p.fits}
    if not ok:
        return None, f"no strategy fits on {gpus} GPUs; see each one's fewest GPUs"
    win = min(ok, key=lambda s: ok[s].time_s)
    w = ok[win]
    reasons = []
    for s, p in plans.items():
        if s == win:
            continue
        if not p.possible:
            reasons.append(f"{s} is not possible ({p.why})")
        elif not p.fits:
            reasons.append(f"{s} does not fit ({p.memory['total'] / 2**30:,.1f} GiB per GPU)")
        else:
            reasons.append(f"{s} exposes {p.exposed_s * 1e3:,.1f} ms of transfers against {w.exposed_s * 1e3:,.1f} ms "
                           f"(+{(p.time_s / w.time_s - 1) * 100:.1f}% time)")
    hidden = [t["name"] for t in w.transfers if t["hides"]]
    shown = [f"{t['name']} on {t['link']}" for t in w.transfers if not t["hides"]]
    own = (f"its {' and '.join(hidden)} hide behind compute" if hidden else "") + \
          ((", " if hidden else "its ") + f"{' and '.join(shown)} cost {w.exposed_s * 1e3:,.1f} ms" if shown else "")
    return win, f"{math.ceil(w.time_s * 1e3):,} ms per call; {own or 'nothing to send'}; " + "; ".join(reasons)
