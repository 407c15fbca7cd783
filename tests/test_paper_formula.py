"""Every engine against the paper's SGLD written out by hand, not through the package's helpers.

The engines share ``sgld_delta``, ``replica_generator``, ``draw_index`` and ``loss_at_optimum``; a
bug in one of those moves the engines together, so engine-against-engine tests cannot see it. Here
the chain is computed in the test from the formulas themselves (paper eq. 6, with an analytic
gradient), on data given as a list of distinct minibatches so that step ``t``'s batch is known:

    w <- w - eps/2 * (nbeta * grad l_t(w) + gamma * (w - w*)) + sqrt(eps) * xi_t
    draw d is the loss before the update of step t = burnin + d * thinning, on batch t;
    its partner l(w*) is the loss at w* on the same batch t; distance = ||w_t - w*||.

The noise contract is written out too (docs/method.md): chain ``c`` of component ``name`` draws
``randn(numel)`` per step from a CPU generator seeded with the first 8 bytes (little-endian, 63 bits)
of ``sha256(f"{seed}|{name}|{c}")``.

What this catches: ``l(w*)`` paired with another step's minibatch; the first draw not at ``w*``;
burn-in or thinning off by one; a wrong factor or sign in the update or the localization term; chains
of a component given each other's (or another component's) noise.
"""
import hashlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import rllc_fast as r
from toy_models import Linear

SIGMA = 0.7


def _loss(x, y, w):
    """0.5 * mean((y - x w)^2) / sigma^2: the test's model of the loss (float32 like the model)."""
    return 0.5 * ((y - x @ w) ** 2).mean() / SIGMA**2


def _grad(x, y, w):
    """Its gradient in w, by hand: -x^T (y - x w) / (B sigma^2)."""
    return -(x.T @ (y - x @ w)) / (len(y) * SIGMA**2)


def _loss_fn(model, batch):
    x, y = batch
    return _loss(x, y, model.w)


def _noise_generator(seed: int, name: str, chain: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}|{name}|{chain}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _by_hand(w_star, batches, name, cfg):
    """(losses [chains, draws], l(w*) [draws], distances [chains, draws]) of the paper's sampler."""
    kept = {cfg.num_burnin + d * cfg.thinning: d for d in range(cfg.num_draws)}
    losses = np.zeros((cfg.num_chains, cfg.num_draws))
    dists = np.zeros((cfg.num_chains, cfg.num_draws))
    init = np.zeros(cfg.num_draws)
    for step, d in kept.items():
        x, y = batches[step]
        init[d] = float(_loss(x, y, w_star))
    for c in range(cfg.num_chains):
        gen = _noise_generator(cfg.seed, name, c)
        w = w_star.clone()
        for step in range(cfg.num_burnin + cfg.num_draws * cfg.thinning):
            x, y = batches[step]
            if step in kept:
                losses[c, kept[step]] = float(_loss(x, y, w))
                dists[c, kept[step]] = float(torch.linalg.vector_norm(w - w_star))
            xi = torch.randn(w.numel(), generator=gen)
            drift = cfg.nbeta * _grad(x, y, w) + cfg.localization * (w - w_star)
            w = w - cfg.step_size / 2 * drift + math.sqrt(cfg.step_size) * xi
    return losses, init, dists


@pytest.fixture(scope="module")
def regression():
    g = torch.Generator().manual_seed(11)
    w_star = torch.tensor([0.8, -1.3, 0.4])
    batches = []
    for step in range(40):  # a distinct minibatch for every step (the data is taken in order)
        x = torch.randn(8, 3, generator=g) * (1 + step % 5)
        batches.append((x, x @ w_star + SIGMA * torch.randn(8, generator=g)))
    return w_star, batches


