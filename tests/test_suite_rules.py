"""Rules the test suite keeps: every float comparison states both its absolute and relative
limit (allclose's default rtol of 1e-5 once hid a planted bug behind atol=1e-12)."""

import ast
import pathlib

import pytest

TESTS = sorted(pathlib.Path(__file__).parent.glob("*.py"))
LIMITS = {"allclose": ("atol", "rtol"), "isclose": ("atol", "rtol"), "assert_allclose": ("atol", "rtol"),
          "approx": ("abs", "rel")}


def _comparisons(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in LIMITS:
            yield node, LIMITS[node.func.attr]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "assert_close"
              and ast.unparse(node.func.value) == "torch.testing"):
            yield node, ("atol", "rtol")


@pytest.mark.parametrize("path", TESTS, ids=lambda p: p.name)
def test_float_comparisons_state_both_limits(path):
    missing = [f"{path.name}:{node.lineno} {ast.unparse(node.func)} without {', '.join(sorted(set(need) - kws))}"
               for node, need in _comparisons(path)
               for kws in [{k.arg for k in node.keywords if k.arg}] if not set(need) <= kws]
    assert not missing, "\n".join(missing)
