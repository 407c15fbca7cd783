"""Sampler diagnostics (rllc_fast.diagnostics): R-hat, ESS and the ||w - w*|| trend against known cases,
the warnings of estimate_llc on a trained model at a too-large and a sensible step size, the a-priori step
size check, the refined-above-whole check and step-size calibration."""
import math
import warnings

import numpy as np
import pytest
import torch

import rllc_fast as r
from rllc_fast import diagnostics as dg
from toy_models import Linear, gaussian_nll


def _ar1(rho: float, chains: int, n: int, seed: int = 0) -> np.ndarray:
    """Stationary AR(1) chains x_t = rho x_{t-1} + N(0, 1): [chains, n]."""
    rng = np.random.default_rng(seed)
    x = np.empty((chains, n))
    x[:, 0] = rng.normal(size=chains) / math.sqrt(1 - rho**2)
    noise = rng.normal(size=(chains, n))
    for t in range(1, n):
        x[:, t] = rho * x[:, t - 1] + noise[:, t]
    return x


def test_iid_normal_chains_have_rhat_one_and_ess_of_every_draw():
    x = np.random.default_rng(0).normal(size=(4, 1000))
    assert abs(dg.rhat(x) - 1) < 0.01
    assert dg.ess(x) == pytest.approx(4000, rel=0.1)


def test_chains_with_different_means_have_a_large_rhat_and_are_flagged():
    x = np.random.default_rng(1).normal(size=(4, 500)) + np.array([0.0, 0.0, 0.0, 2.0])[:, None]
    assert dg.rhat(x) > 1.3
    d = dg.diagnose(0.1 * x, np.zeros(500), np.ones((4, 500)), nbeta=10.0)  # as loss traces; l(w*) = 0
    assert d.rhat == pytest.approx(dg.rhat(x)) and any("chains disagree" in p for p in d.problems())


@pytest.mark.parametrize("rho", [0.5, 0.9])
def test_ar1_chains_have_ess_n_times_1_minus_rho_over_1_plus_rho(rho):
    x = _ar1(rho, chains=4, n=4000)
    assert dg.ess(x) == pytest.approx(4 * 4000 * (1 - rho) / (1 + rho), rel=0.15)
    assert abs(dg.rhat(x) - 1) < 0.02


def test_one_chain_has_no_rhat_and_no_false_warning():
    x = np.random.default_rng(2).normal(size=(1, 1000))
    assert math.isnan(dg.rhat(x))
    assert dg.ess(x) == pytest.approx(1000, rel=0.25)  # split halves: defined for one chain
    d = dg.diagnose(x, np.zeros(1000), 1 + 0.01 * np.random.default_rng(3).normal(size=(1, 1000)), nbeta=1.0)
    assert math.isnan(d.rhat) and d.problems() == []


def test_distance_trend_flags_a_growing_trace_and_passes_a_flat_one():
    t = np.arange(1, 201)
    rng = np.random.default_rng(4)
    walk = np.sqrt(t) * (1 + 0.01 * rng.normal(size=(4, 200)))  # diffusing away from w*: distance ~ sqrt(t)
    flat = 3.0 * (1 + 0.02 * rng.normal(size=(4, 200)))
    blowup = 1.2**t * np.ones((4, 1))  # an unstable step: geometric growth
    assert dg.distance_growth(walk) == pytest.approx(np.sqrt(0.875 / 0.625) - 1, abs=0.02)  # 0.18
    assert abs(dg.distance_growth(flat)) < 0.02
    assert dg.distance_growth(blowup) > 1e3
    messages = [dg.problems({"distance_growth": dg.distance_growth(x)}) for x in (walk, flat, blowup)]
    assert "still growing" in messages[0][0] and messages[1] == [] and "blows up" in messages[2][0]


