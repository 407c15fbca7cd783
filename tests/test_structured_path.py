"""The batched engine's structured path (shared layers below each head) against the reference engine."""
import math
import warnings

import numpy as np
import pytest
import torch

import rllc_fast as r
from rllc_fast.engine.structured import plan
from rllc_fast.losses import NextTokenLoss, next_token_loss
from rllc_fast.engine.head_replicas import HeadReplicas, head_of


def _perturbed(cfg, seed):
    """A ``HookedTransformer`` of ``cfg`` with every weight moved by 0.05 N(0, 1) (TransformerLens zero-initialises
    biases; give every weight a value so all paths matter)."""
    from transformer_lens import HookedTransformer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _neox_like(seed=1, vocab=96):
    """A tiny GPT-NeoX-style TransformerLens model: rotary on part of the head, parallel attention/MLP."""
    from transformer_lens import HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=3, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=16, d_vocab=vocab,
                                  act_fn="gelu", normalization_type="LN", positional_embedding_type="rotary",
                                  rotary_dim=4, rotary_adjacent_pairs=False, parallel_attn_mlp=True, seed=seed)
    return _perturbed(cfg, seed)


def _gpt2_like(seed=2, vocab=80):
    """A tiny GPT-2-style TransformerLens model: learned positions, LayerNorm, sequential attention then MLP."""
    from transformer_lens import HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=3, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=16, d_vocab=vocab,
                                  act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard",
                                  parallel_attn_mlp=False, seed=seed)
    return _perturbed(cfg, seed)


def _llama_like(n_kv=2, seed=4, vocab=72):
    """A tiny Llama-style TransformerLens model with grouped-query attention: 4 query heads in ``n_kv`` key/value
    groups, RMSNorm, rotary on the whole head, sequential blocks with a gated (SwiGLU) MLP."""
    from transformer_lens import HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=3, d_model=32, n_heads=4, d_head=8, d_mlp=48, n_ctx=16, d_vocab=vocab,
                                  act_fn="silu", normalization_type="RMS", final_rms=True, gated_mlp=True,
                                  positional_embedding_type="rotary", rotary_dim=8, n_key_value_heads=n_kv, seed=seed)
    return _perturbed(cfg, seed)


@pytest.fixture(scope="module")
def small_tl():
    model = r.models.attn_only(n_layers=2, d_model=64, n_heads=4, d_head=16, n_ctx=32, d_vocab=128, seed=3)
    tokens = torch.randint(0, 128, (64, 32), generator=torch.Generator().manual_seed(0))
    return model, tokens


@pytest.fixture(scope="module")
def neox():
    model = _neox_like()
    tokens = torch.randint(0, 96, (48, 16), generator=torch.Generator().manual_seed(1))
    return model, tokens


def _assert_same_chains(a, b, rtol=1e-5):
    assert a.components == b.components
    np.testing.assert_allclose(a.loss_trace, b.loss_trace, rtol=rtol, atol=1e-6)
    for name in a.components:
        np.testing.assert_allclose(a[name].distance_trace, b[name].distance_trace, rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(a[name].diverged_at, b[name].diverged_at)


@pytest.mark.parametrize("attention", ["sdpa", "materialized"])
def test_replica_logits_at_w_star_and_perturbed_match_the_model(neox, attention):
    model, tokens = neox
    hr = HeadReplicas(model, attention=attention)
    params = dict(model.named_parameters())
    comps = r.heads(model)
    batch = tokens[:3]
    for layer in range(3):
        names = [f"{layer}:{h}" for h in range(4)]
        rows = torch.stack([torch.cat([s.view(params[s.param]).reshape(-1) for s in comps[n].slices]) for n in names])
        rows = rows.detach() + 0.1 * torch.randn(rows.shape, generator=torch.Generator().manual_seed(layer))
        got = hr.replica_logits(hr.shared(batch, [layer]), layer, torch.arange(4), rows)
        for h, n in enumerate(names):  # write the row into a copy of the model and run it whole
            expect = _logits_with_row(model, comps[n], rows[h], batch)
            torch.testing.assert_close(got[h], expect, rtol=1e-4, atol=1e-5)


def _logits_with_row(model, comp, row, tokens):
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in comp.param_names}
    with torch.no_grad():
        off = 0
        for s in comp.slices:
            v = s.view(params[s.param])
            v.copy_(row[off: off + v.numel()].view_as(v))
            off += v.numel()
        out = model(tokens)
        for n, t in saved.items():
            params[n].copy_(t)
    return out


