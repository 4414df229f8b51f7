"""Plotly figures of ringlab's data: traces of real runs, dilation geometry, memory, errors,
scaling and plans. Each builder takes plain data (from ringlab.engine.trace or ringlab.workbench.experiments)
and returns a ``plotly.graph_objects.Figure`` in the ``ringlab`` template (set as plotly's default
on import); :func:`save` writes them to figures/."""

from __future__ import annotations

import datetime
import functools
import json
import math
import os
import pathlib
import platform
import shutil
import subprocess
import threading
import warnings
from collections import defaultdict

import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

# Okabe and Ito's colour-blind-safe palette (blue first, its yellow last: faint on white)
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#56B4E9", "#CC79A7", "#000000", "#F0E442"]
# One template for every figure: fonts that stay readable in a two-column paper, the palette,
# and margins that grow to fit tick labels, axis titles, the title and the legend (automargin),
# so that nothing is clipped in the HTML, PNG, PDF or SVG.
TEMPLATE = go.layout.Template(layout=dict(
    font=dict(family="Arial, Helvetica, 'DejaVu Sans', sans-serif", size=14, color="#222222"),
    # the title sits in the figure's top margin (container coordinates), which grows to hold it
    title=dict(font=dict(size=18), automargin=True, yref="container", y=1, yanchor="top", pad=dict(t=12),
               x=0.02, xanchor="left"),
    colorway=PALETTE, colorscale=dict(sequential="Viridis"),
    xaxis=dict(automargin=True), yaxis=dict(automargin=True),
    legend=dict(font=dict(size=13)),
    margin=dict(l=70, r=30, t=90, b=60, autoexpand=True)))
pio.templates["ringlab"] = TEMPLATE
pio.templates.default = "plotly_white+ringlab"
LEGEND_ROW = 30  # pixels per legend entry at the template's legend font
PANEL_SPACING = 0.09  # between side-by-side panels: room for the next panel's tick labels and axis title
STATE_NAMES = ["not yet", "computed earlier", "computing now", "skipped (future)"]
STATE_COLORS = ["#f2f2f2", "#9ecae1", "#08519c", "#fdd0a2"]


def _discrete_scale(colors):
    n = len(colors)
    scale = []
    for i, c in enumerate(colors):
        scale += [[i / n, c], [(i + 1) / n, c]]
    return scale


def _tile_events(events, pass_):
    """{(branch, step): [tile events]} of compute/skip events of one pass."""
    frames = defaultdict(list)
    for e in events:
        if e["kind"] in ("compute", "skip") and e.get("pass", "forward") == pass_ and not e.get("local"):
            frames[(e.get("branch", 0), e["step"])].append(e)
    return dict(sorted(frames.items()))


def ring_states(events, world_size: int, pass_: str = "forward"):
    """[(label, state grid, text grid)] per ring step: each (query rank, K/V source rank)
    tile as 0 not yet, 1 computed earlier, 2 computing now, 3 skipped."""
    p = world_size
    frames_data = _tile_events(events, pass_)
    if not frames_data:
        raise ValueError("no compute/skip events for this pass in the trace")
    state = [[0] * p for _ in range(p)]
    out = []
    for (branch, step), evs in frames_data.items():
        state = [[1 if x == 2 else x for x in row] for row in state]
        held = {}
        for e in evs:
            state[e["rank"]][e["src"]] = 2 if e["kind"] == "compute" else 3
            held[e["rank"]] = e["src"]
        text = [[f"K/V of rank {s}" if held.get(r) == s else "" for s in range(p)] for r in range(p)]
        label = f"step {step}" if len({b for b, _ in frames_data}) == 1 else f"branch {branch}, hop {step}"
        out.append((label, state, text))
    return out


