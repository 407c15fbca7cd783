"""Susceptibilities and Bayesian influence against their closed forms on a Gaussian local posterior.

Model: linear regression ``f(x) = x . w``, ``w`` in R^3, with the loss ``L(w) = mean_k l_k(w)``,
``l_k(w) = (x_k . w - y_k)^2 / 2`` over ``n`` training points, at its exact minimiser ``w*`` (least
squares), so ``grad L(w) = H (w - w*)`` with ``H = X^T X / n``. Full-batch SGLD restricted to the
coordinates ``S`` of a component,

    d' = d - eps/2 (nbeta H_SS + gamma) d + sqrt(eps) xi,         d = w_S - w*_S,

is a linear Gaussian recursion ``d' = M d + sqrt(eps) xi`` with symmetric ``M = I - eps P / 2``,
``P = nbeta H_SS + gamma I``. Its stationary law is ``N(0, Sigma)`` with ``Sigma = M Sigma M + eps I``;
as ``M`` commutes with ``P``, ``Sigma = eps (I - M^2)^{-1} = (P - eps P^2 / 4)^{-1}`` (exact for the
discrete chain, not only as ``eps -> 0``). Embedded in R^3 with zeros outside ``S``, write
``s_ij = x_i^T Sigma x_j`` and ``r_i = x_i . w* - y_i``. Each per-sample loss is
``l_i = (r_i + x_i . d)^2 / 2``, so with ``d`` centred Gaussian (odd moments vanish; Isserlis gives
``Cov(a^2, b^2) = 2 Cov(a, b)^2``):

    E[l_i] = (r_i^2 + s_ii) / 2,          Cov(l_i, l_j) = r_i r_j s_ij + s_ij^2 / 2.

**Influence** (covariance form) of sample ``j`` on query ``i`` is ``Cov(l_i, l_j)`` under the whole
model's posterior, and the correlation divides by ``sqrt(Var l_i Var l_j)``.

**Susceptibility.** With the sampling loss ``L = mean_k l_k`` over the training points (here also the
sampling probe set), ``phi = L - L(w*)``, and the estimator
``chi_C[j] = E_C[phi (L - l_j)] - E_C[phi] E_whole[L - l_j]``, the expectations give

    chi_C[j] = Var_C(L) - Cov_C(L, l_j) + E_C[phi] ((E_C[L] - E_C[l_j]) - (E_whole[L] - E_whole[l_j])),

where ``Var_C(L) = mean_kl Cov_C(l_k, l_l)``, ``Cov_C(L, l_j) = mean_k Cov_C(l_k, l_j)`` and
``E_C[phi] = mean_k s^C_kk / 2``. The estimator is unbiased for this once the chains are stationary
(burn-in), since the whole-model run's noise is independent of the component's.
"""
import numpy as np
import pytest
import torch

import rllc_fast as r
from toy_models import Linear

pytestmark = pytest.mark.slow

EPS, NBETA, GAMMA = 0.04, 20.0, 10.0


class SquaredError:
    """loss_fn for ``(x, y)`` batches with the per-sample terms observables need."""

    def per_token(self, model, batch):
        x, y = batch
        return 0.5 * (model(x) - y) ** 2             # [N]

    def __call__(self, model, batch):
        return self.per_token(model, batch).mean()


def _stationary_cov(H, coords):
    """Sigma (3x3) of the SGLD chain moving only ``coords``."""
    k = len(coords)
    P = NBETA * H[np.ix_(coords, coords)] + GAMMA * np.eye(k)
    sigma = np.zeros_like(H)
    sigma[np.ix_(coords, coords)] = np.linalg.inv(P - EPS * P @ P / 4)
    return sigma


def _moments(X, resid, sigma):
    """``(E[l_i] [m], Cov(l_i, l_j) [m, m])`` for the points ``X [m, 3]`` with residuals ``resid [m]``."""
    s = X @ sigma @ X.T
    return 0.5 * (resid ** 2 + np.diag(s)), np.outer(resid, resid) * s + 0.5 * s ** 2


@pytest.fixture(scope="module")
def run():
    g = torch.Generator().manual_seed(0)
    n, m = 48, 6
    X = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = X @ torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64) + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    Xp = torch.randn(m, 3, generator=g, dtype=torch.float64) * 1.5
    yp = Xp @ torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64) + 0.1 * torch.randn(m, generator=g, dtype=torch.float64)
    w_star = torch.linalg.lstsq(X, y[:, None]).solution[:, 0]
    model = Linear(w_star.float())
    data = (X.float(), y.float())
    comps = {"c": r.from_params(model, [("w", slice(0, 2))], name="c"), "whole": r.whole(model)}
    cfg = r.SGLDConfig(step_size=EPS, nbeta=NBETA, localization=GAMMA, num_chains=12, num_draws=2000,
                       num_burnin=100, batch_size=None, seed=3)
    res = r.estimate_llc(model, data, cfg, components=comps, loss_fn=SquaredError(), engine="batched",
                         observables={"train": data, "probe": (Xp.float(), yp.float())})
    Xn, w = X.numpy(), w_star.numpy()
    return res, Xn, Xn @ w - y.numpy(), Xp.numpy(), Xp.numpy() @ w - yp.numpy(), Xn.T @ Xn / n


