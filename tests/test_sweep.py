"""Sweeps and the result store: resume after a real kill, concurrent writers, config changes, failures,
bad input, and `rllc plot`'s figures and page."""
import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from rllc_fast import SGLDConfig
from rllc_fast.models import attn_only, save_checkpoint
from rllc_fast.store import ResultStore, SeveralConfigsWarning
from rllc_fast.sweep import run_sweep
from store_rows import estimate_count

SMALL = dict(n_layers=2, d_model=32, n_heads=8, d_head=4, n_ctx=16, d_vocab=64)  # 16 heads
STEPS = (1, 10, 100)


def _checkpoints(folder):
    for step in STEPS:
        save_checkpoint(attn_only(seed=step, **SMALL), folder / f"step{step}.pt", step)
    return folder


def _data_files(folder):
    g = torch.Generator().manual_seed(0)
    np.save(folder / "mix.npy", torch.randint(0, 64, (64, 16), generator=g).numpy())
    np.save(folder / "code.npy", torch.randint(0, 16, (64, 16), generator=g).numpy())
    return {"mix": folder / "mix.npy", "code": folder / "code.npy"}


@pytest.fixture()
def run_dir(tmp_path):
    _checkpoints(tmp_path / "ckpts")
    data = _data_files(tmp_path)
    return tmp_path, data


def _sweep_cmd(tmp, data, store, draws=40, extra=()):
    return [sys.executable, "-m", "rllc_fast.cli", "sweep", "--checkpoints", str(tmp / "ckpts"),
            "--data", f"mix={data['mix']}", "--data", f"code={data['code']}", "--components", "heads",
            "--store", str(store), "--context", "16", "--draws", str(draws), "--batch-size", "8", "--quiet", *extra]


def _rows(store):
    df = ResultStore(store).rows()
    key = ["checkpoint", "data", "component_set", "component"]
    assert not df.duplicated(key).any()
    return df.sort_values(key).reset_index(drop=True)


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_killed_sweep_resumes_to_the_same_rows(run_dir):
    tmp, data = run_dir
    total = len(STEPS) * 2 * 16
    clean = tmp / "clean.sqlite"
    subprocess.run(_sweep_cmd(tmp, data, clean), check=True, env=_env(), timeout=600)
    assert estimate_count(clean) == total

    killed = tmp / "killed.sqlite"
    proc = subprocess.Popen(_sweep_cmd(tmp, data, killed), env=_env())
    deadline = time.time() + 300
    while estimate_count(killed) < 16 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = estimate_count(killed)
    assert 16 <= done_before < total, f"the kill came too late to test resumption ({done_before} rows)"
    assert done_before % 16 == 0  # units are written whole or not at all

    resumed = subprocess.run(_sweep_cmd(tmp, data, killed), check=True, env=_env(), timeout=600,
                             capture_output=True, text=True)
    assert f"{(total - done_before) // 16} unit(s) computed" in resumed.stdout
    assert f"{done_before // 16} already stored" in resumed.stdout
    a, b = _rows(clean), _rows(killed)
    assert len(a) == len(b) == total
    for col in ("checkpoint", "step", "data", "component", "config_key", "numel", "num_diverged"):
        assert a[col].tolist() == b[col].tolist(), col
    np.testing.assert_array_equal(a["llc_mean"].to_numpy(), b["llc_mean"].to_numpy())
    np.testing.assert_array_equal(np.stack(a["llc_per_chain"]), np.stack(b["llc_per_chain"]))
    ta = ResultStore(clean).traces("step10.pt", "code", "heads", "1:7")
    tb = ResultStore(killed).traces("step10.pt", "code", "heads", "1:7")
    assert ta["loss_trace"].shape == (4, 40)
    for k in ta:
        np.testing.assert_array_equal(ta[k], tb[k])


