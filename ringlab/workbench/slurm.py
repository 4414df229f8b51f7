"""Sweeps on a SLURM cluster: the unfinished points of a sweep as one job array.

    ringlab sweep notebooks/scaling.ipynb -p sizes "[65536]" "[262144]" --slurm --partition gpu \\
        --time 2:00:00 --gpus-per-task 8 --nodes-per-task 2
    ringlab sweep --collect scaling-1a2b3c4d        # or the same sweep command again

ringlab writes a plain sbatch script (runs/<sweep-id>/slurm/array-<n>.sbatch, n counting the
submissions) and submits it with ``sbatch``; no Python package is needed on top. Array task i
runs point i of sweep.json with ``python -m ringlab.workbench.sweep`` into the same
runs/<sweep-id>/<run>/ folders as a local sweep, and logs to slurm/task-<i>.log. A task of
several nodes starts torchrun on each node, one rank per GPU (see sweep.run_point).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass

from ..engine.checks import check_int

# what sbatch --time accepts: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
TIME = re.compile(r"(\d+|\d+:\d\d|\d+:\d\d:\d\d|\d+-\d+|\d+-\d+:\d\d|\d+-\d+:\d\d:\d\d)")
RDZV_PORT = 29500


@dataclass(frozen=True)
class SlurmOptions:
    """How each array task (one run of the sweep) is allocated."""
    partition: str
    time: str                  # the task's time limit, as sbatch --time takes it
    gpus_per_task: int = 0     # GPUs on each node of a task (0: CPU only)
    nodes_per_task: int = 1    # above 1: torchrun on every node, one rank per GPU
    sbatch_args: tuple = ()    # more sbatch options, e.g. ("--account=proj", "--qos=high")

    def check(self) -> None:
        """ValueError naming the option when one is missing or malformed."""
        if not isinstance(self.partition, str) or not re.fullmatch(r"[\w.,-]+", self.partition):
            raise ValueError(f"--slurm needs --partition, the SLURM partition to run on (sinfo lists them), "
                             f"got {self.partition!r}")
        if not isinstance(self.time, str) or not TIME.fullmatch(self.time):
            raise ValueError(f"--slurm needs --time, each task's time limit as sbatch takes it (minutes, "
                             f"HH:MM:SS or D-HH:MM:SS), got {self.time!r}")
        check_int("--gpus-per-task", self.gpus_per_task, low=0)
        check_int("--nodes-per-task", self.nodes_per_task)
        bad = [a for a in self.sbatch_args if not str(a).startswith("--") or "\n" in str(a)]
        if bad:
            raise ValueError(f"--sbatch takes long sbatch options such as --account=NAME, got {bad}")


def task_log(folder, index: int) -> pathlib.Path:
    """Where array task ``index`` logs (every submission appends to it)."""
    return pathlib.Path(folder) / "slurm" / f"task-{index}.log"


def array_spec(indices) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8' (sbatch --array)."""
    parts, run = [], []
    for i in sorted(indices):
        if run and i != run[-1] + 1:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(i)
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)


def script(sweep, indices, options: SlurmOptions, *, max_running: int | None = None,
           python: str = sys.executable, cwd=None) -> str:
    """The sbatch script of a job array that runs the points ``indices`` of ``sweep``."""
    folder, q = sweep.folder, shlex.quote
    array = array_spec(indices) + (f"%{max_running}" if max_running else "")
    lines = ["#!/bin/bash",
             f"# ringlab sweep {sweep.sweep_id}: one array task per run of {sweep.notebook.name};",
             "# task i runs point i of sweep.json (written by ringlab sweep --slurm; resubmitted by rerunning it)",
             f"#SBATCH --job-name=ringlab-{sweep.sweep_id}",
             f"#SBATCH --array={array}",
             f"#SBATCH --partition={options.partition}",
             f"#SBATCH --time={options.time}",
             f"#SBATCH --nodes={options.nodes_per_task}",
             "#SBATCH --ntasks-per-node=1"]
    if options.gpus_per_task:
        lines.append(f"#SBATCH --gpus-per-node={options.gpus_per_task}")
    lines += [f"#SBATCH --output={task_log(folder, 0).with_name('task-%a.log')}",
              "#SBATCH --open-mode=append",
              *[f"#SBATCH {a}" for a in options.sbatch_args],
              "", "set -eu", f"cd {q(str(cwd or os.getcwd()))}",
              'echo "ringlab: task $SLURM_ARRAY_TASK_ID of job $SLURM_ARRAY_JOB_ID on $(hostname) at $(date)"']
    for index in indices:
        name, point = sweep.runs[index]
        lines.append(f"# task {index}: {json.dumps(point, default=str)} -> {name}/")
    run = f"-m ringlab.workbench.sweep {q(str(folder))} \"$SLURM_ARRAY_TASK_ID\""
    if options.nodes_per_task == 1:
        lines.append(f"exec {q(python)} {run}")
    else:
        ranks = max(options.gpus_per_task, 1)
        lines += ["# torchrun on every node of the task, one rank per GPU; rendezvous on the first node",
                  'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                  f"srun --ntasks-per-node=1 {q(python)} -m torch.distributed.run --nnodes=\"$SLURM_NNODES\" "
                  f"--nproc-per-node={ranks} \\",
                  f"    --rdzv-id=\"$SLURM_JOB_ID\" --rdzv-backend=c10d --rdzv-endpoint=\"$head:{RDZV_PORT}\" \\",
                  f"    {run}"]
    return "\n".join(lines) + "\n"


def _submissions(folder) -> list[dict]:
    path = pathlib.Path(folder) / "slurm" / "jobs.json"
    return json.loads(path.read_text()) if path.exists() else []


def queued_tasks(folder) -> set[int]:
    """Array tasks of this sweep's submissions that SLURM still has queued or running (empty
    when squeue is not here, e.g. on a machine that only reads the results)."""
    jobs = [s["job"] for s in _submissions(folder)]
    if not jobs or shutil.which("squeue") is None:
        return set()
    out = subprocess.run(["squeue", "--noheader", "--array", "--format=%i", f"--jobs={','.join(jobs)}"],
                         capture_output=True, text=True)
    # a job SLURM no longer knows is an error (and a finished one): nothing of it is queued
    return {int(m) for m in re.findall(r"^\d+_(\d+)$", out.stdout, re.M)}


def submit(sweep, todo: list[int], options: SlurmOptions, report, *, max_running: int | None = None):
    """Submit the points ``todo`` of ``sweep`` as one job array (those still queued from an
    earlier submission are left alone) and add them to ``report``."""
    queued = queued_tasks(sweep.folder)
    for index in todo:
        name, point = sweep.runs[index]
        report.runs.append(dict(name=name, params=point, status="queued" if index in queued else "submitted",
                                seconds=0.0, error=None))
    todo = [i for i in todo if i not in queued]
    if not todo:
        return report
    submissions = _submissions(sweep.folder)
    path = sweep.folder / "slurm" / f"array-{len(submissions) + 1}.sbatch"
    path.parent.mkdir(exist_ok=True)
    path.write_text(script(sweep, todo, options, max_running=max_running))
    done = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise ValueError(f"sbatch refused {path}: {(done.stderr or done.stdout).strip()[-500:]}")
    report.job = done.stdout.strip().split(";")[0]  # --parsable: "jobid" or "jobid;cluster"
    submissions.append(dict(job=report.job, script=path.name, tasks=todo))
    (path.parent / "jobs.json").write_text(json.dumps(submissions, indent=1))
    return report
