"""Sweeps on real hardware (issue 19): GPU-pinned parallel runs, and SLURM job arrays.

No GPU and no cluster are needed: the GPU count is faked, each run's process is a small
script that records the environment it received, and sbatch/squeue are shell stand-ins. The
generated sbatch scripts are compared with golden files (RINGLAB_UPDATE_GOLDEN=1 rewrites them).
"""

import json
import os
import pathlib
import subprocess
import sys

import nbformat
import pytest
from test_reliability import cli_error

from ringlab import cli
from ringlab.workbench import slurm, sweep
from ringlab.workbench.slurm import SlurmOptions

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden"

# A run's process as the tests fake it: it records the GPUs it may use and when it ran.
FAKE_RUN = """
import json, os, pathlib, sys, time
folder, index = pathlib.Path(sys.argv[1]), int(sys.argv[2])
run = json.loads((folder / "sweep.json").read_text())["runs"][index]
t0 = time.time()
time.sleep(0.3)
(folder / run["name"]).mkdir(exist_ok=True)
(folder / run["name"] / "status.json").write_text(json.dumps(dict(
    status="ok", error=None, params=run["params"], seconds=0.3, t0=t0, t1=time.time(),
    gpus=os.environ["CUDA_VISIBLE_DEVICES"].split(","))))
"""


# ---------------------------------------------------------------- GPU pinning
def test_parallel_runs_get_gpu_groups_of_their_own(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "visible_gpus", lambda: ["0", "1", "2", "3"])
    monkeypatch.setattr(sweep, "_command", lambda folder, i: [sys.executable, "-c", FAKE_RUN, str(folder), str(i)])
    report = sweep.run_sweep("dilation", [("heads", ["1", "2", "3", "4", "5", "6"])], gpus_per_run=2,
                             root=tmp_path, progress=False)
    assert [r["status"] for r in report.runs] == ["ok"] * 6
    runs = [json.loads((report.folder / r["name"] / "status.json").read_text()) for r in report.runs]
    assert {tuple(r["gpus"]) for r in runs} == {("0", "1"), ("2", "3")}  # both groups used, nothing else
    for a in runs:  # two runs that overlapped in time never shared a GPU
        for b in runs:
            if a is not b and a["t0"] < b["t1"] and b["t0"] < a["t1"]:
                assert not set(a["gpus"]) & set(b["gpus"]), (a, b)
    assert all(r["gpus"] in (["0", "1"], ["2", "3"]) for r in report.runs)  # the report says which


def test_gpus_per_run_errors_say_why(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep, "_execute", lambda *a: pytest.fail("a run started"))
    # this machine has no GPU: the real count, through the command line
    err = cli_error(capsys, ["sweep", "dilation", "-p", "heads", "1", "--gpus-per-run", "1", "--runs", str(tmp_path)])
    assert "needs GPUs" in err and "torch sees none" in err and "CUDA_VISIBLE_DEVICES" in err
    monkeypatch.setattr(sweep, "visible_gpus", lambda: ["0", "1", "2", "3"])
    with pytest.raises(ValueError, match=r"3 does not divide the 4 visible GPUs.*\[1, 2, 4\]"):
        sweep.run_sweep("dilation", [("heads", ["1"])], gpus_per_run=3, root=tmp_path, progress=False)
    with pytest.raises(ValueError, match="--jobs 3 needs 3 groups of 2 GPUs, and there are 2"):
        sweep.run_sweep("dilation", [("heads", ["1"])], gpus_per_run=2, jobs=3, root=tmp_path, progress=False)
    with pytest.raises(ValueError, match="--gpus-per-run must be an int >= 1, got 0"):
        sweep.gpu_groups(0, ["0"])
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_a_run_whose_process_dies_is_recorded_and_runs_again(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "_command", lambda folder, i: [sys.executable, "-c", "print('out of memory'); exit(9)"])
    report = sweep.run_sweep("dilation", [("heads", ["1"])], root=tmp_path, progress=False)
    (run,) = report.runs
    assert run["status"] == "failed" and "exited with code 9" in run["error"] and "out of memory" in run["error"]
    assert "| out of memory" in report.summary()  # the end of its log
    monkeypatch.setattr(sweep, "_command", lambda folder, i: [sys.executable, "-c", FAKE_RUN, str(folder), str(i)])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # unpinned: the run inherits this process's environment
    assert [r["status"] for r in sweep.run_sweep("dilation", [("heads", ["1"])], root=tmp_path,
                                                 progress=False).runs] == ["ok"]