def test_susceptibilities_equal_their_closed_form(run):
    res, X, rx, Xp, rp, H = run
    sus = r.susceptibilities(res, sampling="train", whole="whole")
    assert sus.components == ["c"] and sus.probes == ["probe"]
    expected = {}
    for name, coords in (("c", [0, 1]), ("whole", [0, 1, 2])):
        sigma = _stationary_cov(H, coords)
        both = np.concatenate([X, Xp])
        mean, cov = _moments(both, np.concatenate([rx, rp]), sigma)
        n = len(X)
        e_L = mean[:n].mean()
        var_L = cov[:n, :n].mean()
        cov_L_probe = cov[:n, n:].mean(0)
        e_phi = e_L - (0.5 * rx ** 2).mean()
        expected[name] = (var_L, cov_L_probe, e_phi, e_L - mean[n:])
    var_L, cov_Lj, e_phi, gap_c = expected["c"]
    chi = var_L - cov_Lj + e_phi * (gap_c - expected["whole"][3])
    got, sem = sus.per_token["probe"][0, :, 0], sus.per_token_sem["probe"][0, :, 0]
    # the init loss is L(w*) exactly here (full batch): the only approximation left is the finite sample
    assert np.all(np.abs(got - chi) <= 4 * sem + 1e-3 * np.abs(chi)), (got, chi, sem)
    # the comparison is sharp: most values are resolved, and both terms of the formula are
    correction = e_phi * (gap_c - expected["whole"][3])   # the whole-model baseline's share
    assert (np.abs(chi) > 8 * sem).sum() >= 3 and (np.abs(correction) > 4 * sem).sum() >= 2, (chi, correction, sem)
    assert np.corrcoef(got, chi)[0, 1] > 0.98
    agg = sus.aggregate[0, 0]
    assert abs(agg - chi.mean()) <= 4 * sus.aggregate_sem[0, 0], (agg, chi.mean(), sus.aggregate_sem[0, 0])


def test_influences_equal_their_closed_form(run):
    res, X, rx, Xp, rp, H = run
    _, cov = _moments(Xp, rp, _stationary_cov(H, [0, 1, 2]))
    losses = res.observations.component_losses("probe", "whole")        # [chains, draws, m, 1]
    got = r.bayesian_influence(losses, per="sequence", covariance=True)
    per_chain = np.stack([r.bayesian_influence(losses[c : c + 1], covariance=True) for c in range(losses.shape[0])])
    sem = per_chain.std(0, ddof=1) / np.sqrt(len(per_chain))
    assert np.all(np.abs(got - cov) <= 4 * sem + 1e-3 * np.abs(cov)), (got, cov, sem)
    corr = r.bayesian_influence(losses, per="sequence")
    expected_corr = cov / np.sqrt(np.outer(np.diag(cov), np.diag(cov)))
    assert np.allclose(np.diag(corr), 1.0, atol=1e-5)
    sd = np.sqrt(np.diag(cov))
    assert np.all(np.abs(corr - expected_corr) <= 4 * sem / np.outer(sd, sd) + 0.02), (corr, expected_corr)


def test_default_phi_is_zero_at_w_star_and_a_shift_moves_chi_as_documented(run):
    """phi defaults to the sampling probe's own loss at w*; a constant shift c of phi adds
    c (E_C[L - l_j] - E_whole[L - l_j]) per token (the estimator is not shift-invariant)."""
    res, X, rx, *_ = run
    obs = res.observations
    base = r.susceptibilities(res, sampling="train")
    assert base.init_loss == pytest.approx(float(obs.at_optimum["train"].mean()), rel=1e-6)
    assert base.init_loss == pytest.approx((0.5 * rx ** 2).mean(), rel=1e-5)
    c = 0.05
    shifted = r.susceptibilities(res, sampling="train", init_loss=base.init_loss + c)

    def gap(comp):
        L = np.asarray(obs.component_losses("train", comp), dtype=np.float64).mean(axis=(2, 3))    # [chains, draws]
        probe = np.asarray(obs.component_losses("probe", comp), dtype=np.float64)[..., 0]         # [chains, draws, m]
        return (L[..., None] - probe).mean(axis=(0, 1))

    expected = -c * (gap("c") - gap("whole"))     # phi - c: E[(phi - c) X] - E[phi - c] D = chi - c (E_C X - D)
    np.testing.assert_allclose(shifted.per_token["probe"][0, :, 0] - base.per_token["probe"][0, :, 0], expected,
                               rtol=1e-6, atol=1e-12)
    # the standard error holds the whole-model run's share as well as the chains' spread
    assert np.all(base.aggregate_sem >= base.aggregate_sem_chains)
    assert np.all(base.per_token_sem["probe"] > base.per_token_sem_chains["probe"])