def test_plan_routes_heads_to_the_structured_path(small_tl):
    model, _ = small_tl
    comps = {**r.heads(model), "L1": r.layer(model, 1)}
    heads, rest, _ = plan(model, comps, next_token_loss)
    assert heads == {f"{l}:{h}": (l, h, "head") for l in range(2) for h in range(4)} and rest == ["L1"]
    _, rest, why = plan(model, comps, lambda m, b: next_token_loss(m, b))
    assert len(rest) == 9 and "custom loss_fn" in why
    assert head_of(model, r.from_params(model, ["blocks.0.attn.W_Q"])) is None


def _rows(model, comps):
    params = dict(model.named_parameters())
    return torch.stack([torch.cat([s.view(params[s.param]).reshape(-1) for s in c.slices]) for c in comps]).detach()


@pytest.mark.parametrize("attention", ["sdpa", "materialized"])
@pytest.mark.parametrize("n_kv", [1, 2])
def test_grouped_query_replicas_match_the_model_with_the_row_written(attention, n_kv):
    """Under grouped-query attention, query-head rows (``W_Q, b_Q, W_O``; the group's keys and values at w*) and
    group rows (``_W_K, _W_V, _b_K, _b_V`` then the group's ``W_Q, b_Q, W_O``), perturbed, give the logits of
    the whole model with that row written in: the row layouts are the components' slice orders."""
    model = _llama_like(n_kv)
    hr = HeadReplicas(model, attention=attention)
    assert hr.kinds == ("query", "group") and hr.numel == r.head(model, 0, 0).numel
    batch = torch.randint(0, 72, (3, 16), generator=torch.Generator().manual_seed(5))
    for layer in range(3):
        shared = hr.shared(batch, [layer])
        for kind, comps in (("query", [r.head(model, layer, h) for h in range(4)]),
                            ("group", [r.group(model, layer, g) for g in range(n_kv)])):
            units = [head_of(model, c) for c in comps]
            assert [u.kind for u in units] == [kind] * len(comps) and {u.layer for u in units} == {layer}
            assert hr.numel_of(kind) == comps[0].numel
            rows = _rows(model, comps)
            rows = rows + 0.1 * torch.randn(rows.shape, generator=torch.Generator().manual_seed(layer))
            got = hr.replica_logits(shared, layer, torch.tensor([u.index for u in units]), rows, kind=kind)
            for i, comp in enumerate(comps):
                torch.testing.assert_close(got[i], _logits_with_row(model, comp, rows[i], batch), rtol=1e-4, atol=1e-5)


def test_plan_routes_query_heads_and_groups_to_the_structured_path():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    model = _llama_like(2)
    comps = {**r.heads(model), **r.groups(model), "L1": r.layer(model, 1),
             "0:q01": r.from_params(model, [("blocks.0.attn.W_Q", slice(0, 2)), ("blocks.0.attn.W_O", slice(0, 2))]),
             "0:kv0": r.from_params(model, [("blocks.0.attn._W_K", 0), ("blocks.0.attn._W_V", 0)])}
    units, rest, why = plan(model, comps, next_token_loss)
    assert units == {**{f"{l}:{h}": (l, h, "query") for l in range(3) for h in range(4)},
                     **{f"{l}:g{g}": (l, g, "group") for l in range(3) for g in range(2)}}
    assert rest == ["L1", "0:q01", "0:kv0"] and why is None
    with warnings.catch_warnings():  # q/k norms (Qwen3, Gemma 3): named, and everything on the generic path
        warnings.simplefilter("ignore")
        normed = HookedTransformer(HookedTransformerConfig(**{**model.cfg.to_dict(), "use_qk_norm": True}))
    units, rest, why = plan(normed, r.heads(normed), next_token_loss)
    assert units == {} and len(rest) == 12 and "q/k normalisation" in why
    assert r.head(model, 1, 3).numel == 2 * 32 * 8 + 8 and r.group(model, 1, 1).numel == 2 * 32 * 8 + 2 * 8 + 2 * (2 * 32 * 8 + 8)


