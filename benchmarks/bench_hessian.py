"""Hessian traces against the reference tools (PyHessian 0.1, curvlinops 3.0.1) on the paper-shape 2-layer model
(d_model 256, 16 heads, vocabulary 5000, random weights), one batch of 8 x 256 tokens, same probes.

1. ``test_hvp_and_full_trace``: seconds per Hessian-vector product, gradient graph built once (ours, both
   methods; PyHessian's ``trace()``; curvlinops' ``HessianLinearOperator``, which rebuilds it per product), and the
   whole-model trace estimate from the same 8 Rademacher probes (must agree to float error).
2. ``test_per_head_traces``: all 16 per-head traces of the trained reduced model to one standard error (5% of
   the median |trace|): PyHessian's method once per head (its HVP with the graph reused and the probe masked to
   the head; PyHessian cannot refine to a slice of a parameter, so the mask is the only change) against our
   shared probes, each with the probe counts that a pilot's variances say the target needs; both timed.

Run:  pip install --no-deps pyhessian==0.1 curvlinops-for-pytorch==3.0.1 backpack-for-pytorch einconv \
          linear_operator opt-einsum unfoldNd einops   (benchmark-only; --no-deps keeps the CPU torch)
      python -m pytest benchmarks/bench_hessian.py --benchmark-json=benchmarks/results/hessian-cpu-<date>-<commit>.json
"""
import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import rllc_fast as r
from conftest import device_name
from models import full_size, trained_reduced
from rllc_fast import hessian
from rllc_fast.hessian.operator import BatchHessian, Support, only_grad_for
from rllc_fast.losses import NextTokenLoss

pyhessian = pytest.importorskip("pyhessian", reason="pip install --no-deps pyhessian==0.1 to run this benchmark")
curvlinops = pytest.importorskip("curvlinops", reason="pip install curvlinops-for-pytorch==3.0.1 (see module doc)")
from pyhessian import hessian as PyHessian  # noqa: E402
from pyhessian.utils import hessian_vector_product  # noqa: E402

PROBES = 8
PILOT = 30


