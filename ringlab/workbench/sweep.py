"""Parameter sweeps: one papermill run of a notebook per point of a grid.

    ringlab sweep notebooks/scaling.ipynb -p heads 8 16 -p head_dim 64 128 --jobs 2
    ringlab sweep notebooks/scaling.ipynb -p heads 8 16 -p head_dim 64 128 --gpus-per-run 2
    ringlab sweep notebooks/scaling.ipynb -p heads 8 16 --slurm --partition gpu --time 1:00:00
    ringlab sweep --collect scaling-1a2b3c4d

Each run executes in runs/<sweep-id>/<run>/ (the executed notebook, the figures it saves, its
log and a status.json), in a process of its own: ``python -m ringlab.workbench.sweep FOLDER
INDEX`` runs point INDEX of the sweep in FOLDER, so a run can be given its own GPUs (through
CUDA_VISIBLE_DEVICES: ``gpus_per_run``) or be a task of a SLURM job array (ringlab.workbench.slurm).
The sweep id is derived from the notebook and the grid, so running the same command again
resumes: finished runs are skipped, failed and missing ones run again. A run that fails (or
whose process dies) is recorded and reported; the others go on. At the end every finished
run's ``summary`` scalars (what the notebook passes to ringlab.workbench.viz.save) are collected
into results.csv (and results.parquet when pandas and pyarrow are installed) with a summary figure.
"""

from __future__ import annotations

import ast
import concurrent.futures
import csv
import hashlib
import itertools
import json
import os
import pathlib
import platform
import queue
import re
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field

from ..engine.checks import check_int, check_positive_number
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


def _write_status(path: pathlib.Path, status: dict) -> None:
    # write then rename: a run killed mid-write leaves the old file (or none), never half a file
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(status, indent=1, default=str))
    tmp.replace(path)


def visible_gpus() -> list[str]:
    """The GPUs this process may use, named as CUDA_VISIBLE_DEVICES names them (indices or UUIDs)."""
    import torch

    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(count)]
    return [x.strip() for x in listed.split(",") if x.strip()][:count]


def gpu_groups(gpus_per_run: int, gpus: list[str] | None = None) -> list[list[str]]:
    """``gpus`` (default: the visible ones) split into groups of ``gpus_per_run``, one group per
    parallel run; ValueError when there are no GPUs or the size does not divide their number."""
    check_int("--gpus-per-run", gpus_per_run)
    gpus = visible_gpus() if gpus is None else list(gpus)
    if not gpus:
        import torch
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise ValueError(f"--gpus-per-run {gpus_per_run} needs GPUs, and torch sees none here (torch "
                         f"{torch.__version__}, {build}; CUDA_VISIBLE_DEVICES="
                         f"{os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}). Leave the option out to run "
                         "on this machine's CPU, or use --slurm to run on a cluster's GPU nodes")
    if len(gpus) % gpus_per_run:
        divisors = [k for k in range(1, len(gpus) + 1) if len(gpus) % k == 0]
        raise ValueError(f"--gpus-per-run {gpus_per_run} does not divide the {len(gpus)} visible GPUs "
                         f"({','.join(gpus)}), so some would sit idle; use one of {divisors}")
    return [gpus[i:i + gpus_per_run] for i in range(0, len(gpus), gpus_per_run)]


@dataclass
class SweepReport:
    sweep_id: str
    folder: pathlib.Path
    runs: list = field(default_factory=list)  # dicts: name, params, status, seconds, error (, log)
    job: str | None = None  # the SLURM job that runs the submitted points

    @property
    def failed(self) -> list:
        return [r for r in self.runs if r["status"] == "failed"]

    def summary(self) -> str:
        counts = {}
        for r in self.runs:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        words = {"ok": "ran", "skipped": "already done (skipped)", "done": "done", "failed": "failed",
                 "submitted": f"submitted to SLURM as job {self.job}", "queued": "still queued or running in SLURM",
                 "missing": "not finished"}
        lines = [f"sweep {self.sweep_id}: " + ", ".join(f"{n} {words[s]}" for s, n in counts.items())
                 + f"; results in {self.folder}"]
        for r in self.failed:
            lines.append(f"  FAILED {r['name']}: {r['error']}")
            if r.get("log"):
                lines.append(f"    log {r['log']}:")
                lines += [f"    | {line}" for line in _tail(r["log"])]
        if any(r["status"] in ("submitted", "queued") for r in self.runs):
            lines.append(f"collect the results with: ringlab sweep --collect {self.sweep_id}"
                         + (f" --runs {self.folder.parent}" if self.folder.parent != pathlib.Path("runs").resolve() else ""))
        return "\n".join(lines)