def test_structured_path_follows_the_reference_chains_grouped_query():
    """Query heads and key/value groups of a Llama-style GQA model (with a layer on the generic path alongside):
    the batched engine's chains are the reference engine's, and the structured path took the heads and groups."""
    model = _llama_like(2)
    tokens = torch.randint(0, 72, (24, 16), generator=torch.Generator().manual_seed(6))
    comps = {n: c for n, c in {**r.heads(model), **r.groups(model)}.items() if n in ("0:1", "1:2", "2:3", "0:g1", "2:g0")}
    comps["L1"] = r.layer(model, 1)
    assert set(plan(model, comps, next_token_loss)[0]) == set(comps) - {"L1"}
    cfg = r.SGLDConfig(num_chains=2, num_draws=8, batch_size=6, seed=3, step_size=3e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = r.estimate_llc(model, tokens, cfg, components=comps, engine="reference")
        bat = r.estimate_llc(model, tokens, cfg, components=comps, engine="batched")
    _assert_same_chains(bat, ref)
    assert np.ptp(bat.loss_trace, axis=-1).min() > 0  # the chains moved


@pytest.mark.parametrize("sampler", ["sgld", "rmsprop"])
def test_structured_path_follows_the_reference_chains_attn_only(small_tl, sampler):
    model, tokens = small_tl
    cfg = r.SGLDConfig(num_chains=2, num_draws=12, batch_size=8, seed=4, sampler=sampler)
    comps = {**r.heads(model), "L0": r.layer(model, 0)}  # heads structured, the layer by the loop
    ref = r.estimate_llc(model, tokens, cfg, components=comps, engine="reference")
    bat = r.estimate_llc(model, tokens, cfg, components=comps, engine="batched")
    _assert_same_chains(bat, ref)


def test_structured_path_follows_the_reference_chains_neox(neox):
    model, tokens = neox
    cfg = r.SGLDConfig(num_chains=2, num_draws=10, batch_size=6, seed=2, step_size=3e-3)
    ref = r.estimate_llc(model, tokens, cfg, components=r.heads(model), engine="reference")
    bat = r.estimate_llc(model, tokens, cfg, components=r.heads(model), engine="batched")
    _assert_same_chains(bat, ref)
    assert np.ptp(bat.loss_trace, axis=-1).min() > 0  # the chains moved


def test_structured_path_follows_the_reference_chains_gpt2_sequential_mlp():
    """Sequential (GPT-2-style) blocks: a replica's own layer runs its MLP after the attention. Catches a
    structured path that skips that MLP (the other tests' models are attention-only or parallel)."""
    model = _gpt2_like()
    tokens = torch.randint(0, 80, (24, 16), generator=torch.Generator().manual_seed(2))
    batch = tokens[:2]
    hr = HeadReplicas(model)
    comps = r.heads(model)
    params = dict(model.named_parameters())
    for layer in range(3):  # logits at w* equal the model's, for every layer's replicas
        rows = torch.stack([torch.cat([s.view(params[s.param]).reshape(-1) for s in comps[f"{layer}:{h}"].slices])
                            for h in range(4)]).detach()
        got = hr.replica_logits(hr.shared(batch, [layer]), layer, torch.arange(4), rows)
        with torch.no_grad():
            torch.testing.assert_close(got, model(batch)[None].expand_as(got), rtol=1e-4, atol=1e-5)
    cfg = r.SGLDConfig(num_chains=2, num_draws=6, batch_size=6, seed=3, step_size=3e-3)
    picked = {n: comps[n] for n in ("0:1", "1:2", "2:0")}
    ref = r.estimate_llc(model, tokens, cfg, components=picked, engine="reference")
    bat = r.estimate_llc(model, tokens, cfg, components=picked, engine="batched")
    assert set(plan(model, picked, next_token_loss)[0]) == set(picked)
    _assert_same_chains(bat, ref)


def test_structured_path_with_kl_to_a_reference_model(small_tl):
    model, tokens = small_tl
    other = r.models.attn_only(n_layers=2, d_model=64, n_heads=4, d_head=16, n_ctx=32, d_vocab=128, seed=9)
    data = r.ModelDistribution(other, tokens)
    cfg = r.SGLDConfig(num_chains=1, num_draws=8, batch_size=8, seed=1)
    comps = [r.head(model, 0, 1), r.head(model, 1, 3)]
    _assert_same_chains(r.estimate_llc(model, data, cfg, components=comps, engine="batched"),
                        r.estimate_llc(model, data, cfg, components=comps, engine="reference"))


def test_memory_chunks_do_not_change_the_chains(small_tl):
    model, tokens = small_tl
    cfg = r.SGLDConfig(num_chains=3, num_draws=6, batch_size=8, seed=5)
    one_at_a_time = r.estimate_llc(model, tokens, cfg, components=r.heads(model), max_memory=1)
    all_at_once = r.estimate_llc(model, tokens, cfg, components=r.heads(model), max_memory="20GB")
    _assert_same_chains(one_at_a_time, all_at_once, rtol=1e-6)


def test_nan_replica_in_a_chunk_is_flagged_and_leaves_its_chunk_mates_alone(small_tl):
    model, tokens = small_tl
    cfg = r.SGLDConfig(num_chains=2, num_draws=8, batch_size=8, seed=6)
    comps = [r.head(model, 1, h) for h in range(4)]  # 8 replicas of layer 1, one chunk

    class Plain(NextTokenLoss):  # a subclass takes the unfactored loss path, as Poisoned does: bit-comparable runs
        pass

    class Poisoned(Plain):
        step = 0

        def feature_losses(self, x, W_U, b_U, tokens, prepared):
            losses = super().feature_losses(x, W_U, b_U, tokens, prepared)
            if not torch.is_grad_enabled():  # l(w*) (no gradient) is not a sampling step
                return losses
            Poisoned.step += 1
            if Poisoned.step == 4:  # step 3: replica 2 = head 1:1, chain 0
                losses = losses.clone()
                losses[2] = float("nan")
            return losses

    clean = r.estimate_llc(model, tokens, cfg, components=comps, loss_fn=Plain())
    with pytest.warns(RuntimeWarning, match="diverged"):
        bad = r.estimate_llc(model, tokens, cfg, components=comps, loss_fn=Poisoned())
    assert bad["1:1"].diverged_at.tolist() == [3, -1]
    assert np.isnan(bad["1:1"].loss_trace[0, 3:]).all()
    np.testing.assert_array_equal(bad["1:1"].loss_trace[1], clean["1:1"].loss_trace[1])
    for name in ("1:0", "1:2", "1:3"):
        np.testing.assert_array_equal(bad[name].loss_trace, clean[name].loss_trace)


def test_thinning_keeps_every_kth_step(small_tl):
    model, tokens = small_tl
    comps = [r.head(model, 0, 0)]
    every = r.estimate_llc(model, tokens, r.SGLDConfig(num_chains=1, num_draws=8, num_burnin=2, batch_size=8),
                           components=comps)
    thinned = r.estimate_llc(model, tokens, r.SGLDConfig(num_chains=1, num_draws=4, num_burnin=2, thinning=2,
                                                         batch_size=8), components=comps)
    np.testing.assert_array_equal(thinned.loss_trace, every.loss_trace[:, :, ::2])
    np.testing.assert_array_equal(thinned["0:0"].init_loss_trace, every["0:0"].init_loss_trace[::2])


@pytest.mark.parametrize("kind", ["tokens", "kl"])
def test_blocked_unembedding_loss_matches_the_plain_loss_and_its_gradient(kind, monkeypatch):
    from rllc_fast.engine import unembed_loss
    from rllc_fast.losses import kl_losses, token_losses

    monkeypatch.setattr(unembed_loss, "BLOCK_ELEMENTS", 7 * 50)  # many ragged row blocks
    g = torch.Generator().manual_seed(0)
    R, N, T, d, V = 3, 2, 6, 8, 50
    x = torch.randn(R, N, T - 1, d, generator=g, dtype=torch.float64).float().requires_grad_(True)
    W, b = torch.randn(d, V, generator=g), torch.randn(V, generator=g)
    tokens = torch.randint(0, V, (N, T), generator=g)
    ref_logp = torch.log_softmax(torch.randn(N, T - 1, V, generator=g), -1)
    weights = torch.tensor([1.0, -2.0, 0.5])
    if kind == "tokens":
        fast = unembed_loss.unembed_token_losses(x, W, b, tokens)
        pad = torch.zeros(R, N, 1, V)  # token_losses ignores the last position's logits
        plain = token_losses(torch.cat([x @ W + b, pad], 2), tokens)
    else:
        fast = unembed_loss.unembed_kl_losses(x, W, b, ref_logp)
        plain = kl_losses(ref_logp, torch.cat([x @ W + b, torch.zeros(R, N, 1, V)], 2))
    torch.testing.assert_close(fast, plain)
    (g_fast,) = torch.autograd.grad((fast * weights).sum(), x)
    (g_plain,) = torch.autograd.grad((plain * weights).sum(), x)
    torch.testing.assert_close(g_fast, g_plain)


def test_step_size_calibration_reports_each_size_and_flags_divergence():
    from toy_models import Linear, gaussian_nll

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 2, generator=g)
    y = x @ torch.tensor([1.0, 2.0]) + torch.randn(200, generator=g)
    model = Linear(torch.tensor([1.0, 2.0]))
    cfg = r.SGLDConfig(nbeta=50.0, localization=1.0, num_chains=3, batch_size=None)
    rows = r.calibrate_step_size(model, (x, y), step_sizes=[1e-3, 10.0], config=cfg, num_draws=30,
                                 loss_fn=gaussian_nll(1.0))
    assert [row["step_size"] for row in rows] == [1e-3, 10.0]
    ok, blown = rows
    assert ok["diverged_chains"] == 0 and math.isfinite(ok["llc_mean"]) and ok["final_distance"] > 0
    assert blown["diverged_chains"] == 3 and math.isnan(blown["llc_mean"])


