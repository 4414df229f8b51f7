"""Packaging: environment.yml and pyproject.toml agree, CI runs make test, the layers import
downwards only, and a plain install is the engine without the workbench."""

import ast
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest
import torch
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req.strip(), maxsplit=1)[0].lower()


def test_environment_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = {_name(r) for r in project["dependencies"] + extras["workbench"] + extras["hf"] + extras["test"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {_name(r) for r in pip if not r.startswith("-e")}
    assert listed == wanted
    assert "python=3.11" in env["dependencies"]


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert "make test" in (ROOT / "README.md").read_text()
    assert "make figures" in (ROOT / "README.md").read_text()


LAYERS = {"engine": set(), "planning": {"engine"}, "workbench": {"engine", "planning"}}


def _imports(path: pathlib.Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved), at any depth."""
    package = ["ringlab", *path.relative_to(ROOT / "ringlab").parent.parts]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found |= {module} | {f"{module}.{a.name}" for a in node.names}
    return found


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_layers_import_only_downwards(layer):
    """engine imports the standard library and the core dependencies, torch and numpy, alone
    (and triton, where installed, for its GPU merge kernel); planning adds the engine; the workbench sits above both, and may use
    the public package and its float64 reference. Nothing imports a layer above its own."""
    third_party = {"engine": {"torch", "numpy", "triton"}, "planning": {"torch", "numpy"},
                   "workbench": {"torch", "numpy", "plotly", "ipywidgets", "IPython", "papermill", "nbformat",
                                 "tqdm", "kaleido", "pandas"}}[layer]
    for path in sorted((ROOT / "ringlab" / layer).glob("*.py")):
        for name in _imports(path):
            top = name.split(".")[0]
            if layer == "workbench" and (name == "ringlab" or name.startswith("ringlab.reference")):
                continue
            if top == "ringlab":
                parts = name.split(".")
                assert len(parts) > 1 and parts[1] in LAYERS and (parts[1] == layer or parts[1] in LAYERS[layer]), (
                    f"{path.name} imports {name}: {layer} may import only {sorted(LAYERS[layer]) or 'itself'}")
            else:
                assert top in sys.stdlib_module_names or top in third_party, f"{path.name} imports {name}"


def test_workbench_without_its_extras_names_the_extra():
    code = ("import sys\nsys.modules['plotly'] = None\nimport ringlab\n"
            "ringlab.ring_attention  # the engine works without the extra\n"
            "try:\n    import ringlab.workbench.viz\nexcept ModuleNotFoundError as err:\n    print(err)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "plotly" in out and 'pip install "ringlab[workbench]"' in out


def test_plain_install_is_torch_and_numpy_only(tmp_path):
    """A fresh venv with ``pip install .`` (no extras) runs the engine and holds no workbench packages."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [f"torch=={torch.__version__.split('+')[0]}"], check=True)  # the local wheel, no download
    subprocess.run(pip + [str(ROOT)], check=True, cwd=tmp_path)
    code = ("import importlib.util, torch, ringlab\n"
            "q = torch.randn(1, 16, 2, 8, dtype=torch.float64)\n"
            "ref = ringlab.attention(q, q, q, causal=True)\n"
            "assert torch.allclose(ringlab.ring_attention(q, q, q, ring_size=2, causal=True), ref, atol=1e-12)\n"
            "d = ringlab.dilated_attention(q, q, q, [8, 16], [1, 2])\n"
            "assert torch.allclose(ringlab.ring_dilated_attention(q, q, q, [8, 16], [1, 2], ring_size=2), d, atol=1e-12)\n"
            "print([m for m in ('jupyterlab', 'plotly', 'papermill', 'ipywidgets', 'kaleido') if importlib.util.find_spec(m)])\n"
            "try:\n    import ringlab.workbench\nexcept ModuleNotFoundError as err:\n    print(err)\n")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, check=True,
                         cwd=tmp_path).stdout
    assert out.splitlines()[0] == "[]"
    assert 'pip install "ringlab[workbench]"' in out
