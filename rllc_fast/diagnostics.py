"""Sampler diagnostics: is an SGLD estimate of the LLC trustworthy?

Per component, from the traces of ``ComponentLLC`` (``[chains, draws]``, diverged chains left out):

- ``rhat``: rank-normalized split-R-hat (Vehtari, Gelman, Simpson, Carpenter, Buerkner 2021, "Rank-
  normalization, folding, and localization: an improved R-hat") of the per-draw excess loss
  ``nbeta * (l(w_t) - l(w*))`` across chains: the larger of the bulk and the tail (folded) R-hat. About 1
  when every chain and both halves of every chain sample the same distribution. NaN with fewer than 2
  chains (undefined: no warning is raised for it).
- ``ess``: bulk effective sample size of that trace (same paper: Geyer's initial monotone sequence on the
  rank-normalized split chains), and ``ess_fraction = ess / (chains x draws)``.
- ``distance_growth``: relative growth of ``||v - v*||`` over the last half of the draws (mean of the
  last quarter over mean of the third, per chain; the low end of its 2-standard-error band across chains).
  About 0 once the chains have settled at the distance where the localization term balances the noise;
  a chain that is still moving away at the last draw has not settled (its LLC is still changing), and an
  unstable step size grows it geometrically.

``problems(diag)`` turns those floats into messages, each with a suggested fix, using the thresholds
below (justified in ``docs/diagnostics.md``); ``warn_unreliable`` raises one ``SamplerWarning`` for
the flagged components of a result. ``refined_exceeding_whole`` checks the refined LLCs of one checkpoint
and data against its whole-model LLC, which a weight-refined LLC should not exceed. ``step_size_problems`` is the
a-priori check of a configuration: SGLD's pull towards ``w*`` alone is unstable when
``step_size * localization > 4`` and biases the LLC upwards well before that.

The excess loss is used rather than the raw loss because the raw loss carries the minibatch noise,
which every chain shares (one minibatch sequence per call) and which cancels in the estimator.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Dict, List, Mapping, Optional

import numpy as np

#: Flag a component when its rank-normalized split-R-hat exceeds this. Vehtari et al. recommend 1.01 for
#: final inference from long runs (ESS > 400); the runs of an rLLC sweep have tens to hundreds of effective
#: draws, so Gelman and Rubin's original cut 1.1 is used: the paper's settings stay below 1.03 on the demo's
#: checkpoints, unstable step sizes reach 1.5-2.3 (docs/diagnostics.md).
RHAT_MAX = 1.1
#: Flag when the bulk ESS is below this fraction of the draws (chains used x draws).
ESS_FRACTION_MIN = 0.01
#: Flag when ||v - v*|| grew by more than this fraction over the last half of the draws (settled chains
#: measured within +-2%, chains that had not settled after too small a step +4% and more) ...
DISTANCE_GROWTH_MAX = 0.03
#: ... and call it a blow-up (the step size is unstable) above this one (more than doubled).
DISTANCE_BLOWUP = 1.0
#: ``step_size * localization`` above which the localization term alone is unstable (``step_size_problems``).
STABLE_STEP_LOCALIZATION = 4.0
#: Flag a step size whose discretisation inflates the sampled spread by more than this fraction (at least
#: ``1 / (1 - step_size * localization / 4) - 1``; see ``step_size_problems``).
DISCRETISATION_BIAS_MAX = 0.2


class SamplerWarning(RuntimeWarning):
    """The sampler diagnostics say an LLC estimate is unreliable; the message names the fix."""


def _as_chains(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"{name} must be [chains, draws] (or [draws] for one chain), got shape {x.shape}")
    return x


def _split_chains(x: np.ndarray) -> np.ndarray:
    """``[chains, draws]`` -> ``[2 chains, draws // 2]``: each chain's first and second half (odd: middle dropped)."""
    half = x.shape[1] // 2
    return np.concatenate([x[:, :half], x[:, x.shape[1] - half:]], axis=0)


_INV_NORMAL = np.frompyfunc(NormalDist().inv_cdf, 1, 1)


def _z_scale(x: np.ndarray) -> np.ndarray:
    """Rank normalization: ranks over all draws (ties averaged) -> normal scores, Blom's offsets (3/8)."""
    flat = x.ravel()
    values, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    below = np.cumsum(counts) - counts  # draws strictly smaller than each distinct value
    ranks = (below + (counts + 1) / 2.0)[inverse]  # 1-based ranks, ties averaged
    z = _INV_NORMAL((ranks - 0.375) / (flat.size + 0.25)).astype(np.float64)
    return z.reshape(x.shape)


def _rhat_basic(x: np.ndarray) -> float:
    """Classic R-hat of ``[chains, draws]`` (no splitting): sqrt of pooled over within-chain variance."""
    n = x.shape[1]
    within = x.var(axis=1, ddof=1).mean()
    between = n * x.mean(axis=1).var(ddof=1)
    if within == 0:
        return 1.0 if between == 0 else math.inf
    return float(math.sqrt((between / within + n - 1) / n))


def rhat(x) -> float:
    """Rank-normalized split-R-hat of ``x`` ``[chains, draws]``: max(bulk, tail) as in Vehtari et al. 2021.

    NaN with fewer than 2 chains (an across-chain quantity), fewer than 4 draws, or non-finite values
    (drop diverged chains first). Dimensionless; 1 for chains that agree."""
    x = _as_chains(x, "x")
    if x.shape[0] < 2 or x.shape[1] < 4 or not np.isfinite(x).all():
        return float("nan")
    bulk = _rhat_basic(_z_scale(_split_chains(x)))
    folded = np.abs(x - np.median(x))
    tail = _rhat_basic(_z_scale(_split_chains(folded)))
    return max(bulk, tail)


def _autocovariance(x: np.ndarray) -> np.ndarray:
    """Per chain, the biased autocovariance at lags ``0..n-1`` (divided by n), by FFT: ``[chains, n]``."""
    n = x.shape[1]
    centred = x - x.mean(axis=1, keepdims=True)
    size = 1 << (2 * n - 1).bit_length()
    f = np.fft.rfft(centred, size, axis=1)
    return np.fft.irfft(f * np.conj(f), size, axis=1)[:, :n] / n


def _ess_basic(x: np.ndarray) -> float:
    """ESS of ``[chains, draws]`` by Geyer's initial monotone sequence over the chains' mean autocorrelation
    (Vehtari et al. 2021; the estimator of Stan and ArviZ)."""
    m, n = x.shape
    acov = _autocovariance(x)
    mean_var = acov[:, 0].mean() * n / (n - 1)
    var_plus = mean_var * (n - 1) / n + (x.mean(axis=1).var(ddof=1) if m > 1 else 0.0)
    if var_plus <= 0:
        return float("nan")
    rho = np.zeros(n)
    rho[0] = 1.0
    rho_even, rho_odd = 1.0, 1.0 - (mean_var - acov[:, 1].mean()) / var_plus
    rho[1] = rho_odd
    t = 1
    while t < n - 3 and rho_even + rho_odd > 0:  # initial positive sequence
        rho_even = 1.0 - (mean_var - acov[:, t + 1].mean()) / var_plus
        rho_odd = 1.0 - (mean_var - acov[:, t + 2].mean()) / var_plus
        if rho_even + rho_odd >= 0:
            rho[t + 1], rho[t + 2] = rho_even, rho_odd
        t += 2
    max_t = t - 2
    if rho_even > 0:
        rho[max_t + 1] = rho_even
    t = 1
    while t <= max_t - 2:  # initial monotone sequence
        if rho[t + 1] + rho[t + 2] > rho[t - 1] + rho[t]:
            rho[t + 1] = rho[t + 2] = (rho[t - 1] + rho[t]) / 2.0
        t += 2
    tau = -1.0 + 2.0 * rho[: max_t + 1].sum() + rho[max_t + 1: max_t + 2].sum()
    tau = max(tau, 1.0 / math.log10(m * n))
    return float(m * n / tau)


def ess(x) -> float:
    """Bulk effective sample size of ``x`` ``[chains, draws]`` (or ``[draws]``): rank-normalized split chains,
    so it is also defined for one chain. At most about ``chains * draws * log10(chains * draws)``; ``chains *
    draws`` for independent draws. NaN with fewer than 4 draws per chain or non-finite values."""
    x = _as_chains(x, "x")
    if x.shape[1] < 4 or not np.isfinite(x).all():
        return float("nan")
    return _ess_basic(_z_scale(_split_chains(x)))


def distance_growth(distance_trace) -> float:
    """How much ``||v - v*||`` still grew over the last half of the draws, as a fraction, counted
    conservatively: per chain ``g = log(mean(q4) / mean(q3))`` with q3, q4 the third and the last quarter
    of its draws; the result is ``exp(mean(g) - 2 * sem(g)) - 1``, the low end of a 2-standard-error band
    across chains (``sem = 0`` for one chain); but when any chain grew by more than ``DISTANCE_BLOWUP``, that
    chain's growth (a blow-up of one chain is not averaged away). About 0 or below for settled chains, about
    0.18 for a random walk (distance ~ sqrt(t)), huge for a geometric blow-up.

    distance_trace: ``[chains, draws]`` (or ``[draws]``) distances in weight units; leave diverged chains out.
    NaN with fewer than 8 draws or non-finite values."""
    d = _as_chains(distance_trace, "distance_trace")
    n = d.shape[1]
    if n < 8 or not np.isfinite(d).all():
        return float("nan")
    q = n // 4
    third, last = d[:, n - 2 * q: n - q].mean(axis=1), d[:, n - q:].mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        g = np.log(last) - np.log(third)
    g = np.where((third == 0) & (last == 0), 0.0, g)  # a chain that stayed at w*
    if np.isnan(g).any():
        return float("nan")
    if g.max() > math.log1p(DISTANCE_BLOWUP):  # one chain blowing up is not averaged away by settled ones
        return float(math.expm1(min(g.max(), 700.0)))
    sem = g.std(ddof=1) / math.sqrt(g.size) if g.size > 1 else 0.0
    return float(math.expm1(min(g.mean() - 2 * sem, 700.0)))


@dataclass(frozen=True)
class SamplerDiagnostics:
    """Diagnostics of one component's chains (the module doc defines each; NaN where undefined).

    rhat:            rank-normalized split-R-hat of the excess-loss trace across chains (dimensionless).
    ess:             the bulk effective sample size of the excess-loss trace (draws).
    ess_fraction:    ``ess / (chains used x draws)``.
    distance_growth: relative growth of ||v - v*|| over the last half of the draws (fraction, conservative).
    """

    rhat: float
    ess: float
    ess_fraction: float
    distance_growth: float

    def as_dict(self) -> Dict[str, float]:
        """``{"rhat", "ess", "ess_fraction", "distance_growth"}`` as floats (what a store keeps per component;
        ``problems`` reads them back)."""
        return {k: float(v) for k, v in asdict(self).items()}

    def problems(self) -> List[str]:
        """What the diagnostics say is wrong, each with its fix (empty when the estimate looks reliable)."""
        return problems(self.as_dict())


def diagnose(loss_trace, init_loss_trace, distance_trace, nbeta: float, diverged=None) -> SamplerDiagnostics:
    """Diagnostics of one component from its traces: ``loss_trace`` and ``distance_trace`` ``[chains, draws]``,
    ``init_loss_trace`` ``[draws]`` (l(w*) on each draw's minibatch), ``diverged`` ``[chains]`` bool (those
    chains are left out). All NaN when no chain is left."""
    loss = _as_chains(loss_trace, "loss_trace")
    dist = _as_chains(distance_trace, "distance_trace")
    keep = np.ones(loss.shape[0], bool) if diverged is None else ~np.asarray(diverged, bool)
    if not keep.any():
        nan = float("nan")
        return SamplerDiagnostics(nan, nan, nan, nan)
    excess = nbeta * (loss[keep] - np.asarray(init_loss_trace, dtype=np.float64)[None, :])
    e = ess(excess)
    return SamplerDiagnostics(rhat=rhat(excess), ess=e, ess_fraction=e / excess.size,
                              distance_growth=distance_growth(dist[keep]))


def problems(diag: Mapping[str, float]) -> List[str]:
    """Messages (each with its fix) for the diagnostics ``diag`` (``SamplerDiagnostics.as_dict()``, or a
    store row with those keys) that cross the thresholds of this module. NaN values are not flagged."""
    out = []
    r, g = diag.get("rhat", math.nan), diag.get("distance_growth", math.nan)
    e, frac = diag.get("ess", math.nan), diag.get("ess_fraction", math.nan)
    if g > DISTANCE_BLOWUP:
        out.append(f"||w - w*|| blows up (x{1 + g:.3g} over the last half of the draws): the step size is unstable "
                   "for this component; lower step_size (e.g. 10x)")
    elif g > DISTANCE_GROWTH_MAX:
        out.append(f"||w - w*|| still growing at the last draw (+{g:.1%} over the last half; settled chains: < "
                   f"{DISTANCE_GROWTH_MAX:.0%}): the chains have not settled and the LLC is still changing; add "
                   "num_burnin (settling takes about 2 / (step_size * localization) steps, long for a small step "
                   "size); if it keeps growing with more steps, lower step_size")
    if r > RHAT_MAX:
        out.append(f"chains disagree (R-hat {r:.3g} > {RHAT_MAX}: the chains, or the two halves of a chain, sample "
                   "different losses): add num_burnin or num_draws; lower step_size if ||w - w*|| grows too")
    if frac < ESS_FRACTION_MIN:
        out.append(f"few effective draws (ESS {e:.3g}, {frac:.1%} of the draws < {ESS_FRACTION_MIN:.0%}): the loss "
                   "trace drifts or sticks; add num_draws, or lower step_size if ||w - w*|| grows")
    return out


def step_size_problems(step_size: float, localization: float, sampler: str = "sgld") -> List[str]:
    """What is wrong with a step size before any sampling (each message with its fix); empty when nothing is.

    Through its localization term each SGLD step multiplies ``v - v*`` by ``1 - step_size * localization / 2``
    (the loss's curvature only adds to the pull). So:

    - ``step_size * localization > 4``: the chains blow up whatever the loss;
    - below that, the discretised chain's stationary spread is ``1 / (1 - step_size * k / 4)`` times the
      target's along a direction of stiffness ``k >= localization`` (an Ornstein-Uhlenbeck chain), which
      inflates the excess loss, hence the LLC, by at least ``1 / (1 - step_size * localization / 4)``:
      flagged above ``1 + DISCRETISATION_BIAS_MAX`` (about 5% at the paper's 1e-3 and 200).

    Nothing is flagged for the RMSProp sampler (its preconditioner rescales the step per weight) or
    without localization."""
    if sampler != "sgld" or localization <= 0:
        return []
    product = step_size * localization
    limit = STABLE_STEP_LOCALIZATION * (1 - 1 / (1 + DISCRETISATION_BIAS_MAX))  # product at the bias threshold
    suggest = f"use step_size <= {limit / localization:.2g} at localization {localization:g} (the paper: 1e-3 at 200)"
    if product > STABLE_STEP_LOCALIZATION:
        return [f"unstable step size (step_size * localization = {product:.3g} > {STABLE_STEP_LOCALIZATION:g}): the pull "
                f"towards w* alone multiplies v - v* by {1 - product / 2:.3g} every step, so the chains blow up; {suggest}"]
    if product > limit:
        bias = 1 / (1 - product / 4) - 1 if product < STABLE_STEP_LOCALIZATION else math.inf
        return [f"step size biases the LLC upwards (step_size * localization = {product:.3g}): the discretisation "
                f"inflates the sampled spread, and the LLC, by at least {bias:.0%} (more along curved directions); "
                f"{suggest}"]
    return []


def warn_unreliable(diagnostics: Mapping[str, SamplerDiagnostics], step_size: float, stacklevel: int = 1) -> Dict[str, List[str]]:
    """Raise one ``SamplerWarning`` naming every component whose diagnostics cross a threshold, with the
    fixes; return ``{component: [problems]}`` (empty when all look reliable). ``stacklevel`` as
    ``warnings.warn``'s, counted from the caller of this function (1: the caller's line)."""
    flagged = {name: d.problems() for name, d in diagnostics.items()}
    flagged = {name: p for name, p in flagged.items() if p}
    if flagged:
        lines = [f"{name}: " + "; ".join(p) for name, p in flagged.items()]
        warnings.warn(f"the sampler diagnostics say {len(flagged)} estimate(s) at step size {step_size:g} are "
                      "unreliable (see docs/diagnostics.md):\n  " + "\n  ".join(lines),
                      SamplerWarning, stacklevel=stacklevel + 1)
    return flagged


def refined_exceeding_whole(refined: Mapping[str, float], whole: float, refined_sem: Optional[Mapping[str, float]] = None,
                            whole_sem: float = 0.0, z: float = 3.0, warn: bool = True, stacklevel: int = 1
                            ) -> Dict[str, float]:
    """Components whose refined LLC exceeds the whole-model LLC ``whole`` of the same checkpoint and data by
    more than ``z`` standard errors: ``{component: refined - whole}``.

    refined:     ``{component: llc_mean}`` of one checkpoint and one data distribution.
    whole:       the whole-model ``llc_mean`` on the same checkpoint and data (NaN: nothing is checked).
    refined_sem, whole_sem: standard errors (``llc_sem``; missing or NaN count as 0, i.e. any excess is flagged).
    z:           how many combined standard errors of excess are tolerated (default 3).
    warn:        raise a ``SamplerWarning`` naming them and the fix when any is found (``stacklevel``: as
                 ``warnings.warn``'s, counted from the caller).

    Fixing the other weights only removes directions the chains could explore: for a regular model the
    refined LLC is ``d_V / 2 <= d / 2``, and for a quadratic loss the estimator's target (the localized,
    tempered posterior's expected excess loss) is never larger on a subset of the weights, at any nbeta
    and localization (docs/diagnostics.md). A refined LLC clearly above the whole-model LLC is therefore
    a sampler artefact, most often a step size too large for the component."""
    if not isinstance(refined, Mapping):
        raise TypeError(f"refined must be a mapping {{component: llc}}, got {type(refined).__name__}")
    whole = float(whole)
    if not math.isfinite(whole):
        return {}
    sems = refined_sem or {}
    w_sem = float(whole_sem) if whole_sem is not None and math.isfinite(float(whole_sem)) else 0.0
    out = {}
    for name, value in refined.items():
        value = float(value)
        s = float(sems.get(name, 0.0))
        s = s if math.isfinite(s) else 0.0
        if math.isfinite(value) and value - whole > z * math.sqrt(s * s + w_sem * w_sem):
            out[name] = value - whole
    if out and warn:
        listed = ", ".join(f"{k} ({whole + v:.3g})" for k, v in out.items())
        warnings.warn(f"refined LLC(s) above the whole-model LLC {whole:.3g} of the same checkpoint and data: {listed}; "
                      "a refined LLC should not exceed the LLC, so these are most likely sampler artefacts: lower step_size (run "
                      "`rllc calibrate`) and check the diagnostics", SamplerWarning, stacklevel=stacklevel + 1)
    return out
