"""Susceptibilities of every head: devinterp 2.0.1's ``susceptibilities()`` against one ``estimate_llc`` call.

One process, one run: on the reduced paper shape (``models.trained_reduced``: 2 layers x 8 heads,
attention-only, d_model 64, context 32, byte tokens of stdlib source), with the same sampling data,
probe sets and hyperparameters (step 1e-3, nbeta 30, localization 200, 4 chains x ``DRAWS`` draws, batch 8):
  devinterp: ``devinterp.slt.susceptibilities.susceptibilities(...)`` over the 16 heads plus its required
             "full" restriction (one ``sample()`` per restriction, chains one after another), timed once;
  ours:      ONE ``estimate_llc`` call with components = all heads + ``r.whole(model)`` and the same probe
             sets, then ``r.susceptibilities`` (timed as the best of ``OURS_ROUNDS`` calls).
Probe sets (``PROBE_CONTEXTS`` fixed contexts each, full context length): ``code`` (held-out windows of
the sampling corpus: the sampling task), ``prose`` (stdlib docstrings and comments), ``induction`` and
``dyck`` (the demo's synthetic sources, as byte ids).

Making the comparison fair (each difference between the two tools, and what is done about it):
- *Contexts.* devinterp's ``Observable`` draws ``batch_size * batches_per_draw`` rows of each probe
  Dataset with its own seed. Each probe Dataset here holds exactly our contexts and
  ``batches_per_draw = PROBE_CONTEXTS / batch_size``, so devinterp scores all of them (in a shuffled
  order, which is mapped back row by row from the ``input_ids`` devinterp stores).
- *When a draw is taken.* devinterp records a draw after that step's SGLD update (its draws are
  ``w_1 .. w_D``); ours before it (draw 0 is ``w*``). Ours runs with ``num_burnin=1``, so its draws are
  the weights after 1 .. D updates as well.
- *Sampling minibatches.* Both draw minibatches of 8 from the same 512 held-out contexts, each with its
  own shuffling (devinterp: one DataLoader order shared by all chains; ours: a seeded schedule).
- *The init loss* ``l(w*)`` in ``phi = L(w) - l(w*)``: devinterp takes it from 32 other batches
  of the sampling data, ours from the batches it samples on. The estimator is not invariant to a shift
  of ``phi`` (a constant ``c`` adds ``c (E_C[L - l_xy] - E_whole[L - l_xy])`` per token), so the
  comparison gives ours devinterp's ``l(w*)`` (``init_loss=``; "same_init_loss", the headline). Also
  recorded: both sides with ``l(w*)`` = the sampling probe's own mean loss at ``w*`` (phi is 0 at ``w*``;
  "centred": our default), with the offset.
Standard errors: ours from the library (``aggregate_sem``: the chains' spread and the whole-model run's
share, ``|E_C[phi]| * SE(E_whole[L - l])``, which every chain of a component shares;
``aggregate_sem_chains``: the spread alone); devinterp returns only the pooled estimate, so its per-chain
values are recomputed from the samples it wrote (``output_path``), by the per-chain form of the same
formula (``rllc_fast.susceptibility.chain_susceptibilities``); their mean is checked against devinterp's
own output, and its whole run's share is added the same way. ``z`` uses the chains' spreads alone,
``z_with_whole`` the full errors.
The formula itself is checked apart from the sampling by feeding OUR observations, in devinterp's
DataTree layout, to devinterp's ``compute_susceptibilities`` (``formula_check_max_abs``).

Recorded in ``extra_info``: both wall times and their ratio, per head x probe the aggregate
susceptibilities with SEs and z-scores, per head the Pearson correlation of per-token susceptibilities
between the two (per probe and over all probes' tokens), and the formula check.

Run:  pip install devinterp==2.0.1   (benchmark-only; never a runtime dependency; or privately:
      pip install --target /tmp/devinterp-site devinterp==2.0.1 --no-deps, plus xarray and zarr, and
      PYTHONPATH=/tmp/devinterp-site; it also needs datasets and transformers)
      OMP_NUM_THREADS=1 python -m pytest benchmarks/bench_susceptibility.py \
          --benchmark-json=benchmarks/results/susceptibility-cpu-<date>-<commit>.json
      (one torch thread for both sides: on the shared 2-core machine, 2 threads made devinterp's
      sampling about 25x slower, 68 s against 2.6 s for one restriction x 60 draws.)
      RLLC_BENCH_OURS_THREADS=2 also times ours with 2 torch threads (set for that call and restored):
      each tool at its faster thread count on this CPU. On a quiet machine (2026-11-30) devinterp took
      20.6 s with 1 thread and 22.7 s with 2 for 3 restrictions x 50 draws, so it stays at 1.
"""
import math
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import rllc_fast as r
from models import REDUCED, trained_reduced

