"""Sweeps with observables: susceptibilities and Bayesian influence into the store, resumable, never reused
for other inputs, and the same numbers as the Python API."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import rllc_fast as r
from rllc_fast.models import attn_only, save_checkpoint
from rllc_fast.observable_jobs import load_susceptibility_arrays, observations_root
from rllc_fast.store import ResultStore
from rllc_fast.sweep import run_sweep

SMALL = dict(n_layers=2, d_model=32, n_heads=2, d_head=8, n_ctx=16, d_vocab=48)


@pytest.fixture()
def setup(tmp_path):
    for step in (0, 50):
        save_checkpoint(attn_only(seed=step + 1, **SMALL), tmp_path / f"step{step}.pt", step)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 48, (48, 16), generator=g)
    probes = {"samp": data[:6], "low": torch.randint(0, 12, (5, 16), generator=g),
              "high": torch.randint(36, 48, (4, 12), generator=g)}
    return tmp_path, data, probes


CFG = r.SGLDConfig(num_chains=2, num_draws=12, batch_size=8, seed=1)


def test_susceptibility_sweep_stores_what_the_api_computes_and_resumes(setup):
    tmp, data, probes = setup
    store = tmp / "s.sqlite"
    report = run_sweep(str(tmp), {"mix": data}, CFG, str(store), ["heads"], metric="susceptibility",
                       observables=probes, sampling_probe="samp", progress=False, log=lambda s: None)
    assert len(report.computed) == 2 and not report.failed
    rows = ResultStore(store, readonly=True).observable_rows("susceptibility")
    assert sorted(set(rows["probe"])) == ["high", "low"]
    assert len(rows) == 2 * 4 * 2                                    # checkpoints x heads x probes
    llc = ResultStore(store, readonly=True).rows()
    assert sorted(set(llc["component"])) == ["0:0", "0:1", "1:0", "1:1"]  # the baseline is not a row of the set
    # the same numbers as the API on the last checkpoint
    model = r.models.checkpoint_at(tmp / "step50.pt").load()
    comps = {**r.heads(model), "whole": r.whole(model)}
    res = r.estimate_llc(model, data, CFG, components=comps, observables=probes)
    sus = r.susceptibilities(res, sampling="samp")
    last = rows[rows["step"] == 50]
    for _, row in last.iterrows():
        i, j = sus.components.index(row["component"]), sus.probes.index(row["probe"])
        assert row["value"] == pytest.approx(sus.aggregate[i, j], rel=1e-6, abs=1e-9)
        assert row["sem"] == pytest.approx(sus.aggregate_sem[i, j], rel=1e-6, abs=1e-9)
        arrays = load_susceptibility_arrays(str(store), row["info"])
        k = list(arrays["components"]).index(row["component"])
        np.testing.assert_allclose(arrays[f"per_token/{row['probe']}"][k], sus.per_token[row["probe"]][i], rtol=1e-6)
    obs = r.Observations.load(observations_root(str(store)) / last.iloc[0]["info"]["folder"] / "observations")
    np.testing.assert_allclose(obs["low"], res.observations["low"], rtol=1e-6)
    # rerun: nothing recomputed; other probe contents: recomputed, the old rows kept beside
    again = run_sweep(str(tmp), {"mix": data}, CFG, str(store), ["heads"], metric="susceptibility",
                      observables=probes, sampling_probe="samp", progress=False, log=lambda s: None)
    assert len(again.skipped) == 2 and not again.computed
    changed = {**probes, "low": probes["low"].flip(0)}
    third = run_sweep(str(tmp), {"mix": data}, CFG, str(store), ["heads"], metric="susceptibility",
                      observables=changed, sampling_probe="samp", progress=False, log=lambda s: None)
    assert len(third.computed) == 2
    every = ResultStore(store, readonly=True).observable_rows("susceptibility", config="all")
    assert every["config_key"].nunique() == 2


def test_bif_sweep_writes_one_matrix_per_component_and_probe_pair(setup):
    tmp, data, probes = setup
    store = tmp / "b.sqlite"
    two = {"low": probes["low"], "high": probes["high"]}
    run_sweep(str(tmp / "step0.pt"), {"mix": data}, CFG, str(store), ["heads"], metric="bif", observables=two,
              progress=False, log=lambda s: None)
    rows = ResultStore(store, readonly=True).observable_rows("bif")
    assert sorted(set(rows["probe"])) == ["high~high", "low~high", "low~low"]
    assert len(rows) == 4 * 3
    row = rows[(rows["component"] == "1:0") & (rows["probe"] == "low~high")].iloc[0]
    matrix = np.load(observations_root(str(store)) / row["info"]["folder"] / row["info"]["file"])
    assert matrix.shape == (5, 4) and row["value"] == pytest.approx(float(matrix.mean()), rel=1e-6)
    self_rows = rows[rows["probe"] == "low~low"]
    for _, row in self_rows.iterrows():
        m = np.load(observations_root(str(store)) / row["info"]["folder"] / row["info"]["file"])
        np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-5)


def test_bad_observable_sweeps_are_refused(setup):
    tmp, data, probes = setup
    kw = dict(progress=False, log=lambda s: None)
    with pytest.raises(ValueError, match="needs sampling_probe"):
        run_sweep(str(tmp), {"mix": data}, CFG, str(tmp / "x.sqlite"), ["heads"], metric="susceptibility",
                  observables=probes, **kw)
    with pytest.raises(ValueError, match="not 'llc'"):
        run_sweep(str(tmp), {"mix": data}, CFG, str(tmp / "x.sqlite"), ["heads"], observables=probes, **kw)
    with pytest.raises(ValueError, match=r"observables\['big'\]: token ids must lie in \[0, 48\)"):
        run_sweep(str(tmp), {"mix": data}, CFG, str(tmp / "x.sqlite"), ["heads"], metric="bif",
                  observables={"big": torch.full((2, 16), 48)}, **kw)
    assert not (tmp / "x.sqlite").exists()


def test_cli_sweep_with_observables(setup):
    tmp, data, probes = setup
    np.save(tmp / "mix.npy", data.numpy())
    for name, t in probes.items():
        np.save(tmp / f"{name}.npy", t.numpy())
    store = tmp / "cli.sqlite"
    cmd = [sys.executable, "-m", "rllc_fast.cli", "sweep", "--checkpoints", str(tmp / "step0.pt"),
           "--data", f"mix={tmp / 'mix.npy'}", "--store", str(store), "--context", "16", "--draws", "8",
           "--chains", "2", "--batch-size", "8", "--quiet", "--metric", "susceptibility",
           "--observable", f"samp={tmp / 'samp.npy'}", "--observable", f"low={tmp / 'low.npy'}",
           "--sampling-probe", "samp"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rows = ResultStore(store, readonly=True).observable_rows("susceptibility")
    assert len(rows) == 4 and set(rows["probe"]) == {"low"}
    twice = subprocess.run(cmd + ["--observable", f"low={tmp / 'high.npy'}"], capture_output=True, text=True)
    assert twice.returncode != 0 and "--observable: the name 'low' is given twice" in twice.stderr
    info = json.loads(json.dumps(rows.iloc[0]["info"]))
    assert info["sampling"] == "samp"


def test_plot_draws_the_response_matrix_and_the_attributions_page(setup):
    tmp, data, probes = setup
    store = tmp / "p.sqlite"
    run_sweep(str(tmp), {"mix": data}, CFG, str(store), ["heads"], metric="susceptibility", observables=probes,
              sampling_probe="samp", progress=False, log=lambda s: None)
    out = subprocess.run([sys.executable, "-m", "rllc_fast.cli", "plot", "--store", str(store), "--out",
                          str(tmp / "report"), "--quiet"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    index = (tmp / "report" / "index.html").read_text()
    assert "Susceptibilities" in index and "susceptibility-pca-mix-heads-step50.png" in index
    assert (tmp / "report" / "susceptibility-pca-mix-heads-step50.png").stat().st_size > 1000
    page = (tmp / "report" / "attributions-mix-heads-step50.html").read_text()
    # every head and probe set, with the first of each context's tokens shown as its id
    for head in ("0:0", "0:1", "1:0", "1:1"):
        assert f"<h2>{head}</h2>" in page
    assert page.count("<h3>low</h3>") == 4 and page.count("<h3>high</h3>") == 4
    first = int(probes["low"][0, 0])
    assert f">{first}</span>" in page


def test_other_data_under_the_same_name_never_overwrites_stored_arrays(setup):
    """The arrays behind a row stay those of its inputs: a sweep of changed data under the same name writes
    its own folder, and the first rows still point at their own, unchanged."""
    tmp, data, probes = setup
    store = tmp / "d.sqlite"
    kw = dict(metric="susceptibility", observables=probes, sampling_probe="samp", progress=False, log=lambda s: None)
    run_sweep(str(tmp / "step0.pt"), {"mix": data}, CFG, str(store), ["heads"], **kw)
    first = ResultStore(store, readonly=True).observable_rows("susceptibility")
    before = load_susceptibility_arrays(str(store), first.iloc[0]["info"])
    run_sweep(str(tmp / "step0.pt"), {"mix": data.flip(0)}, CFG, str(store), ["heads"], **kw)
    both = ResultStore(store, readonly=True).observable_rows("susceptibility", config="all")
    folders = {row["info"]["folder"] for _, row in both.iterrows()}
    assert len(folders) == 2
    after = load_susceptibility_arrays(str(store), first.iloc[0]["info"])
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])