def ring_steps_figure(events, world_size: int, *, pass_: str = "forward", title: str | None = None):
    """The ring's steps side by side (the static view of :func:`ring_rotation_figure`)."""
    states = ring_states(events, world_size, pass_)
    cols = min(4, len(states))
    rows = -(-len(states) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[s[0] for s in states],
                        horizontal_spacing=0.04, vertical_spacing=0.12)
    for i, (label, state, text) in enumerate(states):
        fig.add_heatmap(z=state, text=text, texttemplate="%{text}", zmin=-0.5, zmax=3.5, showscale=i == 0,
                        colorscale=_discrete_scale(STATE_COLORS), row=i // cols + 1, col=i % cols + 1,
                        colorbar=dict(tickvals=[0, 1, 2, 3], ticktext=STATE_NAMES),
                        hovertemplate="queries of rank %{y}<br>K/V of rank %{x}<extra></extra>")
    fig.update_yaxes(autorange="reversed", dtick=1)
    fig.update_xaxes(dtick=1)
    fig.update_layout(title=title or f"Ring attention, {world_size} ranks: rows = query blocks, columns = K/V blocks "
                                     f"({pass_})", height=300 * rows + 80)
    return fig


def ring_rotation_figure(events, world_size: int, *, pass_: str = "forward", title: str | None = None):
    """An animated (query rank x K/V source rank) grid, one frame per ring step: which tile of
    the attention matrix each rank computes (or skips) while holding which K/V block."""
    p = world_size
    frames = [go.Frame(name=label, data=[go.Heatmap(z=state, text=text, texttemplate="%{text}")])
              for label, state, text in ring_states(events, world_size, pass_)]
    fig = go.Figure(data=frames[0].data, frames=frames)
    fig.update_traces(zmin=-0.5, zmax=3.5, colorscale=_discrete_scale(STATE_COLORS), x=list(range(p)), y=list(range(p)),
                      colorbar=dict(tickvals=[0, 1, 2, 3], ticktext=STATE_NAMES, title="tile"),
                      hovertemplate="queries of rank %{y}<br>keys/values of rank %{x}<br>%{text}<extra></extra>")
    fig.update_layout(
        title=title or f"Ring attention, {p} ranks: the tile each rank computes at each step ({pass_})",
        xaxis=dict(title="K/V block (source rank)", dtick=1), yaxis=dict(title="query block (rank)", dtick=1, autorange="reversed"),
        **_player(frames, frame_ms=700), height=520)
    return fig


def _player(frames: list, *, frame_ms: int) -> dict:
    """Layout of a slider over ``frames`` (its current frame's name shown at the right end, clear
    of the buttons) and play/pause buttons at its left."""
    steps = [dict(method="animate", label=f.name, args=[[f.name], dict(mode="immediate", frame=dict(duration=0, redraw=True))])
             for f in frames]
    return dict(
        sliders=[dict(steps=steps, currentvalue=dict(prefix="", xanchor="right"), pad=dict(t=50), x=0.25, len=0.75)],
        updatemenus=[dict(type="buttons", showactive=False, direction="left", x=0, y=-0.1, xanchor="left",
                          yanchor="top", pad=dict(t=50), buttons=[
            dict(label="play", method="animate", args=[None, dict(frame=dict(duration=frame_ms, redraw=True), fromcurrent=True)]),
            dict(label="pause", method="animate", args=[[None], dict(mode="immediate", frame=dict(duration=0))])])])


