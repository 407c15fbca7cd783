"""The toy run (cache, determinism, recipe errors), the refinement summary, and the demo end to end:
a seeded ``rllc demo --quick`` forms previous-token and induction heads, learns in context, makes no
network call and writes nothing outside its output folder and cache."""
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import pandas as pd
import pytest
import torch

from rllc_fast.analysis.refinement_shift import ratios_by_type, refinement_ratios
from rllc_fast.models import checkpoint_series
from rllc_fast.toy import ToyRecipe, train_toy

TINY = ToyRecipe(steps=12, checkpoints=3, n_ctx=16, d_model=16, n_heads=2, num_contexts=64, batch_size=4)


def test_toy_run_is_cached_and_deterministic(tmp_path):
    logs = []
    a = train_toy(tmp_path, TINY, progress=False, log=logs.append)
    assert not a.reused and [m["step"] for m in a.metrics] == [0, 1, 12]
    b = train_toy(tmp_path, TINY, progress=False, log=logs.append)
    assert b.reused and b.metrics == a.metrics and "reusing" in logs[-1]
    first = {c.step: c.load().state_dict() for c in checkpoint_series(a.directory)}
    c = train_toy(tmp_path, TINY, progress=False, log=logs.append, force=True)  # same seed: same weights
    assert not c.reused
    for ckpt in checkpoint_series(c.directory):
        for k, v in ckpt.load().state_dict().items():
            assert torch.equal(v, first[ckpt.step][k]), (ckpt.step, k)
    other = train_toy(tmp_path, replace(TINY, seed=1), progress=False, log=logs.append)
    assert other.directory != a.directory and other.metrics[-1] != a.metrics[-1]


def test_toy_cache_ignores_an_unfinished_run(tmp_path):
    run = train_toy(tmp_path, TINY, progress=False, log=lambda s: None)
    (run.directory / run.metrics[-1]["file"]).unlink()  # a checkpoint went missing
    again = train_toy(tmp_path, TINY, progress=False, log=lambda s: None)
    assert not again.reused and (again.directory / again.metrics[-1]["file"]).is_file()


@pytest.mark.parametrize("field,value,message", [("steps", 0, "steps"), ("checkpoints", 1, "checkpoints"),
                                                 ("n_heads", 5, "divisible"), ("n_ctx", 8, "n_ctx"),
                                                 ("mixture", (("prose", 1.0),), "mixture")])
def test_bad_recipe_names_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        replace(TINY, **{field: value}).check()


def test_refinement_ratios_use_the_late_checkpoints():
    rows = []
    for step in range(8):
        for head, base, refined in (("1:0", 1.0, 2.0 if step >= 5 else 9.0), ("0:0", 2.0, 2.0)):
            rows.append(dict(step=step, component_set="heads", component=head, data="mix", llc_mean=base))
            rows.append(dict(step=step, component_set="heads", component=head, data="code", llc_mean=refined))
    ratios = refinement_ratios(pd.DataFrame(rows), "code", "mix", late_fraction=0.25)
    assert ratios["1:0"]["checkpoints"] == 3 and ratios["1:0"]["ratio"] == pytest.approx(2.0)
    assert ratios["0:0"]["ratio"] == pytest.approx(1.0)
    groups = ratios_by_type(ratios, {"1:0": "induction", "0:0": "previous-token"})
    assert groups["induction"]["mean_ratio"] == pytest.approx(2.0)
    assert groups["non-induction"]["heads"] == ["0:0"]
    with pytest.raises(ValueError, match="both"):
        refinement_ratios(pd.DataFrame(rows), "code", "prose")


def test_train_toy_cli_reports_head_scores(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rllc_fast.cli", "train-toy", "--steps", "10", "--checkpoints", "3",
                          "--cache", str(tmp_path), "--quiet"], capture_output=True, text=True, check=True).stdout
    assert "checkpoints in" in out and "head 1:3: previous-token" in out
    bad = subprocess.run([sys.executable, "-m", "rllc_fast.cli", "train-toy", "--checkpoints", "1",
                          "--cache", str(tmp_path), "--quiet"], capture_output=True, text=True)
    assert bad.returncode != 0 and "checkpoints must be >= 2" in bad.stderr


