"""Hugging Face checkpoints of every supported family (issue 21, item 2): a tiny random model of each, built
offline from a ``transformers`` config and saved with ``save_pretrained``, loads through ``load_hf`` into a
TransformerLens model whose logits equal ``transformers``' (fp32, CPU, 1e-4), with no network access; a
checkpoint folder of a family is swept; other model types and config features a converter would ignore are
refused by name; per-head and per-group estimates follow the reference engine on every family."""
import sqlite3
import warnings

import numpy as np
import pytest
import torch

import rllc_fast as r
from rllc_fast.engine.structured import plan
from rllc_fast.losses import next_token_loss
from rllc_fast.models import SUPPORTED_MODEL_TYPES, load_hf, select_checkpoints
from rllc_fast.sweep import run_sweep

VOCAB = 61
# initializer_range 0.2: peaked attention, so that a wrong rotary base, window or head layout shows in the logits
_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=32, initializer_range=0.2)


def _configs():
    import transformers as T

    return {
        "gpt_neox": T.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=48, max_position_embeddings=32, initializer_range=0.2,
                                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                     "partial_rotary_factor": 0.5}),
        "gpt2": T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_inner=40, n_positions=32,
                             initializer_range=0.2, scale_attn_by_inverse_layer_idx=True),
        # grouped-query attention; head_dim 16 with d_model 32 (n_heads * d_head != d_model) and Llama 3 rotary
        "llama": T.LlamaConfig(**_DECODER, num_key_value_heads=2, head_dim=16,
                               rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 8}),
        "mistral": T.MistralConfig(**_DECODER, num_key_value_heads=2, sliding_window=5),  # the window binds
        "qwen2": T.Qwen2Config(**_DECODER, num_key_value_heads=1),  # q/k/v biases, one key/value group
        "olmo": T.OlmoConfig(**_DECODER, clip_qkv=0.5),  # the clip binds at this scale
        "gemma": T.GemmaConfig(**_DECODER, num_key_value_heads=2, head_dim=8),
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``{model_type: (transformers model, its save_pretrained folder)}``; norms and biases perturbed so that a
    mix-up of them shows."""
    import transformers as T

    root = tmp_path_factory.mktemp("families")
    out = {}
    with torch.random.fork_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        for model_type, config in _configs().items():
            model = T.AutoModelForCausalLM.from_config(config).eval()
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "norm" in name or "bias" in name or ".ln_" in name:
                        p.add_(0.1 * torch.randn_like(p))
            model.save_pretrained(root / model_type)
            out[model_type] = (model, root / model_type)
    return out


def test_every_supported_family_is_tested():
    assert set(_configs()) == set(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("model_type", sorted(SUPPORTED_MODEL_TYPES))
def test_logits_equal_transformers(saved, model_type, no_network):
    hf, path = saved[model_type]
    assert hf.config.model_type == model_type
    tl = load_hf(path)
    tokens = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = hf(tokens).logits, tl(tokens)
    assert want.std() > 0.5  # logits of size, so that 1e-4 is a tight bound
    assert (got - want).abs().max().item() < 1e-4
    if model_type in ("llama", "mistral", "qwen2", "gemma"):
        assert tl.cfg.n_key_value_heads == hf.config.num_key_value_heads  # grouped-query attention kept


def _same_chains(a, b):
    assert a.components == b.components
    np.testing.assert_allclose(a.loss_trace, b.loss_trace, rtol=1e-5, atol=1e-6)
    for name in a.components:
        np.testing.assert_allclose(a[name].distance_trace, b[name].distance_trace, rtol=1e-4, atol=1e-6)
    assert np.ptp(b.loss_trace, axis=-1).min() > 0  # the chains moved


def _picked(model):
    """Two heads in different layers and, under grouped-query attention, a group."""
    comps = {n: c for n, c in r.heads(model).items() if n in ("0:1", "1:2")}
    return {**comps, "1:g0": r.group(model, 1, 0)} if r.components.kv_groups(model) else comps


@pytest.mark.filterwarnings("ignore::rllc_fast.SamplerWarning")  # 6 draws: R-hat is not the point here
@pytest.mark.parametrize("model_type", sorted(SUPPORTED_MODEL_TYPES))
def test_per_head_estimates_follow_the_reference_engine(saved, model_type):
    """The default (batched) engine on heads and groups of each family gives the reference engine's chains, on
    whichever path ``plan`` routes them: the structured one for every family but mistral and olmo here (their
    models use a binding sliding window and clip_qkv, which only the generic path implements), under grouped-query
    attention (llama, qwen2, gemma) for query heads and key/value groups alike."""
    model = load_hf(saved[model_type][1])
    tokens = torch.randint(0, VOCAB, (16, 12), generator=torch.Generator().manual_seed(3))
    cfg = r.SGLDConfig(num_chains=2, num_draws=6, batch_size=4, seed=5, step_size=1e-3)
    comps = _picked(model)
    structured = plan(model, comps, next_token_loss)[0]
    assert set(structured) == (set() if model_type in ("mistral", "olmo") else set(comps))
    if model_type in ("llama", "qwen2", "gemma"):
        assert {u.kind for u in structured.values()} == {"query", "group"}
    _same_chains(r.estimate_llc(model, tokens, cfg, components=comps),
                 r.estimate_llc(model, tokens, cfg, components=comps, engine="reference"))


@pytest.mark.filterwarnings("ignore::rllc_fast.SamplerWarning")
@pytest.mark.parametrize("model_type", ["llama", "olmo"])
def test_structured_path_on_llama_without_gqa_and_olmo_without_clip(tmp_path, model_type):
    """RMSNorm, gated MLPs, whole-head rotary (Llama), parameter-free LayerNorm (OLMo) on the structured path."""
    import transformers as T

    config = _configs()[model_type]
    config.num_key_value_heads, config.clip_qkv, config.head_dim = 4, None, 8
    with torch.random.fork_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        T.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / model_type)
    model = load_hf(tmp_path / model_type)
    comps = _picked(model)
    assert set(plan(model, comps, next_token_loss)[0]) == set(comps)
    tokens = torch.randint(0, VOCAB, (16, 12), generator=torch.Generator().manual_seed(3))
    cfg = r.SGLDConfig(num_chains=2, num_draws=6, batch_size=4, seed=5, step_size=1e-3)
    _same_chains(r.estimate_llc(model, tokens, cfg, components=comps),
                 r.estimate_llc(model, tokens, cfg, components=comps, engine="reference"))


@pytest.mark.filterwarnings("ignore::rllc_fast.SamplerWarning")
def test_structured_path_on_mistral_without_a_sliding_window(tmp_path):
    """Mistral with grouped-query attention and no sliding window (as Mistral 7B v0.2 on): query heads and a
    key/value group on the structured path, the reference engine's chains."""
    import transformers as T

    config = _configs()["mistral"]
    config.sliding_window = None
    with torch.random.fork_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(2)
        T.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "mistral")
    model = load_hf(tmp_path / "mistral")
    comps = _picked(model)
    assert {n: u.kind for n, u in plan(model, comps, next_token_loss)[0].items()} == {
        "0:1": "query", "1:2": "query", "1:g0": "group"}
    tokens = torch.randint(0, VOCAB, (16, 12), generator=torch.Generator().manual_seed(3))
    cfg = r.SGLDConfig(num_chains=2, num_draws=6, batch_size=4, seed=5, step_size=1e-3)
    _same_chains(r.estimate_llc(model, tokens, cfg, components=comps),
                 r.estimate_llc(model, tokens, cfg, components=comps, engine="reference"))


