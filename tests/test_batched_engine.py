"""The batched engine against the reference engine (the plain one-chain loop)."""
import math

import numpy as np
import pytest
import torch

import rllc_fast as r
from toy_models import Linear, gaussian_nll


@pytest.fixture(scope="module")
def small_tl():
    # the equivalence model: 2 layers, 4 heads, d_model 64, context 32
    model = r.models.attn_only(n_layers=2, d_model=64, n_heads=4, d_head=16, n_ctx=32, d_vocab=128, seed=3)
    tokens = torch.randint(0, 128, (64, 32), generator=torch.Generator().manual_seed(0))
    return model, tokens


def test_same_noise_streams_give_the_same_chains(small_tl):
    model, tokens = small_tl
    cfg = r.SGLDConfig(num_chains=2, num_draws=15, batch_size=8, seed=4)
    ref = r.estimate_llc(model, tokens, cfg, components=r.heads(model), engine="reference")
    bat = r.estimate_llc(model, tokens, cfg, components=r.heads(model), engine="batched")
    assert bat.engine == "batched" and bat.components == ref.components
    np.testing.assert_allclose(bat.loss_trace, ref.loss_trace, rtol=1e-5, atol=1e-6)
    # l(w*) on each kept step's minibatch, computed here (both engines share loss_at_optimum, so comparing
    # their init_loss_trace with each other could not fail)
    schedule = r.data.BatchSchedule(tokens, cfg.batch_size, cfg.num_steps, cfg.seed)
    with torch.no_grad():
        expected = [float(r.losses.next_token_loss(model, schedule[t])) for t in cfg.kept_steps]
    for name in ref.components:
        np.testing.assert_allclose(bat[name].distance_trace, ref[name].distance_trace, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(bat[name].init_loss_trace, expected, rtol=1e-6)
        np.testing.assert_allclose(ref[name].init_loss_trace, expected, rtol=1e-6)


def test_batched_estimates_agree_with_reference_within_standard_error(small_tl):
    """Different seeds (independent chains): the per-head means agree within combined errors."""
    model, tokens = small_tl
    ref = r.estimate_llc(model, tokens, r.SGLDConfig(num_chains=4, num_draws=40, batch_size=8, seed=1),
                         components=r.heads(model), engine="reference")
    bat = r.estimate_llc(model, tokens, r.SGLDConfig(num_chains=4, num_draws=40, batch_size=8, seed=2),
                         components=r.heads(model), engine="batched")
    for name in ref.components:
        a, b = ref[name], bat[name]
        combined = math.hypot(a.llc_sem, b.llc_sem)
        assert abs(a.llc_mean - b.llc_mean) <= 4 * combined + 1e-3, (name, a.llc_mean, b.llc_mean, combined)


def test_weights_are_restored_and_other_parameters_untouched(small_tl):
    model, tokens = small_tl
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    r.estimate_llc(model, tokens, r.SGLDConfig(num_chains=1, num_draws=3, batch_size=8),
                   components=[r.heads(model)["1:2"]], engine="batched")
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]) and p.requires_grad


def test_diverging_replica_is_flagged_and_does_not_touch_the_others():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 2, generator=g)
    y = x @ torch.tensor([1.0, 2.0]) + torch.randn(200, generator=g)
    model = Linear(torch.tensor([1.0, 2.0]))
    cfg = r.SGLDConfig(step_size=1e-4, nbeta=50.0, num_chains=4, num_draws=10, batch_size=None)
    a = r.components.make_component(model, "a", [("w", (0,))])
    b = r.components.make_component(model, "b", [("w", (1,))])
    base = gaussian_nll(1.0)

    def poisoned(m, batch):  # NaN once w[0] has wandered 0.03 from w*: only component "a" moves it
        loss = base(m, batch)
        return loss * float("nan") if abs(float(m.w[0]) - 1.0) > 0.03 else loss

    clean_b = r.estimate_llc(model, (x, y), cfg, components=[b], loss_fn=base, engine="batched")["b"]
    with pytest.warns(RuntimeWarning, match="diverged"):
        res = r.estimate_llc(model, (x, y), cfg, components=[a, b], loss_fn=poisoned, engine="batched")
    assert res["a"].diverged_at.tolist() == [4, -1, 3, -1]  # fixed by the seed on CPU
    assert np.isfinite(res["a"].llc_per_chain[[1, 3]]).all() and np.isnan(res["a"].llc_per_chain[[0, 2]]).all()
    assert res["b"].num_diverged == 0
    np.testing.assert_array_equal(res["b"].loss_trace, clean_b.loss_trace)  # untouched by "a"'s NaNs
    with pytest.warns(RuntimeWarning, match="diverged"):
        ref = r.estimate_llc(model, (x, y), cfg, components=[a, b], loss_fn=poisoned, engine="reference")
    assert ref["a"].diverged_at.tolist() == [4, -1, 3, -1]  # same chains, same steps