@pytest.mark.slow
def test_two_sweeps_writing_one_store(run_dir):
    tmp, data = run_dir
    store = tmp / "shared.sqlite"
    procs = [subprocess.Popen(_sweep_cmd(tmp, data, store, draws=10), env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert len(_rows(store)) == len(STEPS) * 2 * 16
    con = sqlite3.connect(store)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()


def test_rerun_skips_done_and_recomputes_changed_config(tmp_path):
    _checkpoints(tmp_path / "ckpts")
    g = torch.Generator().manual_seed(0)
    data = {"mix": torch.randint(0, 64, (32, 16), generator=g)}
    config = SGLDConfig(num_draws=4, batch_size=8)
    store = tmp_path / "s.sqlite"
    first = run_sweep(tmp_path / "ckpts", data, config, store, ["whole", "layers"], progress=False)
    assert len(first.computed) == 6 and first.rows_written == 3 * (1 + 2)
    again = run_sweep(tmp_path / "ckpts", data, config, store, ["whole", "layers"], progress=False)
    assert again.computed == [] and len(again.skipped) == 6
    # a different config is computed and kept beside the first; rows() shows the latest per unit, with a note
    changed = run_sweep(tmp_path / "ckpts", data, SGLDConfig(num_draws=5, batch_size=8), store, ["whole"],
                        progress=False)
    assert len(changed.computed) == 3
    with pytest.warns(SeveralConfigsWarning, match="2 configuration"):
        df = _rows(store)
    assert len(df) == 9 and df[df.component_set == "whole"].num_draws.tolist() == [5, 5, 5]
    assert df[df.component_set == "layers"].num_draws.unique().tolist() == [4]
    assert len(ResultStore(store).rows("all")) == 12
    new_key = df[df.component_set == "whole"].config_key.iloc[0]
    s = ResultStore(store)
    assert s.traces("step1.pt", "mix", "whole", "whole", config_key=new_key)["loss_trace"].shape == (4, 5)
    with pytest.raises(ValueError, match="2 estimates match"):  # ambiguous without the key
        s.traces("step1.pt", "mix", "whole", "whole")
    # changed data under the same name is noticed too
    data2 = {"mix": torch.randint(0, 64, (32, 16), generator=g)}
    assert len(run_sweep(tmp_path / "ckpts", data2, config, store, ["whole"], progress=False).computed) == 3


def test_bad_checkpoints_are_recorded_and_the_sweep_goes_on(tmp_path):
    ckpts = _checkpoints(tmp_path / "ckpts")
    (ckpts / "step50.pt").write_bytes(b"truncated")
    save_checkpoint(attn_only(**{**SMALL, "d_model": 48, "d_head": 6}), ckpts / "step60.pt", 60)
    data = {"mix": torch.randint(0, 64, (32, 16))}
    store = tmp_path / "s.sqlite"
    report = run_sweep(ckpts, data, SGLDConfig(num_draws=3, batch_size=8), store, ["whole"], progress=False,
                       log=lambda m: None)
    assert len(report.computed) == 3
    failed = {u.checkpoint: err for u, err in report.failed.items()}
    assert set(failed) == {"step50.pt", "step60.pt"}
    assert "step50.pt: not a readable torch checkpoint" in failed["step50.pt"]
    assert "step60.pt: a different architecture" in failed["step60.pt"] and "d_model 48 (expected 32)" in failed["step60.pt"]
    assert sorted(ResultStore(store).failures().checkpoint) == ["step50.pt", "step60.pt"]


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "rllc_fast.cli", *map(str, args)], capture_output=True, text=True,
                          env=_env(), timeout=300, **kw)


def _cli_error(*args) -> str:
    """Run ``rllc`` in-process and return its exit message (it must exit with an error)."""
    from rllc_fast.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    assert exit_info.value.code not in (0, None)
    return str(exit_info.value.code)


