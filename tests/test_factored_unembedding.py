"""The last layer's replicas in factored form (``HeadReplicas.final_logit_parts`` and
``unembed_loss.low_rank_token_losses``): the same losses, gradients and per-position losses as the plain path
(final features, then the unembedding), for every final norm, parallel blocks and grouped-query kinds; where the
engine takes it and where not. The engine-level chains of the last layer's heads against the reference engine
are in tests/test_batched_engine.py and tests/test_structured_path.py (attention-only and GPT-NeoX-like models),
which now run through this path."""
import warnings

import pytest
import torch

import rllc_fast as r
from rllc_fast.engine import structured, unembed_loss
from rllc_fast.engine.common import pack
from rllc_fast.engine.head_replicas import HeadReplicas, head_of
from rllc_fast.engine.unembed_loss import (low_rank_allowed, low_rank_position_losses, low_rank_token_losses,
                                           unembed_position_losses, unembed_token_losses)
from rllc_fast.losses import NextTokenLoss


def _model(**overrides):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, n_ctx=16, d_vocab=50, act_fn="gelu", attn_only=True,
               normalization_type="LN", seed=0)
    cfg.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(HookedTransformerConfig(**cfg))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # every weight non-trivial (TransformerLens zero-initialises biases)
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


MODELS = {
    "LN": {}, "LNPre": dict(normalization_type="LNPre"), "RMS": dict(normalization_type="RMS"),
    "RMSPre": dict(normalization_type="RMSPre"), "no final norm": dict(normalization_type=None),
    "parallel attention/MLP, rotary": dict(attn_only=False, d_mlp=64, parallel_attn_mlp=True,
                                           positional_embedding_type="rotary", rotary_dim=4),
    "grouped-query": dict(n_key_value_heads=2, normalization_type="RMS"),
}


def _replica_rows(model, comps, seed=2):
    params = dict(model.named_parameters())
    rows = torch.stack([pack(c, params) for c in comps]).detach()
    return rows + 0.05 * torch.randn(rows.shape, generator=torch.Generator().manual_seed(seed))


def _cases(model):
    """``[(kind, unit indices [R], components)]`` of the last layer: heads, or query heads and key/value groups."""
    last = model.cfg.n_layers - 1
    heads = [r.head(model, last, h) for h in (0, 2, 3)]
    cases = [(head_of(model, heads[0]).kind, torch.tensor([0, 2, 3]), heads)]
    if model.cfg.n_key_value_heads is not None:
        groups = [r.group(model, last, g) for g in (1, 0)]
        cases.append(("group", torch.tensor([1, 0]), groups))
    return cases


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("block_bytes", [None, 4096], ids=["one block", "many blocks"])
def test_factored_losses_and_gradients_equal_the_plain_paths(name, block_bytes):
    model = _model(**MODELS[name])
    hr = HeadReplicas(model)
    last = model.cfg.n_layers - 1
    assert hr.low_rank_reason(last) is None
    tokens = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(3))
    shared = hr.shared(tokens, [last])
    W_U, b_U = model.unembed.W_U, model.unembed.b_U
    for kind, units, comps in _cases(model):
        rows = _replica_rows(model, comps)
        weights = torch.tensor([1.0, -2.0, 0.5][: len(comps)])  # a weighted sum: each replica's own gradient scale
        plain, factored = rows.clone().requires_grad_(True), rows.clone().requires_grad_(True)
        x = hr.replica_features(shared, last, units, plain, kind=kind)
        expected = unembed_token_losses(x, W_U, b_U, tokens, block_bytes)
        (expected * weights).sum().backward()
        parts = hr.final_logit_parts(shared, last, units, factored, kind=kind)
        got = low_rank_token_losses(parts, tokens, block_bytes)
        (got * weights).sum().backward()
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(factored.grad, plain.grad, rtol=1e-4, atol=1e-5 * float(plain.grad.abs().max()))
        assert float(plain.grad.abs().max()) > 1e-3  # gradients that matter
        torch.testing.assert_close(low_rank_position_losses(parts, tokens, block_bytes),
                                   unembed_position_losses(x.detach(), W_U, b_U, tokens, block_bytes),
                                   rtol=1e-5, atol=2e-5)


@pytest.fixture()
def factored_on_cpu(monkeypatch):
    """The engine takes the factored form on CUDA only (``FACTORED_DEVICES``: slower on a CPU); here, on the CPU too."""
    monkeypatch.setattr(unembed_loss, "FACTORED_DEVICES", ("cuda", "meta", "cpu"))


def test_where_the_factored_form_does_not_apply(factored_on_cpu):
    attn_only = HeadReplicas(_model())
    assert attn_only.low_rank_reason(0) == "not the last layer"
    sequential = HeadReplicas(_model(attn_only=False, d_mlp=64, parallel_attn_mlp=False))
    assert "MLP reads its attention output" in sequential.low_rank_reason(1)
    hooked = _model()
    hooked.ln_final.hook_scale.add_hook(lambda t, hook: t)
    assert HeadReplicas(hooked).low_rank_reason(1) == "final norm LayerNorm"
    with torch.autocast("cpu", dtype=torch.bfloat16):  # reduced-precision products: the plain path, as l(w*)
        assert not low_rank_allowed("cpu")
    assert low_rank_allowed("cpu")


