"""Speedup of a distributed sweep (``torchrun --nproc-per-node=2``, gloo, CPU) over one process.

The sweep: the demo's toy architecture (2 layers x 6 heads, d_model 48, context 48) at 8 log-spaced checkpoints
of a short training run, data = 2048 contexts of the synthetic mixture, component sets heads + whole, the demo's
SGLD settings (2 chains x 50 draws, batch 16): 16 units, 104 estimates. Three wall-clock timings of the whole
command (Python start, imports, data, the sweep, the merge):
  one process, 2 intra-op threads (torch's default here);
  one process, 1 thread (OMP_NUM_THREADS=1);
  two ranks of 1 thread each (what torchrun gives 2 ranks on a 2-core machine).

Run:  python -m pytest benchmarks/bench_distributed.py --benchmark-json=benchmarks/results/distributed-cpu-<date>-<commit>.json
"""
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from rllc_fast.data.synthetic import synthetic_mixture
from rllc_fast.store import ResultStore
from rllc_fast.toy import ToyRecipe, train_toy

RECIPE = ToyRecipe(steps=300, checkpoints=8)


@pytest.fixture(scope="module")
def sweep_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-dist")
    run = train_toy(root / "cache", RECIPE, progress=False, log=lambda s: None)
    np.save(root / "mix.npy", synthetic_mixture(2048, RECIPE.n_ctx, seed=7).numpy())
    return root, run.directory


def _args(root, ckpts, store):
    return ["sweep", "--checkpoints", str(ckpts), "--data", f"mix={root / 'mix.npy'}", "--context", str(RECIPE.n_ctx),
            "--num-contexts", "2048", "--components", "heads,whole", "--store", str(store), "--chains", "2",
            "--draws", "50", "--batch-size", "16", "--device", "cpu", "--quiet"]


def _timed(cmd, threads, cwd):
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    assert done.returncode == 0, done.stderr[-3000:]
    return seconds


def test_two_ranks_against_one_process(benchmark, sweep_inputs):
    root, ckpts = sweep_inputs
    single = [sys.executable, "-m", "rllc_fast.cli"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                "rllc_fast.cli"]
    times = {
        "one_process_2_threads": _timed(single + _args(root, ckpts, root / "a.sqlite"), None, root),
        "one_process_1_thread": _timed(single + _args(root, ckpts, root / "b.sqlite"), 1, root),
    }
    times["two_ranks_1_thread_each"] = benchmark.pedantic(
        lambda: _timed(torchrun + _args(root, ckpts, root / "c.sqlite"), 1, root), rounds=1, iterations=1)
    rows = {k: len(ResultStore(root / f"{k}.sqlite").rows()) for k in "abc"}
    assert rows["a"] == rows["b"] == rows["c"] == 8 * (12 + 1)
    benchmark.extra_info.update({
        "device": "cpu", "cpu_count": os.cpu_count(), "units": 16, "estimates": rows["c"],
        "seconds": times,
        "speedup_vs_one_process_2_threads": times["one_process_2_threads"] / times["two_ranks_1_thread_each"],
        "speedup_vs_one_process_1_thread": times["one_process_1_thread"] / times["two_ranks_1_thread_each"],
    })
    print(times)