def timeline_figure(events, *, title: str | None = None):
    """Per rank: compute spans, and communication in flight (posted until its wait returned),
    with the time a rank sat blocked in a wait marked. Overlap = compute under a flight bar."""
    t_start = min(e.get("t0", e.get("t", math.inf)) for e in events if "t0" in e or "t" in e)
    ranks = sorted({e["rank"] for e in events})
    fig = go.Figure()
    series = {"compute": (PALETTE[0], 0.6), "in flight": (PALETTE[1], 0.25), "blocked in wait": (PALETTE[5], 0.25)}
    rows = defaultdict(lambda: ([], [], [], []))
    for e in events:
        y = f"rank {e['rank']} {e.get('pass', 'forward')}"
        if e["kind"] == "compute":
            rows["compute"][0].append(e["t1"] - e["t0"])
            rows["compute"][1].append(e["t0"] - t_start)
            rows["compute"][2].append(y)
            rows["compute"][3].append(f"step {e['step']}, K/V of rank {e['src']}")
        elif e["kind"] == "wait":
            rows["in flight"][0].append(e["t1"] - e["posted"])
            rows["in flight"][1].append(e["posted"] - t_start)
            rows["in flight"][2].append(y)
            rows["in flight"][3].append(f"{e['label']}, {e['bytes'] / 2**20:.2f} MiB")
            rows["blocked in wait"][0].append(e["t1"] - e["t0"])
            rows["blocked in wait"][1].append(e["t0"] - t_start)
            rows["blocked in wait"][2].append(y)
            rows["blocked in wait"][3].append(e["label"])
    for name, (color, width) in series.items():
        dur, base, ys, text = rows[name]
        fig.add_bar(x=[d * 1e3 for d in dur], base=[b * 1e3 for b in base], y=ys, orientation="h", name=name,
                    marker_color=color, width=width, hovertext=text, textposition="none",
                    hovertemplate="%{hovertext}<br>%{x:.2f} ms<extra>" + name + "</extra>")
    fig.update_layout(barmode="overlay", title=title or "Compute and communication per rank (overlap: compute under a flight bar)",
                      xaxis_title="time (ms)", yaxis=dict(categoryorder="category descending"),
                      height=160 + 40 * len(ranks) * 2)
    return fig


def work_balance_figure(work: dict, *, title: str | None = None):
    """Causal work (score pairs) per rank for each layout: {layout: {rank: pairs}}."""
    fig = go.Figure()
    for layout, per_rank in work.items():
        ranks = sorted(per_rank)
        mean = sum(per_rank.values()) / len(per_rank)
        fig.add_bar(x=[f"rank {r}" for r in ranks], y=[per_rank[r] for r in ranks],
                    name=f"{layout} (max/mean {max(per_rank.values()) / mean:.2f})")
    fig.update_layout(barmode="group", title=title or "Causal work per rank: score pairs computed",
                      yaxis_title="score pairs", height=420)
    return fig


def multiplicity_figure(m, *, head: int = 0, title: str | None = None):
    """Heatmap of m_h(q, k) for one head: in how many branches query q and key k interact."""
    z = m[head].tolist()
    fig = go.Figure(go.Heatmap(z=z, colorscale="Blues", colorbar=dict(title="branches"),
                               hovertemplate="query %{y}<br>key %{x}<br>m = %{z}<extra></extra>"))
    fig.update_layout(title=title or f"Dilation pattern of head {head}: m(q, k)", xaxis_title="key position",
                      yaxis=dict(title="query position", autorange="reversed"), height=520)
    return fig


def coverage_figure(coverage: list[float], pairs_ratio: float, *, title: str | None = None):
    """Fraction of (query, key) pairs each head can attend to, and the engine's work vs dense."""
    fig = go.Figure(go.Bar(x=[f"head {h}" for h in range(len(coverage))], y=coverage, name="pairs with m > 0"))
    fig.add_hline(y=pairs_ratio, line_dash="dash", annotation_text=f"score pairs computed / dense = {pairs_ratio:.3f}")
    fig.update_layout(title=title or "Coverage per head", yaxis=dict(title="fraction of pairs", range=[0, 1.05]), height=380)
    return fig


def receptive_field_figure(frac, *, title: str | None = None):
    """Fraction of the sequence the last query can draw on after L layers: (layers, N) data."""
    last = [row[-1] for row in frac.tolist()]
    mean = [sum(row) / len(row) for row in frac.tolist()]
    layers = list(range(1, len(last) + 1))
    fig = go.Figure([go.Scatter(x=layers, y=last, mode="lines+markers", name="last query"),
                     go.Scatter(x=layers, y=mean, mode="lines+markers", name="mean over queries")])
    fig.update_layout(title=title or "Receptive field after L stacked layers", xaxis=dict(title="layers", dtick=1),
                      yaxis=dict(title="fraction of positions reachable", range=[0, 1.05]), height=380)
    return fig


