"""Susceptibilities of components to shifts of the data distribution towards probe sets, per token.

Baker et al. (arXiv 2504.18274, App. C.4): shifting the data distribution from the sampling task ``q``
towards a probe distribution changes the posterior expectation of a component's observable ``phi_C`` at
first order by ``chi = -Cov_C[phi_C, l_probe - L_q]`` per unit of ``n*beta``; it splits into one term per
probe token ``xy``. Estimated from one SGLD run that samples every component (weights restricted to
``C``) and the whole model, with per-token losses on fixed probe contexts at each draw
(``estimate_llc(..., observables=...)``):

    L(w)   = mean per-token loss on the sampling-task probe set        (the sampling loss, per draw)
    phi(w) = L(w) - L(w*)                                              (the sampling loss's excess over w*)
    chi_C[xy] = E_C[ phi * (L - l_xy) ] - E_C[phi] * E_whole[ L - l_xy ]

``E_C`` averages over the draws of the run restricted to ``C``, ``E_whole`` over the whole model's run
(the baseline that replaces ``E_C[L - l_xy]``, as devinterp 2.0.1's ``compute_susceptibilities`` does; the
same formula is its numerical reference). The estimate is linear in ``E_C``: the pooled value is the mean
of the per-chain values (chains that diverged are left out). The aggregate susceptibility of a probe set
is the mean over its tokens.

**Which ``l(w*)``.** Because ``E_whole`` stands in for ``E_C``, the estimate is not invariant to a constant
shift of ``phi``: a shift ``c`` adds ``c (E_C[L - l_xy] - E_whole[L - l_xy])``. By default ``phi`` is taken
from the sampling probe's own loss at ``w*`` (``phi(w*) = 0``: the sampling loss's excess, on the same
contexts). devinterp 2.0.1 subtracts an init loss measured on other batches of the sampling data; its
offset from the probe's own ``L(w*)`` (0.05 nats in ``benchmarks/bench_susceptibility.py``, twice the
typical ``E_C[phi]``) flipped the sign of every head's aggregate on two probe sets there. Pass
``init_loss=`` to reproduce devinterp's numbers.

**Standard errors** add, in quadrature, the spread across the component's chains and the noise of the
whole-model run that all of them share through ``E_whole[L - l_xy]``: ``|E_C[phi]| * SE(E_whole[L - l_xy])``,
with that SE across the whole run's chains (``*_sem_chains`` keep the first part alone).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .observations import LabelledArray, Observations


@dataclass
class Susceptibilities:
    """Per-token and aggregate susceptibilities of components (rows) to probe sets.

    per_token:     ``{probe: [component, context, position]}`` (pooled over chains).
    per_token_sem: ``{probe: [component, context, position]}`` standard error across chains.
    aggregate:     ``[component, probe]`` mean over the probe's tokens; ``aggregate_sem`` its standard error.
    per_token_sem_chains, aggregate_sem_chains: the chain-spread part of those errors alone.
    chains_used:   ``[component]`` chains without divergence that entered the estimate.
    init_loss:     the ``L(w*)`` subtracted in ``phi``.
    """

    components: List[str]
    probes: List[str]
    sampling: str
    whole: str
    per_token: Dict[str, np.ndarray]
    per_token_sem: Dict[str, np.ndarray]
    aggregate: np.ndarray
    aggregate_sem: np.ndarray
    chains_used: np.ndarray
    per_token_sem_chains: Dict[str, np.ndarray]
    aggregate_sem_chains: np.ndarray
    init_loss: float

    def response_matrix(self, per: str = "probe") -> LabelledArray:
        """The response matrix: ``[component, probe]`` aggregates (``per="probe"``) or ``[component, token]``
        with every probe set's tokens side by side (``per="token"``; labels ``probe/context/position``)."""
        if per == "probe":
            return LabelledArray(self.aggregate, ("component", "probe"),
                                 {"component": list(self.components), "probe": list(self.probes)})
        if per != "token":
            raise ValueError(f"per must be 'probe' or 'token', got {per!r}")
        blocks, labels = [], []
        for p in self.probes:
            arr = self.per_token[p]
            blocks.append(arr.reshape(arr.shape[0], -1))
            labels += [f"{p}/{i}/{j + 1}" for i in range(arr.shape[1]) for j in range(arr.shape[2])]
        return LabelledArray(np.concatenate(blocks, axis=1), ("component", "token"),
                             {"component": list(self.components), "token": labels})

    def to_dataframe(self):
        """One row per (component, probe): the aggregate susceptibility, its standard error and chains used."""
        import pandas as pd

        rows = [{"component": c, "probe": p, "susceptibility": self.aggregate[i, j],
                 "susceptibility_sem": self.aggregate_sem[i, j], "chains_used": int(self.chains_used[i])}
                for i, c in enumerate(self.components) for j, p in enumerate(self.probes)]
        return pd.DataFrame(rows)


