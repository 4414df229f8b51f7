"""The main job: execute every notebook with papermill and rewrite figures/.

    ringlab figures                 # all notebooks, default parameters
    ringlab figures --only memory   # one of them

Executed copies go to runs/figures/ (the sources in notebooks/ are left as they are). The
notebooks pick the device themselves ("auto": CUDA when available), so the same command uses
the GPUs of a multi-GPU node.
"""

from __future__ import annotations

import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
FIGURES = ROOT / "figures"
ORDER = ["dilation", "kv_rotation", "correctness", "memory", "scaling", "billion_tokens"]


def notebook_names() -> list[str]:
    """The notebooks in notebooks/, in the order the main job runs them."""
    found = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))
    return [n for n in ORDER if n in found] + [n for n in found if n not in ORDER]


def execute_path(notebook, output, parameters: dict, *, timeout: float = 1800):
    """Run a notebook with papermill (in its own folder), writing the executed copy to ``output``."""
    import papermill as pm

    notebook, output = pathlib.Path(notebook), pathlib.Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    return pm.execute_notebook(str(notebook), str(output), parameters=parameters, cwd=str(notebook.parent),
                               progress_bar=False, execution_timeout=timeout, kernel_name="python3")


def run_notebooks(only=None, *, timeout: float = 1800, out_dir=FIGURES, runs_dir=ROOT / "runs" / "figures",
                  parameters: dict | None = None) -> int:
    """Execute the notebooks (all, or ``only``) and write their figures to ``out_dir``.
    Returns 0 when every notebook ran, 1 otherwise (the others still run)."""
    from tqdm.auto import tqdm

    names = notebook_names() if not only else list(only)
    unknown = [n for n in names if not (NOTEBOOKS / f"{n}.ipynb").exists()]
    if unknown:
        raise ValueError(f"no such notebook(s): {unknown}; known: {notebook_names()}")
    failed = []
    bar = tqdm(names, desc="notebooks", unit="nb")
    for name in bar:
        bar.set_postfix_str(name)
        t0 = time.perf_counter()
        try:
            execute_path(NOTEBOOKS / f"{name}.ipynb", pathlib.Path(runs_dir) / f"{name}.ipynb",
                         {"output_dir": str(pathlib.Path(out_dir).resolve()), **(parameters or {})}, timeout=timeout)
            tqdm.write(f"{name}: done in {time.perf_counter() - t0:.0f} s")
        except Exception as err:  # noqa: BLE001 - report and go on with the other notebooks
            failed.append(name)
            tqdm.write(f"{name}: FAILED after {time.perf_counter() - t0:.0f} s: {str(err).strip().splitlines()[-1][:300]}",
                       file=sys.stderr)
    if failed:
        print(f"notebooks that failed: {failed} (executed copies with the error are in {runs_dir})", file=sys.stderr)
        return 1
    print(f"figures written to {out_dir}")
    return 0
