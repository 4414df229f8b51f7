"""tools/mutants.py stays pointed at the code: every pattern occurs once (the check itself runs
in CI through `make mutants`)."""

import importlib.util
import pathlib
import sys

import pytest

spec = importlib.util.spec_from_file_location("mutants", pathlib.Path(__file__).parent.parent / "tools" / "mutants.py")
mutants = sys.modules["mutants"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mutants)


@pytest.mark.parametrize("m", mutants.MUTANTS, ids=lambda m: m.name)
def test_pattern_occurs_once_and_changes_the_code(m):
    assert mutants.mutated(m) != (mutants.ROOT / m.path).read_text()


def test_a_moved_pattern_is_an_error(tmp_path):
    m = mutants.MUTANTS[0]
    (tmp_path / m.path).parent.mkdir(parents=True)
    (tmp_path / m.path).write_text("the code moved elsewhere\n")
    with pytest.raises(mutants.PatternError, match="re-point the pattern"):
        mutants.mutated(m, tmp_path)