def _trained_regression(n=1000, d=100, seed=0):
    """A linear model at its least-squares weights on an orthonormal design (x^T x / n = I), so every weight
    direction has curvature nbeta + gamma and SGLD is stable exactly for step * (nbeta + gamma) < 4."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, d, generator=g))
    x = q * n**0.5
    y = x @ torch.randn(d, generator=g) + torch.randn(n, generator=g)
    w = torch.linalg.lstsq(x, y.unsqueeze(1)).solution.squeeze(1)
    return Linear(w), (x, y)


def _sampler_warnings(caught):
    return [str(w.message) for w in caught if issubclass(w.category, dg.SamplerWarning)]


def test_a_too_large_step_is_flagged_with_the_fix_and_a_sensible_one_passes():
    model, data = _trained_regression()
    base = dict(nbeta=100.0, localization=1.0, num_chains=4, batch_size=None, seed=0)
    # 0.044 * (100 + 1) = 4.4 > 4: unstable through the loss's curvature, which no a-priori check sees
    big = r.SGLDConfig(step_size=0.044, num_draws=100, **base)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = r.estimate_llc(model, data, big, loss_fn=gaussian_nll(1.0))
    found = _sampler_warnings(caught)
    assert res["whole"].num_diverged == 0 and res["whole"].llc_mean > 1e6  # finite, silently absurd before
    assert len(found) == 1 and "whole" in found[0] and "blows up" in found[0] and "lower step_size" in found[0]
    assert res.unreliable() and "warning: whole" in res.summary()
    assert res.to_dataframe()["distance_growth"].iloc[0] > 1

    good = r.SGLDConfig(step_size=2e-3, num_draws=200, num_burnin=50, **base)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = r.estimate_llc(model, data, good, loss_fn=gaussian_nll(1.0))
    assert _sampler_warnings(caught) == [] and res.unreliable() == {}
    d = res["whole"].diagnostics
    assert d.rhat < 1.1 and d.ess_fraction > 0.05 and d.distance_growth < 0.05
    assert res["whole"].llc_mean == pytest.approx(50, rel=0.15)  # d/2 = 50: a regular model


def test_step_sizes_beyond_the_localization_limit_are_flagged_before_sampling():
    assert dg.step_size_problems(1e-3, 200.0) == []  # the paper's: 5% spread inflation
    unstable = dg.step_size_problems(0.1, 200.0)
    assert len(unstable) == 1 and "unstable step size" in unstable[0] and "-9" in unstable[0]
    assert "use step_size <= 0.0033" in unstable[0]
    biased = dg.step_size_problems(1e-2, 200.0)
    assert len(biased) == 1 and "biases the LLC" in biased[0] and "100%" in biased[0]
    assert dg.step_size_problems(1.0, 200.0, sampler="rmsprop") == [] and dg.step_size_problems(1.0, 0.0) == []
    model, data = _trained_regression(n=64, d=4)
    cfg = r.SGLDConfig(step_size=0.05, nbeta=1.0, localization=200.0, num_chains=1, num_draws=4, batch_size=None)
    with pytest.warns(dg.SamplerWarning, match="unstable step size"):
        r.estimate_llc(model, data, cfg, loss_fn=gaussian_nll(1.0))


def test_refined_llcs_above_the_whole_model_llc_are_named_with_the_fix():
    with pytest.warns(dg.SamplerWarning, match="0:1.*lower step_size"):
        above = dg.refined_exceeding_whole({"0:0": 2.0, "0:1": 45.0, "1:0": 10.5}, 10.0,
                                           {"0:0": 0.1, "0:1": 1.0, "1:0": 0.5}, whole_sem=0.5)
    assert above == {"0:1": 35.0}  # 1:0 is within 3 standard errors
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dg.refined_exceeding_whole({"0:0": 2.0}, float("nan")) == {}
        assert dg.refined_exceeding_whole({"0:0": 12.0}, 10.0, warn=False) == {"0:0": 2.0}
    with pytest.raises(TypeError, match="refined must be a mapping"):
        dg.refined_exceeding_whole([1.0], 2.0)


def test_calibration_rows_carry_the_diagnostics_and_the_problems_instead_of_warnings(tmp_path):
    model, data = _trained_regression(n=256, d=20)
    cfg = r.SGLDConfig(nbeta=100.0, localization=1.0, num_chains=2, batch_size=None, num_burnin=50)
    comps = {"w": r.whole(model), "w[:10]": r.components.make_component(model, "w[:10]", [("w", (slice(0, 10),))])}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        rows = r.calibrate_step_size(model, data, (2e-3, 0.044), cfg, components=comps, num_draws=100,
                                     loss_fn=gaussian_nll(1.0))
    by = {(row["step_size"], row["component"]): row for row in rows}
    assert set(by) == {(2e-3, "w"), (2e-3, "w[:10]"), (0.044, "w"), (0.044, "w[:10]")}
    assert by[2e-3, "w"]["problems"] == "" and by[2e-3, "w[:10]"]["problems"] == ""
    assert "blows up" in by[0.044, "w"]["problems"] and "blows up" in by[0.044, "w[:10]"]["problems"]
    assert {"rhat", "ess", "ess_fraction", "distance_growth", "final_distance"} <= set(rows[0])
    assert r.suggest_step_size(rows) == 2e-3
    png = r.plot_calibration(rows, tmp_path / "c.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in r.calibration_figure(rows).axes[:2])  # labelled axes


def test_the_report_lists_flagged_estimates_and_refined_llcs_above_the_whole_model():
    import pandas as pd

    from rllc_fast.report import diagnostics_section

    rows = pd.DataFrame({"step": [10] * 3, "checkpoint": ["c.pt"] * 3, "checkpoint_id": ["abc"] * 3,
                         "data": ["mix"] * 3, "data_hash": ["d1"] * 3, "config_key": ["k1"] * 3,
                         "component_set": ["whole", "heads", "heads"], "component": ["whole", "0:0", "0:1"],
                         "llc_mean": [10.0, 2.0, 45.0], "llc_sem": [0.5, 0.1, 1.0], "rhat": [1.01, 1.5, 1.02],
                         "ess": [100.0, 50, 100], "ess_fraction": [0.5, 0.25, 0.5], "distance_growth": [0.0, 0, 0]})
    page = diagnostics_section(rows)
    assert "2 of 3 estimates flagged" in page and "chains disagree" in page and "above the whole-model LLC" in page
    assert "<td>whole</td>" not in page
    # a head of another configuration (or another checkpoint of the same name) is not held against this whole
    other = rows.iloc[[2]].assign(config_key="k2", rhat=1.0)
    assert "above the whole-model LLC" not in diagnostics_section(pd.concat([rows.iloc[[0]], other]))
    assert diagnostics_section(rows.drop(columns=["rhat"])) == ""  # a store without the diagnostics
    assert "No estimate is flagged" in diagnostics_section(rows.iloc[:1])


def test_one_chain_blowing_up_is_not_averaged_away_by_settled_chains():
    from rllc_fast.diagnostics import DISTANCE_BLOWUP, distance_growth, problems

    draws = 40
    settled = np.ones((3, draws))
    runaway = np.exp(np.linspace(0, 4, draws))[None, :]  # grows e-fold over the last half
    growth = distance_growth(np.concatenate([settled, runaway]))
    assert growth > DISTANCE_BLOWUP
    assert any("blows up" in p for p in problems({"rhat": 1.0, "ess": 100.0, "ess_fraction": 0.5,
                                                  "distance_growth": growth}))
    assert abs(distance_growth(settled)) < 1e-12  # settled chains alone: nothing
