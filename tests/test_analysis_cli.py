"""`rllc analyze` end to end on a tiny toy run: every subcommand writes its rows and figure, `rllc plot
--clusters` colours heads by cluster, and bad input gets a message that names the problem."""
import json
import shutil
import sqlite3
import subprocess
import sys

import pytest

from rllc_fast.config import SGLDConfig
from rllc_fast.data.synthetic import synthetic_mixture
from rllc_fast.models import checkpoint_series
from rllc_fast.store import ResultStore
from rllc_fast.sweep import run_sweep
from rllc_fast.toy import ToyRecipe, train_toy

TINY = ToyRecipe(steps=12, checkpoints=4, n_ctx=16, d_model=16, n_heads=2, num_contexts=64, batch_size=4)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    toy = train_toy(root / "cache", TINY, progress=False, log=lambda s: None)
    store = ResultStore(root / "store.sqlite")
    data = synthetic_mixture(32, 16, seed=1)
    run_sweep(checkpoint_series(toy.directory), {"mix": data}, SGLDConfig(num_chains=1, num_draws=4, batch_size=8),
              store, ["heads"], progress=False, log=lambda s: None)
    return root, toy.directory, store


def rllc(*args, cwd):
    return subprocess.run([sys.executable, "-m", "rllc_fast.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True)


def test_every_subcommand_writes_rows_and_a_figure(run):
    root, ckpts, store = run
    out = root / "out"
    common = ["--store", store.path, "--out", out, "--quiet"]
    data = ["--data", "mix=synthetic:mixture", "--num-contexts", "16"]
    done = rllc("analyze", "scores", "--checkpoints", ckpts, *data, *common, cwd=root)
    assert done.returncode == 0, done.stderr
    assert "head scores at step 12" in done.stdout and "prefix_matching" in done.stdout
    for args in (["composition", "--checkpoints", ckpts], ["ablation", "--checkpoints", ckpts, *data, "--kind", "zero"],
                 ["tokens", "--checkpoints", ckpts, *data, "--k", "20"],
                 ["cluster", "--data", "mix", "--clusters", "2", "--method", "ward"]):
        done = rllc("analyze", *args, *common, cwd=root)
        assert done.returncode == 0, (args, done.stderr)
    for name in ("head_scores.png", "composition_K.png", "ablation.png", "icl.png", "tokens_in_context.png",
                 "clusters.png", "clusters.json"):
        assert (out / name).is_file(), name
    rows = store.analysis_rows()
    n_heads, steps = 4, 4
    counts = rows.groupby("analysis").size().to_dict()
    assert counts["head-score"] == 4 * n_heads * steps and counts["head-type"] == n_heads
    assert counts["composition"] == 3 * 2 * 2 * steps  # Q, K, V x (2 layer-0 heads -> 2 layer-1 heads)
    assert counts["ablation"] == n_heads * steps and counts["icl"] == (n_heads + 1) * steps
    assert counts["cluster"] == n_heads
    clusters = json.loads((out / "clusters.json").read_text())
    assert set(clusters["labels"]) == {"0:0", "0:1", "1:0", "1:1"} and set(clusters["colours"]) == set(clusters["labels"])
    # a clustering fitted on one run labels another run's heads: here a copy of the run with two heads of
    # different clusters swapped, so the right labels are the fitted ones swapped (catches labels taken
    # from the fitted run instead of predicted from the other run's curves)
    fitted = rllc("analyze", "cluster", "--data", "mix", "--clusters", "2", "--method", "kmeans", *common, cwd=root)
    assert fitted.returncode == 0, fitted.stderr
    labels = json.loads((out / "clusters.json").read_text())["labels"]
    a = sorted(labels)[0]
    b = next(h for h in sorted(labels) if labels[h] != labels[a])
    other = root / "swapped.sqlite"
    shutil.copyfile(store.path, other)
    con = sqlite3.connect(other)
    for old_name, new_name in ((a, "tmp"), (b, a), ("tmp", b)):
        con.execute("UPDATE estimates SET component=? WHERE component=?", (new_name, old_name))
    con.commit()
    con.close()
    applied = rllc("analyze", "cluster", "--data", "mix", "--clusters", "2", "--method", "kmeans", "--apply-to",
                   other, *common, cwd=root)
    assert applied.returncode == 0, applied.stderr
    result = json.loads((out / "clusters.json").read_text())
    assert result["labels"] == labels  # the same fit (kmeans is seeded)
    assert result["applied"][str(other)] == {**labels, a: labels[b], b: labels[a]}
    # rerunning replaces rows instead of duplicating them
    assert rllc("analyze", "composition", "--checkpoints", ckpts, *common, cwd=root).returncode == 0
    assert len(store.analysis_rows("composition")) == counts["composition"]
    plot = rllc("plot", "--store", store.path, "--out", root / "plot", "--clusters", out / "clusters.json", cwd=root)
    assert plot.returncode == 0, plot.stderr
    assert (root / "plot" / "heads_mix.png").is_file()


def test_bad_input_is_named(run):
    root, ckpts, store = run
    common = ["--store", store.path, "--out", root / "bad", "--quiet"]
    data = ["--data", "synthetic:mixture", "--num-contexts", "8"]
    bad = rllc("analyze", "ablation", "--checkpoints", ckpts, *data, "--heads", "3:0", *common, cwd=root)
    assert bad.returncode != 0 and "head 3:0 is out of range" in bad.stderr
    bad = rllc("analyze", "cluster", "--data", "mix", "--clusters", "9", *common, cwd=root)
    assert bad.returncode != 0 and "n_clusters=9 but only 4 heads" in bad.stderr
    bad = rllc("analyze", "cluster", "--data", "prose", "--clusters", "2", *common, cwd=root)
    assert bad.returncode != 0 and "no per-head estimates on data 'prose'" in bad.stderr
    bad = rllc("analyze", "tokens", "--checkpoints", ckpts, *data, "--step", "5", *common, cwd=root)
    assert bad.returncode != 0 and "no checkpoint at that step" in bad.stderr
    bad = rllc("analyze", "scores", "--checkpoints", ckpts, "--data", "synthetic:prose", *common, cwd=root)
    assert bad.returncode != 0 and "synthetic:NAME" in bad.stderr
    bad = rllc("plot", "--store", store.path, "--out", root / "bad", "--clusters", store.path, cwd=root)
    assert bad.returncode != 0 and "not a clusters.json" in bad.stderr