def memory_curves_figure(rows: list[dict], *, title: str | None = None):
    """Measured (markers) and modelled (lines) per-rank peak vs tokens, forward and
    forward+backward; rows have mode, tokens, ring_size, backward, measured, model."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("forward", "forward+backward"), shared_yaxes=True)
    groups = defaultdict(list)
    for r in rows:
        groups[(r["mode"], r["ring_size"], r["backward"])].append(r)
    colors = {}
    for (mode, p, backward), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["tokens"])
        label = mode if p == 1 else f"{mode}, P={p}"
        color = colors.setdefault(label, PALETTE[len(colors) % len(PALETTE)])
        col = 2 if backward else 1
        fig.add_scatter(x=[r["tokens"] for r in rs], y=[r["model"] / 2**20 for r in rs], mode="lines", name=label,
                        line=dict(color=color, dash="dash"), legendgroup=label, showlegend=col == 1, row=1, col=col)
        meas = [r for r in rs if r.get("measured") is not None]
        fig.add_scatter(x=[r["tokens"] for r in meas], y=[r["measured"] / 2**20 for r in meas], mode="markers",
                        name=f"{label} measured", marker=dict(color=color, size=9), legendgroup=label,
                        showlegend=False, row=1, col=col)
    fig.update_xaxes(type="log", title="tokens")
    fig.update_yaxes(type="log")
    fig.update_yaxes(title="peak MiB per rank", col=1)
    fig.update_layout(title=title or "Memory per rank: measured (dots) and the analytic model (dashed)", height=480)
    return fig


def memory_terms_figure(estimate, *, title: str | None = None):
    """Bars of one rank's bytes by named term (inputs it holds, then the call's peak terms) from
    a ``memory_model.Estimate``."""
    items = {**estimate.resident, **estimate.terms}
    return go.Figure(go.Bar(x=list(items), y=[v / 2**20 for v in items.values()]),
                     layout=dict(title=title or f"{estimate.mode}: MiB by term", yaxis_title="MiB"))


def seed_table_figure(rows: list[dict], *, title: str | None = None):
    """The seed document's claims beside measured and modelled memory (MB, log scale)."""
    labels = [f"{r['mode']} N={r['tokens']:,}" + (f" P={r['ring_size']}" if r["mode"] == "ring" else "") for r in rows]
    fig = go.Figure([
        go.Bar(x=labels, y=[r["seed_claim_MB"] for r in rows], name="seed claim"),
        go.Bar(x=labels, y=[r["measured_MB"] for r in rows], name="measured"),
        go.Bar(x=labels, y=[r["model_MB"] for r in rows], name="model")])
    fig.update_layout(barmode="group", yaxis=dict(type="log", title="MB (inputs + peak of the call)"),
                      title=title or "The seed's memory table, measured", height=480)
    return fig


def error_figure(rows: list[dict], *, title: str | None = None):
    """Max abs error vs the float64 reference per configuration, divided by the tolerance the
    tests enforce (below 1 passes); rows have label, dtype, quantity (out / grads), error,
    tolerance."""
    fig = go.Figure()
    for dtype in sorted({r["dtype"] for r in rows}):
        for quantity, symbol in (("out", "circle"), ("grads", "diamond")):
            rs = [r for r in rows if r["dtype"] == dtype and r["quantity"] == quantity]
            if rs:
                fig.add_scatter(x=[r["label"] for r in rs], y=[max(r["error"], 1e-18) / r["tolerance"] for r in rs],
                                mode="markers", marker=dict(symbol=symbol, size=9), name=f"{dtype} {quantity}",
                                customdata=[[r["error"], r["tolerance"]] for r in rs],
                                hovertemplate="%{x}<br>error %{customdata[0]:.3g}, tolerance %{customdata[1]:.1g}<extra></extra>")
    fig.add_hline(y=1, line_dash="dash", annotation_text="tolerance: the tests fail above this line",
                  annotation_position="top right")
    fig.update_layout(yaxis=dict(type="log", title="max abs error / tolerance", exponentformat="power"), height=560,
                      title=title or "Error against the float64 dense reference, relative to the tested tolerance")
    return fig


