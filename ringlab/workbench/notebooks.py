"""The main job: execute every notebook with papermill and rewrite figures/.

    ringlab figures                              # every notebook in notebooks/, default parameters
    ringlab figures --only memory                # one of them, by name
    ringlab figures path/to/mine.ipynb --out figs  # notebooks given by path
    ringlab figures --index                      # only rewrite figures/index.html

Executed copies go to runs/figures/ (the sources are left as they are). Each notebook writes
its figures as HTML, PNG, PDF and SVG (ringlab.workbench.viz.save), and figures/index.html then
lists them all with their captions (ringlab.workbench.gallery). The notebooks pick
the device themselves ("auto": CUDA when available), so the same command uses the GPUs of a
multi-GPU node.
"""

from __future__ import annotations

import pathlib
import sys
import time


def _home() -> pathlib.Path:
    """The source checkout ringlab runs from (an editable install), else the current folder."""
    checkout = pathlib.Path(__file__).resolve().parents[2]
    return checkout if (checkout / "notebooks").is_dir() else pathlib.Path.cwd()


ROOT = _home()
NOTEBOOKS = ROOT / "notebooks"
FIGURES = ROOT / "figures"
ORDER = ["dilation", "kv_rotation", "correctness", "memory", "scaling", "billion_tokens"]


def notebook_names(folder=NOTEBOOKS) -> list[str]:
    """The notebooks in ``folder``, in the order the main job runs them."""
    found = sorted(p.stem for p in pathlib.Path(folder).glob("*.ipynb"))
    return [n for n in ORDER if n in found] + [n for n in found if n not in ORDER]


def find_notebook(name_or_path, folder=NOTEBOOKS) -> pathlib.Path:
    """A notebook given by path, or by name in ``folder``; ValueError naming both if neither exists."""
    path = pathlib.Path(name_or_path)
    if path.suffix == ".ipynb" and path.is_file():
        return path
    named = pathlib.Path(folder) / f"{path.stem}.ipynb"
    if named.is_file():
        return named
    known = notebook_names(folder) if pathlib.Path(folder).is_dir() else []
    raise ValueError(f"no such notebook: {name_or_path} (neither a .ipynb file nor a notebook of {folder}"
                     + (f"; its notebooks: {known})" if known else ")"))


def execute_path(notebook, output, parameters: dict, *, timeout: float = 1800):
    """Run a notebook with papermill (in its own folder), writing the executed copy to ``output``."""
    import papermill as pm

    notebook, output = pathlib.Path(notebook), pathlib.Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    return pm.execute_notebook(str(notebook), str(output), parameters=parameters, cwd=str(notebook.parent),
                               progress_bar=False, execution_timeout=timeout, kernel_name="python3")


def run_notebooks(only=None, *, folder=NOTEBOOKS, timeout: float = 1800, out_dir=FIGURES,
                  runs_dir=ROOT / "runs" / "figures", parameters: dict | None = None) -> int:
    """Execute the notebooks (every one in ``folder``, or ``only``: names in it or paths) and
    write their figures to ``out_dir``, then its index.html. Returns 0 when every notebook ran, 1
    otherwise (the others still run)."""
    from .gallery import write_index
    from tqdm.auto import tqdm

    paths = [find_notebook(x, folder) for x in only] if only else [
        pathlib.Path(folder) / f"{n}.ipynb" for n in notebook_names(folder)]
    if not paths:
        raise ValueError(f"no notebooks in {folder}: give notebooks by path, or the folder with --notebooks")
    pathlib.Path(out_dir).mkdir(parents=True, exist_ok=True)
    failed = []
    bar = tqdm(paths, desc="notebooks", unit="nb")
    for path in bar:
        name = path.stem
        bar.set_postfix_str(name)
        t0 = time.perf_counter()
        try:
            execute_path(path, pathlib.Path(runs_dir) / f"{name}.ipynb",
                         {"output_dir": str(pathlib.Path(out_dir).resolve()), **(parameters or {})}, timeout=timeout)
            tqdm.write(f"{name}: done in {time.perf_counter() - t0:.0f} s")
        except Exception as err:  # noqa: BLE001 - report and go on with the other notebooks
            failed.append(name)
            tqdm.write(f"{name}: FAILED after {time.perf_counter() - t0:.0f} s: {str(err).strip().splitlines()[-1][:300]}",
                       file=sys.stderr)
    index = write_index(out_dir, folder, order=notebook_names(folder))
    print(f"index of the figures: {index}")
    if failed:
        print(f"notebooks that failed: {failed} (executed copies with the error are in {runs_dir})", file=sys.stderr)
        return 1
    print(f"figures written to {out_dir}")
    return 0
