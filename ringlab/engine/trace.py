"""Opt-in recorder of what each rank does at each ring step.

    with ringlab.engine.trace.record_events() as tr:
        ringlab.ring_attention(q, k, v, ring_size=4, causal=True)
    tr.events  # list of dicts, one per event

Event kinds (all carry ``rank``, ``step`` and ``pass`` = "forward" | "backward"):
  compute  a tile was computed: ``src`` (whose K/V block is held), ``q_rows``, ``k_rows``
           ([start, stop) local rows), ``causal``, ``pairs`` (score pairs), ``t0``, ``t1``;
           ring attention adds ``blocks`` (kernel calls: one per shared packed document, or
           two), and ``q_rows``, ``k_rows`` then span them; ring-dilated adds ``branch``.
  skip     a tile lay wholly in the future, or its ranks share no packed document, and was
           not computed: ``src``.
  post     sends and receives were posted: ``t``, ``bytes`` sent, ``peers``, ``label``.
  wait     the rank waited for them: ``posted``, ``t0``, ``t1``, ``bytes``, ``label``.
Ulysses and hybrid calls (ringlab.engine.ulysses) add ``mesh_rank`` (the rank in the U x R
mesh, ring-major: r * U + u) to every event, since ``rank`` there is the rank within the
Ulysses group (all-to-all events, labels "a2a/...") or within the ring group (the rest).
Times are ``time.perf_counter()`` seconds, comparable across processes of one machine.
When no recorder is open, :func:`recording` is False and the engine records nothing.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

_open: list["Trace"] = []
_pass = ["forward"]
_fields: list[dict] = [{}]


@dataclass
class Trace:
    events: list[dict] = field(default_factory=list)

    def of(self, **match) -> list[dict]:
        """Events whose fields equal ``match``, e.g. ``tr.of(kind="compute", rank=0)``;
        ``pass_=`` matches the ``pass`` field."""
        if "pass_" in match:
            match["pass"] = match.pop("pass_")
        return [e for e in self.events if all(e.get(k) == v for k, v in match.items())]

    def work_per_rank(self, pass_: str = "forward") -> dict[int, int]:
        """Score pairs computed by each rank in one pass: the load-balance figure."""
        work: dict[int, int] = {}
        for e in self.of(kind="compute", pass_=pass_):
            work[e["rank"]] = work.get(e["rank"], 0) + e["pairs"]
        return work

    def bytes_sent(self, **match) -> int:
        return sum(e["bytes"] for e in self.of(kind="post", **match))


@contextlib.contextmanager
def record_events():
    """Record the events of every ring call in this process inside the ``with`` block."""
    tr = Trace()
    _open.append(tr)
    try:
        yield tr
    finally:
        _open.remove(tr)


def recording() -> bool:
    return bool(_open)


def record(**event) -> None:
    event = {**_fields[-1], **event}
    event.setdefault("pass", _pass[-1])
    for tr in _open:
        tr.events.append(event)


@contextlib.contextmanager
def in_pass(name: str):
    """Label the events recorded inside as ``pass`` = name (the engine's backward uses it)."""
    _pass.append(name)
    try:
        yield
    finally:
        _pass.pop()


def tagged(gen, **fields):
    """Run the generator ``gen`` (a rank's algorithm) with ``fields`` added to every event it
    records; the fields hold only while it runs, so simulated ranks in lockstep keep theirs."""
    while True:
        _fields.append({**_fields[-1], **fields})
        try:
            item = next(gen)
        except StopIteration as stop:
            return stop.value
        finally:
            _fields.pop()
        yield item


@contextlib.contextmanager
def span(**event):
    """Record ``event`` with the start ``t0`` and end ``t1`` of the ``with`` block."""
    if not _open:
        yield
        return
    t0 = time.perf_counter()
    yield
    record(t0=t0, t1=time.perf_counter(), **event)