def _tail(path, lines: int = 8) -> list[str]:
    """The last lines of a log (what a failed run printed last), or why there are none."""
    try:
        text = pathlib.Path(path).read_text(errors="replace")
    except OSError as err:
        return [f"(no log: {err.strerror or err})"]
    return [x for x in text.splitlines() if x.strip()][-lines:] or ["(empty)"]


@dataclass
class Sweep:
    """A sweep's folder and its points, as sweep.json records them (what a run process reads)."""
    sweep_id: str
    folder: pathlib.Path
    notebook: pathlib.Path
    runs: list  # [(name, point)], in grid order; a point's index is its SLURM array task id
    timeout: float

    @classmethod
    def load(cls, folder) -> Sweep:
        folder = pathlib.Path(folder)
        if not (folder / "sweep.json").is_file():
            raise ValueError(f"{folder} holds no sweep (no sweep.json): give the id of a sweep started with "
                             "ringlab sweep, and its --runs folder if it is not runs/")
        try:
            meta = json.loads((folder / "sweep.json").read_text())
            return cls(folder.name, folder, pathlib.Path(meta["notebook"]),
                       [(str(r["name"]), dict(r["params"])) for r in meta["runs"]], float(meta["timeout"]))
        except (ValueError, TypeError, KeyError) as err:  # not JSON, or not what prepare() writes
            raise ValueError(f"{folder / 'sweep.json'} is unreadable ({type(err).__name__}: {err}); run the sweep "
                             "command again to rewrite it") from None

    def status(self, name: str) -> dict | None:
        path = self.folder / name / "status.json"
        return _read_status(path) if path.exists() else None


def prepare(notebook, params, *, sweep_id: str | None = None, root="runs", timeout: float = 1800) -> Sweep:
    """Check the grid ``params`` = [(name, [values...]), ...] against the notebook and write the
    sweep's folder and sweep.json (nothing runs yet)."""
    check_positive_number("timeout", timeout, " of seconds per run")
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
    points = [dict(zip([n for n, _ in grid], combo)) for combo in itertools.product(*[v for _, v in grid])]
    sweep_id = sweep_id or f"{path.stem}-" + hashlib.sha1(json.dumps([path.stem, grid], default=str).encode()).hexdigest()[:8]
    names = [_run_name(point) for point in points]
    if len(set(names)) < len(names):  # only if a value repeats in the grid: the same point twice
        raise ValueError(f"the grid holds the same point more than once: {grid}; list each value once")
    folder = pathlib.Path(root).resolve() / sweep_id
    meta = dict(notebook=str(path.resolve()), grid=grid, timeout=timeout,
                runs=[dict(name=n, params=p) for n, p in zip(names, points)])
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "sweep.json").write_text(json.dumps(meta, indent=1, default=str))
    except OSError as err:
        raise ValueError(f"cannot write the sweep folder {folder}: {err.strerror or err}; choose a writable "
                         "folder with --runs (root=)") from None
    return Sweep(sweep_id, folder, path.resolve(), list(zip(names, points)), timeout)


