"""The command line's edges (issue 18): a log file of plain lines, Ctrl-C with one line and a resumable rerun,
checkpoint selection (file, Hugging Face directory, glob, --steps), `rllc estimate --checkpoint`, SGLD defaults
read from SGLDConfig, and bad flags that name themselves and leave nothing behind."""
import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from importlib import metadata

import numpy as np
import pytest
import torch

import rllc_fast
from rllc_fast import SGLDConfig, cli
from rllc_fast.calibrate import STEP_SIZES
from rllc_fast.cli import calibrate as cli_calibrate
from rllc_fast.cli.common import SGLD_FLAGS, sgld_config
from rllc_fast.models import attn_only, checkpoint_at, save_checkpoint, select_checkpoints
from rllc_fast.models.checkpoints import parse_steps
from store_rows import estimate_count

TINY = dict(n_layers=1, d_model=16, n_heads=2, d_head=8, n_ctx=16, d_vocab=32)
STEPS = (1, 10, 100, 1000, 5000)


@pytest.fixture()
def run(tmp_path):
    """Five tiny checkpoints (n_ctx 16) in ``ckpts/`` and 32 rows of 16 tokens in ``mix.npy``."""
    for step in STEPS:
        save_checkpoint(attn_only(seed=step, **TINY), tmp_path / "ckpts" / f"step{step}.pt", step)
    g = torch.Generator().manual_seed(0)
    np.save(tmp_path / "mix.npy", torch.randint(0, 32, (32, 16), generator=g).numpy())
    return tmp_path


def _env():
    root = os.path.dirname(os.path.dirname(os.path.abspath(rllc_fast.__file__)))
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root}


def _check_log(text: str, units: int) -> None:
    """A log file's text: plain lines only, a bounded number per unit."""
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert all(line.strip() and line.isprintable() for line in lines), lines
    assert len(lines) <= 2 + 2 * units, lines  # start and end lines, a unit line (and at most a minute's line) each