def test_calibration_reports_the_surviving_component_when_another_loses_every_chain():
    from toy_models import Linear, gaussian_nll

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 2, generator=g)
    y = x @ torch.tensor([1.0, 2.0]) + torch.randn(200, generator=g)
    model = Linear(torch.tensor([1.0, 2.0]))
    a = r.components.make_component(model, "a", [("w", (0,))])
    b = r.components.make_component(model, "b", [("w", (1,))])
    base = gaussian_nll(1.0)

    def poisoned(m, batch):  # NaN as soon as w[0] leaves w*: only component "a" moves it
        loss = base(m, batch)
        return loss * float("nan") if float(m.w[0].detach()) != 1.0 else loss

    cfg = r.SGLDConfig(nbeta=50.0, localization=1.0, num_chains=2, batch_size=None)
    rows = r.calibrate_step_size(model, (x, y), step_sizes=[1e-3], config=cfg, components=[a, b], num_draws=10,
                                 loss_fn=poisoned)
    by_name = {row["component"]: row for row in rows}
    assert by_name["a"]["diverged_chains"] == 2 and math.isnan(by_name["a"]["llc_mean"])
    assert by_name["b"]["diverged_chains"] == 0 and math.isfinite(by_name["b"]["llc_mean"])


def _global_flags():
    return (torch.get_float32_matmul_precision(), torch.is_autocast_enabled("cpu"),
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_default_dtype())