def run_point(folder, index: int) -> dict:
    """Execute point ``index`` of the sweep in ``folder`` with papermill, in this process, and
    write its status.json (status, error, params, seconds, the GPUs it had, the host).

    Under torchrun (a multi-node SLURM task) every rank runs the notebook, with its own GPU and
    the job's RANK, WORLD_SIZE and MASTER_ADDR in the kernel's environment; rank 0 writes the
    run folder, the other ranks write rank-<N>/ inside it."""
    from .notebooks import execute_path

    sweep = Sweep.load(folder)
    name, point = sweep.runs[index]
    rank = int(os.environ.get("RANK", "0"))
    run_dir = sweep.folder / name / ("" if rank == 0 else f"rank-{rank}")
    if "LOCAL_RANK" in os.environ and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        # one GPU per torchrun rank, so the notebooks of a node do not all use every GPU of it
        os.environ["CUDA_VISIBLE_DEVICES"] = visible_gpus()[int(os.environ["LOCAL_RANK"])]
    t0 = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        execute_path(sweep.notebook, run_dir / sweep.notebook.name,
                     {**point, "output_dir": str(run_dir), "png": False}, timeout=sweep.timeout)
        status = dict(status="ok", error=None)
    except Exception as err:  # noqa: BLE001 - a failed run is data, not the end of the sweep
        lines = [x for x in str(err).strip().splitlines() if x.strip()]
        status = dict(status="failed", error=(lines[-1] if lines else repr(err))[:500])
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
    status.update(params=point, seconds=round(time.perf_counter() - t0, 2), host=platform.node(),
                  gpus=None if gpus is None else [g for g in gpus.split(",") if g])
    _write_status(run_dir / "status.json", status)
    return status


def _command(folder: pathlib.Path, index: int) -> list[str]:
    """The command that runs one point in a process of its own."""
    return [sys.executable, "-m", "ringlab.workbench.sweep", str(folder), str(index)]


def _execute(sweep: Sweep, index: int, gpus: list[str] | None = None) -> dict:
    """Run point ``index`` in a child process (seeing only ``gpus``, when given) and return its
    status; a child that dies before writing one (killed, out of memory) is recorded as failed."""
    name, point = sweep.runs[index]
    run_dir = sweep.folder / name
    run_dir.mkdir(parents=True, exist_ok=True)
    status_file, log = run_dir / "status.json", run_dir / "run.log"
    status_file.unlink(missing_ok=True)  # an old failure must not stand in for this attempt
    env = dict(os.environ)
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    t0 = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(_command(sweep.folder, index), env=env, stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL).returncode
    status = _read_status(status_file) if status_file.exists() else None
    if status is None:
        status = dict(status="failed", error=f"the run's process exited with code {code} before writing its "
                      f"status: {_tail(log, 1)[0]}"[:500], params=point,
                      seconds=round(time.perf_counter() - t0, 2), host=platform.node(), gpus=gpus)
        _write_status(status_file, status)
    return status


def _pending(sweep: Sweep, report: SweepReport) -> list[int]:
    """Indices of the points without a finished run; the finished ones go to ``report`` as skipped."""
    todo = []
    for index, (name, point) in enumerate(sweep.runs):
        if (sweep.status(name) or {}).get("status") == "ok":
            report.runs.append(dict(name=name, params=point, status="skipped", seconds=0.0, error=None))
        else:
            todo.append(index)
    return todo


