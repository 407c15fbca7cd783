"""The README's examples run as written: the quickstart, and the sweep example (shell, then Python on the
same store). Blocks are found by their ``<!-- example: NAME -->`` markers, so an edited example is the
tested one."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def example(name: str) -> str:
    """The code block after ``<!-- example: name -->`` in README.md."""
    text = (ROOT / "README.md").read_text()
    found = re.search(rf"<!-- example: {re.escape(name)} -->\n```[a-z]*\n(.*?)```", text, re.S)
    assert found, f"README.md has no example block {name!r}"
    return found.group(1)


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow
def test_quickstart_runs_as_written(tmp_path):
    done = run_python(example("quickstart"), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "component" in done.stdout and "1:3" in done.stdout  # the summary table of every head


@pytest.mark.slow
def test_sweep_example_runs_as_written(tmp_path):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    rllc = shutil.which("rllc")
    script = example("sweep-shell")
    if rllc is None:  # not installed as a script: the same command through the module
        script = re.sub(r"^rllc ", f"{sys.executable} -m rllc_fast.cli ", script, flags=re.M)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    shell = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=900)
    assert shell.returncode == 0, shell.stderr[-3000:]
    assert (tmp_path / "runs" / "report" / "index.html").is_file()
    assert (tmp_path / "runs" / "estimates.csv").stat().st_size > 0
    python = run_python(example("sweep-python"), tmp_path)
    assert python.returncode == 0, python.stderr[-3000:]
    assert "3 unit(s) computed" in python.stdout  # the prose data is new to the store: 3 checkpoints x heads


@pytest.mark.slow
def test_observables_example_runs_as_written(tmp_path):
    done = run_python(example("observables"), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(9, 4, 20, 16, 15)" in done.stdout and "susceptibility_sem" in done.stdout
