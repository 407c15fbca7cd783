"""Checkpoints in a local Hugging Face hub cache (issue 21, item 1): a hub name, its models--org--name folder
or its snapshots folder are swept offline, steps read from the revision names (never the commit hashes),
revisions chosen by name, and errors that list the revisions in the cache."""
import sqlite3
import warnings

import numpy as np
import pytest
import torch

from rllc_fast import SGLDConfig, cli
from rllc_fast.models import checkpoint_series, load_gpt_neox, select_checkpoints
from rllc_fast.sweep import run_sweep

# commit hashes full of digits: a step read from a hash would be 84365, 4, 8 (and in that order)
HASHES = {"step0": "84365" + "a" * 35, "step1000": "4" + "b" * 39, "step2000": "c" * 20 + "8" + "d" * 19}


def _tiny_neox(seed):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=16, rotary_pct=0.25)
    with torch.random.fork_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        return GPTNeoXForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A hub cache with models--EleutherAI--pythia-tiny at refs step0, step1000, step2000 (no refs/main)."""
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / "models--EleutherAI--pythia-tiny"
    models = {}
    for k, (rev, commit) in enumerate(HASHES.items()):
        models[rev] = _tiny_neox(seed=k)
        models[rev].save_pretrained(repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / rev).write_text(commit)
    return cache, repo, models


@pytest.fixture()
def offline(hub, monkeypatch, no_network):
    """HF_HUB_CACHE pointing at the test cache, and any network connection fails the test (``no_network``)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(hub[0]))
    return hub


def test_a_hub_cache_is_a_series_ordered_by_the_revision_steps(offline):
    cache, repo, _ = offline
    for source in ("EleutherAI/pythia-tiny", repo, repo / "snapshots"):
        series = select_checkpoints(source)
        assert [c.step for c in series] == [0, 1000, 2000], source
        assert [c.name for c in series] == ["pythia-tiny@step0", "pythia-tiny@step1000", "pythia-tiny@step2000"]
        assert [c.path.name for c in series] == list(HASHES.values())
    assert [c.step for c in checkpoint_series("EleutherAI/pythia-tiny", revisions="step2000,step0")] == [0, 2000]
    assert [c.step for c in select_checkpoints(repo, steps="1000:")] == [1000, 2000]


def test_load_gpt_neox_takes_a_revision_and_lists_the_cached_ones(offline):
    _, repo, models = offline
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    tl = load_gpt_neox("EleutherAI/pythia-tiny", revision="step1000")
    with torch.no_grad():
        gap = (tl(tokens) - models["step1000"](tokens).logits).abs().max()
    assert gap < 1e-4
    with pytest.raises(FileNotFoundError, match="no revision 'main'.*revisions found: step0, step1000, step2000"):
        load_gpt_neox(repo)  # no refs/main and several revisions: say which exist
    with pytest.raises(FileNotFoundError, match="revisions found: step0, step1000, step2000"):
        select_checkpoints("EleutherAI/pythia-tiny", revisions=["step5"])
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache.*never downloads"):
        select_checkpoints("EleutherAI/pythia-absent")
    with pytest.raises(ValueError, match="revisions: .* is not a Hugging Face hub cache entry"):
        select_checkpoints(repo / "snapshots" / HASHES["step0"], revisions=["step0"])


def test_sweep_by_hub_name_and_by_folder_offline(offline, tmp_path, capsys):
    _, repo, _ = offline
    tokens = torch.randint(0, 64, (16, 16), generator=torch.Generator().manual_seed(1))
    config = SGLDConfig(num_chains=1, num_draws=2, batch_size=8)
    report = run_sweep("EleutherAI/pythia-tiny", {"mix": tokens}, config, tmp_path / "a.sqlite", ["whole"],
                       progress=False, log=lambda m: None)
    assert not report.failed and len(report.computed) == 3
    con = sqlite3.connect(tmp_path / "a.sqlite")
    assert con.execute("SELECT step, checkpoint FROM estimates ORDER BY step").fetchall() == [
        (0, "pythia-tiny@step0"), (1000, "pythia-tiny@step1000"), (2000, "pythia-tiny@step2000")]
    con.close()
    np.save(tmp_path / "mix.npy", tokens.numpy())
    code = cli.main(["sweep", "--checkpoints", str(repo), "--revisions", "step0,step2000", "--data",
                     f"mix={tmp_path / 'mix.npy'}", "--components", "whole", "--store", str(tmp_path / "b.sqlite"),
                     "--chains", "1", "--draws", "2", "--device", "cpu", "--quiet"])
    assert code == 0, capsys.readouterr()
    con = sqlite3.connect(tmp_path / "b.sqlite")
    assert [r[0] for r in con.execute("SELECT step FROM estimates ORDER BY step")] == [0, 2000]
    con.close()
    with pytest.raises(SystemExit, match="--revisions step9: .*revisions found: step0, step1000, step2000"):
        cli.main(["sweep", "--checkpoints", "EleutherAI/pythia-tiny", "--revisions", "step9", "--data",
                  f"mix={tmp_path / 'mix.npy'}", "--store", str(tmp_path / "c.sqlite")])