def test_bf16_and_tf32_agree_with_fp32_per_head_and_leave_global_flags_alone(small_tl):
    """bf16 (autocast on CPU) moves each head's estimate by at most 0.5 of its fp32 standard error
    (measured: at most 0.09 at 4 chains x 40 draws); tf32 is fp32 on a CPU (no TF32 products there),
    bit for bit. No global flag is left changed."""
    model, tokens = small_tl
    cfg = r.SGLDConfig(num_chains=2, num_draws=20, batch_size=8, seed=1)
    before = _global_flags()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp32 = r.estimate_llc(model, tokens, cfg, components=r.heads(model))
        tf32 = r.estimate_llc(model, tokens, cfg, components=r.heads(model), matmul_precision="tf32")
        bf16 = r.estimate_llc(model, tokens, cfg, components=r.heads(model), matmul_precision="bf16")
    assert _global_flags() == before
    assert [x.matmul_precision for x in (fp32, tf32, bf16)] == ["fp32", "tf32", "bf16"]  # the result says which
    assert bf16.to_dict()["matmul_precision"] == "bf16"
    np.testing.assert_array_equal(tf32.loss_trace, fp32.loss_trace)
    assert not np.array_equal(bf16.loss_trace, fp32.loss_trace)  # bf16 really ran
    for name in fp32.components:
        a, b = fp32[name], bf16[name]
        assert abs(b.llc_mean - a.llc_mean) <= 0.5 * a.llc_sem, (name, a.llc_mean, b.llc_mean, a.llc_sem)
        assert abs(b.init_loss - a.init_loss) < 1e-2 * abs(a.init_loss)


