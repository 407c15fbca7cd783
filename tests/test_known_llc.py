"""The estimator recovers known learning coefficients (issue: foundation, must-show 1 and 2)."""
import math

import numpy as np
import pytest
import torch

import rllc_fast as r
from toy_models import Linear, PowerModel, gaussian_nll, nbeta_for


@pytest.mark.slow
def test_linear_regression_recovers_d_over_2():
    """A regular model: d = 10 weights at the least-squares solution -> lambda = d/2 = 5."""
    g = torch.Generator().manual_seed(1)
    n, d = 10_000, 10
    x = torch.randn(n, d, generator=g)
    y = x @ torch.randn(d, generator=g) + torch.randn(n, generator=g)
    w_ls = torch.linalg.lstsq(x, y.unsqueeze(1)).solution.squeeze(1)
    cfg = r.SGLDConfig(step_size=5e-5, nbeta=nbeta_for(n), localization=1.0, num_chains=8,
                       num_draws=4000, num_burnin=200, batch_size=None, seed=0)
    est = r.estimate_llc(Linear(w_ls), (x, y), cfg, loss_fn=gaussian_nll(1.0))["whole"]
    print(f"linear regression d=10: llc {est.llc_mean:.3f} +- {est.llc_std:.3f} (truth 5)")
    assert abs(est.llc_mean - 5.0) < 0.5


def _power_data(n=1000):
    """x ~ N(0, 2^2), y ~ N(0, 0.25^2) with the sample correlation of x and y projected out, so
    that w = 0 is exactly the empirical minimum (otherwise l_n(w) - l_n(0) has a linear term)."""
    g = torch.Generator().manual_seed(2)
    x = 2 * torch.randn(n, generator=g)
    y = 0.25 * torch.randn(n, generator=g)
    return x, y - x * (x @ y) / (x @ x)


def exact_tempered_expectation(p, x, y, nbeta, gamma, sigma=0.25):
    """nbeta * E[l_n(w) - l_n(0)] under exp(-nbeta l_n - gamma/2 |w|^2), by 2-D quadrature:
    what a perfect sampler would estimate at this finite n (below the asymptotic truth where
    the singularity has multiplicity 2, e.g. (1, 1))."""
    sxx = float((x.double() ** 2).mean())
    u = np.linspace(-12, 12, 3001)
    w = np.sinh(u) / np.sinh(12) * 8 / math.sqrt(gamma)
    dw = np.gradient(w)
    w1, w2 = np.meshgrid(w, w, indexing="ij")
    c = w1 ** p[0] * w2 ** p[1]
    k = c * c * sxx / (2 * sigma**2)
    logp = -nbeta * k - gamma / 2 * (w1**2 + w2**2)
    weight = np.exp(logp - logp.max()) * np.outer(dw, dw)
    return nbeta * float((weight * k).sum() / weight.sum())


POWERS = [(0, 1), (1, 1), (0, 2), (1, 2), (2, 2), (0, 3), (1, 3), (2, 3), (3, 3)]


@pytest.fixture(scope="module")
def power_estimates():
    """``{p: (estimate, exact at this n, truth)}`` for every power model: 4 chains x 10,000 draws each."""
    x, y = _power_data()
    nbeta = nbeta_for(len(x))
    cfg = r.SGLDConfig(step_size=3e-5, nbeta=nbeta, localization=1.0, num_chains=4, num_draws=10_000,
                       batch_size=None, seed=0)
    out = {}
    for p in POWERS:
        est = r.estimate_llc(PowerModel(*p), (x, y), cfg, loss_fn=gaussian_nll(0.25))["whole"]
        out[p] = est, exact_tempered_expectation(p, x, y, nbeta, 1.0), 1 / (2 * max(p))
        print(f"{p}: llc {est.llc_mean:.3f} +- {est.llc_sem:.3f} (sem; std {est.llc_std:.3f}), truth {out[p][2]:.3f}, "
              f"exact at this n {out[p][1]:.3f}")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("p", POWERS, ids=[f"w1^{a}w2^{b}" for a, b in POWERS])
def test_singular_models_recover_their_learning_coefficient(p, power_estimates):
    """Each power model's estimate against the exact tempered expectation at this n (quadrature): within 4
    standard errors plus 10% (SGLD's step-size bias, measured at 2-7% here), and the asymptotic truth within
    3.5 chain standard deviations (a weaker check: the truth is not what a finite-n sampler estimates)."""
    est, exact, truth = power_estimates[p]
    assert abs(est.llc_mean - exact) <= 4 * est.llc_sem + 0.1 * exact, (est.llc_mean, est.llc_sem, exact)
    assert est.llc_mean - 3.5 * est.llc_std <= truth <= est.llc_mean + 3.5 * est.llc_std


@pytest.mark.slow
def test_power_models_together_pin_the_scale_of_the_estimate(power_estimates):
    """The inverse-variance weighted mean of estimate / exact over the nine models is 1 within 4 of its
    standard errors plus 10% (SGLD's step-size bias): an estimator off by a constant factor (halved, or
    1.3x) fails here. The per-model bands cannot show it for the slowly mixing higher powers (4 chains x
    10,000 draws leave their standard errors at 20-45% of the value; measured 2026-11-30), so the models
    that pin the scale are the sharp ones: w2 alone (2% standard error) and w1 w2 (8%)."""
    ratios = np.array([est.llc_mean / exact for est, exact, _ in power_estimates.values()])
    sems = np.array([est.llc_sem / exact for est, exact, _ in power_estimates.values()])
    weights = 1 / sems**2
    mean, sem = float((weights * ratios).sum() / weights.sum()), float(1 / math.sqrt(weights.sum()))
    print(f"weighted mean ratio estimate / exact over {len(ratios)} models: {mean:.3f} +- {sem:.3f}")
    assert abs(mean - 1) <= 4 * sem + 0.1, (mean, sem, ratios.round(3).tolist(), sems.round(3).tolist())
