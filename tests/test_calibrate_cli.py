"""``rllc calibrate`` on a checkpoint file and on the built-in model: a table, calibrate.csv and calibrate.png;
bad flags are refused with the flag named."""

import pandas as pd
import pytest

from rllc_fast.cli import build_parser, main
from rllc_fast.cli.common import model_and_data
from rllc_fast.models import attn_only, save_checkpoint

FAST = ["--chains", "2", "--draws", "10", "--burnin", "0", "--batch-size", "4", "--num-contexts", "16", "--quiet"]


def test_calibrate_a_checkpoint_file_writes_the_table_and_the_figure(tmp_path, capsys):
    model = attn_only(n_layers=1, d_model=16, n_heads=2, d_head=8, n_ctx=16, d_vocab=128, seed=0)
    ckpt = save_checkpoint(model, tmp_path / "run" / "step000010.pt", 10)
    out = tmp_path / "cal"
    code = main(["calibrate", "--checkpoint", str(ckpt), "--data", "mix=synthetic:mixture", "--step-sizes", "1e-3,0.1",
                 "--out", str(out), *FAST])
    assert code == 0
    table = capsys.readouterr().out
    assert "step size 0.1: 3 of 3 component(s) with problems" in table and "unstable step size" in table
    rows = pd.read_csv(out / "calibrate.csv")
    assert sorted(set(rows["component"])) == ["0:0", "0:1", "whole"] and sorted(set(rows["step_size"])) == [1e-3, 0.1]
    assert rows[rows["step_size"] == 0.1]["problems"].str.contains("unstable step size").all()
    assert (out / "calibrate.png").read_bytes()[:4] == b"\x89PNG"
    # a folder of checkpoints: its last one (the only one here)
    assert main(["calibrate", "--checkpoint", str(tmp_path / "run"), "--data", "synthetic:mixture", "--step-sizes",
                 "1e-3", "--components", "whole", "--out", str(out), *FAST]) == 0


def test_calibrate_the_built_in_model(tmp_path, capsys):
    code = main(["calibrate", "--train-steps", "2", "--n-layers", "1", "--n-heads", "2", "--d-model", "16", "--context",
                 "16", "--components", "heads", "--step-sizes", "1e-3", "--out", str(tmp_path), *FAST])
    assert code == 0
    assert "step size 0.001:" in capsys.readouterr().out and (tmp_path / "calibrate.png").exists()


@pytest.mark.parametrize("args, message", [
    (["--step-sizes", "1e-3,abc"], "--step-sizes"),
    (["--step-sizes", "-1"], "--step-sizes"),
    (["--components", "heads,tails"], "--components"),
    (["--checkpoint", "/nonexistent/x.pt", "--data", "synthetic:mixture"], "--checkpoint"),
    (["--step", "3"], "--step needs --checkpoint"),
])
def test_bad_flags_are_named(args, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        main(["calibrate", "--out", str(tmp_path), *args, *FAST])


@pytest.fixture()
def run(tmp_path):
    """Two tiny checkpoints (steps 10 and 20, n_ctx 16) in ``run/``."""
    for step in (10, 20):
        save_checkpoint(attn_only(n_layers=1, d_model=16, n_heads=2, d_head=8, n_ctx=16, d_vocab=128, seed=step),
                        tmp_path / "run" / f"step{step:06d}.pt", step)
    return tmp_path / "run"


@pytest.mark.parametrize("args, message", [
    (["--chains", "0"], "rllc calibrate: --chains 0: num_chains must be an int >= 1"),
    (["--batch-size", "0"], "argument --batch-size: expected an integer >= 1"),
    (["--context", "0"], "argument --context: expected an integer >= 1, got 0"),
    (["--num-contexts", "-1"], "argument --num-contexts: expected an integer >= 1, got -1"),
    (["--train-steps", "0"], "argument --train-steps: expected an integer >= 1, got 0"),
    (["--step", "-1"], "argument --step: expected an integer >= 0, got -1"),
    (["--d-model", "10"], "--d-model 10 is not a multiple of --n-heads 4"),
    (["--like", "x.pt"], "--like needs --checkpoint"),
])
def test_bad_flags_before_any_work_name_the_flag(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate", "--out", str(tmp_path / "cal"), "--train-steps", "1", *args])
    code = exit_info.value.code
    assert message in (code if isinstance(code, str) else capsys.readouterr().err)
    assert not (tmp_path / "cal").exists()


@pytest.mark.parametrize("args, message", [
    (["--step", "15"], "--step 15: no checkpoint of"),
    (["--step", "15"], "steps found: 10, 20"),
    (["--context", "32"], "--context 32 exceeds the model's n_ctx 16"),
    (["--data", "synthetic:nothing"], "choose synthetic:NAME"),
])
def test_bad_flags_with_a_checkpoint_folder_name_the_flag(run, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate", "--checkpoint", str(run), "--data", "synthetic:mixture", "--out", str(run / "cal"), *args,
              *FAST])
    assert message in exit_info.value.code


def test_step_needs_a_folder_and_picks_its_checkpoint(run):
    with pytest.raises(SystemExit, match="--step 10 needs --checkpoint FOLDER"):
        main(["calibrate", "--checkpoint", str(run / "step000010.pt"), "--step", "10", "--data", "synthetic:mixture",
              *FAST])
    parser = build_parser()
    for extra, step in (([], 20), (["--step", "10"], 10)):
        args = parser.parse_args(["calibrate", "--checkpoint", str(run), "--data", "synthetic:mixture", *extra])
        assert f"(step {step})" in model_and_data(args, "calibrate", print)[1]


def test_context_defaults_to_the_models_n_ctx_as_in_estimate(tmp_path):
    # n_ctx 80: the model's, not the old min(64, n_ctx)
    ckpt = save_checkpoint(attn_only(n_layers=1, d_model=16, n_heads=2, d_head=8, n_ctx=80, d_vocab=128),
                           tmp_path / "wide.pt", 0)
    parser = build_parser()
    for command in ("calibrate", "estimate"):
        args = parser.parse_args([command, "--checkpoint", str(ckpt), "--data", "m=synthetic:mixture",
                                  "--num-contexts", "4"])
        model, label, data = model_and_data(args, command, print)
        assert data.tokens.shape == (4, 80) and data.name == "m" and label == "wide.pt (step 0)"