def test_cli_bad_input_names_the_argument(run_dir):
    tmp, data = run_dir
    base = ["sweep", "--store", tmp / "s.sqlite", "--quiet"]
    assert "missing does not exist" in _cli_error(*base, "--checkpoints", tmp / "missing", "--data", data["mix"])
    np.save(tmp / "big.npy", np.full((8, 16), 64))
    msg = _cli_error(*base, "--checkpoints", tmp / "ckpts", "--data", tmp / "big.npy", "--context", 16)
    assert "data 'big': token ids must lie in [0, 64)" in msg
    np.save(tmp / "short.npy", np.zeros((8, 12), dtype=np.int64))
    msg = _cli_error(*base, "--checkpoints", tmp / "ckpts", "--data", tmp / "short.npy")  # --context: n_ctx 16
    assert not (tmp / "s.sqlite").exists()  # a sweep failing on bad input leaves no store behind
    assert "rows have 12 tokens, fewer than context_length 16" in msg
    np.save(tmp / "long.npy", np.zeros(4000, dtype=np.int64))
    msg = _cli_error(*base, "--checkpoints", tmp / "ckpts", "--data", tmp / "long.npy", "--context", 32)
    assert "--context 32 exceeds the model's n_ctx 16 (step1.pt); give --context 16 or less" in msg
    assert not (tmp / "s.sqlite").exists()
    assert "--components" in _cli_error(*base, "--checkpoints", tmp / "ckpts", "--data", data["mix"],
                                        "--components", "heads,mlp")
    (tmp / "bad.toml").write_text("stepsize = 0.1\n")
    msg = _cli_error(*base, "--checkpoints", tmp / "ckpts", "--data", data["mix"], "--config", tmp / "bad.toml")
    assert "unknown key(s) ['stepsize']" in msg
    assert "does not exist" in _cli_error("plot", "--store", tmp / "nothing.sqlite")
    assert not (tmp / "nothing.sqlite").exists()