def _spread_bars(rs, key=None):
    """Error bars from a row's low to high (of ``key``, a nested dict, when given), if rows have them."""
    if not all("low" in (r[key] if key else r) for r in rs):
        return None
    get = (lambda r: r[key]) if key else (lambda r: dict(median=r["seconds"], low=r["low"], high=r["high"]))  # noqa: E731
    return dict(type="data", symmetric=False, array=[get(r)["high"] - get(r)["median"] for r in rs],
                arrayminus=[get(r)["median"] - get(r)["low"] for r in rs])


def scaling_figure(rows: list[dict], *, title: str | None = None):
    """Time and tokens/s vs N per method, and the per-round ratio to SDPA.

    rows have method, tokens, seconds (the median), optionally low and high (fastest and slowest
    round, drawn as error bars) and over_sdpa (median, low, high of the per-round ratios of
    interleaved timings, drawn in the third panel with the spread as error bars)."""
    fig = make_subplots(rows=1, cols=3, subplot_titles=("time per call (median, fastest to slowest round)",
                                                         "throughput", "time / SDPA, per round (median, range)"),
                        horizontal_spacing=PANEL_SPACING)
    for i, method in enumerate(sorted({r["method"] for r in rows})):
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["tokens"])
        line = dict(color=PALETTE[i % len(PALETTE)])
        tokens = [r["tokens"] for r in rs]
        fig.add_scatter(x=tokens, y=[r["seconds"] for r in rs], error_y=_spread_bars(rs), name=method,
                        legendgroup=method, mode="lines+markers", line=line, row=1, col=1)
        fig.add_scatter(x=tokens, y=[r["tokens"] / r["seconds"] for r in rs], name=method,
                        legendgroup=method, showlegend=False, mode="lines+markers", line=line, row=1, col=2)
        ratios = [r for r in rs if "over_sdpa" in r]
        if ratios and method != "sdpa":
            fig.add_scatter(x=[r["tokens"] for r in ratios], y=[r["over_sdpa"]["median"] for r in ratios],
                            error_y=_spread_bars(ratios, "over_sdpa"), name=method, legendgroup=method,
                            showlegend=False, mode="lines+markers", line=line, row=1, col=3)
    fig.update_xaxes(type="log", title="tokens")
    fig.update_yaxes(type="log", title="seconds", col=1)
    fig.update_yaxes(type="log", title="tokens / s", col=2)
    fig.update_yaxes(type="log", title="ratio to SDPA", col=3)
    fig.update_layout(title=title or "Scaling with sequence length (contestants timed interleaved)", height=460)
    return fig


def tokens_label(n: int) -> str:
    """2**30 -> '2^30 (1.07B)'; other counts with a thousands separator."""
    if n & (n - 1) == 0:
        short = next(f"{n / d:.3g}{u}" for d, u in ((1e9, "B"), (1e6, "M"), (1e3, "K"), (1, "")) if n >= d)
        return f"2^{n.bit_length() - 1} ({short})"
    return f"{n:,}"


