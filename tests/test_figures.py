"""Figures for papers (issue 19): one template, vector exports, the index page, and a check in
Chromium that no tick label, legend entry or title of a saved figure falls outside its SVG.

Every figure the notebooks save is rebuilt here from the data of figures/*.json (what `make
figures` last wrote; dilation's from its default parameters), with the notebooks' own builder
calls: real labels and sizes in seconds.
"""

import json
import os
import pathlib
import shutil

import nbformat
import pytest

from ringlab.workbench import experiments, gallery, viz

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None and os.environ.get("RINGLAB_REQUIRE_BROWSER") != "1",
                                    reason="Chromium is missing: install Debian's 'chromium' package")


def notebook_figures() -> dict:
    """{notebook: {key: figure}}: what each notebook passes to viz.save, from figures/<name>.json."""
    data = {p.stem: json.loads(p.read_text())["data"] for p in (ROOT / "figures").glob("*.json")
            if p.stem != "index"}
    rot, mem = data["kv_rotation"], data["memory"]
    world = 1 + max(e["rank"] for e in rot["events"])
    geo = experiments.dilation_geometry(128, 4, [8, 32, 128], [1, 2, 8], layers=6)  # the notebook's defaults
    return {
        "kv_rotation": dict(rotation=viz.ring_rotation_figure(rot["events"], world),
                            steps=viz.ring_steps_figure(rot["events"], world),
                            steps_backward=viz.ring_steps_figure(rot["events"], world, pass_="backward"),
                            timeline=viz.timeline_figure(rot["events"]),
                            balance=viz.work_balance_figure({k: {int(r): w for r, w in v.items()}
                                                             for k, v in rot["work"].items()}),
                            packed_balance=viz.work_balance_figure(  # the notebook's packed mix, rebuilt
                                experiments.packed_view(world, [64 * 2 * world] + [2 * world] * 32)["work"],
                                title="Packed documents: causal work per rank")),
        "dilation": dict(pattern=viz.multiplicity_figure(geo["m"]),
                         coverage=viz.coverage_figure(geo["coverage"], geo["pairs_ratio"]),
                         receptive=viz.receptive_field_figure(geo["receptive"])),
        "memory": dict(curves=viz.memory_curves_figure(mem["curves"]),
                       seed_table=viz.seed_table_figure([r for r in mem["seed_table"]
                                                         if r["seed_claim_MB"] or r["mode"] == "attention"])),
        "correctness": dict(errors=viz.error_figure(data["correctness"])),
        "scaling": dict(curves=viz.scaling_figure(data["scaling"])),
        "billion_tokens": dict(
            dense=viz.planner_figure(data["billion_tokens"]["dense"], title="Ring attention (dense): what N tokens need"),
            dilated=viz.planner_figure(data["billion_tokens"]["dilated"],
                                       title="Ring-dilated attention: what N tokens need")),
    }


def test_every_figure_uses_the_template_and_its_palette():
    for name, figures in notebook_figures().items():
        for key, fig in figures.items():
            assert fig.layout.template.layout.colorway == tuple(viz.PALETTE), (name, key)
            assert fig.layout.template.layout.yaxis.automargin, (name, key)
            used = {t.marker.color for t in fig.data if t.type == "bar"}
            used |= {t.line.color for t in fig.data if t.type == "scatter"}
            assert {c for c in used if isinstance(c, str)} <= set(viz.PALETTE) | {"black"}, (name, key, used)


def _caption_notebook(path: pathlib.Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# Demo\n\nBars per rank; **higher** is more work."),
                nbformat.v4.new_code_cell("bars = viz.work_balance_figure(work)"),
                nbformat.v4.new_markdown_cell("Not a caption of anything saved."),
                nbformat.v4.new_code_cell("viz.save('demo', {'bars': bars}, out_dir=output_dir)")]
    nbformat.write(nb, path)