@pytest.mark.parametrize("engine", ["reference", "batched", "generic"])
@pytest.mark.parametrize("burnin,thinning", [(0, 1), (3, 2)])
def test_engines_follow_the_papers_sgld_written_by_hand(regression, engine, burnin, thinning):
    w_star, batches = regression
    model = Linear(w_star)
    cfg = r.SGLDConfig(num_chains=3, num_draws=6, num_burnin=burnin, thinning=thinning, seed=5,
                       step_size=1e-3, nbeta=30.0, localization=200.0, batch_size=None)
    res = r.estimate_llc(model, batches, cfg, loss_fn=_loss_fn, engine=engine)
    name = res.components[0]
    losses, init, dists = _by_hand(w_star, batches, name, cfg)
    est = res[name]
    np.testing.assert_allclose(est.init_loss_trace, init, rtol=1e-6)
    np.testing.assert_allclose(est.loss_trace, losses, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(est.distance_trace, dists, rtol=1e-4, atol=1e-7)
    assert np.ptp(est.loss_trace - init, axis=-1).min() > 0  # the chains moved away from w*
    # the estimator itself: nbeta * (mean l(w_t) - mean l(w*)) per chain
    np.testing.assert_allclose(est.llc_per_chain, cfg.nbeta * (losses.mean(-1) - init.mean()), rtol=1e-4)


def test_two_components_get_their_own_noise(regression):
    """Each component's chains follow their own named streams (not a shared or swapped one)."""
    w_star, batches = regression
    model = Linear(w_star)
    cfg = r.SGLDConfig(num_chains=2, num_draws=5, seed=8, batch_size=None)
    comps = [r.components.make_component(model, "first", [("w", (slice(0, 2),))]),
             r.components.make_component(model, "last", [("w", (slice(2, 3),))])]
    for engine in ("reference", "batched"):
        res = r.estimate_llc(model, batches, cfg, components=comps, loss_fn=_loss_fn, engine=engine)
        for comp, moving in ((comps[0], [0, 1]), (comps[1], [2])):
            gen = [_noise_generator(cfg.seed, comp.name, c) for c in range(cfg.num_chains)]
            for c in range(cfg.num_chains):
                w = w_star.clone()
                for step in range(cfg.num_steps):
                    x, y = batches[step]
                    assert res[comp.name].loss_trace[c, step] == pytest.approx(float(_loss(x, y, w)), rel=2e-5)
                    xi = torch.randn(len(moving), generator=gen[c])
                    drift = cfg.nbeta * _grad(x, y, w) + cfg.localization * (w - w_star)
                    w = w.clone()
                    w[moving] = (w - cfg.step_size / 2 * drift)[moving] + math.sqrt(cfg.step_size) * xi


def _token_loss(model, tokens):
    logits = model(tokens)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


@pytest.mark.filterwarnings("ignore::rllc_fast.SamplerWarning")  # 5 draws: R-hat is not the point here
@pytest.mark.parametrize("engine", ["batched", "reference"])
def test_token_loss_pairs_each_draw_with_l_w_star_on_its_own_batch(engine):
    """Structured path (heads of a TransformerLens model) too: l(w*) of draw d is the model's own cross
    entropy on step t's batch, and with no burn-in the first draw is at w* itself."""
    model = r.models.attn_only(n_layers=2, d_model=32, n_heads=2, d_head=16, n_ctx=16, d_vocab=64, seed=2)
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 64, (2 + step % 3, 16), generator=g) for step in range(12)]
    cfg = r.SGLDConfig(num_chains=2, num_draws=5, num_burnin=1, thinning=2, seed=1, batch_size=None)
    res = r.estimate_llc(model, batches, cfg, components=r.heads(model), engine=engine)
    with torch.no_grad():
        init = [float(_token_loss(model, batches[1 + 2 * d])) for d in range(5)]
    for name in res.components:
        np.testing.assert_allclose(res[name].init_loss_trace, init, rtol=1e-5)
    cfg0 = r.SGLDConfig(num_chains=2, num_draws=3, seed=1, batch_size=None)
    res0 = r.estimate_llc(model, batches, cfg0, components=r.heads(model), engine=engine)
    with torch.no_grad():
        first = float(_token_loss(model, batches[0]))
    for name in res0.components:
        np.testing.assert_allclose(res0[name].loss_trace[:, 0], first, rtol=1e-5)
        assert np.all(res0[name].loss_trace[:, 1:] != first)