# ---------------------------------------------------------------- SLURM
@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """sbatch and squeue stand-ins: sbatch records its arguments and answers job ids 4242, 4243,
    ...; squeue prints the array tasks listed in queue.txt."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/sh\necho "$@" >> "$FAKE_SLURM/sbatch.txt"\n'
                                    'echo "$((4241 + $(wc -l < "$FAKE_SLURM/sbatch.txt")));cluster"\n')
    (bin_dir / "squeue").write_text('#!/bin/sh\ncat "$FAKE_SLURM/queue.txt" 2>/dev/null\nexit 0\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(tmp_path))
    return tmp_path


def assert_golden(text: str, name: str, folder: pathlib.Path) -> None:
    """``text`` with this machine's paths replaced must equal tests/golden/<name>."""
    for path, mark in ((folder, "<SWEEP>"), (folder.parent, "<RUNS>"), (sys.executable, "<PYTHON>"),
                       (os.getcwd(), "<CWD>")):
        text = text.replace(str(path), mark)
    path = GOLDEN / name
    if os.environ.get("RINGLAB_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text(), f"{name} changed: check the diff, then RINGLAB_UPDATE_GOLDEN=1"


GRID = [("seq_len", ["24", "-5"]), ("heads", ["1", "2"])]
TWO_NODES = ["--slurm", "--partition", "gpu", "--time", "2:00:00", "--gpus-per-task", "8", "--nodes-per-task", "2",
             "--sbatch=--account=ringlab"]


def test_slurm_array_scripts_collect_failed_tasks_and_resume(fake_slurm, capsys):
    runs = fake_slurm / "runs"
    argv = ["sweep", "dilation", *[x for name, values in GRID for x in ("-p", name, *values)], *TWO_NODES,
            "--runs", str(runs)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "4 submitted to SLURM as job 4242" in out and "ringlab sweep --collect dilation-" in out
    sweep_id = out.split("--collect ")[1].split()[0]
    folder = runs / sweep_id
    assert_golden((folder / "slurm" / "array-1.sbatch").read_text(), "slurm-array-1.sbatch", folder)
    assert (fake_slurm / "sbatch.txt").read_text().split() == ["--parsable", str(folder / "slurm" / "array-1.sbatch")]

    # What the cluster did: task 0 finished, task 1 failed in the notebook, task 2 hit its time
    # limit (a log, no status), task 3 is still running.
    loaded = sweep.Sweep.load(folder)
    for index, state in ((0, "ok"), (1, "failed")):
        name, point = loaded.runs[index]
        (folder / name).mkdir()
        (folder / name / "status.json").write_text(json.dumps(dict(
            status=state, error=None if state == "ok" else "ValueError: seq_len must be positive",
            params=point, seconds=3.0, host="node7", gpus=["0"])))
    slurm.task_log(folder, 1).write_text("ringlab: task 1 of job 4242\nValueError: seq_len must be positive\n")
    slurm.task_log(folder, 2).write_text("ringlab: task 2 of job 4242\nslurmstepd: error: *** JOB 4244 "
                                         "CANCELLED DUE TO TIME LIMIT ***\n")
    (fake_slurm / "queue.txt").write_text("4242_3\n")

    assert cli.main(["sweep", "--collect", sweep_id, "--runs", str(runs)]) == 1
    out = capsys.readouterr().out
    assert_golden(out, "slurm-collect.txt", folder)
    assert (folder / "results.csv").read_text().count("\n") == 2  # the finished run

    # Rerunning the command resubmits the failed and the timed-out task, not the running one.
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "2 submitted to SLURM as job 4243" in out and "1 still queued" in out and "1 already done" in out
    assert_golden((folder / "slurm" / "array-2.sbatch").read_text(), "slurm-array-2.sbatch", folder)
    jobs = json.loads((folder / "slurm" / "jobs.json").read_text())
    assert [(j["job"], j["tasks"]) for j in jobs] == [("4242", [0, 1, 2, 3]), ("4243", [1, 2])]


def test_a_single_node_array_task_runs_its_point(fake_slurm, capsys):
    """The generated script, run by bash as SLURM would run a task, executes the notebook."""
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python",
                                                          "display_name": "Python 3"}})
    params = nbformat.v4.new_code_cell("x = 1\noutput_dir = '.'\npng = False")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("assert x > 0, 'x must be positive'")]
    nbformat.write(nb, fake_slurm / "tiny.ipynb")
    report = sweep.run_sweep(fake_slurm / "tiny.ipynb", [("x", ["1", "-1"])], root=fake_slurm / "runs",
                             slurm=SlurmOptions("debug", "10"), jobs=1, progress=False)
    text = (report.folder / "slurm" / "array-1.sbatch").read_text()
    assert_golden(text, "slurm-single-node.sbatch", report.folder)
    for index in (0, 1):  # SLURM would start these on a node; bash does here
        with open(slurm.task_log(report.folder, index), "a") as log:
            subprocess.run(["bash", str(report.folder / "slurm" / "array-1.sbatch")], stdout=log, stderr=log,
                           env={**os.environ, "SLURM_ARRAY_TASK_ID": str(index), "SLURM_ARRAY_JOB_ID": "4242"})
    collected = sweep.collect_sweep(report.sweep_id, root=fake_slurm / "runs")
    assert [r["status"] for r in collected.runs] == ["done", "failed"]
    assert "x must be positive" in collected.failed[0]["error"]
    assert "task 1 of job 4242" in collected.summary()  # the failed task's log, shown


def test_slurm_options_are_checked(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sweep, "_execute", lambda *a: pytest.fail("a run started"))
    base = ["sweep", "dilation", "-p", "heads", "1", "--runs", str(tmp_path)]
    assert "--slurm needs --partition" in cli_error(capsys, [*base, "--slurm", "--time", "10"])
    assert "--slurm needs --time" in cli_error(capsys, [*base, "--slurm", "--partition", "gpu", "--time", "1h"])
    assert "only apply with --slurm" in cli_error(capsys, [*base, "--partition", "gpu"])
    assert "--nodes-per-task must be an int >= 1" in cli_error(
        capsys, [*base, "--slurm", "--partition", "gpu", "--time", "10", "--nodes-per-task", "0"])
    assert "--gpus-per-run is for runs on this machine" in cli_error(
        capsys, [*base, "--slurm", "--partition", "gpu", "--time", "10", "--gpus-per-run", "2"])
    assert "no sweep" in cli_error(capsys, ["sweep", "--collect", "nothing-here", "--runs", str(tmp_path)])
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))  # not a login node: no sbatch
    with pytest.raises(ValueError, match="needs sbatch on PATH"):
        sweep.run_sweep("dilation", [("heads", ["1"])], root=tmp_path, progress=False,
                        slurm=SlurmOptions("gpu", "1:00:00"))
    assert not list(tmp_path.iterdir())  # every refusal came before anything was written
    assert slurm.array_spec([7, 0, 1, 2, 5, 8]) == "0-2,5,7-8"
