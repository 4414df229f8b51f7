"""The workbench: notebooks under papermill, the figure builders, and sweeps."""

import csv
import json
import os
import pathlib
import re
import shutil

import nbformat
import pytest
from notebook_params import SMALL

from ringlab.engine.layout import LAYOUTS
from ringlab.workbench import experiments, viz
from ringlab.planning.memory_model import Problem, estimate
from ringlab.planning.planner import plan
from ringlab.workbench.sweep import run_sweep
from ringlab.workbench.notebooks import NOTEBOOKS, execute_path, notebook_names

pytestmark = pytest.mark.notebooks

# What each notebook's own summary must say at the small parameters (its figures' claims).
CLAIMS = {
    "correctness": lambda s: 0 < s["worst_error_over_tolerance"] <= 1,   # every error within docs/design.md §7
    "memory": lambda s: s["max_model_error"] <= 0.1,                     # the model within 10% of measured
    "billion_tokens": lambda s: abs(s["dry_run_ratio"] - 1) <= 0.1,      # dry run within 10% of the planner
    "kv_rotation": lambda s: s["imbalance"]["zigzag"] <= 1.1 < s["imbalance"]["contiguous"]
    and 0 <= s["overlap"] <= 1 and s["packed_imbalance"]["doc_zigzag"] <= 1.1 < s["packed_imbalance"]["zigzag"],
    "parallelism": lambda s: s["bytes_mismatch"] == 0 and s["phases"] >= 4 and "hybrid" in s["winners"],
    "dilation": lambda s: 0 < s["pairs_ratio"] < 1 and 0 < s["reach_after_layers"] <= 1,
    "scaling": lambda s: s["attention_over_sdpa"]["median"] > 0 and s["dilated_over_sdpa"]["median"] > 0
    and s["attention_over_sdpa"]["spread"] >= 0,
}


def test_every_notebook_is_covered_and_has_one_parameters_cell():
    assert sorted(notebook_names()) == sorted(SMALL)
    for name in notebook_names():
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", 4)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{name}: needs exactly one cell tagged 'parameters'"
        assert 'device = "auto"' in tagged[0].source and "output_dir" in tagged[0].source
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{name}: clear outputs"


