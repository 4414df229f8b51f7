"""Issue 17: nothing wrong without an error, nothing lost, nothing left running.

One regression test (or a few) per case of the issue; multi-rank cases spawn 2 gloo ranks.
"""

import glob
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest
import reliability_workers as rw
import torch

import ringlab
from ringlab import cli, run
from ringlab.planning import memory, planner
from ringlab.planning.strategies import compare
from ringlab.workbench import sweep, viz
from ringlab.engine.launch import RankError, launch
from ringlab.engine.layout import LAYOUTS

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}


def cli_error(capsys, argv) -> str:
    """Run the ringlab command; it must exit 2 with a one-line message, not a traceback."""
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    return err


# ---------------------------------------------------------------- 2, 5, 10: sweeps
def fake_execute(sweep_, index, gpus=None):
    """Stands in for a run's process: records the point as a finished run."""
    name, point = sweep_.runs[index]
    run_dir = sweep_.folder / name
    run_dir.mkdir(parents=True, exist_ok=True)
    status = dict(status="ok", error=None, params=point, seconds=0.0)
    (run_dir / "status.json").write_text(json.dumps(status))
    return status


def test_sweep_points_with_a_long_common_prefix_get_their_own_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "_execute", fake_execute)
    monkeypatch.setattr(sweep, "_summary_figure", lambda rows, folder: None)
    # before: names were cut at 150 characters, so both points shared one folder
    params = [("sizes", [str([8] * 40)]), ("heads", ["1", "2"])]
    report = sweep.run_sweep("scaling", params, root=tmp_path, progress=False)
    assert sum(r["status"] == "ok" for r in report.runs) == 2
    with open(report.folder / "results.csv") as f:
        assert len(f.readlines()) == 3  # header + one row per grid point
    names = {sweep._run_name({"sizes": [8] * 40, "heads": h}) for h in range(50)}
    assert len(names) == 50 and all(len(n) < 100 for n in names)


def test_sweep_rejects_unknown_parameters_before_running(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep, "_execute", lambda *a: pytest.fail("a run started"))
    with pytest.raises(ValueError, match=r"no parameter 'seqlen'.*heads, head_dim"):
        sweep.run_sweep("scaling", [("seqlen", ["32", "64"])], root=tmp_path, progress=False)
    err = cli_error(capsys, ["sweep", "notebooks/scaling.ipynb", "-p", "seqlen", "32", "--runs", str(tmp_path)])
    assert "seqlen" in err and "sizes" in err
    assert not list(tmp_path.iterdir())  # nothing was created