def test_the_engine_takes_it_for_the_token_loss_of_the_last_layer_only(monkeypatch, factored_on_cpu):
    model = _model()
    tokens = torch.randint(0, 50, (32, 16), generator=torch.Generator().manual_seed(4))
    calls = []
    real = structured.low_rank_token_losses
    monkeypatch.setattr(structured, "low_rank_token_losses", lambda parts, *a, **k: calls.append(parts.z.shape[0])
                        or real(parts, *a, **k))
    cfg = r.SGLDConfig(num_chains=2, num_draws=3, batch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r.estimate_llc(model, tokens, cfg, components=r.heads(model))
        assert calls == [8] * cfg.num_steps  # the 4 last-layer heads x 2 chains, each step; layer 0 the plain way
        calls.clear()

        class Subclass(NextTokenLoss):  # may change feature_losses: the plain path
            pass

        r.estimate_llc(model, tokens, cfg, components=r.heads(model), loss_fn=Subclass())
        r.estimate_llc(model, tokens, cfg, components=r.heads(model), matmul_precision="bf16")
        ref = r.models.attn_only(n_layers=2, d_model=32, n_heads=4, d_head=8, n_ctx=16, d_vocab=50, seed=9)
        r.estimate_llc(model, r.data.ModelDistribution(ref, tokens), cfg, components=r.heads(model))
    assert calls == []


def test_not_on_a_cpu_by_default():
    assert "cpu" not in unembed_loss.FACTORED_DEVICES and "cuda" in unembed_loss.FACTORED_DEVICES
    assert not low_rank_allowed("cpu")


@pytest.mark.parametrize("observed", [False, True], ids=["sampling", "with probe sets"])
def test_factored_chains_and_probe_losses_equal_the_reference_engines(factored_on_cpu, observed):
    """Engine level, with the factored form on: the last layer's heads (and layer 0's, the plain way, in the same
    run) follow the reference engine's chains, and record its probe losses."""
    model = _model(attn_only=False, d_mlp=64, parallel_attn_mlp=True, positional_embedding_type="rotary", rotary_dim=4)
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 50, (32, 16), generator=g)
    probes = {"p": torch.randint(0, 50, (4, 16), generator=g)} if observed else None
    cfg = r.SGLDConfig(num_chains=2, num_draws=6, batch_size=8, seed=2)
    comps = {k: v for k, v in r.heads(model).items() if k in ("0:1", "1:0", "1:3")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = r.estimate_llc(model, tokens, cfg, components=comps, engine="reference", observables=probes)
        bat = r.estimate_llc(model, tokens, cfg, components=comps, observables=probes)
    torch.testing.assert_close(torch.from_numpy(bat.loss_trace), torch.from_numpy(ref.loss_trace), rtol=1e-5, atol=1e-6)
    if observed:
        torch.testing.assert_close(torch.from_numpy(bat.observations["p"]), torch.from_numpy(ref.observations["p"]),
                                   rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("name", ["no final norm", "RMSPre", "LN"])
def test_cached_foldings_follow_weights_written_to_or_replaced(name):
    """One ``HeadReplicas`` kept across a change of ``W_U`` (in place, or a new parameter object) or of a head's
    ``W_O``: the factored losses follow it (the cached ``W`` and ``-W_O W`` are keyed on each weight's identity,
    storage and write count; with no final norm ``W`` is ``W_U`` itself, so a key on ``W``'s storage alone
    would not see an in-place write)."""
    model = _model(**MODELS[name])
    hr = HeadReplicas(model)
    tokens = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(7))
    units = torch.tensor([0, 2])
    comps = [r.head(model, 1, h) for h in (0, 2)]

    def both():
        shared = hr.shared(tokens, [1])
        rows = _replica_rows(model, comps)
        plain = unembed_token_losses(hr.replica_features(shared, 1, units, rows), model.unembed.W_U,
                                     model.unembed.b_U, tokens)
        return low_rank_token_losses(hr.final_logit_parts(shared, 1, units, rows), tokens), plain

    torch.testing.assert_close(*both(), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        model.unembed.W_U.mul_(1.5)
    torch.testing.assert_close(*both(), rtol=1e-6, atol=1e-6)
    model.unembed.W_U = torch.nn.Parameter(model.unembed.W_U.detach() * 0.5)
    torch.testing.assert_close(*both(), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        model.blocks[1].attn.W_O.add_(0.2)
    torch.testing.assert_close(*both(), rtol=1e-6, atol=1e-6)


def test_a_float64_model_keeps_the_plain_form():
    model = _model().double()
    model.cfg.dtype = torch.float64
    assert HeadReplicas(model).low_rank_reason(1) == "model dtype torch.float64"
