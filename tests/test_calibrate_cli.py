"""``rllc calibrate`` on a checkpoint file and on the built-in model: a table, calibrate.csv and calibrate.png;
bad flags are refused with the flag named."""

import pandas as pd
import pytest

from rllc_fast.cli import main
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