def test_sweep_into_an_unwritable_folder(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    err = cli_error(capsys, ["sweep", "scaling", "-p", "heads", "1", "--runs", str(blocker)])
    assert "cannot write the sweep folder" in err and "--runs" in err


@pytest.mark.parametrize("content", ["{}", "[]", '{"notebook": 1, "runs": [], "timeout": 5}',
                                     '{"notebook": "a.ipynb", "runs": [{"name": "x"}], "timeout": 5}'])
def test_sweep_collect_names_a_sweep_json_of_the_wrong_shape(tmp_path, capsys, content):
    (tmp_path / "s1").mkdir()
    (tmp_path / "s1" / "sweep.json").write_text(content)
    err = cli_error(capsys, ["sweep", "--collect", "s1", "--runs", str(tmp_path)])
    assert "sweep.json is unreadable" in err and "run the sweep command again" in err


def test_figures_and_sweep_check_their_folders_and_timeouts(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert "cannot write the figures folder" in cli_error(capsys, ["figures", "--index", "--out", str(blocker / "x")])
    assert "is not a folder" in cli_error(capsys, ["figures", "--index", "--notebooks", str(tmp_path / "none")])
    assert "--timeout must be a positive" in cli_error(capsys, ["figures", "--timeout", "-5"])
    for bad in ("-5", "nan"):
        err = cli_error(capsys, ["sweep", "scaling", "-p", "heads", "1", "--timeout", bad, "--runs", str(tmp_path)])
        assert "timeout must be a positive number" in err


def test_sweep_resume_names_a_truncated_status_file_and_reruns_it(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "_execute", fake_execute)
    monkeypatch.setattr(sweep, "_summary_figure", lambda rows, folder: None)
    params = [("heads", ["1", "2"])]
    report = sweep.run_sweep("scaling", params, root=tmp_path, progress=False)
    broken = report.folder / sweep._run_name({"heads": 1}) / "status.json"
    broken.write_text('{"status": "o')
    with pytest.warns(UserWarning, match=f"{broken}.*runs again"):
        again = sweep.run_sweep("scaling", params, root=tmp_path, progress=False)
    assert sorted(r["status"] for r in again.runs) == ["ok", "skipped"]
    assert json.loads(broken.read_text())["status"] == "ok"


# ---------------------------------------------------------------- 3, 10, 12: the launcher
def _children(pid):
    """Live (not zombie) processes whose parent is ``pid``."""
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = open(stat).read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[1]) == pid:
            found.append(int(stat.split("/")[2]))
    return found


def _alive(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.distributed
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killing_the_caller_of_launch_leaves_no_rank_and_no_folder(tmp_path, sig):
    script = tmp_path / "caller.py"
    script.write_text("import reliability_workers\nfrom ringlab.engine.launch import launch\n"
                      "if __name__ == '__main__':\n"
                      "    launch(reliability_workers.hang_in_collective, 2, timeout=600)\n")
    parent = subprocess.Popen([sys.executable, str(script)], env=ENV)
    try:
        deadline = time.monotonic() + 180
        folders = []
        while time.monotonic() < deadline:
            folders = glob.glob(os.path.join(tempfile.gettempdir(), f"ringlab-launch-{parent.pid}-*"))
            if folders and all(os.path.exists(os.path.join(folders[0], f"rank{r}.joined")) for r in (0, 1)):
                break
            assert parent.poll() is None, "the launching script ended early"
            time.sleep(0.2)
        else:
            pytest.fail("the ranks did not join within 180 s")
        left = _children(parent.pid)
        assert len(left) >= 3  # two ranks and the reaper
        parent.send_signal(sig)
        parent.wait(10)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 10 and (any(map(_alive, left)) or os.path.exists(folders[0])):
            time.sleep(0.1)
        assert not [p for p in left if _alive(p)], "processes of the launch outlived their parent"
        assert not os.path.exists(folders[0]), "the launch folder was left behind"
    finally:
        parent.kill()
        parent.wait()


def test_launch_removes_folders_of_callers_that_no_longer_exist(tmp_path, monkeypatch):
    from ringlab.engine import launch as launcher

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"ringlab-launch-{int(gone.stdout)}-abc"
    live = tmp_path / f"ringlab-launch-{os.getpid()}-def"
    other = tmp_path / "ringlab-launch-abcdefgh"  # an older release's name: not ours to judge
    for folder in (stale, live, other):
        folder.mkdir()
    launcher._remove_stale_folders()
    assert not stale.exists() and live.exists() and other.exists()


@pytest.mark.distributed
def test_rank_that_exits_with_code_zero_is_a_rank_error():
    with pytest.raises(RankError, match="rank 1 failed") as info:
        launch(rw.quit_with_zero_on, 2, args=(1,), timeout=120)
    assert "exit code 0 before returning a result" in str(info.value)
    assert info.value.ranks[0] == 1


@pytest.mark.distributed
def test_rank_that_returned_is_not_failed_by_an_abort_in_interpreter_teardown():
    # CI once lost a run to SIGABRT ("terminate called without an active exception") in a gloo
    # rank's teardown; a rank that has returned its result leaves without finalization.
    assert launch(rw.abort_at_interpreter_exit, 2, timeout=120) == [0, 1]


@pytest.mark.parametrize("bad, kind", [(math.nan, ValueError), (math.inf, ValueError), (-1, ValueError),
                                       (0, ValueError), ("10", TypeError)])
def test_launch_timeout_must_be_a_finite_positive_number(bad, kind):
    with pytest.raises(kind, match="timeout must be a (positive )?number of seconds"):
        launch(rw.hang_in_collective, 2, timeout=bad)


def test_launch_at_the_top_level_of_an_unguarded_script_says_to_guard_it(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text("from ringlab.workbench.experiments import ring_trace\n"
                      "events = ring_trace(world_size=2, seq_len=64, layout='zigzag')\n")
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, str(script)], env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert f"{script}:2" in done.stderr and "if __name__ == \"__main__\":" in done.stderr
    assert "RankError" not in done.stderr  # it stops before any rank starts
    assert time.monotonic() - t0 < 60


# ---------------------------------------------------------------- 4: group metadata
@pytest.mark.distributed
def test_ranks_with_different_branch_counts_get_a_readable_error():
    errors = launch(rw.ring_dilated_error, 2, args=([{}, dict(segment_lengths=[4, 8], dilation_rates=[1, 2])],),
                    timeout=120)
    for err in errors:
        assert err is not None and "disagree on branches" in err
        assert "'dtype': 'float32'" in err and "'scale': 0.5" in err  # names and floats, not codes
    errors = launch(rw.ring_dilated_error, 2, args=([{}, dict(dtype="float64", scale=0.25)],), timeout=120)
    for err in errors:
        assert "disagree on dtype, scale" in err and "'float64'" in err and "0.25" in err


# ---------------------------------------------------------------- 6: PNG export
def test_hanging_png_export_gives_up_and_writes_html_and_json(tmp_path, monkeypatch):
    import plotly.graph_objects as go

    release = threading.Event()
    monkeypatch.setattr(viz, "_export_image", lambda fig, path: release.wait(60))  # Chromium hangs
    monkeypatch.setattr(viz, "_image_hung", [])
    monkeypatch.setattr(viz, "PNG_TIMEOUT", 1.0)
    figs = {"a": go.Figure(go.Scatter(y=[1, 2])), "b": go.Figure(go.Scatter(y=[2, 1]))}
    t0 = time.monotonic()
    try:
        with pytest.warns(UserWarning, match="did not finish within 1 s"):
            written = viz.save("hang", figs, data={"x": 1}, out_dir=tmp_path)
    finally:
        release.set()
    assert time.monotonic() - t0 < 10  # one timeout, then image export is off
    assert written["png"] == written["pdf"] == written["svg"] == [] and (tmp_path / "hang.html").exists() and (tmp_path / "hang.json").exists()


# ---------------------------------------------------------------- 7, 10: the planner
def test_planner_searches_every_gpu_count_the_layout_allows(capsys):
    p = planner.plan("1e9", heads=32, head_dim=128)
    assert p.gpus == p.min_gpus and p.fits and p.gpus & (p.gpus - 1)  # not a power of two
    counts = planner.gpu_counts(planner.Problem(**p.problem))
    smaller = counts[counts.index(p.gpus) - 1]
    assert not planner.plan("1e9", heads=32, head_dim=128, gpus=smaller).fits
    err = cli_error(capsys, ["plan", "--tokens", "1000001", "--heads", "32", "--head-dim", "128"])
    assert "zigzag" in err and "evenly" in err and "do not fit" not in err
    assert planner.plan(1000001, heads=32, head_dim=128, layout="contiguous").fits


def test_planner_memory_failure_names_the_largest_count_tried():
    with pytest.raises(ValueError, match=r"do not fit in memory on any GPU count.*largest, 1,048,576") as info:
        planner.plan(2**60, heads=32, head_dim=128, layout="contiguous", gpu="a100")
    assert "GiB per GPU" in str(info.value)


def test_plan_command_errors_are_messages(tmp_path, capsys):
    base = ["plan", "--heads", "32", "--head-dim", "128"]
    assert "positive whole number" in cli_error(capsys, base + ["--tokens", "1e400"])
    assert "--segments must be comma-separated" in cli_error(capsys, base + ["--tokens", "1G", "--segments", ",",
                                                                          "--rates", ","])
    assert "cannot read the device profiles" in cli_error(capsys, base + ["--tokens", "1G", "--devices",
                                                                           str(tmp_path / "none.json")])
    bad = tmp_path / "bad.json"
    bad.write_text('{"h100": {"name": "x"')
    assert "not valid JSON" in cli_error(capsys, base + ["--tokens", "1G", "--devices", str(bad)])
    bad.write_text('{"h100": {"name": "x", "hbm_gib": 80}}')
    assert "must have exactly the fields" in cli_error(capsys, base + ["--tokens", "1G", "--devices", str(bad)])


def test_plan_piped_into_a_reader_that_stops_early_is_not_an_error():
    cmd = (f"{sys.executable} -m ringlab.cli plan --tokens 1M --heads 8 --head-dim 64 --json --documents exp:64 "
           "| head -c 1 > /dev/null; echo ${PIPESTATUS[0]}")
    done = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "0" and "BrokenPipeError" not in done.stderr, done.stderr


def test_device_profile_numbers_out_of_range_are_named(tmp_path, capsys):
    base = ["plan", "--heads", "32", "--head-dim", "128", "--tokens", "1G"]
    good = json.loads(planner.DEVICES_FILE.read_text())["h100"]
    for field, value in (("usable", 5.0), ("hbm_gib", 1e-300), ("bf16_tflops", 1e300), ("gpus_per_node", 2.5)):
        bad = tmp_path / f"{field}.json"
        bad.write_text(json.dumps({"h100": {**good, field: value}}))
        assert f"{field} must be a number from" in cli_error(capsys, base + ["--devices", str(bad)])


@pytest.mark.parametrize("tokens", [-4096, 0, True, 2.5])
def test_planner_takes_only_a_positive_whole_number_of_tokens(tokens):
    for call in (planner.plan, compare):
        with pytest.raises(ValueError, match="tokens must be"):
            call(tokens, heads=8, head_dim=64, gpus=1)
    assert planner.parse_tokens("9007199254740993") == 2**53 + 1  # exact, not through a float


@pytest.mark.parametrize("option,value", [("--heads", "0"), ("--head-dim", "-64"), ("--batch", "0"),
                                          ("--kv-heads", "0"), ("--gpus-per-node", "0"), ("--dtype", "int8")])
def test_plan_with_strategy_checks_what_plain_plan_checks(capsys, option, value):
    base = ["plan", "--tokens", "4096", "--heads", "8", "--head-dim", "64", "--gpus", "8"]
    err = cli_error(capsys, [*base, "--strategy", "best", option, value])
    assert "must be" in err and option.lstrip("-").replace("-", "_") in err


def test_compare_checks_its_arguments_like_plan():
    kw = dict(heads=8, head_dim=64, gpus=8)
    assert compare(4096, **kw, dtype="bf16").to_dict() == compare(4096, **kw, dtype=torch.bfloat16).to_dict() == \
        compare(4096, **kw, dtype="bfloat16").to_dict()
    for bad, match in ((dict(dtype="int8"), "dtype must be one of"), (dict(layout="foo"), "layout must be one of"),
                       (dict(causal="yes"), "causal must be True or False"),
                       (dict(head_offsets="foo"), "head_offsets must be one of"),
                       (dict(segments=[1024], rates=[1], layout="striped"), "whole chunks")):
        with pytest.raises(ValueError, match=match):
            compare(4096, **{**kw, **bad})


def test_exp_documents_are_drawn_at_once_and_bounded():
    """The draw is vectorised (a million documents in well under a second of it) and a mean
    that would make more than MAX_DOCUMENTS documents is refused instead of running for hours."""
    lengths = planner.document_lengths("exp:64", 2**26, multiple=4)
    assert sum(lengths) == 2**26 and all(n > 0 and n % 4 == 0 for n in lengths[:-1]) and len(lengths) > 900_000
    with pytest.raises(ValueError, match="use a mean of at least 256"):
        planner.document_lengths("exp:1", 2**30)
    with pytest.raises(ValueError, match="multiple must be an int >= 1"):
        planner.document_lengths("exp:10", 100, multiple=0)


# ---------------------------------------------------------------- 8: shard / unshard
@pytest.mark.parametrize("layout", LAYOUTS)
def test_shard_and_unshard_take_negative_dims(layout):
    x = torch.randn(4, 8, 4, 8)
    for dim in range(-4, 4):
        shards = [ringlab.shard(x, r, 2, layout, dim=dim) for r in range(2)]
        same = [ringlab.shard(x, r, 2, layout, dim=dim % 4) for r in range(2)]
        assert all(torch.equal(a, b) for a, b in zip(shards, same))
        assert torch.equal(ringlab.unshard(shards, layout, dim=dim), x)
    if layout == "striped":
        assert torch.equal(ringlab.shard(x, 1, 2, layout, dim=-1), x[..., 1::2])


def test_unshard_refuses_unequal_shards():
    with pytest.raises(ValueError, match="equal shape"):
        ringlab.unshard([torch.zeros(1, 4, 2, 2), torch.zeros(1, 3, 2, 2)])
    with pytest.raises(ValueError, match="on one device"):
        ringlab.unshard([torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2, device="meta")])
    with pytest.raises(ValueError, match="out of range"):
        ringlab.shard(torch.zeros(1, 4, 2, 2), 0, 2, dim=4)


# ---------------------------------------------------------------- 9: memory.track
def test_nested_or_concurrent_memory_regions_raise():
    with memory.track() as outer:
        with pytest.raises(RuntimeError, match="cannot nest or overlap"):
            with memory.track():
                pass
        raised = []

        def other():
            try:
                with memory.track():
                    pass
            except RuntimeError as err:
                raised.append(err)
        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert raised and "another" in str(raised[0])
        x = torch.zeros(1 << 16)
    assert outer.peak >= x.numel() * 4  # the outer region still measures
    with memory.track() as region:  # on CPU, what other threads allocate is not counted (README)
        t = threading.Thread(target=lambda: torch.zeros(1 << 16))
        t.start()
        t.join()
    assert region.peak < 1 << 16
    with memory.track() as again:  # and the lock is released
        torch.zeros(1 << 10)
    assert again.peak >= 4096


# ---------------------------------------------------------------- 10: other messages
def test_modules_check_their_arguments():
    from ringlab.engine.nn import DilatedAttention, LongNetBlock, LongNetLM, MultiheadDilatedAttention, RingAttention

    with pytest.raises(ValueError, match="num_heads must be an int >= 1"):
        MultiheadDilatedAttention(8, 0, [4], [1])
    model = LongNetLM(10, 8, 1, 2, [4], [1], max_seq_len=8)
    with pytest.raises(ValueError, match=r"9 tokens.*max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    for tokens in (torch.zeros(8, dtype=torch.long), torch.zeros(1, 8)):
        with pytest.raises(TypeError, match=r"tokens must be a \(batch, seq\) tensor of integer token ids"):
            model(tokens)
    for wrong in (10, -1):
        with pytest.raises(ValueError, match=rf"token ids must lie in \[0, 10\) \(vocab_size\), got {wrong}"):
            model(torch.tensor([[3, wrong, 0]]))
    with pytest.raises(ValueError, match="total_tokens must be an int >= 1"):
        model.loss(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long), total_tokens=0)
    bad = [(lambda: LongNetLM(10, 8, 0, 2, [4], [1]), ValueError, "depth must be an int >= 1"),
           (lambda: LongNetLM(-1, 8, 1, 2, [4], [1]), ValueError, "vocab_size must be an int >= 1"),
           (lambda: LongNetLM(10.0, 8, 1, 2, [4], [1]), TypeError, r"vocab_size must be an int, got 10\.0 \(float\)"),
           (lambda: LongNetLM(10, 8, 1, 2, [4], [1], max_seq_len=0), ValueError, "max_seq_len must be"),
           (lambda: LongNetBlock(8, 2, [4], [1], mlp_ratio=-1), ValueError, "mlp_ratio must be"),
           (lambda: MultiheadDilatedAttention(8, 2, [4], [1], layer_norm_eps=-1.0), ValueError, "layer_norm_eps"),
           (lambda: MultiheadDilatedAttention(8, 2, [4], [1], gamma_init=math.nan), ValueError, "gamma_init"),
           (lambda: DilatedAttention([4, 8], [1]), ValueError, "same length"),
           (lambda: DilatedAttention(4.0, 1), TypeError, "segment_lengths must"),
           (lambda: DilatedAttention([4], [1], head_offsets="x"), ValueError, "head_offsets must be one of"),
           (lambda: DilatedAttention([4], [1], layout="striped"), ValueError, "layout must be one of"),
           (lambda: RingAttention(ring_size=2, layout="x"), ValueError, "layout must be one of")]
    for make, kind, match in bad:
        with pytest.raises(kind, match=match):
            make()


def test_numpy_bool_causal_is_explained():
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(TypeError, match=r"must be a bool.*numpy\.bool.*bool\(causal\)"):
        ringlab.attention(q, q, q, causal=np.bool_(True))


def test_huge_scale_and_branch_values_are_errors_not_nan():
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="scale must be <="):
        ringlab.attention(q, q, q, scale=1e300)
    with pytest.raises(ValueError, match="segment_lengths must be <= 2\\*\\*40"):
        ringlab.dilated_attention(q, q, q, [2**59], [1])
    with pytest.raises(ValueError, match="dilation_rates must be <= 2\\*\\*40"):
        ringlab.dilated_attention(q, q, q, [8], [2**59])