# Runs the CLI with every internet socket operation turned into an error that is also logged to a file.
_NO_NETWORK = textwrap.dedent("""
    import socket, sys
    log = open(sys.argv[1], "a")
    def refuse(*args, **kwargs):
        log.write(repr(args[:2]) + "\\n"); log.flush()
        raise OSError("network blocked by the test")
    socket.getaddrinfo = refuse
    socket.create_connection = refuse
    real_connect = socket.socket.connect
    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            refuse(address)
        return real_connect(self, address)
    socket.socket.connect = connect
    socket.socket.connect_ex = connect
    from rllc_fast.cli import main
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.slow
def test_quick_demo_offline_forms_heads_and_stays_in_its_folders(tmp_path):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RLLC_CACHE", "XDG_CACHE_HOME", "MPLCONFIGDIR")}
    env.update(HOME=str(home), PYTHONDONTWRITEBYTECODE="1")
    attempts = tmp_path / "network.log"
    cmd = [sys.executable, "-c", _NO_NETWORK, str(attempts), "demo", "--quick", "--seed", "0"]
    run = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert not attempts.exists() or attempts.read_text() == ""

    # nothing outside ./rllc-demo and the cache (~/.cache/rllc_fast)
    assert sorted(p.name for p in work.iterdir()) == ["rllc-demo"]
    assert [str(p.relative_to(home)) for p in home.rglob("*") if p.is_dir() and p.parent == home] == [".cache"]
    assert sorted(p.name for p in (home / ".cache").iterdir()) == ["rllc_fast"]

    out = work / "rllc-demo"
    for name in ("index.html", "demo.png", "summary.json", "results.sqlite", "heads_mixture.png", "heads_code.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    # head types formed (issue 6, must-show 2)
    assert max(summary["previous_token_scores"].values()) >= 0.5
    assert max(summary["induction_scores"].values()) >= 0.3
    assert "induction" in summary["head_types"].values() and "previous-token" in summary["head_types"].values()
    # in-context learning: the repeated copy of a random span becomes far easier than the first copy
    repeat, first = summary["loss_repeat_copy"], summary["loss_first_copy"]
    assert repeat["final"] < repeat["first"] - 2.0 and repeat["final"] < first["final"] - 2.0
    n_heads = len(summary["head_types"])
    assert summary["estimates_computed"] == summary["checkpoints"] * (1 + 2 * n_heads)
    assert "mean ratio drLLC code / wrLLC mixture" in run.stdout

    # a rerun reuses the trained run and every stored estimate
    again = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    summary2 = json.loads((out / "summary.json").read_text())
    assert summary2["trained_now"] is False and summary2["estimates_computed"] == 0
    _check_stored_rllcs_against_independent_estimates(out / "results.sqlite", summary)

    # the analysis suite on the same run (issue 7): classify_heads finds the heads the demo reports, and a
    # shape-based clustering of the layer-1 wrLLC curves puts the induction heads together
    store, analysis = out / "results.sqlite", tmp_path / "analysis"
    for args in (["scores", "--checkpoints", summary["toy_run"], "--data", "mixture=synthetic:mixture"],
                 ["cluster", "--data", "mixture", "--layer", "1", "--clusters", "2", "--method", "sbd"]):
        done = subprocess.run([sys.executable, "-m", "rllc_fast.cli", "analyze", *args, "--store", str(store),
                               "--out", str(analysis), "--quiet"], cwd=work, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    from rllc_fast.store import ResultStore

    types = ResultStore(store).analysis_rows("head-type")
    found = {h: t if t in ("induction", "previous-token") else "other" for h, t in zip(types["head"], types["other"])}
    assert found == summary["head_types"]
    clusters = json.loads((analysis / "clusters.json").read_text())["labels"]
    induction = [h for h, t in summary["head_types"].items() if t == "induction"]
    assert len({clusters[h] for h in induction}) == 1, clusters


def _check_stored_rllcs_against_independent_estimates(store_path, summary):
    """The demo's stored per-head rLLCs at the final checkpoint, recomputed here from the checkpoint with
    ``estimate_llc`` on the data each should be on: the code drLLC of an induction head on the code source,
    its wrLLC on the mixture (same seeds, so the same chains up to rounding). Catches a demo that computes
    the code refinement on the mixture (or the mixture estimate on other data), and the refinement summary
    not being the stored values (the rerun's summary is read from the same store, so comparing the two
    summaries cannot fail)."""
    from rllc_fast import estimate_llc, head
    from rllc_fast.data.synthetic import synthetic_mixture, synthetic_source
    from rllc_fast.demo import QUICK
    from rllc_fast.models import checkpoint_series
    from rllc_fast.store import ResultStore

    recipe, n = QUICK.recipe, QUICK.num_contexts
    assert summary["recipe"]["seed"] == recipe.seed and summary["sgld"] == QUICK.sgld_config().to_dict()
    final = checkpoint_series(summary["toy_run"])[-1]
    assert final.step == summary["final_step"]
    model = final.load()
    name = next(h for h, t in summary["head_types"].items() if t == "induction")
    layer, h = (int(x) for x in name.split(":"))
    rows = ResultStore(store_path, readonly=True).rows()
    stored = rows[(rows.step == final.step) & (rows.component == name)].set_index("data").llc_mean
    data = {"code": synthetic_source("code", n, recipe.n_ctx, seed=QUICK.data_seed),
            "mixture": synthetic_mixture(n, recipe.n_ctx, seed=QUICK.data_seed, weights=dict(recipe.mixture))}
    for which, tokens in data.items():
        mine = estimate_llc(model, tokens, QUICK.sgld_config(), components=[head(model, layer, h)])[name].llc_mean
        assert stored[which] == pytest.approx(mine, rel=1e-4, abs=1e-4), (which, stored[which], mine)
    assert abs(stored["code"] - stored["mixture"]) > 1e-2  # the two data sets give different values
    per_head = summary["refinement"]["per_head"][name]
    late = rows[(rows.component == name) & (rows.step >= sorted(rows.step.unique())[-per_head["checkpoints"]])]
    assert per_head["refined"] == pytest.approx(late[late.data == "code"].llc_mean.mean(), rel=1e-9)
    assert per_head["base"] == pytest.approx(late[late.data == "mixture"].llc_mean.mean(), rel=1e-9)
