"""The result store's identity rules and file discipline (issue 18): checkpoints known by content, every
configuration kept and selectable, readers that never write, writers that create the file only with the
first result and refuse other SQLite files, schema-1 stores, and `rllc export`."""
import json
import os
import shutil
import sqlite3

import numpy as np
import pandas as pd
import pytest
import torch

from rllc_fast import SGLDConfig, content_id
from rllc_fast.cli import main
from rllc_fast.models import attn_only, save_checkpoint
from rllc_fast.report import write_report
from rllc_fast.store import APPLICATION_ID, ResultStore, SeveralConfigsWarning, StoreError, UnitKey
from rllc_fast.sweep import run_sweep

SMALL = dict(n_layers=2, d_model=32, n_heads=2, d_head=16, n_ctx=16, d_vocab=64)  # 4 heads
FAST = dict(num_chains=2, num_draws=3, batch_size=8)


def _tokens(seed=0):
    return torch.randint(0, 64, (16, 16), generator=torch.Generator().manual_seed(seed))


def _run(folder, seeds_by_step):
    folder.mkdir(parents=True, exist_ok=True)
    for step, seed in seeds_by_step.items():
        save_checkpoint(attn_only(seed=seed, **SMALL), folder / f"step{step:06d}.pt", step)
    return folder


def _sweep(ckpts, store, sets=("whole",), data=None, **config):
    return run_sweep(ckpts, data or {"mix": _tokens()}, SGLDConfig(**{**FAST, **config}), store, list(sets),
                     progress=False, log=lambda m: None)


def _cli(*args, capsys=None):
    """Run ``rllc`` in-process: ``(exit code, stdout, stderr)`` (SystemExit messages land in stderr)."""
    try:
        code = main([str(a) for a in args])
        message = ""
    except SystemExit as exit_:
        code, message = (exit_.code, "") if isinstance(exit_.code, int) or exit_.code is None else (1, str(exit_.code))
    out, err = capsys.readouterr() if capsys else ("", "")
    return code or 0, out, err + message