def susceptibilities(observations, sampling: str, whole: str = "whole", init_loss: Optional[float] = None,
                     probes: Optional[Sequence[str]] = None,
                     components: Optional[Sequence[str]] = None) -> Susceptibilities:
    """Susceptibilities of every component but ``whole`` to every probe set but ``sampling``.

    observations: an ``LLCResult`` from ``estimate_llc(..., observables=...)`` or its ``Observations``.
    sampling:     the probe set drawn from the sampling distribution (the ``L`` above).
    whole:        the component that is the whole model (the baseline run).
    init_loss:    ``L(w*)`` in ``phi`` (default: the sampling probe's mean loss at ``w*``; see the module doc).
    probes, components: restrict to these (default: all but ``sampling`` / all but ``whole``).
    """
    obs = _observations(observations)
    if sampling not in obs.names:
        raise ValueError(f"sampling={sampling!r} is not a probe set of this run; have {obs.names} (the sampling "
                         "task must be observed too: add a probe set drawn from the sampling data)")
    l_star = float(np.asarray(obs.at_optimum[sampling], dtype=np.float64).mean()) if init_loss is None \
        else float(init_loss)
    if whole not in obs.components:
        raise ValueError(f"whole={whole!r} is not a component of this run; have {obs.components} (add the whole "
                         "model as a component: it is the baseline run)")
    probes = [p for p in obs.names if p != sampling] if probes is None else list(probes)
    if not probes:
        raise ValueError(f"no probe set besides the sampling task {sampling!r}; observe at least one more")
    for p in probes:
        obs[p]
    comps = [c for c in obs.components if c != whole] if components is None else list(components)
    for c in comps:
        obs.component_losses(sampling, c)

    full_pt = _per_draw_mean(obs.component_losses(sampling, whole))             # [chains, draws]
    full_ok = _finite_chains(full_pt)
    if not full_ok.any():
        raise ValueError(f"every chain of the whole-model run {whole!r} diverged: no baseline")
    full_delta, delta_sem, delta_agg_sem = {}, {}, {}
    for p in probes:
        probe = _float(obs.component_losses(p, whole))[full_ok]
        per_chain = full_pt[full_ok].mean(1)[:, None, None] - probe.mean(axis=1)   # [chains, N, P]
        full_delta[p] = per_chain.mean(0)                                          # [N, P]
        delta_sem[p], delta_agg_sem[p] = _sem(per_chain), _sem(per_chain.mean(axis=(1, 2)))

    per_token = {p: np.full((len(comps),) + full_delta[p].shape, np.nan) for p in probes}
    per_token_sem = {p: np.full_like(per_token[p], np.nan) for p in probes}
    per_token_sem_chains = {p: np.full_like(per_token[p], np.nan) for p in probes}
    aggregate = np.full((len(comps), len(probes)), np.nan)
    aggregate_sem = np.full_like(aggregate, np.nan)
    aggregate_sem_chains = np.full_like(aggregate, np.nan)
    used = np.zeros(len(comps), dtype=int)
    for i, c in enumerate(comps):
        pt = _per_draw_mean(obs.component_losses(sampling, c))                 # [chains, draws]
        losses = {p: _float(obs.component_losses(p, c)) for p in probes}      # read once: [chains, draws, N, P]
        ok = _finite_chains(pt)
        for p in probes:  # a diverged chain's losses are NaN from its divergence on, on every probe set
            ok &= np.isfinite(losses[p]).all(axis=(1, 2, 3))
        used[i] = int(ok.sum())
        if not used[i]:
            continue
        pt = pt[ok]
        phi = pt - l_star
        e_phi = abs(phi.mean())                                                # the whole run's share of the error
        for j, p in enumerate(probes):
            chi = chain_susceptibilities(phi, pt, losses[p][ok], full_delta[p])  # [chains, N, P]
            per_token[p][i], per_token_sem_chains[p][i] = chi.mean(0), _sem(chi)
            per_token_sem[p][i] = np.hypot(per_token_sem_chains[p][i], e_phi * delta_sem[p])
            agg = chi.mean(axis=(1, 2))
            aggregate[i, j], aggregate_sem_chains[i, j] = agg.mean(), _sem(agg)
            aggregate_sem[i, j] = np.hypot(aggregate_sem_chains[i, j], e_phi * delta_agg_sem[p])
    return Susceptibilities(components=comps, probes=probes, sampling=sampling, whole=whole,
                            per_token=per_token, per_token_sem=per_token_sem, aggregate=aggregate,
                            aggregate_sem=aggregate_sem, chains_used=used, per_token_sem_chains=per_token_sem_chains,
                            aggregate_sem_chains=aggregate_sem_chains, init_loss=l_star)