def test_a_binding_window_is_kept_and_one_that_cannot_bind_is_dropped(saved, no_network):
    _, path = saved["mistral"]
    assert load_hf(path).cfg.attn_types == ["local", "local"]
    plain = load_hf(path, n_ctx=4)  # a window of 5 over at most 4 tokens is plain causal attention
    assert plain.cfg.attn_types is None and plain.cfg.n_ctx == 4


def test_rotary_contexts_are_capped_unless_asked_for(tmp_path):
    from rllc_fast.models.families import ROTARY_N_CTX_CAP, tl_config

    config = _configs()["llama"]
    config.max_position_embeddings = 131072
    assert tl_config(config, tmp_path).n_ctx == ROTARY_N_CTX_CAP
    assert tl_config(config, tmp_path, n_ctx=4096).n_ctx == 4096
    with pytest.raises(ValueError, match="learned positions for exactly 32 tokens"):
        tl_config(_configs()["gpt2"], tmp_path, n_ctx=64)


def test_sweep_of_a_llama_checkpoint_folder(saved, tmp_path, no_network):
    """``Checkpoint.load`` takes any supported family: a folder of two Llama (GQA) checkpoints is swept, with
    query heads and key/value groups."""
    _, path = saved["llama"]
    import shutil

    for step in (0, 10):
        shutil.copytree(path, tmp_path / "run" / f"step{step}")
    series = select_checkpoints(tmp_path / "run")
    assert [c.step for c in series] == [0, 10] and {c.kind for c in series} == {"hf"}
    tokens = torch.randint(0, VOCAB, (8, 12), generator=torch.Generator().manual_seed(2))
    report = run_sweep(tmp_path / "run", {"d": tokens}, r.SGLDConfig(num_chains=1, num_draws=2, batch_size=4),
                       tmp_path / "s.sqlite", ["heads", "groups"], progress=False, log=lambda m: None)
    assert not report.failed
    con = sqlite3.connect(tmp_path / "s.sqlite")
    rows = con.execute("SELECT DISTINCT component FROM estimates").fetchall()
    con.close()
    assert sorted(c for (c,) in rows) == sorted([f"{l}:{h}" for l in range(2) for h in range(4)]
                                                + [f"{l}:g{g}" for l in range(2) for g in range(2)])