def run_sweep(notebook, params, *, jobs: int | None = None, sweep_id: str | None = None, root="runs",
              timeout: float = 1800, progress: bool = True, gpus_per_run: int | None = None,
              slurm=None) -> SweepReport:
    """Execute ``notebook`` for every point of the grid ``params`` = [(name, [values...]), ...].

    ``jobs`` runs at once (default 1, or one per GPU group). ``gpus_per_run`` K splits the visible
    GPUs into groups of K and gives each run a group of its own (CUDA_VISIBLE_DEVICES); default:
    every run sees every GPU. ``slurm`` (a ringlab.workbench.slurm.SlurmOptions) submits the
    unfinished points as a SLURM job array instead of running them here."""
    from tqdm.auto import tqdm

    if jobs is not None:
        check_int("jobs", jobs)
    if slurm is not None and gpus_per_run is not None:
        raise ValueError("--gpus-per-run is for runs on this machine; with --slurm each task gets the GPUs of "
                         "--gpus-per-task from SLURM")
    groups = gpu_groups(gpus_per_run) if gpus_per_run is not None else None
    if groups and jobs is not None and jobs > len(groups):
        raise ValueError(f"--jobs {jobs} needs {jobs} groups of {gpus_per_run} GPUs, and there are {len(groups)} "
                         f"({len(groups) * gpus_per_run} GPUs visible); use --jobs {len(groups)} or fewer")
    if slurm is not None:
        slurm.check()
        if shutil.which("sbatch") is None:
            raise ValueError("--slurm needs sbatch on PATH: run the sweep on a SLURM login node")
    sweep = prepare(notebook, params, sweep_id=sweep_id, root=root, timeout=timeout)
    report = SweepReport(sweep.sweep_id, sweep.folder)
    todo = _pending(sweep, report)
    if slurm is not None:
        from . import slurm as slurm_
        return slurm_.submit(sweep, todo, slurm, report, max_running=jobs)
    free = queue.SimpleQueue()  # GPU groups not in use: a run takes one and gives it back
    for group in groups or []:
        free.put(group)

    def run(index):
        gpus = free.get() if groups else None
        try:
            return _execute(sweep, index, gpus)
        finally:
            if groups:
                free.put(gpus)

    bar = tqdm(total=len(todo), desc=f"sweep {sweep.sweep_id}", unit="run", disable=not progress)
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs or len(groups or [1])) as pool:
        futures = {pool.submit(run, index): sweep.runs[index][0] for index in todo}
        for fut in concurrent.futures.as_completed(futures):
            status, name = fut.result(), futures[fut]
            report.runs.append(dict(name=name, **{k: status.get(k) for k in ("params", "status", "seconds", "error",
                                                                               "gpus")}))
            if status["status"] == "failed":
                report.runs[-1]["log"] = str(sweep.folder / name / "run.log")
                bar.write(f"run {name} failed: {status['error']}")
            bar.update(1)
    bar.close()
    collect(sweep.folder, sweep.notebook.stem)
    return report


def collect_sweep(sweep_id: str, root="runs") -> SweepReport:
    """The state of a sweep (e.g. one submitted to SLURM): its finished runs gathered into
    results.csv, its failed runs with the end of their logs, and the points not finished yet."""
    from . import slurm

    sweep = Sweep.load(pathlib.Path(root).resolve() / sweep_id)
    report = SweepReport(sweep.sweep_id, sweep.folder)
    queued = slurm.queued_tasks(sweep.folder)
    for index, (name, point) in enumerate(sweep.runs):
        status = sweep.status(name) or {}
        row = dict(name=name, params=point, seconds=status.get("seconds", 0.0), error=status.get("error"),
                   gpus=status.get("gpus"))
        log = slurm.task_log(sweep.folder, index)
        if not log.exists():
            log = sweep.folder / name / "run.log"
        if status.get("status") == "ok":
            row["status"] = "done"
        elif index in queued:
            row["status"] = "queued"
        elif status.get("status") == "failed" or log.exists():
            # a task with a log but no status was stopped by SLURM (time limit, node failure, cancelled)
            row.update(status="failed", log=str(log),
                       error=row["error"] or "the task ended without a status: see its log")
        else:
            row["status"] = "missing"
        report.runs.append(row)
    collect(sweep.folder, sweep.notebook.stem)
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
        gpus = status.get("gpus")
        row = {"run": status_file.parent.name, **status["params"], "seconds": status["seconds"],
               "host": status.get("host"), "gpus": None if gpus is None else ",".join(gpus)}
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


if __name__ == "__main__":  # python -m ringlab.workbench.sweep FOLDER INDEX: one run, in this process
    if len(sys.argv) != 3 or not sys.argv[2].isdigit():
        sys.exit("usage: python -m ringlab.workbench.sweep SWEEP_FOLDER INDEX (started by ringlab sweep)")
    sys.exit(0 if run_point(sys.argv[1], int(sys.argv[2]))["status"] == "ok" else 1)
