"""Model construction and loading: GPT-NeoX directories against transformers, the attention-only model
against TransformerLens, checkpoint series (ordering, corrupt and mismatched files)."""
import warnings

import pytest
import torch

from rllc_fast.models import (
    PAPER_CONFIG,
    CheckpointError,
    attn_only,
    checkpoint_series,
    load_gpt_neox,
    pythia_70m_config,
    save_checkpoint,
)


def _hf_neox(tmp_path, name, seed=0, **config):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(**config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorm weights and biases, so a mix-up of them shows
        for pname, p in model.named_parameters():
            if "bias" in pname or "norm" in pname:
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path / name
    model.save_pretrained(path)
    return model, path


def _max_logit_gap(hf_model, tl_model, vocab, length=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (2, length), generator=g)
    with torch.no_grad():
        return (hf_model(tokens).logits - tl_model(tokens)).abs().max().item()


@pytest.mark.parametrize("parallel", [True, False])
def test_tiny_gpt_neox_directory_matches_transformers(tmp_path, parallel):
    hf, path = _hf_neox(tmp_path, "tiny", vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, use_parallel_residual=parallel,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})
    tl = load_gpt_neox(path)
    assert tl.cfg.parallel_attn_mlp is parallel and tl.cfg.rotary_dim == 4
    assert _max_logit_gap(hf, tl, 97) < 1e-4


@pytest.mark.slow
def test_pythia_70m_config_directory_matches_transformers(tmp_path):
    # Pythia-70m's exact shapes (random weights: nothing is downloaded).
    hf, path = _hf_neox(tmp_path, "step1000", vocab_size=50304, hidden_size=512, num_hidden_layers=6,
                        num_attention_heads=8, intermediate_size=2048, max_position_embeddings=2048,
                        use_parallel_residual=True, tie_word_embeddings=False,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})
    assert sum(p.numel() for p in hf.parameters()) == 70_426_624
    tl = load_gpt_neox(path)
    ref = pythia_70m_config()
    for field in ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx", "rotary_dim",
                  "parallel_attn_mlp", "positional_embedding_type"):
        assert getattr(tl.cfg, field) == getattr(ref, field), field
    assert _max_logit_gap(hf, tl, 50304, length=32) < 1e-4


def test_hub_name_without_cache_says_to_pass_a_local_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="local directory"):
        load_gpt_neox("EleutherAI/pythia-70m-deduped")


def test_missing_or_empty_gpt_neox_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_gpt_neox(tmp_path / "nope" / "step1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_gpt_neox(tmp_path / "empty")


def test_attn_only_is_transformer_lens_forward():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    small = dict(d_model=64, n_heads=4, d_head=16, n_ctx=32, d_vocab=100)
    ours = attn_only(seed=3, **small)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = HookedTransformer(HookedTransformerConfig(**{**PAPER_CONFIG, **small}))
    theirs.load_state_dict(ours.state_dict())
    tokens = torch.randint(0, 100, (3, 32))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(tokens), rtol=0, atol=0)
    paper = attn_only()
    assert sum(p.numel() for p in paper.parameters()) == 3_355_016


def _small(seed=0, **kw):
    return attn_only(seed=seed, **{**dict(n_layers=1, d_model=16, n_heads=2, d_head=8, n_ctx=8, d_vocab=30), **kw})


def test_checkpoint_series_orders_by_step_and_round_trips(tmp_path):
    models = {step: _small(seed=step) for step in (0, 7, 30, 200)}
    for step, m in models.items():  # names that sort wrongly as text; step stored in the file
        save_checkpoint(m, tmp_path / f"ckpt-{step}.pt", step)
    torch.save(_small(seed=5).state_dict(), tmp_path / "plain_step5.pt")  # a plain state dict: step from the name
    series = checkpoint_series(tmp_path)
    assert [c.step for c in series] == [0, 5, 7, 30, 200]
    assert [c.kind for c in series] == ["rllc", "state_dict", "rllc", "rllc", "rllc"]
    tokens = torch.randint(0, 30, (2, 8))
    for c in series:
        if c.kind == "rllc":
            loaded = c.load()
            torch.testing.assert_close(loaded(tokens), models[c.step](tokens), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="plain_step5.pt.*like="):
        series[1].load()
    torch.testing.assert_close(series[1].load(like=_small())(tokens), _small(seed=5)(tokens), rtol=0, atol=0)


def test_hf_directories_in_a_series(tmp_path):
    hf = {}
    for step in (1000, 143000, 512):
        hf[step], _ = _hf_neox(tmp_path, f"step{step}", seed=step, vocab_size=50, hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=64, max_position_embeddings=16)
    series = checkpoint_series(tmp_path)
    assert [(c.name, c.step, c.kind) for c in series] == [
        ("step512", 512, "hf"), ("step1000", 1000, "hf"), ("step143000", 143000, "hf")]
    for c in series:
        assert _max_logit_gap(hf[c.step], c.load(), 50, length=16) < 1e-4


def test_corrupt_and_mismatched_checkpoints_name_the_file(tmp_path):
    save_checkpoint(_small(), tmp_path / "step1.pt", 1)
    save_checkpoint(_small(d_model=32, d_head=16), tmp_path / "step2.pt", 2)
    (tmp_path / "step3.pt").write_bytes(b"not a checkpoint")
    good, other, corrupt = checkpoint_series(tmp_path)
    like = good.load()
    with pytest.raises(CheckpointError, match=r"step2\.pt: a different architecture.*d_model 32 \(expected 16\)"):
        other.load(like=like)
    with pytest.raises(CheckpointError, match=r"step3\.pt: not a readable torch checkpoint"):
        corrupt.load(like=like)
    torch.save(_small(d_vocab=31).state_dict(), tmp_path / "step4.pt")
    with pytest.raises(CheckpointError, match=r"step4\.pt: a different architecture.*shape mismatch"):
        checkpoint_series(tmp_path)[-1].load(like=like)


def test_missing_or_unnamed_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint_series(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        checkpoint_series(tmp_path)
    torch.save(_small().state_dict(), tmp_path / "final.pt")
    with pytest.raises(CheckpointError, match="final.pt: cannot tell its training step"):
        checkpoint_series(tmp_path)