@needs_chromium
def test_save_writes_pdf_and_svg_and_the_index_lists_them(tmp_path):
    fig = viz.work_balance_figure({"zigzag": {0: 5, 1: 5}, "contiguous": {0: 1, 1: 9}})
    written = viz.save("demo", {"bars": fig}, params={"ranks": 2}, out_dir=tmp_path)
    assert [len(written[f]) for f in ("png", "pdf", "svg")] == [1, 1, 1]
    assert (tmp_path / "demo-bars.pdf").read_bytes().startswith(b"%PDF")
    assert (tmp_path / "demo-bars.svg").read_text().startswith("<svg")
    meta = json.loads((tmp_path / "demo.json").read_text())
    assert meta["figures"]["bars"]["files"] == ["demo.html", "demo-bars.png", "demo-bars.pdf", "demo-bars.svg"]
    assert meta["environment"]["host"] and meta["environment"]["commit"]  # the checkout's commit

    _caption_notebook(tmp_path / "demo.ipynb")
    assert gallery.captions(tmp_path / "demo.ipynb") == {"bars": "# Demo\n\nBars per rank; **higher** is more work."}
    page = gallery.write_index(tmp_path, tmp_path).read_text()
    assert "<img src='demo-bars.svg'" in page and "<p><b>Demo</b></p><p>Bars per rank; higher is more work.</p>" in page
    assert "Not a caption" not in page and "<code>ranks = 2</code>" in page
    assert meta["environment"]["commit"] in page and meta["environment"]["host"] in page
    for f in ("demo.html", "demo-bars.png", "demo-bars.pdf", "demo-bars.svg"):
        assert f"href='{f}'" in page


# What a saved SVG must keep inside itself; a legend that scrolls hides entries inside the SVG,
# so legend entries must also lie inside their legend's box.
OUTSIDE = """() => {
  const svg = document.documentElement, W = svg.width.baseVal.value, H = svg.height.baseVal.value;
  const inside = (r, b) => r.left >= b.left - 1 && r.top >= b.top - 1 && r.right <= b.right + 1 && r.bottom <= b.bottom + 1;
  const kinds = {"tick label": ".xtick text, .ytick text, .cbaxis text", "legend entry": ".legendtext",
                 "title": ".gtitle, .xtitle, .ytitle, .annotation-text, .cbtitle text"};
  const bad = [];
  for (const [kind, sel] of Object.entries(kinds))
    for (const el of document.querySelectorAll(sel)) {
      const r = el.getBoundingClientRect();
      if (!el.textContent.trim() || (r.width === 0 && r.height === 0)) continue;
      if (!inside(r, {left: 0, top: 0, right: W, bottom: H}))
        bad.push(`${kind} '${el.textContent}' at [${[r.left, r.top, r.right, r.bottom].map(Math.round)}] in ${W}x${H}`);
    }
  for (const legend of document.querySelectorAll(".legend")) {
    const box = legend.querySelector("rect.bg").getBoundingClientRect();
    for (const el of legend.querySelectorAll(".legendtext"))
      if (!inside(el.getBoundingClientRect(), box)) bad.push(`legend entry '${el.textContent}' scrolled out of its legend`);
  }
  return bad;
}"""


@pytest.mark.browser
@needs_chromium
def test_no_label_of_a_saved_figure_falls_outside_its_svg(tmp_path):
    from playwright.sync_api import sync_playwright

    svgs = []
    for name, figures in notebook_figures().items():
        for key, fig in figures.items():
            viz.fit_legend(fig)  # as viz.save does
            path = tmp_path / f"{name}-{key}.svg"
            assert viz._write_image(fig, path) is None
            svgs.append(path)
    svgs += sorted((ROOT / "figures").glob("*.svg"))  # and those `make figures` wrote, if any
    problems = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            for path in svgs:
                page.goto(path.as_uri())
                bad = page.evaluate(OUTSIDE)
                if bad:
                    problems[path.name] = bad
        finally:
            browser.close()
    assert not problems, json.dumps(problems, indent=1)
