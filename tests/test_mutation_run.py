"""The mutation script (tests/mutation_run.py) cannot rot silently: every mutant's text is in its file
exactly once, and every test file it names exists. (The script itself reruns test files per mutant and is
not run in CI; see its docstring.)"""
from pathlib import Path

import pytest

from mutation_run import MUTANTS, ROOT


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_each_mutant_still_applies(mutant):
    source = (ROOT / mutant.path).read_text()
    assert source.count(mutant.old) == 1, f"update the mutant {mutant.name!r}: its text is no longer in {mutant.path} once"
    assert mutant.new != mutant.old
    for arg in mutant.tests:
        if arg.startswith("tests/"):
            assert (ROOT / arg).is_file(), arg
    assert Path(ROOT / "tests" / "mutation_run.py").is_file()
