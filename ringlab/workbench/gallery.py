"""figures/index.html: every saved figure with its caption, parameters, machine and commit.

``ringlab figures`` writes it after the notebooks (``ringlab figures --index`` rewrites just it).
A figure's caption is the notebook's markdown cell right above the code cell that builds the
figure, i.e. the cell that assigns the variable the notebook passes to ``viz.save``; the rest
comes from the figure's <name>.json (see viz.save).
"""

from __future__ import annotations

import ast
import html
import json
import pathlib
import re


def captions(notebook) -> dict[str, str]:
    """{figure key: caption markdown} for the figures ``notebook`` saves with
    ``viz.save(name, {key: variable, ...})``."""
    import nbformat

    nb = nbformat.read(str(notebook), 4)
    saved, above, last_markdown = {}, {}, None
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            last_markdown = cell.source
            continue
        if cell.cell_type != "code":
            continue
        try:
            tree = ast.parse(cell.source)
        except SyntaxError:  # IPython magics: no figure is built there
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    for name in ast.walk(target):
                        if isinstance(name, ast.Name):
                            above.setdefault(name.id, last_markdown)  # the first assignment builds it
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "save"
                    and len(node.args) >= 2 and isinstance(node.args[1], ast.Dict)):
                for key, value in zip(node.args[1].keys, node.args[1].values):
                    if isinstance(key, ast.Constant) and isinstance(value, ast.Name):
                        saved[key.value] = value.id
    return {key: above[var] for key, var in saved.items() if above.get(var)}


def _caption_html(text: str) -> str:
    """A caption's markdown as HTML paragraphs of its prose: headings in bold, emphasis and code
    marks dropped (the index shows the words; the notebook keeps the markup)."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text.strip()):
        heading = re.match(r"#+\s*(.*)", block)
        words = html.escape(re.sub(r"[*`]", "", heading.group(1) if heading else block))
        paragraphs.append(f"<p><b>{words}</b></p>" if heading else f"<p>{words}</p>")
    return "".join(paragraphs)


def _figure_keys(meta: dict, out: pathlib.Path) -> dict:
    """{key: {title, files}}: from the JSON, or for JSON written before it listed its figures,
    from the image files beside it."""
    if "figures" in meta:
        return meta["figures"]
    name = meta["name"]
    keys = sorted({p.stem[len(name) + 1:] for p in out.glob(f"{name}-*.*") if p.suffix in (".png", ".svg", ".pdf")})
    return {key: dict(title=None, files=[f"{name}.html"] + sorted(p.name for p in out.glob(f"{name}-{key}.*")))
            for key in keys}


def _environment(env: dict) -> str:
    device = env.get("cuda") or "no GPU"
    if env.get("gpus", 0) > 1:
        device = f"{env['gpus']} x {device}"
    machine = ", ".join(str(x) for x in (env.get("host"), env.get("machine"), env.get("cpus") and f"{env['cpus']} CPUs",
                                         device) if x)
    return (f"machine: {html.escape(machine)}; torch {html.escape(str(env.get('torch')))}, python "
            f"{html.escape(str(env.get('python')))}; commit <code>{html.escape(str(env.get('commit') or 'unknown'))}"
            f"</code>; written {html.escape(str(env.get('written')))}")


def write_index(out_dir, notebooks=None, order=()) -> pathlib.Path:
    """Write ``out_dir``/index.html from the <name>.json files there; captions come from the
    notebooks of the folder ``notebooks`` (<name>.ipynb). ``order``: names listed first."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metas = {}
    for path in sorted(out.glob("*.json")):
        try:
            meta = json.loads(path.read_text())
        except ValueError:
            continue
        if isinstance(meta, dict) and {"name", "environment"} <= meta.keys():
            metas[meta["name"]] = meta
    names = [n for n in order if n in metas] + [n for n in metas if n not in order]
    sections = []
    for name in names:
        meta, nb = metas[name], pathlib.Path(notebooks or ".") / f"{name}.ipynb"
        notes = captions(nb) if nb.is_file() else {}
        params = ", ".join(f"<code>{html.escape(k)} = {html.escape(json.dumps(v, default=str))}</code>"
                           for k, v in meta.get("params", {}).items()) or "defaults"
        parts = [f"<section id='{html.escape(name)}'><h2>{html.escape(name)}</h2>",
                 f"<p class='meta'>parameters: {params}</p>", f"<p class='meta'>{_environment(meta['environment'])}</p>"]
        for key, fig in _figure_keys(meta, out).items():
            files = fig.get("files", [])
            image = next((f for ext in (".svg", ".png") for f in files if f == f"{name}-{key}{ext}"), None)
            title = html.escape(fig.get("title") or key)
            shown = (f"<img src='{html.escape(image)}' alt='{title}'>" if image
                     else "<p>(no image: written without Chromium; open the interactive HTML)</p>")
            links = " ".join(f"<a href='{html.escape(f)}'>{html.escape(f.rsplit('.', 1)[-1].upper())}</a>" for f in files)
            parts.append(f"<figure id='{html.escape(name)}-{html.escape(key)}'>{shown}<figcaption><p><b>{title}</b> "
                         f"({links})</p>{_caption_html(notes[key]) if key in notes else ''}</figcaption></figure>")
        sections.append("".join(parts) + "</section>")
    toc = " · ".join(f"<a href='#{html.escape(n)}'>{html.escape(n)}</a>" for n in names)
    page = out / "index.html"
    page.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>ringlab figures</title><style>"
        "body{font-family:Arial,Helvetica,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
        "figure{margin:1.5em 0;border-top:1px solid #ddd;padding-top:1em}img{max-width:100%}"
        ".meta{color:#555;font-size:90%}code{font-size:90%}</style></head><body>"
        f"<h1>ringlab figures</h1><p>Every figure of the notebooks, with the notebook's caption, its parameters, "
        f"and the machine and commit that made it. Click a format to open it (HTML is interactive).</p>"
        f"<p>{toc}</p>{''.join(sections)}</body></html>")
    return page
