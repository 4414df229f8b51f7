"""The benchmark scripts run end to end (tiny sizes): the GPU script's CPU dry run, the one
entry point, and the exponent fit. Speed itself is measured by the scripts, not asserted here."""

import json

import pytest

from benchmarks import gpu_check, run
from benchmarks.scaling import exponent


def test_gpu_check_dry_run_runs_every_step_and_writes_json(tmp_path):
    summary = gpu_check.main(["--dry-run", "--out", str(tmp_path)])
    assert summary["correctness_ok"], summary["failed_checks"]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    correctness, speed, packed, profiled, merges, hosts, chunks, capacity, notebooks, graphs, _ = data["sections"]
    checked = {r["check"].split()[0].rstrip(",") for r in correctness["rows"]}
    assert checked == {"attention", "dilated_attention", "ring_attention", "ring_dilated_attention", "dilated",
                       "ring", "MultiheadDilatedAttention"}
    assert all(r["backend"] != "-" for r in correctness["rows"])
    assert all("error" not in r and r["ms"] > 0 and r["TFLOPs"] > 0 for r in speed["rows"])
    assert {r["call"] for r in speed["rows"]} == {"SDPA flash", "attention", "ring P=8 (simulated)",
                                                   "dilated (LongNet)", "A/B: ring P=8, torch merge",
                                                   "A/B: ring P=8, rank by rank",
                                                   "A/B: dilated, as before", "simulated ring-dilated P=8",
                                                   "A/B: ring-dilated P=8, rank by rank"}
    assert {(r["variant"], r["kernel"]) for r in merges["rows"]} == {("ringlab merge", "torch"), ("torch merge", "torch"),
                                                                     ("cast + lerp_", "torch")}  # the kernel is CUDA's
    assert summary["merge_kernel"] == "torch"
    assert len(hosts["rows"]) == 4 and all(r["host_us"] > 0 for r in hosts["rows"])
    assert {r["call"] for r in packed["rows"]} == {"attention packed (auto)", "attention packed (per-document blocks)",
                                                    "SDPA per document"}
    assert all(r["ms"] > 0 and r["documents"] > 4 for r in packed["rows"])
    assert {r["call"] for r in chunks["rows"]} == {"ring P=8 (simulated)", "dilated (LongNet)"}
    busy = {(r["call"], r["N"], r["mode"]): r for r in profiled["rows"] if r["kernel"] == "(all)"}
    small, large = sorted({n for _, n, _ in busy})
    assert set(busy) == {(c, n, m) for c, n in [("ring P=8 (simulated)", small), ("dilated (LongNet)", small),
                                               ("dilated (LongNet)", large)] for m in ("fwd", "fwd+bwd")}
    assert all(0 < r["ms"] and 0 < r["of_wall"] <= 1.05 for r in busy.values())
    assert all(r["host_ms"] > 0 for r in speed["rows"])
    assert summary["largest_N_fwd+bwd"] >= 512 and summary["largest_N_fwd"] >= 1024
    assert all(r["fits"] and abs(r["model_over_measured"] - 1) <= 0.1 for r in capacity["rows"])
    assert notebooks["rows"] == []  # the dry run leaves the notebooks to the CPU tests
    assert graphs["rows"] == []  # CUDA graphs need CUDA
    assert (tmp_path / "gpu_check.md").read_text().startswith("# ringlab benchmarks: gpu_check-dry-run")


def test_run_writes_one_summary_and_keeps_sections_when_one_fails(tmp_path, monkeypatch):
    import benchmarks.hardware

    def broken(quick):
        raise RuntimeError("boom")

    monkeypatch.setattr(benchmarks.hardware, "run", broken)
    status = run.main(["--quick", "--only", "accuracy", "hardware", "--out-dir", str(tmp_path)])
    assert status == 1
    (md,), (js,) = tmp_path.glob("*-quick.md"), tmp_path.glob("*-quick.json")
    sections = {s["name"]: s for s in json.loads(js.read_text())["sections"]}
    ours = [r for r in sections["accuracy"]["rows"] if r["impl"] == "ringlab"]
    assert ours and all(r["within_tolerance"] for r in ours)
    assert "FAILED" in sections["hardware"]["notes"] and "boom" in md.read_text()