def test_config_file_and_plot(run_dir):
    tmp, data = run_dir
    (tmp / "sweep.toml").write_text(
        f'checkpoints = "{tmp / "ckpts"}"\nstore = "{tmp / "s.sqlite"}"\ndata = ["mix={data["mix"]}", '
        f'"code={data["code"]}"]\ncomponents = "heads,whole"\ncontext = 16\ndraws = 6\nbatch-size = 8\n')
    r = _cli("sweep", "--config", tmp / "sweep.toml", "--quiet")
    assert r.returncode == 0, r.stderr
    df = _rows(tmp / "s.sqlite")
    assert len(df) == 3 * 2 * 17
    assert (np.stack(df["llc_per_chain"]).shape == (102, 4))
    r = _cli("plot", "--store", tmp / "s.sqlite", "--out", tmp / "report")
    assert r.returncode == 0, r.stderr
    files = sorted(os.listdir(tmp / "report"))
    assert files == ["heads_code.png", "heads_diff_mix_minus_code.png", "heads_mix.png", "index.html", "whole.png"]
    page = (tmp / "report" / "index.html").read_text()
    for png in files[:-2] + ["whole.png"]:
        assert f"src='{png}'" in page
        assert (tmp / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    estimates = page.split("<h2>Estimates</h2>")[1].split("<h2>")[0]
    assert estimates.count("</tr>") == 1 + len(df)  # header + one row per estimate
    assert "<h2>Sampler diagnostics</h2>" in page  # the rows carry R-hat, ESS and the distance trend
    configs = page.split("<h2>Configurations</h2>")[1].split("<h2>")[0]
    assert configs.count("</tr>") == 2 and df.config_key.iloc[0] in configs  # one configuration, with its settings


def test_head_figure_has_a_panel_per_layer_and_a_line_per_head(run_dir):
    from rllc_fast.report import head_curves_figure

    tmp, _ = run_dir
    g = torch.Generator().manual_seed(0)
    store = tmp / "s.sqlite"
    run_sweep(tmp / "ckpts", {"mix": torch.randint(0, 64, (32, 16), generator=g)}, SGLDConfig(num_draws=3, batch_size=8),
              store, ["heads"], progress=False)
    fig = head_curves_figure(ResultStore(store).rows(), "title")
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["layer 0", "layer 1"]
    for layer, ax in enumerate(axes):
        assert ax.get_xscale() == "log" and ax.get_xlabel() == "training step"
        assert [l.get_text() for l in ax.get_legend().get_texts()] == [f"{layer}:{h}" for h in range(8)]
        lines = ax.get_lines()
        assert len(lines) == 8 and all(list(l.get_xdata()) == list(STEPS) for l in lines)
    assert "rLLC" in axes[0].get_ylabel()


def test_hessian_metric_sweeps_write_beside_the_rllc_and_plot(run_dir):
    tmp, data = run_dir
    store = tmp / "s.sqlite"
    base = ["sweep", "--checkpoints", tmp / "ckpts", "--data", f"mix={data['mix']}", "--store", store,
            "--context", 16, "--quiet"]
    r = _cli(*base, "--components", "heads,whole", "--draws", 4, "--batch-size", 8)
    assert r.returncode == 0, r.stderr
    r = _cli(*base, "--components", "heads,whole", "--metric", "hessian-trace", "--probes", 4,
             "--hessian-batches", 2)
    assert r.returncode == 0, r.stderr
    r = _cli(*base, "--components", "whole", "--metric", "hessian-rank", "--probes", 2, "--hessian-batches", 1,
             "--degree", 10)
    assert r.returncode == 0, r.stderr
    s = ResultStore(store)
    traces, ranks = s.metric_rows("hessian-trace"), s.metric_rows("hessian-rank")
    assert len(traces) == 3 * 17 and len(ranks) == 3 and len(s.rows()) == 3 * 17
    assert traces["sem"].gt(0).all() and traces["num_samples"].eq(4).all()
    # the stored value is the library's estimate with the same settings
    from rllc_fast import hessian
    from rllc_fast.models.checkpoints import checkpoint_series

    from rllc_fast.data import data_from_spec

    ckpt = checkpoint_series(tmp / "ckpts")[0]
    tokens = data_from_spec(str(data["mix"]), 16, 256, None, seed=0)  # what the CLI reads
    want = hessian.trace(ckpt.load(), tokens, None, num_probes=4, num_batches=2, batch_size=8, seed=0)
    got = traces[(traces.checkpoint == ckpt.name) & (traces.component == "whole")]["value"].item()
    assert got == pytest.approx(want["whole"].value, rel=1e-5)
    # a rerun computes nothing new
    r = _cli(*base, "--components", "heads,whole", "--metric", "hessian-trace", "--probes", 4,
             "--hessian-batches", 2)
    assert r.returncode == 0 and "0 unit(s) computed" in r.stdout, r.stdout + r.stderr
    r = _cli("plot", "--store", store, "--out", tmp / "report")
    assert r.returncode == 0, r.stderr
    files = set(os.listdir(tmp / "report"))
    assert {"heads_mix.png", "hessian-trace_heads_mix.png", "hessian-trace_whole_mix.png",
            "hessian-rank_whole_mix.png"} <= files
    page = (tmp / "report" / "index.html").read_text()
    assert "src='hessian-trace_heads_mix.png'" in page and "Hessian metrics" in page


def test_hessian_sweep_bad_input(run_dir):
    tmp, data = run_dir
    base = ["sweep", "--checkpoints", tmp / "ckpts", "--data", data["mix"], "--store", tmp / "s.sqlite",
            "--context", 16, "--quiet"]
    msg = _cli_error(*base, "--metric", "hessian-trace")  # 100 batches x 8 > 256 contexts of 64 rows
    assert "give more data or lower num_batches" in msg
    assert "--interval" in _cli_error(*base, "--metric", "hessian-rank", "--interval", "1..2", "--hessian-batches", 1)


def test_sampler_warnings_become_one_log_line_and_other_warnings_pass():
    import warnings

    from rllc_fast.diagnostics import SamplerWarning
    from rllc_fast.sweep import runtime_warnings_as_lines

    lines, filters = [], list(warnings.filters)
    with pytest.warns(UserWarning, match="unrelated"):
        with runtime_warnings_as_lines(lines.append):
            warnings.warn("chains disagree\n  (R-hat 1.5): lower step_size", SamplerWarning)
            warnings.warn("unrelated", UserWarning)
    assert lines == ["chains disagree (R-hat 1.5): lower step_size"]
    assert warnings.filters == filters


class _Recorded(Exception):
    """Raised by a stand-in metric once it has recorded the device it was given."""


@pytest.mark.filterwarnings("ignore:.*to a meta parameter:UserWarning")  # loading onto the meta device
@pytest.mark.parametrize("metric", ["llc", "hessian-trace"])
def test_every_metric_runs_on_the_resolved_device(tmp_path, monkeypatch, metric):
    """run_sweep(device=None) resolves the device once (``distributed.device_for``) and both the rLLC and the
    Hessian jobs get it: the model is loaded there and the metric is asked to run there (never the CPU by default)."""
    import rllc_fast.hessian
    import rllc_fast.sweep as sweep

    _checkpoints(tmp_path / "ckpts")
    seen = {}

    def fake_metric(model, data, *args, device=None, **kwargs):
        seen.update(device=device, model_device=next(model.parameters()).device.type)
        raise _Recorded

    resolved = []
    monkeypatch.setattr(sweep, "device_for", lambda rank, device: resolved.append(device) or "meta")
    monkeypatch.setattr(sweep, "estimate_llc", fake_metric)
    monkeypatch.setattr(rllc_fast.hessian, "trace", fake_metric)
    data = {"mix": torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(0))}
    with pytest.raises(_Recorded):
        run_sweep(tmp_path / "ckpts", data, SGLDConfig(num_draws=2, batch_size=8), tmp_path / "s.sqlite",
                  ["whole"], progress=False, metric=metric)
    assert resolved == [None]  # asked once, with what the caller gave
    assert seen == {"device": "meta", "model_device": "meta"}