devinterp_sus = pytest.importorskip("devinterp.slt.susceptibilities",
                                    reason="pip install devinterp==2.0.1 to run this benchmark")
import xarray as xr  # noqa: E402  (a devinterp dependency)
from datasets import Dataset  # noqa: E402
from devinterp.slt.weight_restrictions import create_param_masks  # noqa: E402
from rllc_fast.data import corpus_tokens  # noqa: E402
from rllc_fast.data.stdlib_bytes import stdlib_byte_tokens  # noqa: E402
from rllc_fast.data.synthetic import synthetic_source  # noqa: E402
from rllc_fast.losses import next_token_loss  # noqa: E402
from rllc_fast.susceptibility import chain_susceptibilities  # noqa: E402

SAMPLING = "code"
PROBE_CONTEXTS = 8
DRAWS = 200
CONFIG = r.SGLDConfig(step_size=1e-3, nbeta=30.0, localization=200.0, num_chains=4, num_draws=DRAWS,
                      num_burnin=1, batch_size=8, seed=0)
OURS_ROUNDS = 2
OURS_EXTRA_THREADS = [int(n) for n in os.environ.get("RLLC_BENCH_OURS_THREADS", "").split(",") if n.strip()]


def probe_sets(context_length: int, n: int) -> dict:
    """``{name: [n, context_length]}`` byte-token probe sets; ``code`` is the sampling task."""
    return {"code": stdlib_byte_tokens(n, context_length, seed=2),
            "prose": corpus_tokens("stdlib_prose", context_length, n, seed=0),
            "induction": synthetic_source("induction", n, context_length, seed=0),
            "dyck": synthetic_source("dyck", n, context_length, seed=0)}


def _dataset(tokens: torch.Tensor) -> Dataset:
    return Dataset.from_dict({"input_ids": tokens.tolist()}).with_format("torch")


def _devinterp_name(head: str) -> str:
    layer, h = head.split(":")
    return f"l{layer}h{h}"