def test_matmul_precision_is_checked(small_tl):
    model, tokens = small_tl
    with pytest.raises(ValueError, match="matmul_precision must be one of"):
        r.estimate_llc(model, tokens, r.SGLDConfig(num_chains=1, num_draws=2), components=r.heads(model),
                       matmul_precision="fp16")


def test_sdpa_and_materialized_attention_give_the_same_chains(neox, small_tl, monkeypatch):
    """The fused-attention path (own head, shared pass, layers above) against the materialized one."""
    from rllc_fast.engine import head_replicas as tl_heads

    for model, tokens in (neox, small_tl):
        cfg = r.SGLDConfig(num_chains=2, num_draws=6, batch_size=8, seed=2)
        comps = r.heads(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fused = r.estimate_llc(model, tokens, cfg, components=comps)
            monkeypatch.setattr(tl_heads, "DEFAULT_ATTENTION", "materialized")
            plain = r.estimate_llc(model, tokens, cfg, components=comps)
            monkeypatch.setattr(tl_heads, "DEFAULT_ATTENTION", "sdpa")
        assert not np.array_equal(fused.loss_trace, plain.loss_trace)  # two different evaluation orders ran
        _assert_same_chains(fused, plain, rtol=1e-5)


def test_out_of_memory_in_a_chunk_halves_it_and_retries(small_tl, monkeypatch):
    """An injected out-of-memory error for chunks of more than 2 replicas: a warning, the chunk halved
    (and halved again), and the same chains as a run that never ran out."""
    from rllc_fast.engine import head_replicas as tl_heads

    model, tokens = small_tl
    cfg = r.SGLDConfig(num_chains=2, num_draws=4, batch_size=8, seed=7)
    comps = r.heads(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clean = r.estimate_llc(model, tokens, cfg, components=comps, max_memory="20GB")
    real = tl_heads.HeadReplicas._own_heads  # the first per-replica work of either path (plain and factored)
    sizes = []

    def tight(self, shared, layer, heads, rows, drop_last, kind):
        sizes.append(rows.shape[0])
        if rows.shape[0] > 2:
            raise torch.OutOfMemoryError("injected")
        return real(self, shared, layer, heads, rows, drop_last, kind)

    monkeypatch.setattr(tl_heads.HeadReplicas, "_own_heads", tight)
    with pytest.warns(RuntimeWarning, match="out of device memory in a chunk of 8 replicas of layer 0"):
        halved = r.estimate_llc(model, tokens, cfg, components=comps, max_memory="20GB")
    assert sizes[:4] == [8, 4, 2, 2]  # halved twice
    assert sizes[-3 * 8:] == [2] * 24  # the later 3 steps start from chunks of 2 (8 per step)
    _assert_same_chains(halved, clean, rtol=1e-6)


def test_diverged_replica_is_frozen_on_the_device_and_the_others_are_bit_identical(small_tl, monkeypatch):
    """Divergence found on the device (no host read in the step): the NaN replica's weights stop changing
    from its divergence step on, and every other replica's losses and distances are bit-identical to a
    run without the NaN."""
    from rllc_fast.engine import batched

    model, tokens = small_tl
    cfg = r.SGLDConfig(num_chains=2, num_draws=8, batch_size=8, seed=6)
    comps = [r.head(model, 0, h) for h in range(2)] + [r.head(model, 1, h) for h in range(2)]
    rows = []
    real_step = batched.sgld_step

    def recording(w, *args, **kwargs):
        out = real_step(w, *args, **kwargs)
        rows.append(w.clone())
        return out

    class Plain(NextTokenLoss):  # a subclass takes the unfactored loss path, as Poisoned does: bit-comparable runs
        pass

    class Poisoned(Plain):
        calls = 0

        def feature_losses(self, x, W_U, b_U, tokens, prepared, block_bytes=None):
            losses = super().feature_losses(x, W_U, b_U, tokens, prepared, block_bytes)
            if not torch.is_grad_enabled():  # l(w*) (no gradient) is not a sampling step
                return losses
            Poisoned.calls += 1
            if Poisoned.calls == 2 * 3 + 1:  # step 3, the layer-0 chunk: its replica 1 = head 0:0, chain 1
                losses = losses.clone()
                losses[1] = float("inf")
            return losses

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clean = r.estimate_llc(model, tokens, cfg, components=comps, loss_fn=Plain())
    monkeypatch.setattr(batched, "sgld_step", recording)
    with pytest.warns(RuntimeWarning, match="diverged"):
        bad = r.estimate_llc(model, tokens, cfg, components=comps, loss_fn=Poisoned())
    assert bad["0:0"].diverged_at.tolist() == [-1, 3]
    assert np.isnan(bad["0:0"].loss_trace[1, 3:]).all() and np.isfinite(bad["0:0"].loss_trace[1, :3]).all()
    w = torch.stack(rows)                      # [steps, R, n] after each update
    assert not torch.equal(w[1, 1], w[2, 1])   # moving before step 3
    for t in range(3, 8):                      # frozen from step 3's update on
        assert torch.equal(w[t, 1], w[2, 1])
    np.testing.assert_array_equal(bad["0:0"].loss_trace[0], clean["0:0"].loss_trace[0])
    np.testing.assert_array_equal(bad["0:0"].distance_trace[0], clean["0:0"].distance_trace[0])
    for name in ("0:1", "1:0", "1:1"):
        np.testing.assert_array_equal(bad[name].loss_trace, clean[name].loss_trace)
        np.testing.assert_array_equal(bad[name].distance_trace, clean[name].distance_trace)


def test_observables_of_query_heads_and_groups_equal_the_reference_engines():
    """Grouped-query attention: probe losses of query-head and group replicas from the structured path's
    shared w* passes equal the reference engine's (the model holding each replica's weights)."""
    model = _llama_like()
    g = torch.Generator().manual_seed(6)
    tokens = torch.randint(0, 72, (24, 16), generator=g)
    probes = {"p": torch.randint(0, 72, (3, 16), generator=g), "q": torch.randint(0, 72, (2, 9), generator=g)}
    comps = {"1:0": r.head(model, 1, 0), "0:g1": r.group(model, 0, 1), "2:g0": r.group(model, 2, 0)}
    heads, rest, _ = plan(model, comps, next_token_loss)
    assert set(heads) == set(comps) and not rest
    cfg = r.SGLDConfig(num_chains=2, num_draws=4, batch_size=8, seed=2)
    bat = r.estimate_llc(model, tokens, cfg, components=comps, observables=probes).observations
    ref = r.estimate_llc(model, tokens, cfg, components=comps, engine="reference", observables=probes).observations
    for name in probes:
        np.testing.assert_allclose(bat[name], ref[name], rtol=1e-4, atol=2e-5)
        assert not np.allclose(bat[name][:, :, 3], bat.at_optimum[name])  # the replicas moved
