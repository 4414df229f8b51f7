"""Parameter sweeps: one papermill run of a notebook per point of a grid.

    ringlab sweep notebooks/scaling.ipynb -p heads 8 16 -p head_dim 64 128 --jobs 2

Each run executes in runs/<sweep-id>/<run>/ (the executed notebook, the figures it saves and a
status.json). The sweep id is derived from the notebook and the grid, so running the same
command again resumes: finished runs are skipped, failed and missing ones run again. A run
that fails is recorded and reported; the others go on. At the end every finished run's
``summary`` scalars (what the notebook passes to ringlab.workbench.viz.save) are collected into
results.csv (and results.parquet when pandas and pyarrow are installed) with a summary figure.
"""

from __future__ import annotations

import ast
import concurrent.futures
import csv
import hashlib
import itertools
import json
import pathlib
import re
import time
import warnings
from dataclasses import dataclass, field

from .notebooks import find_notebook


def parse_value(text):
    """'8' -> 8, '0.5' -> 0.5, 'True' -> True, '[1, 2]' -> [1, 2]; anything else stays a string."""
    if not isinstance(text, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return {"true": True, "false": False}.get(text.lower(), text)


def notebook_parameters(path) -> list[str]:
    """The names the notebook's cell tagged ``parameters`` assigns (what papermill may set)."""
    import nbformat

    nb = nbformat.read(str(path), 4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    if not cells:
        raise ValueError(f"{path} has no cell tagged 'parameters', so a sweep cannot set anything in it")
    names = []
    for node in ast.parse(cells[0].source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AnnAssign, ast.AugAssign)) else []
        for t in targets:
            names += [n.id for n in ast.walk(t) if isinstance(n, ast.Name)]
    return list(dict.fromkeys(names))


def _run_name(point: dict) -> str:
    """A folder name for a grid point: a readable prefix of its values, then a hash of all of
    them, so two different points never share a folder even when their prefixes agree."""
    full = json.dumps(point, sort_keys=True, default=str)
    text = ",".join(f"{k}={json.dumps(v, default=str)}" for k, v in point.items()) or "defaults"
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", text)[:80] + "-" + hashlib.sha1(full.encode()).hexdigest()[:12]


def _read_status(path: pathlib.Path) -> dict | None:
    """A run's status.json, or None (with a warning naming the file) when it is unreadable,
    e.g. cut short by a crash: that run then counts as not finished and runs again."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        warnings.warn(f"ringlab sweep: {path} is unreadable ({err}); that run counts as not finished and "
                      "runs again on this (or the next) sweep. Delete the file to rerun it by hand",
                      stacklevel=3)
        return None


@dataclass
class SweepReport:
    sweep_id: str
    folder: pathlib.Path
    runs: list = field(default_factory=list)  # dicts: name, params, status, seconds, error

    @property
    def failed(self) -> list:
        return [r for r in self.runs if r["status"] == "failed"]

    def summary(self) -> str:
        counts = {s: sum(r["status"] == s for r in self.runs) for s in ("ok", "skipped", "failed")}
        lines = [f"sweep {self.sweep_id}: {counts['ok']} ran, {counts['skipped']} already done (skipped), "
                 f"{counts['failed']} failed; results in {self.folder}"]
        lines += [f"  FAILED {r['name']}: {r['error']}" for r in self.failed]
        return "\n".join(lines)


def _execute(notebook: pathlib.Path, run_dir: pathlib.Path, point: dict, timeout: float) -> dict:
    from .notebooks import execute_path
    status_file = run_dir / "status.json"
    t0 = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        execute_path(notebook, run_dir / notebook.name,
                     {**point, "output_dir": str(run_dir.resolve()), "png": False}, timeout=timeout)
        status = dict(status="ok", error=None)
    except Exception as err:  # noqa: BLE001 - a failed run is data, not the end of the sweep
        lines = [x for x in str(err).strip().splitlines() if x.strip()]
        status = dict(status="failed", error=(lines[-1] if lines else repr(err))[:500])
    status.update(params=point, seconds=round(time.perf_counter() - t0, 2))
    # write then rename: a run killed mid-write leaves the old file (or none), never half a file
    tmp = status_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(status, indent=1, default=str))
    tmp.replace(status_file)
    return status


def run_sweep(notebook, params, *, jobs: int = 1, sweep_id: str | None = None, root="runs",
              timeout: float = 1800, progress: bool = True) -> SweepReport:
    """Execute ``notebook`` for every point of the grid ``params`` = [(name, [values...]), ...]."""
    from tqdm.auto import tqdm

    path = find_notebook(notebook)
    grid = [(name, [parse_value(v) for v in values]) for name, values in params]
    known = notebook_parameters(path)
    unknown = [name for name, _ in grid if name not in known]
    if unknown:
        raise ValueError(f"{path.name} has no parameter {', '.join(map(repr, unknown))}; the names its "
                         f"parameters cell sets are: {', '.join(known)}")
    for name, values in grid:
        if not values:
            raise ValueError(f"parameter {name!r} has no values: use -p {name} V1 [V2 ...]")
    if len({name for name, _ in grid}) < len(grid):
        raise ValueError(f"a parameter is given twice: {[name for name, _ in grid]}; give each once, with all its values")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive int, got {jobs!r}")
    points = [dict(zip([n for n, _ in grid], combo)) for combo in itertools.product(*[v for _, v in grid])]
    sweep_id = sweep_id or f"{path.stem}-" + hashlib.sha1(json.dumps([path.stem, grid], default=str).encode()).hexdigest()[:8]
    names = [_run_name(point) for point in points]
    if len(set(names)) < len(names):  # only if a value repeats in the grid: the same point twice
        raise ValueError(f"the grid holds the same point more than once: {grid}; list each value once")
    folder = pathlib.Path(root) / sweep_id
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "sweep.json").write_text(json.dumps(dict(notebook=str(path), grid=grid), indent=1, default=str))
    except OSError as err:
        raise ValueError(f"cannot write the sweep folder {folder}: {err.strerror or err}; choose a writable "
                         "folder with --runs (root=)") from None
    report = SweepReport(sweep_id, folder)
    todo = []
    for name, point in zip(names, points):
        status = folder / name / "status.json"
        if status.exists() and (_read_status(status) or {}).get("status") == "ok":
            report.runs.append(dict(name=name, params=point, status="skipped", seconds=0.0, error=None))
        else:
            todo.append((name, point))
    bar = tqdm(total=len(todo), desc=f"sweep {sweep_id}", unit="run", disable=not progress)
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(_execute, path, folder / name, point, timeout): name for name, point in todo}
        for fut in concurrent.futures.as_completed(futures):
            status = fut.result()
            report.runs.append(dict(name=futures[fut], **{k: status[k] for k in ("params", "status", "seconds", "error")}))
            bar.update(1)
            if status["status"] == "failed":
                bar.write(f"run {futures[fut]} failed: {status['error']}")
    bar.close()
    collect(folder, path.stem)
    return report


def collect(folder, name: str) -> list[dict]:
    """Gather the finished runs' parameters and summary scalars into results.csv (and
    results.parquet when pandas and pyarrow are installed) and a summary figure."""
    folder = pathlib.Path(folder)
    rows = []
    for status_file in sorted(folder.glob("*/status.json")):
        status = _read_status(status_file)
        if status is None or status.get("status") != "ok":
            continue
        row = {"run": status_file.parent.name, **status["params"], "seconds": status["seconds"]}
        result = status_file.parent / f"{name}.json"
        if result.exists():
            summary = json.loads(result.read_text()).get("summary", {})
            row.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool)) or v is None})
        rows.append(row)
    if not rows:
        return rows
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(folder / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    try:
        import pandas as pd
        pd.DataFrame(rows).to_parquet(folder / "results.parquet")
    except ImportError:
        pass
    _summary_figure(rows, folder)
    return rows


def _summary_figure(rows, folder) -> None:
    import plotly.graph_objects as go

    from .viz import save
    numeric = [k for k in rows[0] if k not in ("run",) and all(isinstance(r.get(k), (int, float)) and
                                                                 not isinstance(r.get(k), bool) for r in rows)]
    fig = go.Figure([go.Bar(x=[r["run"] for r in rows], y=[r[k] for r in rows], name=k) for k in numeric])
    fig.update_layout(barmode="group", title="Sweep: summary values per run", yaxis_type="log", height=500)
    save("summary", {"values": fig}, data=rows, out_dir=folder, png=False)