def test_low_precision_measures_every_call_against_sdpa():
    from benchmarks import low_precision

    rows = low_precision.run(quick=True)["rows"]
    calls = [(c, d) for d in ("bfloat16", "float16") for c in low_precision.CALLS]
    assert [(r["call"], r["dtype"]) for r in rows] == calls
    for r in rows:
        assert 0 < r["worst_ulps"] <= 2, r  # the tests' limit (docs/design.md §7)
        assert r["worst_ulps"] == max(r[f"{q}_ulps"] for q in low_precision.QUANTITIES)
    assert {r["vs_sdpa"] for r in rows if r["call"] == "SDPA (torch)"} == {1.0}


def test_host_overhead_counts_the_ops_of_each_call():
    from benchmarks import host_overhead

    rows = {(r["call"], r["dtype"], r["mode"]): r for r in host_overhead.run(quick=True)["rows"]}
    assert len(rows) == 28 and all(r["ms"] > 0 and 0 < r["kernels"] <= r["ops"] for r in rows.values())
    for dtype in ("float32", "bfloat16"):
        one, ring = rows[("attention", dtype, "fwd")], rows[("ring P=8 zigzag (simulated)", dtype, "fwd")]
        alone = rows[("ring P=8 zigzag (simulated, rank by rank)", dtype, "fwd")]
        assert one["blocks"] == 1 and alone["blocks"] == 64  # 8 ranks x 8 steps, zigzag: a block each
        assert ring["blocks"] == 15  # together: one run at step 0, then the ranks before and after the owner
        assert alone["kernels"] > 5 * alone["blocks"]  # merges, copies, accumulators: the host work per block
        assert ring["kernels"] < alone["kernels"] / 3
        dilated, as_on_gpu = rows[("dilated (LongNet)", dtype, "fwd")], rows[("dilated (LongNet, cut as on a GPU)",
                                                                                 dtype, "fwd")]
        assert dilated["blocks"] == 11 and as_on_gpu["blocks"] == 4  # one call per branch
        assert as_on_gpu["kernels"] < dilated["kernels"]
        rd = rows[("ring-dilated P=8 zigzag (simulated)", dtype, "fwd")]
        rd_alone = rows[("ring-dilated P=8 zigzag (simulated, rank by rank)", dtype, "fwd")]
        assert rd_alone["blocks"] == 256 and rd["blocks"] == 82  # together: runs of ranks whose blocks read alike
        assert dilated["blocks"] < rd["blocks"] and rd["kernels"] < rd_alone["kernels"] / 2


def test_exponent_fit():
    assert exponent([1, 2, 4, 8], [3, 12, 48, 192]) == pytest.approx(2.0, rel=1e-12, abs=0)
    assert exponent([1, 2, 4], [8, 4, 2]) == pytest.approx(-1.0, rel=1e-12, abs=0)


def test_timing_interleaves_and_reports_the_per_round_ratio():
    from ringlab.workbench.timing import ratio_spread, side_by_side
    calls = []
    times = side_by_side({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4 and [len(t) for t in times.values()] == [3, 3]
    stats = ratio_spread({"a": [2.0, 4.0, 3.0], "b": [1.0, 1.0, 1.0]}, "a", "b")
    assert stats == dict(median=3.0, low=2.0, high=4.0, spread=2.0)


def test_gpu_check_graph_step_captures_once_and_replays():
    """The CUDA-graph step (CUDA only, last on a lease) with a stand-in capture on CPU: each call
    is captured once per input set and replayed after, beside its eager form; a capture that
    fails is its row's error, and the other rows stand."""
    captured, replayed = [], []

    def stand_in(fn):
        graphs = {}

        def call(q, k, v, causal):
            key = (q.data_ptr(), causal)
            if key not in graphs:
                captured.append(key)
                graphs[key] = fn(q, k, v, causal)
            replayed.append(key)
            return graphs[key]
        return call

    rows = gpu_check.graph_rows("cpu", [64], 2, 16, 2, 256, capture=stand_in)
    assert len(rows) == 8 and len(captured) == 4 and len(replayed) == 4 * 3  # the trial call and 2 repeats
    graphed = [r for r in rows if r["call"].endswith("CUDA graph replay")]
    assert len(graphed) == 4 and all(r["ms"] > 0 and r["over_eager"] > 0 and "error" not in r for r in graphed)

    def failing(fn):
        def call(*args):
            raise RuntimeError("operation not permitted when stream is capturing")
        return call

    rows = gpu_check.graph_rows("cpu", [64], 2, 16, 1, 256, capture=failing)
    errors = [r for r in rows if "error" in r]
    assert len(errors) == 4 and all("capturing" in r["error"] and "ms" not in r for r in errors)
    assert all(r["ms"] > 0 for r in rows if "error" not in r) and len(rows) == 8
