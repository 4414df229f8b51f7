"""The workbench, above the engine and planning: experiments for the notebooks (experiments),
their figures (viz), running the notebooks (notebooks) and their gallery (gallery), sweeps over
them (sweep, slurm), and the baselines and timing the experiments use (baselines, timing).

It needs the ``workbench`` extra: ``pip install "ringlab[workbench]"``.
"""

import importlib.util

# What the workbench's modules import beyond torch and numpy (kaleido only when writing PNGs).
NEEDS = ("plotly", "ipywidgets", "papermill", "tqdm")

_missing = [name for name in NEEDS if importlib.util.find_spec(name) is None]
if _missing:
    raise ModuleNotFoundError(
        f"ringlab.workbench needs {', '.join(_missing)}, which are not installed. Install the workbench "
        'extra: pip install "ringlab[workbench]" (the engine, ringlab.attention and the ring functions, '
        "needs none of them)", name=f"ringlab.workbench ({_missing[0]})")