def _files(folder):
    """Every file in ``folder`` with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ---- 1: a checkpoint is its content ---------------------------------------------------------------
def test_same_named_checkpoints_of_two_runs_give_two_sets_of_rows(tmp_path):
    run_a = _run(tmp_path / "seed1", {3000: 1})
    run_b = _run(tmp_path / "seed2", {3000: 2})  # same file name, other weights
    store = tmp_path / "s.sqlite"
    assert len(_sweep(run_a, store).computed) == 1
    second = _sweep(run_b, store)
    assert len(second.computed) == 1 and second.skipped == []  # not mistaken for run A's checkpoint
    df = ResultStore(store).rows("all")
    assert len(df) == 2 and df.checkpoint.tolist() == ["step003000.pt"] * 2 and df.checkpoint_id.nunique() == 2
    assert sorted(df.checkpoint_path) == [str(run_a / "step003000.pt"), str(run_b / "step003000.pt")]
    assert df.llc_mean.nunique() == 2
    # a copy of run A's file elsewhere is the same checkpoint: its rows are reused
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(run_a / "step003000.pt", copy / "renamed_step3000.pt")
    again = _sweep(copy, store)
    assert again.computed == [] and len(again.skipped) == 1
    # curves of two runs in one store are refused instead of being drawn as one
    with pytest.raises(ValueError, match="2 different checkpoints at step 3000"):
        write_report(store, tmp_path / "report")


def test_checkpoint_ids_are_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    calls = []
    real = content_id._sha256_files
    monkeypatch.setattr(content_id, "_sha256_files", lambda p: calls.append(p) or real(p))
    ckpts = _run(tmp_path / "run", {1: 1, 2: 2})
    store = tmp_path / "s.sqlite"
    _sweep(ckpts, store)
    assert len(calls) == 2
    calls.clear()
    assert len(_sweep(ckpts, store).skipped) == 2 and calls == []  # a rerun hashes nothing
    path = ckpts / "step000001.pt"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # touched, same content
    assert len(_sweep(ckpts, store).skipped) == 2 and calls == [path]
    calls.clear()
    _sweep(ckpts, store)
    assert calls == []  # the new signature was cached
    with sqlite3.connect(store) as con:
        cached = dict(con.execute("SELECT path, checkpoint_id FROM checkpoint_ids").fetchall())
    assert cached[str(path)] == real(path) and len(cached) == 2


def test_hf_directory_id_covers_weights_and_config_only(tmp_path):
    hf = tmp_path / "step1000"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "gpt_neox"}')
    (hf / "model.safetensors").write_bytes(b"weights-1")
    (hf / "optimizer.pt").write_bytes(b"adam")
    first = content_id.checkpoint_ids([hf])[0][str(hf)]
    (hf / "optimizer.pt").write_bytes(b"adam state changed")
    assert content_id.checkpoint_ids([hf])[0][str(hf)] == first
    (hf / "model.safetensors").write_bytes(b"weights-2")
    assert content_id.checkpoint_ids([hf])[0][str(hf)] != first
    (hf / "model.safetensors").write_bytes(b"weights-1")
    (hf / "config.json").write_text('{"model_type": "gpt_neox", "hidden_size": 8}')
    assert content_id.checkpoint_ids([hf])[0][str(hf)] != first
    ids, errors = content_id.checkpoint_ids([tmp_path / "missing.pt"])
    assert ids == {} and "cannot read the checkpoint" in errors[str(tmp_path / "missing.pt")]


# ---- 2: configurations side by side ---------------------------------------------------------------
def test_two_step_sizes_live_side_by_side_and_are_selectable(tmp_path, capsys):
    ckpts = _run(tmp_path / "run", {1: 1, 10: 10})
    store = tmp_path / "s.sqlite"
    _sweep(ckpts, store, ("whole", "heads"), step_size=1e-3)
    _sweep(ckpts, store, ("whole", "heads"), step_size=3e-4)
    s = ResultStore(store, readonly=True)
    every = s.rows("all")
    assert len(every) == 2 * 2 * 5 and sorted(every.step_size.unique()) == [3e-4, 1e-3]
    for col in ("step_size", "nbeta", "localization", "num_chains", "num_draws", "batch_size", "sampler", "seed",
                "engine", "data", "data_hash", "checkpoint_path", "step", "checkpoint_id"):
        assert col in every, col
    assert every.num_draws.eq(3).all() and every.engine.eq("batched").all() and every.batch_size.eq(8).all()
    with pytest.warns(SeveralConfigsWarning, match="2 configuration"):
        latest = s.rows()
    assert len(latest) == 10 and latest.step_size.eq(3e-4).all()
    key_a = every.loc[every.step_size == 1e-3, "config_key"].iloc[0]
    only_a = s.rows(key_a)
    assert len(only_a) == 10 and only_a.step_size.eq(1e-3).all()
    with pytest.raises(ValueError, match="stored config keys: .*" + key_a):
        s.rows("0123456789abcdef")
    assert sorted(s.configs().step_size) == [3e-4, 1e-3]
    # rllc plot: the default draws the latest with a note; --config-key selects
    code, _, err = _cli("plot", "--store", store, "--out", tmp_path / "latest", capsys=capsys)
    assert code == 0 and "rllc plot: note:" in err and key_a in err
    page = (tmp_path / "latest" / "index.html").read_text()
    assert key_a not in page.split("<h2>Estimates</h2>")[1]
    code, _, err = _cli("plot", "--store", store, "--out", tmp_path / "a", "--config-key", key_a, capsys=capsys)
    assert code == 0 and "note" not in err
    table = (tmp_path / "a" / "index.html").read_text().split("<h2>Estimates</h2>")[1]
    assert table.count(key_a) == 10 and table.count("</tr>") == 11
    code, _, err = _cli("plot", "--store", store, "--out", tmp_path / "all", "--config-key", "all", capsys=capsys)
    assert code == 0 and sorted(p.name for p in (tmp_path / "all").iterdir() if p.is_dir()) == sorted(
        f"config-{k}" for k in every.config_key.unique())
    code, _, err = _cli("plot", "--store", store, "--out", tmp_path / "x", "--config-key", "nope", capsys=capsys)
    assert code != 0 and "'nope' is not in" in err and key_a in err


# ---- 4: readers never write; writers refuse other files ----------------------------------------------
def test_readers_never_modify_a_store(tmp_path, capsys):
    ckpts = _run(tmp_path / "run", {1: 1, 10: 10, 100: 100})
    folder = tmp_path / "stores"
    folder.mkdir()
    store = folder / "s.sqlite"
    _sweep(ckpts, store, ("heads", "whole"))
    other = tmp_path / "fit.sqlite"
    shutil.copy(store, other)
    before = _files(folder)
    assert list(before) == ["s.sqlite"]  # the writer left no -wal behind
    with sqlite3.connect(store) as con:
        tables = con.execute("SELECT name FROM sqlite_master ORDER BY name").fetchall()

    s = ResultStore(store, readonly=True)
    s.rows(), s.rows("all", traces=True), s.metric_rows(), s.analysis_rows(), s.failures(), s.configs(), repr(s)
    s.traces("step000010.pt", "mix", "heads", "1:1")
    assert s.done(UnitKey("x", 1, "mix", "heads", "id"), "k") == set()
    for args in (["plot", "--store", store, "--out", tmp_path / "report"],
                 ["export", "--store", store, "--out", tmp_path / "rows.csv", "--traces"],
                 ["analyze", "cluster", "--store", other, "--apply-to", store, "--data", "mix", "--clusters", "2",
                  "--out", tmp_path / "clusters", "--quiet"]):
        code, _, err = _cli(*args, capsys=capsys)
        assert code == 0, (args, err)
    after = _files(folder)
    assert after["s.sqlite"] == before["s.sqlite"]  # the main file is byte-identical
    assert set(after) <= {"s.sqlite", "s.sqlite-wal", "s.sqlite-shm"} and after.get("s.sqlite-wal", b"") == b""
    with sqlite3.connect(store) as con:  # a writer's close would fold any WAL content into the file: none
        assert con.execute("SELECT name FROM sqlite_master ORDER BY name").fetchall() == tables
    assert (folder / "s.sqlite").read_bytes() == before["s.sqlite"]
    assert ResultStore(other).analysis_rows("cluster").other.tolist().count(str(store)) == 4  # labels went to --store


@pytest.mark.parametrize("wal", [False, True])
def test_a_foreign_sqlite_file_is_refused_by_readers_and_writers(tmp_path, capsys, wal):
    foreign = tmp_path / "other.sqlite"
    con = sqlite3.connect(foreign)
    if wal:
        con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE people (name TEXT)")
    con.execute("INSERT INTO people VALUES ('ada')")
    con.commit()
    con.close()
    text = tmp_path / "notes.sqlite"
    text.write_text("not a database at all\n" * 10)
    before = _files(tmp_path)
    ckpts = _run(tmp_path / "run", {1: 1})
    for path in (foreign, text):
        with pytest.raises(StoreError, match="not an rllc result store"):
            ResultStore(path, readonly=True)
        with pytest.raises(StoreError, match="not an rllc result store"):
            ResultStore(path)
        with pytest.raises(StoreError, match="not an rllc result store"):
            _sweep(ckpts, path)
        for args in (["plot", "--store", path, "--out", tmp_path / "r"], ["export", "--store", path],
                     ["sweep", "--checkpoints", ckpts, "--data", "mix=synthetic:mixture", "--context", 16,
                      "--num-contexts", 16, "--store", path],
                     ["analyze", "cluster", "--store", path, "--data", "mix", "--clusters", "2", "--out", tmp_path / "c"],
                     ["upgrade-store", "--store", path]):
            code, _, err = _cli(*args, capsys=capsys)
            assert code != 0 and "not an rllc result store" in err and "--store" in err, (args, err)
    after = _files(tmp_path)
    for name in ("other.sqlite", "notes.sqlite"):
        assert after[name] == before[name]
    assert set(after) - set(before) <= {"other.sqlite-wal", "other.sqlite-shm"}
    assert after.get("other.sqlite-wal", b"") == b""
    assert not (tmp_path / "r").exists() and not (tmp_path / "c").exists()
    assert sqlite3.connect(foreign).execute("SELECT name FROM sqlite_master").fetchall() == [("people",)]


def test_writers_create_the_store_with_the_first_result_in_an_existing_folder(tmp_path, capsys):
    ckpts = _run(tmp_path / "run", {1: 1})
    path = tmp_path / "s.sqlite"
    store = ResultStore(path)
    assert not path.exists()
    assert store.done(UnitKey("a", 1, "mix", "whole", "id"), "k") == set() and store.rows().empty
    assert store.unit_count() == 0 and not path.exists()
    _sweep(ckpts, store)
    with sqlite3.connect(path) as con:
        assert con.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(FileNotFoundError, match=f"folder {missing} does not exist.*mkdir -p"):
        ResultStore(missing / "s.sqlite")
    code, _, err = _cli("sweep", "--checkpoints", ckpts, "--data", "mix=synthetic:mixture", "--store",
                        missing / "s.sqlite", "--context", 16, "--num-contexts", 16, "--quiet", capsys=capsys)
    assert code != 0 and f"--store {missing / 's.sqlite'}" in err and "mkdir -p" in err
    assert not (tmp_path / "no").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ResultStore(tmp_path / "absent.sqlite", readonly=True)
    with pytest.raises(StoreError, match="read-only"):
        ResultStore(path, readonly=True).write_analysis("x", [{"head": "0:0", "value": 1.0}])


# ---- 5: names that are not stored -----------------------------------------------------------------
def test_unknown_data_names_are_refused_with_the_stored_ones(tmp_path, capsys):
    ckpts = _run(tmp_path / "run", {1: 1, 10: 10})
    store = tmp_path / "s.sqlite"
    _sweep(ckpts, store, ("heads",), data={"mix": _tokens(0), "code": _tokens(1)})
    code, _, err = _cli("plot", "--store", store, "--out", tmp_path / "r", "--diff", "mix", "mixture", capsys=capsys)
    assert code != 0 and "--diff" in err and "'mixture'" in err and "'mix'" in err and "'code'" in err
    code, _, err = _cli("analyze", "cluster", "--store", store, "--data", "mixture", "--clusters", "2", "--out",
                        tmp_path / "c", "--quiet", capsys=capsys)
    assert code != 0 and "no per-head estimates on data 'mixture'" in err and "'mix'" in err and "'code'" in err
    code, _, err = _cli("plot", "--store", store, "--out", tmp_path / "r", "--diff", "code", "mix", capsys=capsys)
    assert code == 0 and (tmp_path / "r" / "heads_diff_code_minus_mix.png").is_file()


# ---- schema 1 ---------------------------------------------------------------------------------------
_V1_ESTIMATES = """CREATE TABLE estimates (checkpoint TEXT NOT NULL, step INTEGER NOT NULL, data TEXT NOT NULL,
    component_set TEXT NOT NULL, component TEXT NOT NULL, config_key TEXT NOT NULL, config_json TEXT NOT NULL,
    numel INTEGER NOT NULL, llc_mean REAL, llc_std REAL, llc_sem REAL, init_loss REAL, num_chains INTEGER NOT NULL,
    num_diverged INTEGER NOT NULL, llc_per_chain TEXT NOT NULL, traces BLOB NOT NULL, seconds REAL NOT NULL,
    written_at TEXT NOT NULL, PRIMARY KEY (checkpoint, data, component_set, component))"""
_V1_FAILURES = """CREATE TABLE failures (checkpoint TEXT NOT NULL, step INTEGER NOT NULL, data TEXT NOT NULL,
    component_set TEXT NOT NULL, config_key TEXT NOT NULL, error TEXT NOT NULL, written_at TEXT NOT NULL,
    PRIMARY KEY (checkpoint, data, component_set))"""


def test_schema_1_stores_are_refused_then_upgraded_with_ids_that_never_match(tmp_path, capsys):
    from rllc_fast.store import pack_traces
    from types import SimpleNamespace

    old = tmp_path / "old.sqlite"
    con = sqlite3.connect(old)
    con.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    con.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    con.execute(_V1_ESTIMATES)
    con.execute(_V1_FAILURES)
    rng = np.random.default_rng(0)  # traces with spread, so the upgrade can compute their diagnostics
    est = SimpleNamespace(loss_trace=rng.standard_normal((2, 8)), init_loss_trace=np.zeros(8),
                          distance_trace=1 + 0.01 * rng.standard_normal((2, 8)), diverged_at=np.array([-1, -1]))
    cfg = json.dumps({"config": SGLDConfig(step_size=2e-3, **{**FAST, "num_draws": 8}).to_dict(),
                      "engine": "batched"})
    con.execute("INSERT INTO estimates VALUES ('step000001.pt', 1, 'mix', 'whole', 'whole', 'oldkey', ?, 10, 7.5, "
                "0.1, 0.05, 1.0, 2, 0, '[7.4, 7.6]', ?, 1.0, '2024-01-01T00:00:00')", (cfg, pack_traces(est)))
    con.execute("INSERT INTO failures VALUES ('step000002.pt', 2, 'mix', 'whole', 'oldkey', 'boom', '2024')")
    con.commit()
    con.close()
    before = old.read_bytes()
    for make in (lambda: ResultStore(old, readonly=True), lambda: ResultStore(old)):
        with pytest.raises(StoreError, match="schema 1.*rllc upgrade-store --store"):
            make()
    code, _, err = _cli("plot", "--store", old, "--out", tmp_path / "r", capsys=capsys)
    assert code != 0 and "rllc upgrade-store" in err and old.read_bytes() == before
    code, out, err = _cli("upgrade-store", "--store", old, capsys=capsys)
    assert code == 0 and "2 rows kept" in out, err
    s = ResultStore(old)
    row = s.rows().iloc[0]
    assert row.checkpoint_id == "legacy:step000001.pt" and row.llc_mean == 7.5 and row.step_size == 2e-3
    assert row.num_draws == 8 and row.engine == "batched" and row.data_hash == ""
    assert np.isfinite(row.rhat) and np.isfinite(row.ess)  # diagnostics recomputed from the stored traces
    assert s.failures().checkpoint_id.tolist() == ["legacy:step000002.pt"]
    assert _cli("upgrade-store", "--store", old, capsys=capsys)[1].strip().endswith("nothing to do")
    # a checkpoint with the old row's name is computed, never matched to the legacy row
    ckpts = _run(tmp_path / "run", {1: 1})
    report = _sweep(ckpts, old, step_size=2e-3, num_draws=8)
    assert len(report.computed) == 1
    assert len(ResultStore(old).rows("all")) == 2


# ---- export -------------------------------------------------------------------------------------
def test_export_writes_csv_and_parquet(tmp_path, capsys):
    ckpts = _run(tmp_path / "run", {1: 1, 10: 10})
    store = tmp_path / "s.sqlite"
    _sweep(ckpts, store, ("whole", "layers"), step_size=1e-3)
    _sweep(ckpts, store, ("whole",), step_size=3e-4)
    code, out, err = _cli("export", "--store", store, "--quiet", capsys=capsys)
    assert code == 0 and out.strip() == str(tmp_path / "s.estimates.csv"), err
    df = pd.read_csv(tmp_path / "s.estimates.csv")
    assert len(df) == 2 * 3 + 2 and sorted(df.step_size.unique()) == [3e-4, 1e-3]
    assert {"checkpoint_id", "checkpoint_path", "config_key", "nbeta", "data_hash", "llc_mean"} <= set(df.columns)
    assert len(json.loads(df.llc_per_chain.iloc[0])) == 2
    code, _, err = _cli("export", "--store", store, "--traces", "--config-key", "latest", "--out",
                        tmp_path / "t.csv", capsys=capsys)
    assert code == 0 and "note" in err
    t = pd.read_csv(tmp_path / "t.csv")
    assert len(t) == 6 and np.array(json.loads(t.loss_trace.iloc[0])).shape == (2, 3)
    want = ResultStore(store).rows("all", traces=True)
    assert set(want.llc_mean.round(10)) >= set(t.llc_mean.round(10))
    pytest.importorskip("pyarrow")
    code, _, err = _cli("export", "--store", store, "--format", "parquet", "--traces", "--out", tmp_path / "r.parquet",
                        capsys=capsys)
    assert code == 0, err
    p = pd.read_parquet(tmp_path / "r.parquet")
    assert len(p) == 8 and np.array([list(r) for r in p.loss_trace.iloc[0]]).shape == (2, 3)
    np.testing.assert_allclose(sorted(p.llc_mean), sorted(want.llc_mean))
    code, _, _ = _cli("export", "--store", store, "--table", "configs", "--out", tmp_path / "c.csv", capsys=capsys)
    assert code == 0 and len(pd.read_csv(tmp_path / "c.csv")) == 2


# ---- sampler diagnostics in the store ------------------------------------------------------------
def _estimate(name, excess, chains=2, draws=40, seed=0):
    """A ComponentLLC whose chains sample an excess loss around ``excess / nbeta`` (nbeta 30)."""
    from rllc_fast import ComponentLLC

    rng = np.random.default_rng(seed)
    init = np.full(draws, 2.0)
    loss = init[None, :] + excess / 30 + 0.01 * rng.standard_normal((chains, draws))
    distance = 1.0 + 0.001 * rng.standard_normal((chains, draws))
    return ComponentLLC(name, 10, 30.0, loss, init, distance, np.full(chains, -1))


def test_rows_carry_the_diagnostics_and_the_sweep_flags_refined_above_whole(tmp_path):
    from rllc_fast.store import DIAGNOSTIC_COLUMNS
    from rllc_fast.sweep import check_against_whole

    store = ResultStore(tmp_path / "s.sqlite")
    config = SGLDConfig(**FAST)
    unit = UnitKey("step1.pt", 1, "mix", "heads", "id-a", data_hash="d")
    store.write(unit, "k1", config, "batched", [_estimate("0:0", 1.0), _estimate("0:1", 9.0)], 1.0)
    assert check_against_whole(store, unit, "k1") == []  # no whole-model row yet
    store.write(UnitKey("step1.pt", 1, "mix", "whole", "id-a", data_hash="d"), "k1", config, "batched",
                [_estimate("whole", 3.0)], 1.0)
    (message,) = check_against_whole(store, unit, "k1")
    assert "heads 0:1 9" in message and "0:0" not in message and "lower --step-size" in message
    assert check_against_whole(store, unit, "another-config") == []  # configurations are not mixed
    df = store.rows()
    expected = _estimate("0:1", 9.0).diagnostics.as_dict()
    row = df[df.component == "0:1"].iloc[0]
    assert all(np.isclose(row[c], expected[c]) for c in DIAGNOSTIC_COLUMNS)
    assert df[["rhat", "ess", "ess_fraction"]].notna().all().all()


def test_one_data_name_with_two_contents_is_never_drawn_as_one_curve_silently(tmp_path):
    from rllc_fast.report import head_difference
    from rllc_fast.sweep import data_fingerprint

    run = _run(tmp_path / "run", {1: 1, 2: 2})
    store = tmp_path / "s.sqlite"
    ckpts = sorted(run.iterdir())
    _sweep(ckpts[0], store, data={"mix": _tokens(0)})
    _sweep(ckpts[1], store, data={"mix": _tokens(1)})  # the same name, regenerated data
    with pytest.warns(SeveralConfigsWarning, match="'mix' also has several contents"):
        ResultStore(store).rows()
    # a per-head difference pairs one configuration only
    _sweep(ckpts[0], store, sets=("heads",), data={"a": _tokens(0)})
    _sweep(ckpts[0], store, sets=("heads",), data={"b": _tokens(0)}, step_size=3e-4)
    df = ResultStore(store).rows("all")
    with pytest.raises(ValueError, match="no per-head estimates of one configuration"):
        head_difference(df, "a", "b")
    # a tuple of tensors (columns) and a list of them (batches) are different data
    x = _tokens(0)
    assert data_fingerprint((x, x)) != data_fingerprint([x, x])


def test_a_checkpoint_rewritten_after_hashing_is_not_stored_under_its_old_id(tmp_path, monkeypatch):
    from rllc_fast.models.checkpoints import Checkpoint

    run = _run(tmp_path / "run", {1: 1, 2: 2})
    original = Checkpoint.load

    def load_after_a_rewrite(self, *args, **kwargs):  # a trainer overwrites step 2 while the sweep runs
        if self.step == 2:
            save_checkpoint(attn_only(seed=9, **SMALL), self.path, 2)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Checkpoint, "load", load_after_a_rewrite)
    report = _sweep(run, tmp_path / "s.sqlite")
    assert [u.step for u in report.computed] == [1]
    (error,) = report.failed.values()
    assert "changed on disk after the sweep hashed it" in error
    monkeypatch.setattr(Checkpoint, "load", original)
    again = _sweep(run, tmp_path / "s.sqlite")  # the rerun hashes the new content and computes it
    assert [u.step for u in again.computed] == [2] and not again.failed


def test_a_unit_whose_write_fails_midway_leaves_none_of_its_rows(tmp_path):
    """A unit's rows are written in one transaction: when the write of its third row fails (an SQLite
    trigger aborts it, standing in for a crash), none of its rows stay and a rerun's ``done()`` sees no
    part of the unit. Catches rows committed one at a time (the SIGKILL test cannot: it only counts
    rows in multiples of the unit size after the fact)."""
    path = tmp_path / "s.sqlite"
    store = ResultStore(path)
    config = SGLDConfig(**FAST)
    store.write(UnitKey("step0.pt", 0, "mix", "heads", "id-0", data_hash="d"), "k1", config, "batched",
                [_estimate("0:0", 1.0)], 1.0)  # creates the schema
    con = sqlite3.connect(path)
    con.execute("CREATE TRIGGER crash BEFORE INSERT ON estimates WHEN NEW.component = '1:0' "
                "BEGIN SELECT RAISE(ABORT, 'simulated crash'); END")
    con.commit()
    con.close()
    unit = UnitKey("step1.pt", 1, "mix", "heads", "id-1", data_hash="d")
    with pytest.raises(sqlite3.DatabaseError, match="simulated crash"):
        store.write(unit, "k1", config, "batched", [_estimate(n, 1.0) for n in ("0:0", "0:1", "1:0", "1:1")], 1.0)
    assert store.done(unit, "k1") == set()
    assert ResultStore(path, readonly=True).rows("all").checkpoint.tolist() == ["step0.pt"]