def chain_susceptibilities(phi: np.ndarray, sampling_loss: np.ndarray, probe: np.ndarray,
                           whole_delta: np.ndarray) -> np.ndarray:
    """``chi [chains, N, P]`` per chain: ``E_c[phi L] - E_c[phi l_xy] - E_c[phi] * whole_delta[xy]``.

    phi, sampling_loss: ``[chains, draws]``; probe: ``[chains, draws, N, P]``; whole_delta: ``[N, P]``
    (``E_whole[L - l_xy]``). Draw means are taken per chain."""
    D = phi.shape[1]
    e_phi_l = (phi * sampling_loss).mean(1)                                   # [chains]
    e_phi_probe = np.einsum("cd,cdnp->cnp", phi, probe) / D                  # [chains, N, P]
    return e_phi_l[:, None, None] - e_phi_probe - phi.mean(1)[:, None, None] * whole_delta[None]


def response_pca(matrix, k: int = 2, standardize: bool = False) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Principal components of a response matrix ``[component, feature]`` (a ``LabelledArray`` or array):
    ``(scores [component, k], explained variance ratio [k], loadings [k, feature])``. Features are centred
    (and scaled to unit variance with ``standardize``); each component's sign is fixed so that its largest
    loading is positive."""
    x = np.asarray(matrix.values if isinstance(matrix, LabelledArray) else matrix, dtype=np.float64)
    if x.ndim != 2 or min(x.shape) < 2:
        raise ValueError(f"the response matrix must be [component, feature] with at least 2 of each, got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("the response matrix has NaN entries (components whose chains all diverged): drop them")
    x = x - x.mean(0)
    if standardize:
        sd = x.std(0)
        x = x / np.where(sd > 0, sd, 1.0)
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    k = min(k, len(s))
    signs = np.sign(vt[np.arange(k), np.abs(vt[:k]).argmax(1)])
    signs[signs == 0] = 1.0
    var = s ** 2
    return u[:, :k] * s[:k] * signs, var[:k] / var.sum(), vt[:k] * signs[:, None]


def _observations(source) -> Observations:
    """The ``Observations`` of an ``LLCResult`` (or the argument itself)."""
    if isinstance(source, Observations):
        return source
    obs = getattr(source, "observations", None)
    if not isinstance(obs, Observations):
        raise ValueError("no observations: run estimate_llc(..., observables={name: tokens}) with a probe set "
                         "from the sampling data among them")
    return obs


def _float(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _per_draw_mean(losses) -> np.ndarray:
    """``[chains, draws]`` mean over a probe set's tokens."""
    return _float(losses).mean(axis=(2, 3))


def _finite_chains(per_draw: np.ndarray) -> np.ndarray:
    return np.isfinite(per_draw).all(axis=1)


def _sem(per_chain: np.ndarray) -> np.ndarray:
    """Standard error of the mean over axis 0 (NaN with one chain)."""
    n = per_chain.shape[0]
    if n < 2:
        return np.full(per_chain.shape[1:], np.nan)
    return per_chain.std(axis=0, ddof=1) / np.sqrt(n)