@pytest.mark.parametrize("argv, message", [(["--iters", "0"], "--iters must be >= 1"),
                                           (["--segments", "256,x", "--rates", "1,2"], "comma-separated ints")])
def test_run_arguments_are_checked(argv, message, capsys):
    with pytest.raises(SystemExit):
        run.parse_args(argv)
    assert message in capsys.readouterr().err


def test_run_and_plan_take_the_same_dtype_names():
    from ringlab.planning.planner import plan

    assert run.parse_args(["--dtype", "bf16"]).dtype == run.parse_args(["--dtype", "bfloat16"]).dtype == "bfloat16"
    assert plan(4096, heads=8, head_dim=64, dtype="fp32", gpus=1).problem["dtype"] == "float32"


# ---------------------------------------------------------------- 14: run --check
def test_run_check_uses_the_single_device_function_in_float32(monkeypatch, capsys):
    calls = []
    real = ringlab.attention
    monkeypatch.setattr(ringlab, "attention", lambda q, k, v, **kw: calls.append((q.dtype, q.shape)) or real(q, k, v, **kw))
    run.main(["--seq-len", "64", "--heads", "2", "--head-dim", "8", "--dtype", "bfloat16", "--layout", "zigzag",
              "--causal", "--iters", "1", "--check"])
    out = capsys.readouterr().out
    assert calls == [(torch.float32, (1, 64, 2, 8))]
    assert "check: single-device attention in float32" in out
    error = float(out.rsplit(":", 1)[1])
    assert error < 2e-2  # bfloat16 ring vs float32 single device
    with pytest.raises(SystemExit):
        run.parse_args(["--help"])
    assert "single-device attention / dilated_attention" in " ".join(capsys.readouterr().out.split())