class _NextTokenLogits(torch.nn.Module):
    """The model as the reference tools want it: ``inputs -> [N*(T-1), vocab]`` logits against flat targets."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens):
        logits = self.model(tokens)
        return logits[:, :-1].reshape(-1, logits.shape[-1])


def _setup():
    model, tokens = full_size()
    batch = tokens[:8]
    return model, batch, (batch, batch[:, 1:].reshape(-1))


def _probes(support, count):
    return support.shared_probes(0, range(count))


def test_hvp_and_full_trace(benchmark):
    model, batch, (inputs, targets) = _setup()
    whole = {"whole": r.whole(model)}
    support = Support(model, whole, "cpu")
    v = _probes(support, PROBES)
    rows, traces = {}, {}
    with only_grad_for(model, support.names):
        for method in hessian.METHODS:
            t0 = time.perf_counter()
            op = BatchHessian(model, NextTokenLoss(), batch, support, method, 1)
            build = time.perf_counter() - t0
            t0 = time.perf_counter()
            hv = op.apply(v)
            rows[f"ours {method}"] = (time.perf_counter() - t0) / PROBES
            rows[f"ours {method} graph build"] = build
            traces[f"ours {method}"] = float((v * hv).sum(1).mean())
    wrapped = _NextTokenLogits(model)
    for p in model.parameters():
        p.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    ph = PyHessian(wrapped, F.cross_entropy, data=(inputs, targets), cuda=False)
    rows["pyhessian graph build"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ph.trace(maxIter=PROBES, tol=0.0)  # its own probes: the timing of its loop
    rows["pyhessian trace() per HVP"] = (time.perf_counter() - t0) / PROBES
    same = [hessian_vector_product(ph.gradsH, ph.params, list(support.unflatten(v[i:i + 1])[j][0]
                                                                for j in range(len(support.names))))
            for i in range(PROBES)]
    traces["pyhessian (same probes)"] = float(np.mean([
        sum(float((a * b).sum()) for a, b in zip(hv_i, [t[0] for t in support.unflatten(v[i:i + 1])]))
        for i, hv_i in enumerate(same)]))
    params = [p for p in wrapped.parameters()]
    op = curvlinops.HessianLinearOperator(wrapped, torch.nn.CrossEntropyLoss(), params, [(inputs, targets)],
                                          check_deterministic=False)
    t0 = time.perf_counter()
    G = v.T.contiguous()
    AG = op @ G
    rows["curvlinops per HVP"] = (time.perf_counter() - t0) / PROBES
    traces["curvlinops (same probes)"] = float(torch.einsum("ij,ij", G, AG) / PROBES)
    benchmark.extra_info.update({"device": device_name("cpu"), "tokens": list(batch.shape), "probes": PROBES,
                                 "weights": support.numel, "seconds": rows, "trace_estimates": traces})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    values = list(traces.values())
    assert max(values) - min(values) <= 1e-3 * max(abs(x) for x in values), traces


def _pyhessian_head_forms(model, batch, support, heads, counts):
    """PyHessian's method once per head: its graph built per head, one HVP per probe masked to the head.
    Returns ({head: [v.Hv per probe]}, seconds)."""
    wrapped = _NextTokenLogits(model)
    for p in model.parameters():
        p.requires_grad_(True)
    names = [n for n, _ in model.named_parameters()]
    forms, t0 = {}, time.perf_counter()
    for i, name in enumerate(heads):
        model.zero_grad(set_to_none=True)  # PyHessian's backward accumulates into .grad
        ph = PyHessian(wrapped, F.cross_entropy, data=(batch, batch[:, 1:].reshape(-1)), cuda=False)
        v = support.component_probes([name] * counts[name], 7, [i * (1 << 24) + p for p in range(counts[name])])
        full = dict(zip(support.names, support.unflatten(v)))
        out = []
        for p in range(counts[name]):
            probe = [full[n][p] if n in full else torch.zeros_like(q) for n, q in zip(names, ph.params)]
            hv = hessian_vector_product(ph.gradsH, ph.params, probe)
            out.append(sum(float((a * b).sum()) for a, b in zip(hv, probe)))
        forms[name] = np.array(out)
    model.zero_grad(set_to_none=True)
    return forms, time.perf_counter() - t0


def test_per_head_traces(benchmark):
    """All 16 per-head traces of the trained reduced model (8 x 32 tokens) to one standard error: a pilot of
    ``PILOT`` probes measures each head's per-probe variance under both schemes; the target is 5% of the median
    |trace|; each side then runs the probes its variances need (PyHessian per head, ours shared) and is timed."""
    model, tokens = trained_reduced()
    batch = tokens[:8]
    heads = r.heads(model)
    support = Support(model, heads, "cpu")
    pilot_p, _ = _pyhessian_head_forms(model, batch, support, heads, {k: PILOT for k in heads})
    pilot_s = hessian.trace(model, batch, heads, num_probes=PILOT, num_batches=1, batch_size=8, seed=1)
    target = 0.05 * float(np.median([abs(f.mean()) for f in pilot_p.values()]))
    counts = {k: max(2, math.ceil(f.var(ddof=1) / target ** 2)) for k, f in pilot_p.items()}
    shared = max(2, max(math.ceil(pilot_s[k].samples.var(ddof=1) / target ** 2) for k in heads))
    forms, pyhessian_seconds = _pyhessian_head_forms(model, batch, support, heads, counts)
    t0 = time.perf_counter()
    ours = hessian.trace(model, batch, heads, num_probes=shared, num_batches=1, batch_size=8, seed=2)
    ours_seconds = time.perf_counter() - t0
    sem_p = {k: float(f.std(ddof=1) / math.sqrt(len(f))) for k, f in forms.items()}
    benchmark.extra_info.update({
        "device": device_name("cpu"), "model": "trained reduced paper shape (d_model 64, 16 heads)",
        "tokens": list(batch.shape), "pilot_probes": PILOT, "target_sem": target,
        "pyhessian_hvps": int(sum(counts.values())), "pyhessian_seconds": pyhessian_seconds,
        "ours_shared_probes": shared, "ours_hvp": ours.config["hvp"], "ours_probe_chunk": ours.config["probe_chunk"],
        "ours_seconds": ours_seconds, "speedup": pyhessian_seconds / ours_seconds,
        "variance_ratio_shared_over_per_head": {
            k: float(pilot_s[k].samples.var(ddof=1) / pilot_p[k].var(ddof=1)) for k in heads},
        "per_head": {k: {"pyhessian": [float(forms[k].mean()), sem_p[k]], "ours": [ours[k].value, ours[k].sem]}
                     for k in heads},
    })
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    for k in heads:  # the same quantity: the two estimates agree within their combined errors
        assert abs(ours[k].value - forms[k].mean()) <= 4 * math.hypot(ours[k].sem, sem_p[k]), k
