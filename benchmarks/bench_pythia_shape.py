"""The structured path on a model with Pythia-70m's shapes: all 48 heads x 4 chains, a few draws.

Random weights (nothing is downloaded); contexts of 128 random tokens, batch 2, so that a CPU
finishes in minutes. Records the time per SGLD step (all 192 replicas), the replica chunk sizes
the memory budget chose, and the process's peak resident memory; and, labelled "projection", the
roofline projection of ``rllc_fast.cost_model`` for one H200 per 200-step checkpoint at the paper's
and Pythia-70m's shapes, batch 8 and 16 (vendor peaks, not a measurement).

Run:  python -m pytest benchmarks/bench_pythia_shape.py --benchmark-json=benchmarks/results/pythia-shape-cpu-<date>-<commit>.json
"""
import resource
import time

import numpy as np
import torch

import rllc_fast as r
from conftest import device_name
from rllc_fast import cost_model
from rllc_fast.engine.head_replicas import HeadReplicas

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BUDGET = "2GB"
N, T, DRAWS = 2, 128, 2


def test_pythia70m_shape_all_heads(benchmark):
    model = r.models.pythia_like(seed=0, device=DEVICE)
    tokens = torch.randint(0, 50304, (16, T), generator=torch.Generator().manual_seed(0))
    comps = r.heads(model)
    cfg = r.SGLDConfig(num_chains=4, num_draws=DRAWS, batch_size=N, seed=0)
    t0 = time.perf_counter()
    result = benchmark.pedantic(r.estimate_llc, args=(model, tokens, cfg), kwargs=dict(components=comps, max_memory=BUDGET),
                                rounds=1, iterations=1)
    seconds = time.perf_counter() - t0
    hr = HeadReplicas(model)
    per_replica = {l: hr.bytes_per_replica(N, T, l) for l in range(6)}
    assert len(result) == 48 and result.loss_trace.shape == (48, 4, DRAWS)
    assert np.isfinite(result.loss_trace).all()
    benchmark.extra_info.update(
        device=device_name(DEVICE), replicas=48 * 4, draws=DRAWS, batch=[N, T], max_memory=BUDGET,
        seconds=seconds, seconds_per_step=seconds / DRAWS,
        estimated_bytes_per_replica_by_layer=per_replica,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        params=sum(p.numel() for p in model.parameters()),
        projection={"label": "projection: roofline at an H200's vendor peaks (rllc_fast.cost_model), not measured",
                    "peaks": cost_model.H200,
                    "this_shape_step": cost_model.step_cost(model.cfg, cost_model.replica_layers(6, 8, 4), N, T).summary(),
                    "h200_per_checkpoint": cost_model.projections()},
    )
    print("projection (H200 vendor peaks, 200 steps per checkpoint; not measured):")
    for name, row in benchmark.extra_info["projection"]["h200_per_checkpoint"].items():
        print(f"  {name:40s} {row['tflop_per_step']:7.2f} TFLOP/step {row['gb_per_step']:6.0f} GB/step "
              f"{row['projected_seconds_per_checkpoint']:7.1f} s/checkpoint")
    print(f"\n192 replicas, {DRAWS} draws: {seconds:.1f} s ({seconds / DRAWS:.1f} s per step incl. setup); "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
