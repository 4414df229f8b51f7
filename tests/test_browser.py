"""The notebooks as users see them: JupyterLab driven by Debian's Chromium through Playwright.

Every notebook is opened, run with Run All Cells (small parameters injected as papermill would),
and checked for errors, rendered plotly figures and rendered widgets; one slider is moved and
the figure must show the new head's data. Screenshots go to test-artifacts/screenshots/ (and, with
RINGLAB_UPDATE_SCREENSHOTS=1, to docs/screenshots/ for the README).
"""

import json
import os
import pathlib
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time

import nbformat
import pytest
from notebook_params import SMALL

from ringlab.workbench import experiments
from ringlab.engine.launch import free_port
from ringlab.workbench.notebooks import NOTEBOOKS, notebook_names

pytestmark = pytest.mark.browser

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts" / "screenshots"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]
PLOTLY, WIDGET = "application/vnd.plotly.v1+json", "application/vnd.jupyter.widget-view+json"
CONTROLS = ", ".join(f".widget-{kind}" for kind in ("slider", "checkbox", "dropdown", "select", "select-multiple",
                                                   "toggle-buttons", "play"))
IDLE = ("() => [...document.querySelectorAll('.jp-StatusBar-TextItem')]"
        ".some(e => e.offsetParent !== null && /\\bIdle\\b/.test(e.textContent))")


def _own_chromium() -> set[int]:
    """Chromium processes descended from this test process (other Chromiums on the machine are
    none of our business)."""
    parent, cmdline = {}, {}
    for d in pathlib.Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmdline[int(d.name)] = (d / "cmdline").read_bytes()
            except (OSError, IndexError, ValueError):
                continue  # exited meanwhile
    ours, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, ppid in parent.items() if ppid in frontier} - ours
        ours |= frontier
    return {pid for pid in ours if b"chrom" in cmdline[pid]}