def test_a_users_own_model_class_sweeps_through_a_loader(tmp_path):
    """``run_sweep(load=...)``: checkpoints in the user's own format, loaded by the user's function into
    their own ``nn.Module`` (no TransformerLens), are swept; a loader error marks that checkpoint failed."""
    from torch import nn

    from rllc_fast.models import Checkpoint

    class Bigram(nn.Module):
        def __init__(self, table):
            super().__init__()
            self.table = nn.Parameter(table)

        def forward(self, tokens):  # [N, T] -> logits [N, T, V]
            return self.table[tokens]

    paths = []
    for step in (0, 10, 20):
        table = torch.randn(16, 16, generator=torch.Generator().manual_seed(step)) * (1 + step / 10)
        np.savez(tmp_path / f"bigram-{step}.npz", table=table.numpy())
        paths.append(Checkpoint(tmp_path / f"bigram-{step}.npz", step, "npz"))
    (tmp_path / "broken.npz").write_bytes(b"not an npz")
    paths.append(Checkpoint(tmp_path / "broken.npz", 30, "npz"))

    def load(ckpt):
        return Bigram(torch.from_numpy(np.load(ckpt.path)["table"]))

    tokens = torch.randint(0, 16, (32, 8), generator=torch.Generator().manual_seed(0))
    store = tmp_path / "s.sqlite"
    report = run_sweep(paths, {"mix": tokens}, SGLDConfig(num_chains=1, num_draws=3, batch_size=8), store,
                       {"whole": None}, load=load, progress=False, log=lambda m: None)
    assert sorted(u.step for u in report.computed) == [0, 10, 20]
    (failed, message), = report.failed.items()
    assert failed.step == 30 and "broken.npz: load() raised" in message
    rows = ResultStore(store, readonly=True).rows()
    assert sorted(rows.step) == [0, 10, 20] and (rows.numel == 256).all()
    with pytest.raises(TypeError, match="load must be a callable"):
        run_sweep(paths, {"mix": tokens}, SGLDConfig(), store, {"whole": None}, load="bigram", progress=False)


def test_cuda_graph_sweep_runs_units_it_cannot_graph_eagerly_and_says_so(tmp_path):
    """On this CPU every unit falls back to the eager step with a log line naming why; the rows are the eager
    sweep's, under the same key (graphs are not part of it)."""
    save_checkpoint(attn_only(seed=1, **SMALL), tmp_path / "ckpts" / "step1.pt", 1)
    data = {"mix": torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(0))}
    config = SGLDConfig(num_chains=1, num_draws=3, batch_size=8)
    lines = []
    graphed = run_sweep(tmp_path / "ckpts", data, config, tmp_path / "g.sqlite", ["heads"], progress=False,
                        log=lines.append, cuda_graph=True)
    eager = run_sweep(tmp_path / "ckpts", data, config, tmp_path / "e.sqlite", ["heads"], progress=False,
                      log=lambda s: None)
    assert len(graphed.computed) == len(eager.computed) == 1
    assert any("without CUDA graphs: cuda_graph=True needs a CUDA device" in line for line in lines), lines
    a, b = _rows(tmp_path / "g.sqlite"), _rows(tmp_path / "e.sqlite")
    assert a.config_key.tolist() == b.config_key.tolist()
    np.testing.assert_array_equal(a.llc_mean.to_numpy(), b.llc_mean.to_numpy())