def test_sweep_log_file_has_plain_lines_and_ctrl_c_stops_with_one_line_and_resumes(run, capsys):
    store = run / "s.sqlite"
    args = [str(a) for a in ("sweep", "--checkpoints", run / "ckpts", "--data", f"mix={run / 'mix.npy'}",
                             "--components", "whole", "--store", store, "--draws", 40)]
    cmd = [sys.executable, "-m", "rllc_fast.cli", *args]
    with open(run / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=_env(),
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 300
        # a unit is stored and its progress line written (the line follows the store's write)
        while (estimate_count(store) < 1 or "sweep: 1/" not in (run / "first.log").read_text()) \
                and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    stored = estimate_count(store)  # one row per unit ("whole")
    assert proc.returncode == 130, (out, (run / "first.log").read_text())
    assert 1 <= stored < len(STEPS), "the interrupt came too late to test resumption"
    first = (run / "first.log").read_text()
    _check_log(first, stored)
    assert "Traceback" not in first and out == ""
    assert first.splitlines()[-1] == (f"rllc sweep: interrupted: {stored} unit(s) stored in {store}; rerun the same "
                                      "command to resume")
    progress = [l.split(" (")[0] for l in first.splitlines() if l.startswith("sweep:")]
    # one line per stored unit, in order; the interrupt may fall between a unit's write and its line
    assert stored - 1 <= len(progress) <= stored
    assert progress == [f"sweep: {k}/{len(STEPS)} units" for k in range(1, len(progress) + 1)]

    assert cli.main(args) == 0  # the rerun (in this process: stderr captured, not a terminal)
    again = capsys.readouterr()
    assert f"{len(STEPS) - stored} unit(s) computed" in again.out
    assert f"{stored} already stored" in again.out
    _check_log(again.err, len(STEPS))
    assert estimate_count(store) == len(STEPS)


def test_ctrl_c_in_other_commands_is_one_line_and_exit_130(monkeypatch, capsys):
    from rllc_fast import ops

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(ops, "backend", interrupted)  # what `rllc info` calls first
    assert cli.main(["info"]) == 130
    assert capsys.readouterr().err == "rllc info: interrupted\n"


def test_select_checkpoints_from_a_folder_file_glob_and_steps(run):
    ckpts = run / "ckpts"
    steps = lambda series: [c.step for c in series]  # noqa: E731
    assert steps(select_checkpoints(ckpts)) == list(STEPS)
    assert steps(select_checkpoints(ckpts / "step10.pt")) == [10]
    assert steps(select_checkpoints(str(ckpts / "step1*.pt"))) == [1, 10, 100, 1000]
    assert steps(select_checkpoints(ckpts, "0100, 1")) == [1, 100]
    assert steps(select_checkpoints(ckpts, [5000])) == [5000]
    assert steps(select_checkpoints(ckpts, "10:1000")) == [10, 100, 1000]
    assert steps(select_checkpoints(ckpts, "1000:")) == [1000, 5000]
    assert steps(select_checkpoints(ckpts, ":10")) == [1, 10]
    assert parse_steps("1000:5000") == slice(1000, 5000) and parse_steps("0,1000,5000") == (0, 1000, 5000)
    with pytest.raises(ValueError, match=r"at step\(s\) 7, 11; steps found: 1, 10, 100, 1000, 5000$"):
        select_checkpoints(ckpts, "7,10,11")
    with pytest.raises(ValueError, match="has a step in 2:9; steps found: 1, 10, 100"):
        select_checkpoints(ckpts, "2:9")
    for bad in ("", "a", "1:2:3", "-5", "5:1", ":", "1.5"):
        with pytest.raises(ValueError, match="steps"):
            parse_steps(bad)
    with pytest.raises(FileNotFoundError, match="no checkpoints match"):
        select_checkpoints(str(ckpts / "nothing*.pt"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        select_checkpoints(ckpts / "step2.pt")
    np.save(ckpts / "extra.npy", np.zeros(3))
    with pytest.raises(Exception, match="not a checkpoint"):
        select_checkpoints(ckpts / "extra.npy")
    # a single file needs no step in its name; a Hugging Face directory is one checkpoint, not a folder of them
    torch.save(attn_only(**TINY).state_dict(), run / "final.pt")
    assert (checkpoint_at(run / "final.pt").step, checkpoint_at(run / "final.pt").kind) == (0, "state_dict")
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)).save_pretrained(run / "step77")
    assert [(c.step, c.kind) for c in select_checkpoints(run / "step77")] == [(77, "hf")]


def test_sweep_cli_takes_a_glob_and_a_step_range(run, capsys):
    store = run / "s.sqlite"
    code = cli.main(["sweep", "--checkpoints", str(run / "ckpts" / "step*0.pt"), "--steps", ":4000", "--data",
                     f"mix={run / 'mix.npy'}", "--components", "whole", "--store", str(store), "--chains", "1",
                     "--draws", "2", "--device", "cpu", "--quiet"])
    assert code == 0 and "3 unit(s) computed" in capsys.readouterr().out
    con = sqlite3.connect(store)
    # step1 left out by the glob, step5000 by the range
    assert sorted(r[0] for r in con.execute("SELECT step FROM estimates")) == [10, 100, 1000]
    con.close()


def test_sweep_exits_3_when_a_checkpoint_fails_and_keeps_the_others(run, capsys):
    """A checkpoint that cannot be read makes `rllc sweep` exit 3 (scripts and CI see the failure), names it,
    and the readable checkpoints are still stored. Catches an exit status of 0 with failures."""
    (run / "ckpts" / "step100.pt").write_bytes(b"not a checkpoint")
    store = run / "s.sqlite"
    code = cli.main(["sweep", "--checkpoints", str(run / "ckpts"), "--data", f"mix={run / 'mix.npy'}",
                     "--components", "whole", "--store", str(store), "--chains", "1", "--draws", "2",
                     "--device", "cpu", "--quiet"])
    captured = capsys.readouterr()
    assert code == 3, captured
    assert "step100.pt" in captured.out + captured.err and "not a readable torch checkpoint" in captured.out + captured.err
    con = sqlite3.connect(store)
    assert sorted(r[0] for r in con.execute("SELECT step FROM estimates")) == [1, 10, 1000, 5000]
    con.close()


def _fails(capsys, *args) -> str:
    """Run ``rllc ARGS`` in-process; it must fail; return its message (SystemExit text or argparse's stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(a) for a in args])
    assert exit_info.value.code not in (0, None)
    code = exit_info.value.code
    return code if isinstance(code, str) else capsys.readouterr().err


def test_bad_flags_name_the_flag_say_what_is_accepted_and_leave_nothing_behind(run, capsys):
    store = run / "s.sqlite"
    sweep = ["sweep", "--checkpoints", run / "ckpts", "--data", f"mix={run / 'mix.npy'}", "--store", store, "--quiet"]
    cases = [
        (["--steps", "7"], "--steps 7: no checkpoint of"),
        (["--steps", "7"], "steps found: 1, 10, 100, 1000, 5000"),
        (["--steps", "x"], "argument --steps: steps 'x': use comma-separated"),
        (["--context", "32"], "--context 32 exceeds the model's n_ctx 16 (step1.pt)"),
        (["--context", "0"], "argument --context: expected an integer >= 1, got 0"),
        (["--num-contexts", "0"], "argument --num-contexts: expected an integer >= 1, got 0"),
        (["--step-size", "-1e-3"], "--step-size -0.001: step_size must be a finite number > 0"),
        (["--draws", "0"], "--draws 0: num_draws must be an int >= 1"),
        (["--batch-size", "0"], "argument --batch-size: expected an integer >= 1 (contexts per minibatch) or 'full'"),
        (["--batch-size", "None"], "or 'full' (every context at every step), got 'None'"),
    ]
    for extra, expected in cases:
        message = _fails(capsys, *sweep, *extra)
        assert expected in message, (extra, message)
        assert "None for full batch" not in message
        assert not store.exists(), extra
    moved = ["sweep", "--checkpoints", run / "elsewhere", "--data", run / "mix.npy", "--store", store]
    assert "--checkpoints" in _fails(capsys, *moved) and "does not exist" in _fails(capsys, *moved)
    (run / "bad.toml").write_text("batch-size = 0\n")
    message = _fails(capsys, *sweep, "--config", run / "bad.toml")
    assert "batch-size = 0: expected an integer >= 1" in message
    assert not store.exists()

    out = run / "out.json"
    estimate = ["estimate", "--checkpoint", run / "ckpts" / "step10.pt", "--output", out, "--quiet"]
    assert "--checkpoint needs --data" in _fails(capsys, *estimate)
    assert "--context 64 exceeds the model's n_ctx 16" in _fails(capsys, *estimate, "--data", run / "mix.npy",
                                                                 "--context", 64)
    assert "not a checkpoint" in _fails(capsys, "estimate", "--checkpoint", run / "mix.npy", "--data", "x")
    assert "--like needs --checkpoint" in _fails(capsys, "estimate", "--data", run / "mix.npy", "--like", run)
    assert not out.exists()


def test_sgld_defaults_are_sgldconfigs_and_help_shows_every_default(capsys):
    parser = cli.build_parser()
    args = parser.parse_args(["sweep", "--checkpoints", "c", "--data", "d", "--store", "s"])
    for flag, (field, _, _) in SGLD_FLAGS.items():
        assert getattr(args, flag.replace("-", "_")) == getattr(SGLDConfig(), field), flag
    assert {field for field, _, _ in SGLD_FLAGS.values()} >= {"num_draws", "batch_size", "num_chains", "step_size"}
    assert parser.parse_args(["estimate", "--batch-size", "full"]).batch_size is None
    with pytest.raises(SystemExit):
        parser.parse_args(["sweep", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, (field, _, _) in SGLD_FLAGS.items():
        assert f"--{flag}" in text and f"(default: {getattr(SGLDConfig(), field)})" in text, flag
    assert "(default: 256)" in text and "(default: heads)" in text and "(default: the model's n_ctx" in text


def test_calibrate_estimate_and_sweep_take_sgldconfigs_defaults_but_calibrates_two_stated_ones(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "10000")  # --help unwrapped: each reason on one line
    library = {f.name: f.default for f in dataclasses.fields(SGLDConfig)}
    stated = cli_calibrate.SGLD_DEFAULTS
    # calibrate states draws and burn-in; everything else, the batch size too, is SGLDConfig's
    assert {flag: value for flag, (value, _) in stated.items()} == {"draws": 50, "burnin": 20}
    minimal = {"estimate": ["estimate"], "sweep": ["sweep", "--checkpoints", "c", "--data", "d", "--store", "s"],
               "calibrate": ["calibrate"]}
    parser = cli.build_parser()
    for command, argv in minimal.items():
        args = parser.parse_args(argv)
        own = {SGLD_FLAGS[flag][0]: value for flag, (value, _) in stated.items()} if command == "calibrate" else {}
        want = {field: own.get(field, library[field]) for field, _, _ in SGLD_FLAGS.values()}
        if command == "calibrate":  # --step-sizes (calibrate_step_size's by default) instead of --step-size
            assert not hasattr(args, "step_size") and want.pop("step_size")
            assert [float(s) for s in args.step_sizes.split(",")] == list(STEP_SIZES)
        got = {field: getattr(args, flag.replace("-", "_")) for flag, (field, _, _) in SGLD_FLAGS.items()
               if field in want}
        assert got == want, command
        assert sgld_config(args, command, **({"step_size": 1e-3} if command == "calibrate" else {})) == \
            SGLDConfig(**own), command
        with pytest.raises(SystemExit):
            parser.parse_args([argv[0], "--help"])
        text = capsys.readouterr().out
        for flag, (field, _, _) in SGLD_FLAGS.items():
            if field in want:
                shown = f"(default: {want[field]}, not SGLDConfig's {library[field]}: {stated[flag][1]})" \
                    if field in own else f"(default: {want[field]})"
                assert shown in text, (command, flag)


def test_estimate_a_checkpoint_on_data_with_the_models_context(run, capsys):
    from rllc_fast import estimate_llc
    from rllc_fast.data import data_from_spec

    out, ckpt = run / "out.json", run / "ckpts" / "step10.pt"
    # no --context: the model's n_ctx (16), which the data's 16-token rows need (64 would fail)
    code = cli.main(["estimate", "--checkpoint", str(ckpt), "--data", f"mix={run / 'mix.npy'}", "--components", "whole",
                     "--chains", "1", "--draws", "3", "--device", "cpu", "--output", str(out), "--quiet"])
    assert code == 0
    assert "whole" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    config = SGLDConfig(num_chains=1, num_draws=3)  # every other setting SGLDConfig's default, as on the CLI
    assert saved["config"] == config.to_dict()
    want = estimate_llc(checkpoint_at(ckpt).load(), data_from_spec(str(run / "mix.npy"), 16, 256), config)
    assert saved["components"]["whole"]["llc_mean"] == pytest.approx(want["whole"].llc_mean, rel=1e-6)


def test_info_reads_versions_from_package_metadata(capsys):
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert f"transformer_lens {metadata.version('transformer_lens')}," in text and "?" not in text


def test_abbreviated_flags_are_refused(capsys):
    from rllc_fast.cli import main

    with pytest.raises(SystemExit):
        main(["calibrate", "--step-size", "1e-3"])  # once silently read as --step-sizes 1e-3
    assert "unrecognized arguments: --step-size" in capsys.readouterr().err


def test_matmul_precision_reaches_the_estimate_and_the_sweeps_rows(run, capsys):
    """--matmul-precision is used (the bf16 estimate differs from fp32's and says so) and a sweep's rows
    carry it in their key and settings, beside the fp32 rows."""
    from rllc_fast.store import ResultStore

    ckpt, out = run / "ckpts" / "step10.pt", {p: run / f"{p}.json" for p in ("fp32", "bf16")}
    for p in out:
        assert cli.main(["estimate", "--checkpoint", str(ckpt), "--data", f"mix={run / 'mix.npy'}", "--components",
                         "whole", "--chains", "1", "--draws", "3", "--matmul-precision", p, "--output", str(out[p]),
                         "--quiet"]) == 0
    saved = {p: json.loads(out[p].read_text()) for p in out}
    assert saved["bf16"]["matmul_precision"] == "bf16" and saved["fp32"]["matmul_precision"] == "fp32"
    assert saved["bf16"]["components"]["whole"]["llc_mean"] != saved["fp32"]["components"]["whole"]["llc_mean"]
    store = run / "p.sqlite"
    for p in ("fp32", "bf16"):
        assert cli.main(["sweep", "--checkpoints", str(ckpt), "--data", f"mix={run / 'mix.npy'}", "--components",
                         "whole", "--chains", "1", "--draws", "3", "--store", str(store), "--matmul-precision", p,
                         "--quiet"]) == 0
    rows = ResultStore(store, readonly=True).rows(config="all")
    assert rows["config_key"].nunique() == 2
    precisions = sorted(json.loads(c).get("matmul_precision", "fp32")
                        for c in ResultStore(store, readonly=True).configs()["config_json"])
    assert precisions == ["bf16", "fp32"]


def test_cuda_graph_flag_reaches_the_estimate_and_is_refused_off_cuda(run):
    """--cuda-graph is passed to estimate_llc, whose refusal on this CPU names the fix."""
    ckpt = run / "ckpts" / "step10.pt"
    with pytest.raises(SystemExit, match="rllc estimate: cuda_graph=True needs a CUDA device.*leave cuda_graph off"):
        cli.main(["estimate", "--checkpoint", str(ckpt), "--data", f"mix={run / 'mix.npy'}", "--chains", "1",
                  "--draws", "2", "--cuda-graph", "--quiet"])