def _devinterp(model, tokens, probes, config, folder: Path):
    """(devinterp's output DataTree, {restriction: its samples DataTree}, seconds of the call)."""
    restrictions = {"full": None}
    restrictions.update({_devinterp_name(h): create_param_masks(model, _devinterp_name(h)) for h in r.heads(model)})
    observables = {name: (_dataset(t), t.shape[0] // config.batch_size) for name, t in probes.items()}
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = devinterp_sus.susceptibilities(
            model, _dataset(tokens), observables, restrictions, sampling_task=SAMPLING, lr=config.step_size,
            n_beta=config.nbeta, localization=config.localization, num_chains=config.num_chains,
            num_draws=config.num_draws, batch_size=config.batch_size, device="cpu",
            output_path=folder / "samples.zarr")
    seconds = time.perf_counter() - t0
    samples = {name: xr.open_datatree(str(folder / f"samples_{name}.zarr"), engine="zarr", consolidated=False)
               for name in restrictions}
    return out, samples, seconds


def _row_order(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    """``perm`` with ``theirs[i] == ours[perm[i]]`` (every row of ours found exactly once)."""
    index = {row.tobytes(): i for i, row in enumerate(ours)}
    assert len(index) == len(ours), "probe contexts must be distinct rows"
    perm = np.array([index[row.tobytes()] for row in np.ascontiguousarray(theirs)])
    assert sorted(perm.tolist()) == list(range(len(ours))), "devinterp did not score every probe context"
    return perm


def _devinterp_per_token(out, probes) -> dict:
    """``{restriction: {probe: [N, P]}}`` of devinterp's output, rows in our probe order."""
    sus, ctx = out["susceptibilities"].dataset, out["context"].dataset
    names = list(sus.attrs["dataset_id_to_name"])
    result = {str(w): {} for w in sus.coords["wr"].values}
    for k, name in enumerate(names):
        n, T = probes[name].shape
        ids = ctx["input_ids"].values[ctx["dataset_id"].values == k].reshape(n, T)
        perm = _row_order(probes[name].numpy(), ids)
        block = sus["sus"].values[sus["dataset_id"].values == k]             # [n * (T-1), wr]
        for j, w in enumerate(sus.coords["wr"].values):
            values = np.empty((n, T - 1))
            values[perm] = block[:, j].reshape(n, T - 1)
            result[str(w)][name] = values
    return result


def _devinterp_per_chain(samples, probes, l_star: float):
    """``({restriction: {probe: chi [chains, N, P]}}, {probe: whole-run delta per chain [chains]})`` from
    devinterp's samples, rows in our probe order, by the per-chain form of devinterp's formula with
    ``phi = L - l_star`` (with devinterp's own ``l(w*)`` their mean is its pooled output)."""
    full = samples["full"].dataset
    full_pt = full[f"loss_{SAMPLING}"].values.astype(np.float64).mean(axis=(2, 3))      # [chains, draws]
    perms, full_delta, whole_chains = {}, {}, {}
    for name in probes:
        if name == SAMPLING:
            continue
        perms[name] = _row_order(probes[name].numpy(), full[f"input_ids_{name}"].values)
        probe = full[f"loss_{name}"].values.astype(np.float64)
        full_delta[name] = full_pt.mean() - probe.mean(axis=(0, 1))
        whole_chains[name] = full_pt.mean(1) - probe.mean(axis=(1, 2, 3))
    out = {}
    for w, tree in samples.items():
        if w == "full":
            continue
        ds = tree.dataset
        pt = ds[f"loss_{SAMPLING}"].values.astype(np.float64).mean(axis=(2, 3))
        out[w] = {"E_phi": float((pt - l_star).mean())}
        for name, perm in perms.items():
            chi = chain_susceptibilities(pt - l_star, pt, ds[f"loss_{name}"].values.astype(np.float64),
                                         full_delta[name])
            ordered = np.empty_like(chi)
            ordered[:, perm] = chi
            out[w][name] = ordered
    return out, whole_chains


def _as_devinterp_tree(obs, component: str, l_star: float):
    """Our observations of one component in the layout devinterp's ``sample()`` writes."""
    data = {"init_loss": (("chain", "token_pos"),
                          np.full((obs.num_chains, obs[SAMPLING].shape[-1]), l_star, dtype=np.float64))}
    for name in obs.names:
        data[f"loss_{name}"] = (("chain", "draw", f"batch_{name}", "token_pos"), obs.component_losses(name, component))
        data[f"input_ids_{name}"] = ((f"batch_{name}", "token"), obs.tokens[name])
    return xr.DataTree(dataset=xr.Dataset(data))


def _formula_check(result, names, l_star: float, ours) -> float:
    """Largest |ours - devinterp's compute_susceptibilities| per token, both on OUR observations."""
    obs = result.observations
    trees = {"full": _as_devinterp_tree(obs, "whole", l_star)}
    trees.update({_devinterp_name(h): _as_devinterp_tree(obs, h, l_star) for h in names})
    theirs = _devinterp_per_token(devinterp_sus.compute_susceptibilities(trees, SAMPLING),
                                  {n: torch.from_numpy(obs.tokens[n]) for n in obs.names})
    return max(float(np.abs(theirs[_devinterp_name(h)][p] - ours.per_token[p][i]).max())
               for i, h in enumerate(ours.components) for p in ours.probes)


def _sem(per_chain: np.ndarray) -> float:
    return float(np.std(per_chain, ddof=1) / math.sqrt(len(per_chain)))


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def _compare(heads, ours, ours_obs, l_star: float, theirs_chains: dict, theirs_whole: dict, theirs_pooled=None):
    """Per head x probe aggregates (SE across chains, and with the whole-model run's noise added:
    ``|E_C[phi]| * SE(E_whole[L - l])``, which the chain spread does not show), z-scores, and per head the
    Pearson correlation of per-token susceptibilities (each probe, and all probes' tokens together)."""
    rows, per_head = {}, {}
    for i, h in enumerate(heads):
        w = _devinterp_name(h)
        pt = np.asarray(ours_obs.component_losses(SAMPLING, h), dtype=np.float64).mean(axis=(2, 3))
        ours_e_phi = float((pt - l_star).mean())
        corr = {}
        for j, p in enumerate(ours.probes):
            agg = theirs_chains[w][p].mean(axis=(1, 2))
            d_mean, d_sem = float(agg.mean()), _sem(agg)
            d_sem_w = math.hypot(d_sem, abs(theirs_chains[w]["E_phi"]) * _sem(theirs_whole[p]))
            o_mean, o_sem = float(ours.aggregate[i, j]), float(ours.aggregate_sem_chains[i, j])
            o_sem_w = float(ours.aggregate_sem[i, j])  # the library's error: chains and the whole run's share
            row = dict(devinterp_mean=d_mean, devinterp_sem=d_sem, ours_mean=o_mean, ours_sem=o_sem,
                       z=abs(o_mean - d_mean) / math.hypot(o_sem, d_sem), devinterp_sem_with_whole=d_sem_w,
                       ours_sem_with_whole=o_sem_w, z_with_whole=abs(o_mean - d_mean) / math.hypot(o_sem_w, d_sem_w),
                       devinterp_E_phi=theirs_chains[w]["E_phi"], ours_E_phi=ours_e_phi)
            if theirs_pooled is not None:  # the per-chain values' mean against devinterp's own output
                row["devinterp_output_vs_chain_mean_max_abs"] = float(np.abs(theirs_chains[w][p].mean(0) - theirs_pooled[w][p]).max())
            rows[f"{h}/{p}"] = row
            corr[p] = _pearson(ours.per_token[p][i], theirs_chains[w][p].mean(0))
        both = _pearson(np.concatenate([ours.per_token[p][i].ravel() for p in ours.probes]),
                        np.concatenate([theirs_chains[w][p].mean(0).ravel() for p in ours.probes]))
        per_head[h] = dict(pearson_all_probes=both, pearson_per_probe=corr)
    z = np.array([v["z"] for v in rows.values()])
    zw = np.array([v["z_with_whole"] for v in rows.values()])
    c_all = np.array([v["pearson_all_probes"] for v in per_head.values()])
    c_probe = np.array([min(v["pearson_per_probe"].values()) for v in per_head.values()])
    summary = dict(init_loss=l_star, cells=len(z), within_2se=int((z <= 2).sum()), within_3se=int((z <= 3).sum()),
                   max_z=float(z.max()), within_2se_with_whole=int((zw <= 2).sum()),
                   within_3se_with_whole=int((zw <= 3).sum()), max_z_with_whole=float(zw.max()),
                   min_pearson_all_probes=float(c_all.min()), heads_pearson_all_probes_ge_0_9=int((c_all >= 0.9).sum()),
                   min_pearson_per_probe=float(c_probe.min()), heads_pearson_every_probe_ge_0_9=int((c_probe >= 0.9).sum()))
    return dict(summary=summary, aggregates=rows, per_head=per_head)


def test_susceptibilities_vs_devinterp_all_heads(benchmark):
    config = CONFIG
    model, tokens = trained_reduced()
    probes = probe_sets(tokens.shape[1], PROBE_CONTEXTS)
    assert all(t.shape[0] % config.batch_size == 0 for t in probes.values())
    with torch.no_grad():  # the sampling probe's own mean loss at w*: phi = L - this is 0 at w*
        at_w_star = float(next_token_loss.per_token(model, probes[SAMPLING]).mean())

    with tempfile.TemporaryDirectory() as folder:
        out, samples, devinterp_s = _devinterp(model, tokens, probes, config, Path(folder))
        l_star_devinterp = float(samples["full"].dataset["init_loss"].values.mean())
        theirs = _devinterp_per_token(out, probes)
        theirs_chains, theirs_whole = _devinterp_per_chain(samples, probes, l_star_devinterp)
        centred_chains, _ = _devinterp_per_chain(samples, probes, at_w_star)
        devinterp_draws = int(samples["full"].dataset.sizes["draw"])

    heads = list(r.heads(model))
    components = dict(r.heads(model))
    components["whole"] = r.whole(model)

    def ours_run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sampler diagnostics (R-hat of short chains) are not the point here
            res = r.estimate_llc(model, tokens, config, components=components, observables=probes)
        return res, r.susceptibilities(res, sampling=SAMPLING, whole="whole")  # the default: phi = 0 at w*

    result, ours_default = benchmark.pedantic(ours_run, rounds=OURS_ROUNDS, iterations=1)
    ours_s = benchmark.stats.stats.min
    threads = torch.get_num_threads()
    ours_by_threads = {threads: list(benchmark.stats.stats.data)}
    for n in OURS_EXTRA_THREADS:  # ours again at another thread count, restored after
        try:
            torch.set_num_threads(n)
            times = []
            for _ in range(OURS_ROUNDS):
                t0 = time.perf_counter()
                ours_run()
                times.append(time.perf_counter() - t0)
            ours_by_threads[n] = times
        finally:
            torch.set_num_threads(threads)
    best_threads = min(ours_by_threads, key=lambda n: min(ours_by_threads[n]))
    obs = result.observations
    ours = r.susceptibilities(result, sampling=SAMPLING, whole="whole", init_loss=l_star_devinterp)
    assert ours.components == heads
    formula_max_abs = _formula_check(result, heads, l_star_devinterp, ours)
    assert ours_default.init_loss == pytest.approx(at_w_star, rel=1e-5)

    same = _compare(heads, ours, obs, l_star_devinterp, theirs_chains, theirs_whole, theirs_pooled=theirs)
    centred = _compare(heads, ours_default, obs, at_w_star, centred_chains, theirs_whole)
    benchmark.extra_info.update(
        case="reduced", model=dict(REDUCED, n_layers=2, attn_only=True, params=sum(p.numel() for p in model.parameters())),
        config=config.to_dict(), devinterp_num_burnin_steps=0, devinterp_draws=devinterp_draws,
        probe_contexts=PROBE_CONTEXTS, probes=list(probes), sampling=SAMPLING, heads_count=len(heads),
        devinterp_seconds=devinterp_s, ours_seconds=ours_s, ours_rounds=OURS_ROUNDS,
        ours_seconds_all=list(benchmark.stats.stats.data), speedup=devinterp_s / ours_s,
        torch_threads=torch.get_num_threads(),
        ours_seconds_by_threads={str(n): v for n, v in ours_by_threads.items()},
        speedup_best_thread_counts=dict(devinterp_threads=threads, ours_threads=best_threads,
                                        ratio=devinterp_s / min(ours_by_threads[best_threads])),
        init_loss=dict(devinterp=l_star_devinterp, sampling_probe_at_w_star=at_w_star,
                       offset_devinterp=at_w_star - l_star_devinterp),
        formula_check_max_abs=formula_max_abs,
        same_init_loss=same, centred=centred,
    )
    for label, v in (("same l(w*) (devinterp's)", same), ("centred l(w*) (our default)", centred)):
        s = v["summary"]
        print(f"\n{label}: {s['within_2se']}/{s['cells']} head x probe cells within 2 combined SE "
              f"({s['within_2se_with_whole']} with the whole run's noise), max z {s['max_z']:.2f} "
              f"({s['max_z_with_whole']:.2f}); per-token Pearson min {s['min_pearson_all_probes']:.3f} all probes, "
              f"{s['min_pearson_per_probe']:.3f} per probe")
    for n, v in ours_by_threads.items():
        print(f"ours with {n} thread(s): best {min(v):.1f} s: {devinterp_s / min(v):.1f}x devinterp's {threads}-thread time")
    print(f"devinterp {devinterp_s:.1f} s, ours {ours_s:.1f} s: {devinterp_s / ours_s:.1f}x; "
          f"formula check max |diff| {formula_max_abs:.2e}")
