"""The GPU session (benchmarks/gpu_session.sh) as a CPU dry run: every step runs at tiny shapes, so the
script that a lent GPU runs cannot rot before one arrives (issue 20)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIPPED_IN_DRY_RUN = {"wheels", "build", "memcheck", "racecheck"}  # need the GPU machine
STEPS = ["env", "wheels", "build", "tests", "memcheck", "racecheck", "e2e", "hessian", "sweep", "bench_paper",
         "devinterp", "bench_pythia", "bench_ops"]


def _devinterp_installed() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import devinterp.slt.llc"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_what_the_device_tool_brings_back(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "RLLC_GPU_DRY_RUN": "1", "OUT": str(out), "PY": sys.executable, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh")], env=env, capture_output=True,
                          text=True, timeout=600)
    session = json.loads((out / "session.json").read_text())
    statuses = session["statuses"]
    assert list(statuses) == STEPS, statuses
    expected_skips = SKIPPED_IN_DRY_RUN | (set() if _devinterp_installed() else {"devinterp"})
    for step, status in statuses.items():
        want = "skipped" if step in expected_skips else "ok"
        assert status == want, (step, session["steps"][step], proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert session["dry_run"] is True and session["date"] and session["commit"] and session["torch"]
    # the steps' limits on the GPU fit the 9-minute call
    assert sum(session["budget_s"].values()) <= session["session_limit_s"] <= 540
    # the files the device tool brings back: few, flat, each of what the session promises
    files = sorted(p.name for p in out.iterdir())
    assert files == ["engine.json", "ops-bench.json", "session.json", "session.log", "tests.xml"], files
    engine = json.loads((out / "engine.json").read_text())
    assert {"e2e", "bench_paper", "bench_pythia"} <= set(engine)
    paper = session["steps"]["bench_paper"]
    for batch in ("batch2", "batch4"):
        assert paper[batch]["flops_per_step"] > 0 and paper[batch]["step_s"] > 0
    assert session["steps"]["e2e"]["op_chain"]["ok"] and session["steps"]["sweep"]["rows"] == 10
    assert session["steps"]["tests"]["junit"]["tests"] > 0


def _session_module():
    spec = importlib.util.spec_from_file_location("gpu_session", ROOT / "benchmarks" / "gpu_session.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CRASHING_TESTS = """
import os, signal
import pytest

@pytest.mark.parametrize("case", ["w must be 2-D", "fine"])
def test_op(case):
    if case == "w must be 2-D":
        os.kill(os.getpid(), signal.SIGSEGV)  # what the CUDA bad-argument case did on 2026-11-30

def test_after():
    pass
"""


def test_a_test_that_kills_pytest_is_named_deselected_and_the_rest_rerun(tmp_path):
    session = _session_module()
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_crash.py").write_text(CRASHING_TESTS)
    rec = {}
    with pytest.raises(session.CheckFailed, match="died in"):
        session.pytest_with_crash_reruns(["test_crash.py"], tmp_path / "tests.xml", rec, cwd=tmp_path)
    assert rec["crashed"] == ["test_crash.py::test_op[w must be 2-D]"]
    assert rec["exit_code"] == 0 and rec["junit"]["tests"] == 2 and rec["junit"]["not_passed"] == []