def test_other_model_types_are_refused_with_the_supported_list(tmp_path, no_network):
    from transformers import OPTConfig

    OPTConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
              word_embed_proj_dim=16).save_pretrained(tmp_path / "opt")
    with pytest.raises(ValueError, match="model_type 'opt' is not supported; supported model types: gemma, gpt2, "
                                         "gpt_neox, llama, mistral, olmo, qwen2"):
        load_hf(tmp_path / "opt")
    with pytest.raises(ValueError, match="model_type is 'opt', not 'gpt_neox'"):
        r.models.load_gpt_neox(tmp_path / "opt")
    (tmp_path / "mine").mkdir()  # a model type transformers itself does not know: the same message
    (tmp_path / "mine" / "config.json").write_text('{"model_type": "my_lm"}')
    with pytest.raises(ValueError, match="model_type 'my_lm' is not supported; supported model types: gemma"):
        load_hf(tmp_path / "mine")


@pytest.mark.parametrize("model_type, fields, message", [
    ("llama", dict(attention_bias=True), "attention_bias=True is not supported .*drops attention biases"),
    ("llama", dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}), "rope_type 'linear'"),
    ("qwen2", dict(use_sliding_window=True), "use_sliding_window=True"),
    ("olmo", dict(num_key_value_heads=2), "grouped-query attention"),
])
def test_config_features_a_converter_would_ignore_are_refused(tmp_path, model_type, fields, message, no_network):
    config = _configs()[model_type]
    for key, value in fields.items():
        setattr(config, key, value)
    config.save_pretrained(tmp_path / model_type)  # the config alone: refused before any weight is read
    with pytest.raises(ValueError, match=message):
        load_hf(tmp_path / model_type)
