"""Timing, machine facts and result files shared by the benchmark scripts.

Times on shared machines are noise; ratios taken side by side are the figure. Every
comparison here interleaves its contestants (a, b, a, b, ...) and reports the median of the
per-round ratios: the helpers live in ringlab.workbench.timing, which the scaling notebook uses too.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
from unittest import mock

import torch

from ringlab.engine import comm
from ringlab.planning import memory
from ringlab.workbench.timing import ratio, side_by_side, sync  # noqa: F401 - the benchmarks' timing helpers

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def rank_by_rank():
    """A context in which simulated rings run each rank's generator (as while tracing) instead of
    all ranks at once (ringlab.engine.comm.SIMULATE_TOGETHER): the A/B of the all-ranks form."""
    return mock.patch.object(comm, "SIMULATE_TOGETHER", False)


def machine() -> dict:
    """Facts about this machine that a reader needs to interpret a ratio."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = dict(cpu=cpu, cores=os.cpu_count(), threads=torch.get_num_threads(),
                torch=torch.__version__, python=platform.python_version(), gpu=None)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_slug() -> str:
    m = machine()
    if m["gpu"]:
        return m["gpu"].lower().replace("nvidia", "").strip().replace(" ", "-")
    return f"cpu-{m['cores']}core"


def best_time(fn, repeats: int, device="cpu") -> float:
    """Best of ``repeats`` timed calls of ``fn`` after one warm-up call."""
    return min(side_by_side({"fn": fn}, repeats=repeats, device=device)["fn"])


def peak_bytes(fn) -> int:
    """Peak live tensor bytes while ``fn()`` runs (ringlab.planning.memory: allocator on CUDA, tracker on CPU)."""
    with memory.track() as m:
        fn()
    return m.peak


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(x):
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
        return str(x)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def section(name: str, rows: list[dict], columns: list[str], *, notes: str = "", extra=None) -> dict:
    """One benchmark's results: what every ``run(quick)`` in benchmarks/ returns."""
    return dict(name=name, rows=rows, columns=columns, notes=notes, extra=extra or {})


def section_markdown(sec: dict, level: str = "#") -> str:
    table = markdown_table(sec["rows"], sec["columns"])
    return f"{level} {sec['name']}\n\n{table}\n" + (f"\n{sec['notes']}\n" if sec["notes"] else "")


def machine_line() -> str:
    m = machine()
    return (f"Machine: {m['cpu']}, {m['cores']} cores" + (f", GPU {m['gpu']}" if m["gpu"] else "")
            + f"; torch {m['torch']}; {datetime.date.today().isoformat()}")


def record(sections: list[dict], name: str | None = None, *, out_dir=None, echo: bool = True,
           stem: str | None = None) -> pathlib.Path:
    """Print the sections and write benchmarks/results/<machine>-<date>[-<name>].{json,md}
    (``stem`` replaces that file name, ``out_dir`` the folder)."""
    out_dir = pathlib.Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.date.today().isoformat()
    base = out_dir / (stem or (f"{machine_slug()}-{stamp}" + (f"-{name}" if name else "")))
    title = f"# ringlab benchmarks{f': {name}' if name else ''}\n\n{machine_line()}\n\n"
    text = title + "\n".join(section_markdown(s, "##") for s in sections)
    if echo:
        print(text)
    base.with_suffix(".md").write_text(text)
    base.with_suffix(".json").write_text(json.dumps(
        dict(date=stamp, machine=machine(), sections=sections), indent=1, default=str))
    return base


def cli(run, doc: str, argv=None) -> dict:
    """The command line every benchmark script shares: ``[--quick] [--out-dir DIR]``."""
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat (smoke test)")
    parser.add_argument("--out-dir", default=None, help="where to write results (default benchmarks/results)")
    args = parser.parse_args(argv)
    sec = run(args.quick)
    record([sec], sec["name"] + ("-quick" if args.quick else ""), out_dir=args.out_dir)
    return sec
