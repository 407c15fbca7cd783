"""Time per SGLD step of the batched engine as the number of replicas grows (1, 4, 16, 64).

Replicas are heads x chains of the 2-layer model: 1 = head 0:0 x 1 chain, 4 = head 0:0 x 4 chains,
16 = heads 0:0, 0:1, 1:0, 1:1 x 4 chains, 64 = all 16 heads x 4 chains. The time per step is
``(T(3 draws) - T(1 draw)) / 2``, which leaves out the one-off setup and l(w*) passes. Two sizes:
the reduced paper shape of the devinterp benchmark, and the paper's full shape (d_model 256, 5k
vocabulary, contexts of 256 tokens, batch 8).

Run:  python -m pytest benchmarks/bench_scaling.py --benchmark-json=benchmarks/results/scaling-cpu-<date>-<commit>.json
"""
import time

import pytest
import torch

import rllc_fast as r
from conftest import device_name
from models import full_size, trained_reduced

REPLICAS = {1: (["0:0"], 1), 4: (["0:0"], 4), 16: (["0:0", "0:1", "1:0", "1:1"], 4), 64: (None, 4)}
SIZES = {"reduced": trained_reduced, "full": full_size}


def _seconds(model, tokens, comps, chains, draws, engine):
    cfg = r.SGLDConfig(num_chains=chains, num_draws=draws, batch_size=8, seed=0)
    t0 = time.perf_counter()
    r.estimate_llc(model, tokens, cfg, components=comps, engine=engine)
    return time.perf_counter() - t0


@pytest.mark.parametrize("engine", ["batched", "generic"])
@pytest.mark.parametrize("replicas", list(REPLICAS))
@pytest.mark.parametrize("size", list(SIZES))
def test_step_time_vs_replicas(benchmark, size, replicas, engine):
    model, tokens = SIZES[size]()
    names, chains = REPLICAS[replicas]
    comps = r.heads(model) if names is None else {n: r.heads(model)[n] for n in names}
    _seconds(model, tokens, comps, chains, 1, engine)  # warm-up
    one = _seconds(model, tokens, comps, chains, 1, engine)
    three = benchmark.pedantic(_seconds, args=(model, tokens, comps, chains, 3, engine), rounds=1, iterations=1)
    three = benchmark.stats.stats.min
    step = max(three - one, 0.0) / 2
    benchmark.extra_info.update(device=device_name("cpu"), size=size, engine=engine, replicas=replicas,
                                seconds_per_step=step, seconds_per_replica_step=step / replicas,
                                torch_threads=torch.get_num_threads())
    print(f"\n{size} {engine} R={replicas}: {step * 1e3:.1f} ms/step, {step / replicas * 1e3:.2f} ms per replica-step")