def _alive(pids) -> set[int]:
    """The pids that still run (zombies count as gone)."""
    alive = set()
    for pid in pids:
        try:
            if pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                alive.add(pid)
        except OSError:
            pass
    return alive


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A fresh JupyterLab on a free loopback port, token auth, own settings and runtime
    dirs, serving copies of the notebooks with small parameters. Always shut down."""
    if CHROMIUM is None:
        missing = "Chromium is missing: install Debian's 'chromium' package (make test does, as root)"
        if os.environ.get("RINGLAB_REQUIRE_BROWSER") == "1":  # CI: a skip would hide a broken set-up
            pytest.fail(missing)
        pytest.skip(missing)
    root = tmp_path_factory.mktemp("lab")
    for name in notebook_names():
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", 4)
        # as papermill does: a cell after the parameters cell overrides them
        params = {**SMALL[name], "output_dir": str(root / "figures"), "png": False}
        at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
        injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items()))
        injected.metadata["tags"] = ["injected-parameters"]
        nb.cells.insert(at + 1, injected)
        nbformat.write(nb, root / f"{name}.ipynb")
    home = root / ".jupyter-test"
    settings = home / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    # render every cell (no virtual scrolling), so every prompt and figure is in the DOM
    tracker = home / "settings" / "@jupyterlab" / "notebook-extension"
    tracker.mkdir(parents=True)
    (tracker / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(home / "settings"), JUPYTER_RUNTIME_DIR=str(home / "runtime"),
               JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
               JUPYTER_DATA_DIR=str(pathlib.Path(sys.prefix) / "share" / "jupyter"))
    token = secrets.token_hex(16)
    log = open(root / "jupyter.log", "w")

    def start():
        port = free_port()
        cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--ServerApp.port_retries=0"]
        if os.geteuid() == 0:
            cmd.append("--allow-root")
        return port, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    port, proc = start()
    try:
        deadline = time.monotonic() + 90
        # free_port() releases its port before JupyterLab binds it, so another process can take
        # it in between: a server that exits before serving is started again on a new port.
        retries = 2
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None and retries:
                    retries -= 1
                    port, proc = start()
                    continue
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("JupyterLab did not start:\n" + (root / "jupyter.log").read_text()[-3000:])
                time.sleep(0.3)
        yield dict(url=f"http://127.0.0.1:{port}", token=token, root=root)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()
        # kernels run in sessions of their own; each was started with a connection file in our runtime dir
        kernels = lambda: subprocess.run(["pgrep", "-f", str(home / "runtime")], capture_output=True,  # noqa: E731
                                         text=True).stdout.split()
        deadline = time.monotonic() + 15
        while kernels() and time.monotonic() < deadline:
            time.sleep(0.2)
        leftover = kernels()
        for pid in leftover:
            os.kill(int(pid), signal.SIGKILL)
        assert proc.poll() is not None, "JupyterLab was left running"
        assert not leftover, f"kernels were left running (killed now): {leftover}"


@pytest.fixture(scope="module")
def browser(lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield b
        finally:
            started = _own_chromium()  # remembered by pid: one that detaches still counts
            b.close()
    deadline = time.monotonic() + 15  # helpers (crashpad, zygote) exit shortly after the browser
    while _alive(started) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert started and not _alive(started), f"Chromium processes were left running: {_alive(started)}"


def _run_all(page, lab, name: str, timeout: float = 400):
    try:
        _open_and_run(page, lab, name, timeout)
    except BaseException:
        _screenshot(page, f"{name}-failure")
        raise


def _open_and_run(page, lab, name, timeout):
    # a workspace of its own, so no tab of an earlier test is restored next to this one
    page.goto(f"{lab['url']}/lab/workspaces/{name}/tree/{name}.ipynb?reset&token={lab['token']}")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
    page.wait_for_function(IDLE, timeout=120_000)
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
    deadline = time.monotonic() + timeout
    while True:
        time.sleep(0.5)
        prompts = [p.strip() for p in page.locator(".jp-CodeCell .jp-InputPrompt").all_inner_texts()]
        started = any(re.fullmatch(r"\[\d+\]:", p) for p in prompts)
        if started and not any("*" in p for p in prompts) and page.evaluate(IDLE):
            if all(re.fullmatch(r"\[\d+\]:", p) for p in prompts):
                break
            # Run All stops at the first error and leaves later cells unrun: report that error now
            _save(page)
            _assert_no_errors(lab, name)
        assert time.monotonic() < deadline, f"{name}: not finished after {timeout} s: {prompts}"
    _save(page)


def _save(page):
    page.keyboard.press("Control+s")
    page.wait_for_function("() => !document.querySelector('.lm-TabBar-tab.lm-mod-current.jp-mod-dirty')",
                           timeout=30_000)


def _assert_no_errors(lab, name):
    saved = nbformat.read(lab["root"] / f"{name}.ipynb", 4)
    errors = [o for c in saved.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{name}: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    return saved


def _screenshot(page, name):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))
    if os.environ.get("RINGLAB_UPDATE_SCREENSHOTS") == "1":
        docs = ROOT / "docs" / "screenshots"
        docs.mkdir(parents=True, exist_ok=True)
        shutil.copy(ARTIFACTS / f"{name}.png", docs / f"{name}.png")


@pytest.mark.parametrize("name", notebook_names())
def test_notebook_runs_in_jupyterlab(lab, browser, name):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        _run_all(page, lab, name)
        saved = _assert_no_errors(lab, name)
        outputs = [o for c in saved.cells for o in c.get("outputs", [])]
        n_plots = sum(PLOTLY in o.get("data", {}) for o in outputs)
        n_widgets = sum(WIDGET in o.get("data", {}) for o in outputs)
        assert n_plots >= 1 and n_widgets >= 1, f"{name}: the notebook shows no plotly figure or no widget"
        page.wait_for_function(f"() => document.querySelectorAll('.js-plotly-plot .main-svg').length > 0"
                               f" && document.querySelectorAll('.js-plotly-plot').length >= {n_plots}",
                               timeout=60_000)
        unrendered = page.evaluate("() => [...document.querySelectorAll('.js-plotly-plot')]"
                                   ".filter(e => !e.querySelector('.main-svg')).length")
        assert unrendered == 0, f"{name}: {unrendered} plotly figure(s) did not render"
        controls = page.locator(CONTROLS)
        assert controls.count() >= 1, f"{name}: no ipywidgets control rendered"
        assert page.get_by_text("Error displaying widget").count() == 0, f"{name}: a widget failed to display"
        controls.first.scroll_into_view_if_needed()
        _screenshot(page, name)
    finally:
        page.close()


def test_moving_a_slider_redraws_the_figure(lab, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        _run_all(page, lab, "dilation")
        slider = page.locator(".widget-slider", has_text="head").first
        slider.scroll_into_view_if_needed()
        title = lambda: page.locator(".js-plotly-plot .gtitle").all_text_contents()  # noqa: E731
        before = title()
        assert "Dilation pattern of head 0: m(q, k)" in before
        # type into the slider's editable readout, as a user can
        readout = slider.locator(".widget-readout")
        readout.click()
        page.keyboard.press("Control+a")
        page.keyboard.type("1")
        page.keyboard.press("Enter")
        try:
            page.wait_for_function("() => [...document.querySelectorAll('.js-plotly-plot .gtitle')]"
                                   ".some(e => e.textContent.includes('head 1'))", timeout=30_000)
        except Exception:
            _screenshot(page, "slider-failure")
            raise
        assert title() != before
        # the redrawn heatmap holds head 1's multiplicities for the widgets' values
        z = page.evaluate("() => [...document.querySelectorAll('.js-plotly-plot')]"
                          ".find(e => e.querySelector('.gtitle')?.textContent.includes('head 1')).data[0].z")
        p = SMALL["dilation"]
        expected = experiments.dilation_geometry(p["seq_len"], p["heads"], [8, 32, 128], [1, 2, 4],
                                                 head_offsets="interleaved", causal=True, layers=1)["m"][1]
        assert [[int(x) for x in row] for row in z] == expected.tolist()
    finally:
        page.close()
