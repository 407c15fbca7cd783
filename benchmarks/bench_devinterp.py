"""Our batched engine against devinterp 2.0.1's per-head ``llc()`` on the same model, data and settings.

One process, one run per case: devinterp estimates every head one call at a time (its way: chains one
after another, each on a deep copy of the model), then our batched engine estimates all heads in one
call (timed as the best of ``OURS_ROUNDS`` calls; devinterp's sweep runs once). Two cases:
  reduced: the reduced paper shape (2 layers x 8 heads, d_model 64, context 32), 4 chains x 50 draws, batch 8;
  small:   issue 19's few-replica case (2 layers x 4 heads, d_head 16, d_model 64, context 64), 2 chains x
           60 draws, batch 16: 16 replicas, where our per-step overhead weighs most.
Recorded in ``extra_info``: both wall times, their ratio, and per head the LLC means, their standard
errors and ``z = |difference| / combined SE``.

devinterp's ``llc()`` subtracts an init loss measured on 32 *other* batches than the ones it samples
on; the gap between the two batch sets' mean loss at ``w*`` shifts every head's estimate by the same
amount (its chains share the batches, so their spread does not show it). We therefore also rescore
devinterp's own samples against ``l(w*)`` on *their* batches (read from its output; the "paired"
figures, the estimator this package uses) and judge agreement on those; the shift is recorded.
The devinterp time is its ``sample()`` + ``compute_llc()`` (what ``llc()`` runs); the rescoring is not
timed.

Run:  pip install devinterp==2.0.1   (benchmark-only; never a runtime dependency; or privately:
      pip install --target /tmp/devinterp-site devinterp==2.0.1 --no-deps, plus xarray and zarr, and
      PYTHONPATH=/tmp/devinterp-site)
      python -m pytest benchmarks/bench_devinterp.py --benchmark-json=benchmarks/results/devinterp-cpu-<date>-<commit>.json
"""
import math
import time
import warnings

import numpy as np
import pytest
import torch

import rllc_fast as r
from models import REDUCED, SMALL, trained_reduced, trained_small

devinterp_llc = pytest.importorskip("devinterp.slt.llc", reason="pip install devinterp==2.0.1 to run this benchmark")
from devinterp.slt.sampling import sample  # noqa: E402
from devinterp.slt.weight_restrictions import create_param_masks  # noqa: E402
from rllc_fast.losses import next_token_loss  # noqa: E402


def _config(chains, draws, batch):
    return r.SGLDConfig(step_size=1e-3, nbeta=30.0, localization=200.0, num_chains=chains, num_draws=draws,
                        batch_size=batch, seed=0)


CASES = {"reduced": (trained_reduced, REDUCED, _config(4, 50, 8)),
         "small": (trained_small, SMALL, _config(2, 60, 16))}
OURS_ROUNDS = 3


def _devinterp_all_heads(model, tokens, config):
    """{head: devinterp's xarray samples} and the seconds devinterp took."""
    from datasets import Dataset

    ds = Dataset.from_dict({"input_ids": tokens.tolist()}).with_format("torch")
    out, seconds = {}, 0.0
    for name in r.heads(model):
        layer, head = name.split(":")
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            samples = sample(model, ds, {}, lr=config.step_size, n_beta=config.nbeta,
                             localization=config.localization, num_chains=config.num_chains,
                             num_draws=config.num_draws, batch_size=config.batch_size,
                             param_masks=create_param_masks(model, f"l{layer}h{head}"), device="cpu")
            summary = devinterp_llc.compute_llc(samples)
        seconds += time.perf_counter() - t0
        out[name] = (samples, summary)
    return out, seconds


def _mean_sem(per_chain):
    per_chain = np.asarray(per_chain, dtype=float)
    return float(per_chain.mean()), float(per_chain.std(ddof=1) / math.sqrt(len(per_chain)))


@torch.no_grad()
def _paired(model, samples, summary, config):
    """devinterp's per-chain LLCs with l(w*) taken on the batches each chain sampled on."""
    ids = torch.as_tensor(np.asarray(samples.dataset.sampling_input_ids_micro.values))  # [chain, step, batch, T]
    cache, per_chain = {}, []
    for c in range(ids.shape[0]):
        init = []
        for t in range(ids.shape[1]):
            key = ids[c, t].numpy().tobytes()
            if key not in cache:
                cache[key] = float(next_token_loss(model, ids[c, t]))
            init.append(cache[key])
        per_chain.append(config.nbeta * (float(summary.loss_trace.values[c].mean()) - float(np.mean(init))))
    return per_chain


@pytest.mark.parametrize("case", list(CASES))
def test_batched_vs_devinterp_all_heads(benchmark, case):
    make, shape, config = CASES[case]
    model, tokens = make()
    theirs, devinterp_s = _devinterp_all_heads(model, tokens, config)

    result = benchmark.pedantic(lambda: r.estimate_llc(model, tokens, config, components=r.heads(model)),
                                rounds=OURS_ROUNDS, iterations=1)
    ours_s = benchmark.stats.stats.min
    heads = {}
    for name, (samples, summary) in theirs.items():
        e = result[name]
        raw_mean, raw_sem = _mean_sem(summary.llc_per_chain.values)
        mean, sem = _mean_sem(_paired(model, samples, summary, config))
        combined = math.hypot(sem, e.llc_sem)
        heads[name] = dict(devinterp_llc_mean=raw_mean, devinterp_llc_sem=raw_sem, devinterp_paired_mean=mean,
                           devinterp_paired_sem=sem, init_batch_shift=raw_mean - mean, ours_mean=e.llc_mean,
                           ours_sem=e.llc_sem, z=abs(mean - e.llc_mean) / combined)
    z = np.array([h["z"] for h in heads.values()])
    benchmark.extra_info.update(
        case=case, model=dict(shape, n_layers=2, attn_only=True, params=sum(p.numel() for p in model.parameters())),
        config=config.to_dict(), heads_count=len(heads), devinterp_seconds=devinterp_s, ours_seconds=ours_s,
        ours_rounds=OURS_ROUNDS, ours_seconds_all=list(benchmark.stats.stats.data),
        speedup=devinterp_s / ours_s, within_2se=int((z <= 2).sum()), within_3se=int((z <= 3).sum()),
        max_z=float(z.max()), torch_threads=torch.get_num_threads(), heads=heads,
    )
    print(f"\n{case}: devinterp {devinterp_s:.1f} s, ours {ours_s:.1f} s: {devinterp_s / ours_s:.1f}x; "
          f"{(z <= 2).sum()}/{len(z)} heads within 2 combined SE, {(z <= 3).sum()}/{len(z)} within 3 (max z {z.max():.2f})")