def planner_figure(rows: list[dict], *, title: str | None = None):
    """Plans over N: memory per GPU by term, GPUs needed, and the overlap margin.
    rows: tokens, gpu, gpus, terms {name: bytes}, capacity, overlap_ratio (step compute /
    transfer time on the slowest link crossed; None when nothing is sent)."""
    fig = make_subplots(rows=1, cols=3, subplot_titles=("memory per GPU by term (first profile)", "GPUs needed",
                                                         "step compute / transfer"), horizontal_spacing=PANEL_SPACING)
    first = rows[0]["gpu"]
    mine = [r for r in rows if r["gpu"] == first]
    names = list(dict.fromkeys(k for r in mine for k in r["terms"]))
    labels = [tokens_label(r["tokens"]) for r in mine]  # bars read better on a categorical axis
    for i, name in enumerate(names):  # more terms than colours: the next round of colours is hatched
        fig.add_bar(x=labels, y=[r["terms"].get(name, 0) / 2**30 for r in mine], name=name, row=1, col=1,
                    marker=dict(color=PALETTE[i % len(PALETTE)], pattern_shape=["", "/", "x"][i // len(PALETTE) % 3]))
    fig.add_scatter(x=labels, y=[r["capacity"] / 2**30 for r in mine], mode="lines",
                    name=f"usable HBM ({first})", line=dict(dash="dash", color="black"), row=1, col=1)
    for i, gpu in enumerate(dict.fromkeys(r["gpu"] for r in rows)):
        rs = [r for r in rows if r["gpu"] == gpu]
        line = dict(color=PALETTE[i % len(PALETTE)])
        fig.add_scatter(x=[r["tokens"] for r in rs], y=[r["gpus"] for r in rs], mode="lines+markers", name=gpu,
                        legendgroup=gpu, line=line, row=1, col=2)
        rs = [r for r in rs if r["overlap_ratio"] is not None]  # no transfer: nothing to hide
        fig.add_scatter(x=[r["tokens"] for r in rs], y=[r["overlap_ratio"] for r in rs],
                        mode="lines+markers", name=gpu, legendgroup=gpu, showlegend=False, line=line, row=1, col=3)
    fig.add_hline(y=1, line_dash="dot", row=1, col=3, annotation_text="transfer hides above 1")
    fig.update_xaxes(type="log", title="tokens", col=2)
    fig.update_xaxes(type="log", title="tokens", col=3)
    fig.update_xaxes(type="category", title="tokens", col=1)
    fig.update_yaxes(title="GiB", col=1)
    fig.update_yaxes(type="log", title="GPUs", col=2)
    fig.update_yaxes(type="log", title="ratio", col=3)
    fig.update_layout(barmode="stack", title=title or "What N tokens need", height=520)
    return fig


def interactive(build, **controls) -> None:
    """Show ipywidgets ``controls`` and, below them, ``build(**values)`` (a Figure), redrawn in
    place on every change.

    The figure lives in an ipywidgets ``Output`` whose ``outputs`` are set directly: JupyterLab
    drops display updates sent from widget callbacks, and capturing (``with out:``) can deadlock
    headless runners (papermill)."""
    import ipywidgets as widgets
    from IPython.display import display

    out = widgets.Output()

    def redraw(_=None):
        # the figure's own MIME bundle: IPython's formatter would display it instead of returning it
        data = build(**{name: w.value for name, w in controls.items()})._repr_mimebundle_()
        out.outputs = ({"output_type": "display_data", "data": data, "metadata": {}},)

    redraw()
    for w in controls.values():
        w.observe(redraw, names="value")
    display(widgets.VBox([widgets.HBox(list(controls.values())), out]))


# ---------------------------------------------------------------- writing figures/
IMAGE_FORMATS = ("png", "pdf", "svg")  # what kaleido writes of each figure, through Chromium
_image_server = []
_image_hung = []  # set once an export timed out: Chromium is stuck, later exports would hang too
# Seconds one image export may take (a cold Chromium start is about 3 s) before the figure goes
# on as HTML + JSON only.
PNG_TIMEOUT = float(os.environ.get("RINGLAB_PNG_TIMEOUT", "60"))


@functools.lru_cache(maxsize=None)
def commit() -> str | None:
    """The git commit of the ringlab checkout, with "+dirty" when its code or notebooks have
    uncommitted changes; None outside a git checkout (an installed package)."""
    root = pathlib.Path(__file__).resolve().parents[2]
    git = ["git", "-C", str(root)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10)
        changed = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no", "--", "ringlab", "notebooks"],
                                 capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if changed.stdout.strip() else "")


def environment(**extra) -> dict:
    """Where a figure came from: versions, machine, devices, commit, time."""
    import torch
    env = dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
               host=platform.node(), cpus=os.cpu_count(),
               cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               gpus=torch.cuda.device_count(), commit=commit(),
               written=datetime.datetime.now().isoformat(timespec="seconds"))
    env.update(extra)
    return env


def fit_legend(fig) -> None:
    """Make ``fig`` tall enough for its vertical legend: plotly scrolls a legend taller than the
    figure, and a static export then loses the entries below the fold."""
    entries = sum(bool(t.name) and t.showlegend is not False for t in fig.data)
    if entries < 2 and fig.layout.showlegend is not True:
        return  # plotly shows no legend for a single trace
    needed = entries * LEGEND_ROW + 240  # the legend beside the plot, the title above and the axis below
    if (fig.layout.height or 450) < needed:
        fig.update_layout(height=needed)


def _export_image(fig, path: pathlib.Path) -> None:
    import kaleido
    if not _image_server and shutil.which("chromium") is None and shutil.which("chromium-browser") is None:
        raise RuntimeError("Chromium is not installed (Debian: apt-get install chromium)")
    if not _image_server:
        kaleido.start_sync_server()
        _image_server.append(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # plotly: "kopts ignored with a server"
        fig.write_image(path, width=fig.layout.width or 1100, height=fig.layout.height or 500)


def _write_image(fig, path: pathlib.Path) -> str | None:
    """Export one image (PNG, PDF or SVG by its suffix) within PNG_TIMEOUT seconds; None when
    it was written, else why not."""
    if _image_hung:
        return f"an earlier export hung for {PNG_TIMEOUT:g} s, so image export is off in this process"
    errors = []

    def run():
        try:
            _export_image(fig, path)
        except Exception as err:  # noqa: BLE001 - images are optional; say why and go on
            errors.append(err)

    # a daemon thread: a hung Chromium must not keep the notebook (or the interpreter) waiting
    worker = threading.Thread(target=run, daemon=True, name="ringlab-image-export")
    worker.start()
    worker.join(PNG_TIMEOUT)
    if worker.is_alive():
        _image_hung.append(True)
        return (f"Chromium (kaleido) did not finish within {PNG_TIMEOUT:g} s (set RINGLAB_PNG_TIMEOUT to wait "
                "longer); image export is off for the rest of this process")
    return str(errors[0]) if errors else None


def save(name: str, figures: dict, *, data=None, params=None, summary=None, out_dir="figures", png: bool = True) -> dict:
    """Write figures/<name>.html (every figure, plotly.js inlined once: no CDN); with ``png``,
    each figure as figures/<name>-<key>.png, .pdf and .svg (kaleido + Chromium; when Chromium is
    missing or hangs, a warning says so and the rest is written); and figures/<name>.json with
    the data, the parameters, the environment (machine, commit), each figure's title and files,
    and an optional ``summary`` of scalars (the values a sweep collects). Returns the paths written."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts, first = [], True
    for key, fig in figures.items():
        fit_legend(fig)
        parts.append(fig.to_html(full_html=False, include_plotlyjs=first, div_id=f"{name}-{key}",
                                 auto_play=False))
        first = False
    html = out / f"{name}.html"
    html.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>ringlab: {name}</title></head>"
                    f"<body style='font-family:sans-serif'>{''.join(parts)}</body></html>")
    written = {"html": str(html), **{fmt: [] for fmt in IMAGE_FORMATS}}
    files = {key: [html.name] for key in figures}
    why = None  # why image export stopped: the same reason would stop every other figure
    for key, fig in figures.items() if png else ():
        for fmt in IMAGE_FORMATS:
            path = out / f"{name}-{key}.{fmt}"
            why = _write_image(fig, path)
            if why:
                break
            written[fmt].append(str(path))
            files[key].append(path.name)
        if why:
            warnings.warn(f"ringlab: image export (PNG, PDF, SVG) skipped for {name}: {why}. The HTML and "
                          "JSON are written.", stacklevel=2)
            break
    meta = out / f"{name}.json"
    titles = {key: fig.layout.title.text for key, fig in figures.items()}
    meta.write_text(json.dumps(dict(name=name, params=params or {}, summary=summary or {}, environment=environment(),
                                    figures={key: dict(title=titles[key], files=files[key]) for key in figures},
                                    data=data), indent=1, default=str))
    written["json"] = str(meta)
    return written


# ---------------------------------------------------------------- ring, Ulysses and hybrid
MESH_NAMES = ["nothing", "its query tokens (and K/V)", "a visiting K/V block"]
MESH_COLORS = ["#f2f2f2", "#0072B2", "#E69F00"]
STRATEGY_COLORS = {"ring": "#0072B2", "ulysses": "#009E73", "hybrid": "#D55E00"}


def mesh_figure(frames: list[dict], ulysses_size: int, *, title: str | None = None):
    """An animated (mesh rank x token) grid, one frame per phase of a traced forward
    (:func:`ringlab.workbench.experiments.mesh_frames`): which tokens each rank holds, and for
    which heads (the row labels)."""
    def data(f):
        rows = [f"rank {m} (u={m % ulysses_size}, r={m // ulysses_size}) heads {a}-{b - 1}"
                for m, (a, b) in enumerate(f["heads"])]
        return [go.Heatmap(z=f["holds"], y=rows, zmin=-0.5, zmax=2.5, colorscale=_discrete_scale(MESH_COLORS),
                           colorbar=dict(tickvals=[0, 1, 2], ticktext=MESH_NAMES, title="holds"),
                           hovertemplate="%{y}<br>token %{x}<extra></extra>")]
    label = lambda f: f"{f['label']} ({f['bytes']:,} B sent by rank 0)"  # noqa: E731
    frames_ = [go.Frame(name=label(f), data=data(f)) for f in frames]
    fig = go.Figure(data=frames_[0].data, frames=frames_)
    fig.update_layout(
        title=title or f"Who holds which tokens and heads: {ulysses_size} x {len(frames[0]['holds']) // ulysses_size} mesh (forward)",
        xaxis=dict(title="token position"), yaxis=dict(autorange="reversed"),
        **_player(frames_, frame_ms=900), height=160 + 40 * len(frames[0]["holds"]))
    return fig


def mesh_bytes_figure(rows: list[dict], *, title: str | None = None):
    """Bytes per rank per strategy: measured (bars, from gloo traces) against the planner (markers)."""
    fig = go.Figure()
    for kind, pattern in (("all-to-all", ""), ("ring", "/")):
        sub = [r for r in rows if r["kind"] == kind]
        x = [[r["strategy"] for r in sub], [f"rank {r['rank']}" for r in sub]]
        fig.add_bar(x=x, y=[r["measured"] for r in sub], name=f"{kind}, measured", marker_pattern_shape=pattern,
                    marker_color=[STRATEGY_COLORS[r["strategy"]] for r in sub])
        fig.add_scatter(x=x, y=[r["planned"] for r in sub], mode="markers", name=f"{kind}, planner",
                        marker=dict(symbol="x" if kind == "ring" else "circle-open", size=12, color="#000000"))
    fig.update_layout(barmode="group", title=title or "Bytes each rank sends in one call: traces vs planner",
                      yaxis=dict(title="bytes sent (forward + backward)"), height=460)
    fit_legend(fig)
    return fig


def strategy_map_figure(rows: list[dict], *, title: str | None = None):
    """The planner's best strategy over (N, GPUs), hover naming why."""
    tokens = sorted({r["tokens"] for r in rows})
    gpus = sorted({r["gpus"] for r in rows})
    names = list(STRATEGY_COLORS)
    cell = {(r["tokens"], r["gpus"]): r for r in rows}
    z = [[names.index(cell[n, g]["best"]) if cell[n, g]["best"] else None for n in tokens] for g in gpus]
    text = [[cell[n, g]["best"] or "none fits" for n in tokens] for g in gpus]
    why = [[cell[n, g]["why"] for n in tokens] for g in gpus]
    fig = go.Figure(go.Heatmap(z=z, x=[tokens_label(n) for n in tokens], y=[str(g) for g in gpus], text=text,
                               customdata=why, texttemplate="%{text}", zmin=-0.5, zmax=len(names) - 0.5,
                               colorscale=_discrete_scale(list(STRATEGY_COLORS.values())), showscale=False,
                               hovertemplate="%{x} tokens on %{y} GPUs: %{text}<br>%{customdata}<extra></extra>"))
    fig.update_layout(title=title or "Fastest strategy that fits, per the planner (H100 nodes of 8)",
                      xaxis=dict(title="sequence length (tokens)", type="category"),
                      yaxis=dict(title="GPUs", type="category"), height=420)
    return fig
