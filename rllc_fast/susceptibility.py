"""Susceptibilities of components to shifts of the data distribution towards probe sets, per token.

Baker et al. (arXiv 2504.18274, App. C.4): shifting the data distribution from the sampling task ``q``
towards a probe distribution changes the posterior expectation of a component's observable ``phi_C`` at
first order by ``chi = -Cov_C[phi_C, l_probe - L_q]`` per unit of ``n*beta``; it splits into one term per
probe token ``xy``. Estimated from one SGLD run that samples every component (weights restricted to
``C``) and the whole model, with per-token losses on fixed probe contexts at each draw
(``estimate_llc(..., observables=...)``):

    L(w)   = mean per-token loss on the sampling-task probe set        (the sampling loss, per draw)
    phi(w) = L(w) - l(w*)                                              (l(w*): the whole model's init loss)
    chi_C[xy] = E_C[ phi * (L - l_xy) ] - E_C[phi] * E_whole[ L - l_xy ]

``E_C`` averages over the draws of the run restricted to ``C``, ``E_whole`` over the whole model's run
(the baseline that replaces ``E_C[L - l_xy]``, as devinterp 2.0.1's ``compute_susceptibilities`` does; the
same formula is its numerical reference). The estimate is linear in ``E_C``: the pooled value is the mean
of the per-chain values, whose spread gives the standard error (chains that diverged are left out).
The aggregate susceptibility of a probe set is the mean over its tokens.
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
    chains_used:   ``[component]`` chains without divergence that entered the estimate.
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

    observations: an ``LLCResult`` from ``estimate_llc(..., observables=...)`` (its whole-model component's
                  ``init_loss`` is ``l(w*)``) or its ``Observations`` (then give ``init_loss``).
    sampling:     the probe set drawn from the sampling distribution (the ``L`` above).
    whole:        the component that is the whole model (the baseline run).
    probes, components: restrict to these (default: all but ``sampling`` / all but ``whole``).
    """
    obs, l_star = _observations_and_init_loss(observations, whole, init_loss)
    if sampling not in obs.names:
        raise ValueError(f"sampling={sampling!r} is not a probe set of this run; have {obs.names} (the sampling "
                         "task must be observed too: add a probe set drawn from the sampling data)")
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
    full_delta = {}
    for p in probes:
        probe = _float(obs.component_losses(p, whole))[full_ok]
        full_delta[p] = full_pt[full_ok].mean() - probe.mean(axis=(0, 1))    # [N, P]

    per_token = {p: np.full((len(comps),) + full_delta[p].shape, np.nan) for p in probes}
    per_token_sem = {p: np.full_like(per_token[p], np.nan) for p in probes}
    aggregate = np.full((len(comps), len(probes)), np.nan)
    aggregate_sem = np.full_like(aggregate, np.nan)
    used = np.zeros(len(comps), dtype=int)
    for i, c in enumerate(comps):
        pt = _per_draw_mean(obs.component_losses(sampling, c))                 # [chains, draws]
        ok = _finite_chains(pt)
        for p in probes:  # a diverged chain's losses are NaN from its divergence on, on every probe set
            ok &= np.isfinite(_float(obs.component_losses(p, c))).all(axis=(1, 2, 3))
        used[i] = int(ok.sum())
        if not used[i]:
            continue
        pt = pt[ok]
        phi = pt - l_star
        for j, p in enumerate(probes):
            probe = _float(obs.component_losses(p, c))[ok]                     # [chains, draws, N, P]
            chi = chain_susceptibilities(phi, pt, probe, full_delta[p])        # [chains, N, P]
            per_token[p][i], per_token_sem[p][i] = chi.mean(0), _sem(chi)
            agg = chi.mean(axis=(1, 2))
            aggregate[i, j], aggregate_sem[i, j] = agg.mean(), _sem(agg)
    return Susceptibilities(components=comps, probes=probes, sampling=sampling, whole=whole,
                            per_token=per_token, per_token_sem=per_token_sem, aggregate=aggregate,
                            aggregate_sem=aggregate_sem, chains_used=used)


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


def _observations_and_init_loss(source, whole: str, init_loss: Optional[float]) -> Tuple[Observations, float]:
    if isinstance(source, Observations):
        if init_loss is None:
            raise ValueError("init_loss is needed with an Observations (the whole model's l(w*)); or pass the "
                             "LLCResult, which holds it")
        return source, float(init_loss)
    obs = getattr(source, "observations", None)
    if not isinstance(obs, Observations):
        raise ValueError("no observations: run estimate_llc(..., observables={name: tokens}) with a probe set "
                         "from the sampling data among them")
    if init_loss is None:
        if whole not in source.estimates:
            raise ValueError(f"whole={whole!r} is not a component of this run; have {list(source.estimates)}")
        init_loss = source[whole].init_loss
    return obs, float(init_loss)


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