@pytest.mark.parametrize("name", sorted(SMALL))
def test_notebook_executes_and_writes_its_figures(name, tmp_path):
    png = name == "dilation"  # one notebook exports PNGs through kaleido; the others HTML + JSON
    params = {**SMALL[name], "output_dir": str(tmp_path), "png": png}
    executed = execute_path(NOTEBOOKS / f"{name}.ipynb", tmp_path / f"{name}.ipynb", params, timeout=900)
    errors = [o for c in executed.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    html = (tmp_path / f"{name}.html").read_text()
    assert not re.search(r"<script[^>]*\bsrc=", html)  # self-contained: nothing fetched from a CDN
    assert "plotly" in html.lower() and len(html) > 1_000_000  # plotly.js inlined
    meta = json.loads((tmp_path / f"{name}.json").read_text())
    assert meta["params"] and meta["environment"]["torch"] and meta["data"] is not None
    assert CLAIMS[name](meta["summary"]), meta["summary"]
    if png:
        pngs = list(tmp_path.glob(f"{name}-*.png"))
        if shutil.which("chromium") or os.environ.get("RINGLAB_REQUIRE_BROWSER") == "1":
            assert pngs, "Chromium is there (or required): every figure must have its PNG"
            assert {p.stem for p in pngs} == {p.stem for p in tmp_path.glob(f"{name}-*.svg")} == {
                p.stem for p in tmp_path.glob(f"{name}-*.pdf")}, "and its PDF and SVG"
        else:  # no Chromium: HTML only, and the notebook says why
            streams = "".join(o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
            assert not pngs and "image export (PNG, PDF, SVG) skipped" in streams


def test_rotation_and_timeline_figures_from_a_known_trace():
    events = experiments.ring_trace(4, 64, heads=1, head_dim=8, layout="contiguous", causal=True,
                                    simulated=True, backward=True, device="cpu")
    fig = viz.ring_rotation_figure(events, 4)
    assert len(fig.frames) == 4
    last = fig.frames[-1].data[0].z
    skipped = sum(v == 3 for row in last for v in row)
    assert skipped == 6  # contiguous causal: the 6 tiles above the diagonal are skipped
    assert all(last[r][r] in (1, 2) for r in range(4))
    steps = viz.ring_steps_figure(events, 4, pass_="backward")
    assert len(steps.data) == 4
    timeline = viz.timeline_figure(events)
    assert [t.name for t in timeline.data] == ["compute", "in flight", "blocked in wait"]
    assert len(timeline.data[0].x) == len([e for e in events if e["kind"] == "compute"])
    balance = viz.work_balance_figure(experiments.layout_work(4, 64))
    assert [t.name.split()[0] for t in balance.data] == list(LAYOUTS)  # every registered layout


def test_gqa_trace_draws_and_posts_the_planners_bytes_per_hop():
    """A grouped-query ring's trace: its K/V posts (measured) carry what the planner counts per hop,
    H_kv / H of the multi-head ring's, and the rotation figures draw it."""
    def hops(kv_heads):
        events = experiments.ring_trace(4, 256, heads=4, kv_heads=kv_heads, head_dim=16, layout="zigzag",
                                        simulated=True, device="cpu")
        return events, {e["bytes"] for e in events if e["kind"] == "post" and e["label"] == "kv"}
    events, sent = hops(1)
    planned = plan(256, heads=4, head_dim=16, dtype="float32", gpus=4, kv_heads=1).communication["per_step"]
    assert sent == set(planned.values()) and {b * 4 for b in sent} == hops(None)[1]
    assert len(viz.ring_rotation_figure(events, 4).frames) == 4
    assert len(viz.timeline_figure(events).data[0].x) == len([e for e in events if e["kind"] == "compute"])


def test_geometry_memory_error_scaling_and_planner_figures():
    geo = experiments.dilation_geometry(32, 2, [8, 32], [1, 2], layers=3)
    assert [list(r) for r in viz.multiplicity_figure(geo["m"], head=1).data[0].z] == geo["m"][1].tolist()
    assert len(viz.receptive_field_figure(geo["receptive"]).data[0].y) == 3
    assert viz.coverage_figure(geo["coverage"], geo["pairs_ratio"]).data[0].y == tuple(geo["coverage"])
    rows = [dict(mode="ring", tokens=n, ring_size=2, backward=b, measured=n * 10, model=n * 10.5)
            for n in (256, 512) for b in (False, True)]
    assert len(viz.memory_curves_figure(rows).data) == 4
    est = estimate(Problem(1024, 2, 16, world_size=4), "ring", backward=True)
    bars = viz.memory_terms_figure(est).data[0]
    assert list(bars.x) == [*est.resident, *est.terms] and sum(bars.y) * 2**20 == pytest.approx(est.total, rel=1e-12, abs=0)
    err = [dict(label="a", dtype="float32", quantity="out", error=1e-6, tolerance=2e-5)]
    assert viz.error_figure(err).data[0].y == (1e-6 / 2e-5,)
    scal = viz.scaling_figure([dict(method="m", tokens=n, seconds=n / 1e4) for n in (256, 512)])
    assert scal.data[1].y == (1e4, 1e4)
    timed = [dict(method=m, tokens=256, seconds=1.0, low=0.5, high=2.0,
                  over_sdpa=dict(median=1.5, low=1.2, high=1.9, spread=0.7)) for m in ("attention", "sdpa")]
    traces = viz.scaling_figure(timed).data
    assert len(traces) == 5  # time, throughput, ratio for attention; no sdpa / sdpa
    curve, _, over = traces[:3]
    assert (curve.error_y.array, curve.error_y.arrayminus) == ((1.0,), (0.5,))
    assert over.y == (1.5,) and over.error_y.array[0] == pytest.approx(0.4, abs=1e-12, rel=0)
    assert over.error_y.arrayminus[0] == pytest.approx(0.3, abs=1e-12, rel=0)
    plans = experiments.planner_sweep([2**20, 2**22], gpus=["h100"], heads=8, head_dim=64)
    assert plans[1]["gpus"] >= plans[0]["gpus"]
    assert viz.planner_figure(plans).layout.barmode == "stack"


def test_save_writes_html_json_and_summary(tmp_path):
    fig = viz.work_balance_figure({"zigzag": {0: 1, 1: 1}})
    written = viz.save("demo", {"balance": fig}, data={"x": 1}, params={"p": 2}, summary={"s": 3.0},
                       out_dir=tmp_path, png=False)
    meta = json.loads(pathlib.Path(written["json"]).read_text())
    assert meta["summary"] == {"s": 3.0} and meta["params"] == {"p": 2}
    assert pathlib.Path(written["html"]).read_text().count("<script") >= 2


def test_sweep_runs_a_grid_resumes_and_survives_a_failing_run(tmp_path):
    grid = [("seq_len", ["24", "32"]), ("heads", ["1", "2"])]
    report = run_sweep("dilation", grid, jobs=2, root=tmp_path, progress=False)
    assert [r["status"] for r in report.runs] == ["ok"] * 4
    with open(report.folder / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["heads"] for r in rows} == {"1", "2"} and all(r["pairs_ratio"] for r in rows)
    assert (report.folder / "summary.html").exists()
    again = run_sweep("dilation", grid, jobs=2, root=tmp_path, progress=False)
    assert again.sweep_id == report.sweep_id and [r["status"] for r in again.runs] == ["skipped"] * 4
    # A partial sweep (one run never finished) resumes with exactly the missing run.
    interrupted = report.runs[2]["name"]
    (report.folder / interrupted / "status.json").unlink()
    resumed = run_sweep("dilation", grid, jobs=2, root=tmp_path, progress=False)
    assert {r["name"]: r["status"] for r in resumed.runs} == {r["name"]: "ok" if r["name"] == interrupted else "skipped"
                                                             for r in report.runs}

    broken = run_sweep("dilation", [("seq_len", ["24", "-5"])], root=tmp_path, progress=False)
    status = {r["params"]["seq_len"]: r["status"] for r in broken.runs}
    assert status == {24: "ok", -5: "failed"}
    assert "FAILED" in broken.summary() and broken.failed[0]["error"]
    assert (broken.folder / "results.csv").exists()
    retried = run_sweep("dilation", [("seq_len", ["24", "-5"])], root=tmp_path, progress=False)
    assert {r["params"]["seq_len"]: r["status"] for r in retried.runs} == {24: "skipped", -5: "failed"}
    assert [r["seconds"] > 0 for r in retried.runs if r["status"] == "failed"] == [True]  # run again, not skipped


def test_experiments_refuse_a_world_size_they_cannot_run():
    """No world size is dropped silently: one that cannot split the sequence is an error."""
    with pytest.raises(ValueError, match="cannot split seq_len 30 over 4 ranks"):
        experiments.correctness_grid(30, world_sizes=(1, 4), progress=False)
    with pytest.raises(ValueError, match="cannot split scaling size 100 over 4 ranks"):
        experiments.scaling([100], world_size=4, repeats=1, progress=False)


def test_figures_runs_notebooks_given_by_path(tmp_path, capsys):
    """`ringlab figures PATH --out DIR` runs a notebook outside any checkout's notebooks/."""
    from ringlab import cli

    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python",
                                                           "display_name": "Python 3"}})
    nb.cells = [nbformat.v4.new_code_cell('output_dir = "."', metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("import pathlib\npathlib.Path(output_dir, 'made.txt').write_text('ok')")]
    path = tmp_path / "elsewhere" / "mine.ipynb"
    path.parent.mkdir()
    nbformat.write(nb, path)
    out = tmp_path / "figs"
    assert cli.main(["figures", str(path), "--out", str(out)]) == 0
    assert (out / "made.txt").read_text() == "ok"
    with pytest.raises(SystemExit):
        cli.main(["figures", str(tmp_path / "missing.ipynb")])
    assert "no such notebook" in capsys.readouterr().err
