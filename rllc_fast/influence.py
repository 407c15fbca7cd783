"""Bayesian influence functions: how the losses of two sets of samples co-vary over the local posterior.

Kreer et al. (arXiv 2509.26544): the influence of training sample ``z`` on query ``q`` is (minus
``n*beta`` times) the posterior covariance of their losses, ``Cov_w[l_q(w), l_z(w)]``, estimated from
SGLD draws of one component (or the whole model). Here it is the Pearson correlation (default) or the
covariance (``ddof = 1``) across the draws of all chains stacked, as devinterp 2.0.1's ``compute_bif``
with ``reduce_chain_dimension_method="stack"``: per sequence (losses averaged over positions) ->
``[Na, Nb]``, or per token -> ``[Na, Nb, Pa, Pb]``. The result is built in blocks of rows and columns
so that no temporary exceeds ``max_memory``; ``out`` may be a memory-mapped array for results that do
not fit in RAM. Chains that diverged (NaN losses on either side) are left out.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .memory import parse_bytes

PER = ("sequence", "token")
DEFAULT_BLOCK_BYTES = 256 * 2**20


def bayesian_influence(a, b=None, per: str = "sequence", covariance: bool = False, max_memory=None,
                       out: Optional[np.ndarray] = None) -> np.ndarray:
    """Influence between the samples of ``a`` (queries) and ``b`` (training samples; default ``a``).

    a, b: per-token losses ``[chains, draws, N, P]`` of one component over the same draws
          (``Observations.component_losses(probe, component)``).
    per:  ``"sequence"`` -> ``[Na, Nb]``; ``"token"`` -> ``[Na, Nb, Pa, Pb]``.
    covariance: the covariance (``ddof = 1``) instead of the correlation.
    max_memory: bytes (or "2GB") for one block's temporaries (default 256 MiB).
    out:  an array of the result's shape to fill (e.g. a ``np.memmap``); float32 otherwise.
    """
    if per not in PER:
        raise ValueError(f"per must be one of {PER}, got {per!r}")
    a = np.asarray(a) if not isinstance(a, np.memmap) else a
    b = a if b is None else b
    for name, x in (("a", a), ("b", b)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be per-token losses [chains, draws, N, P], got shape {x.shape}")
    if a.shape[:2] != b.shape[:2]:
        raise ValueError(f"a and b must come from the same draws: [chains, draws] {a.shape[:2]} vs {b.shape[:2]}")
    ok = _finite_chains(a) & _finite_chains(b)
    S = int(ok.sum()) * a.shape[1]
    if S < 3:
        raise ValueError(f"only {S} draws without divergence on both sides: too few for a correlation")
    Na, Pa = a.shape[2:]
    Nb, Pb = b.shape[2:]
    shape = (Na, Nb) if per == "sequence" else (Na, Nb, Pa, Pb)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif tuple(out.shape) != shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, the result is {shape}")
    za = _standardized(a, ok, per, covariance)                          # [S, Na, Pa'] centred (and scaled)
    zb = za if b is a else _standardized(b, ok, per, covariance)
    pa, pb = za.shape[2], zb.shape[2]
    budget = DEFAULT_BLOCK_BYTES if max_memory is None else parse_bytes(max_memory)
    rows, cols = _block_sizes(budget, S, Na, Nb, pa, pb)
    denom = (S - 1) if covariance else S
    for i in range(0, Na, rows):
        A = za[:, i : i + rows].reshape(S, -1)                          # [S, r*pa]
        for j in range(0, Nb, cols):
            B = zb[:, j : j + cols].reshape(S, -1)                      # [S, c*pb]
            block = (A.T @ B / denom).reshape(A.shape[1] // pa, pa, B.shape[1] // pb, pb)
            if per == "sequence":
                out[i : i + rows, j : j + cols] = block[:, 0, :, 0]
            else:
                out[i : i + rows, j : j + cols] = block.transpose(0, 2, 1, 3)
    return out


def _finite_chains(x) -> np.ndarray:
    return np.isfinite(np.asarray(x, dtype=np.float64)).all(axis=(1, 2, 3))


def _standardized(x, ok: np.ndarray, per: str, covariance: bool) -> np.ndarray:
    """``[S, N, P']`` (draws of the kept chains stacked): centred over the draws, and divided by the standard
    deviation (``ddof = 0``) unless ``covariance``; ``P' = 1`` per sequence. A constant series gives NaN."""
    x = np.asarray(x, dtype=np.float64)[ok]
    x = x.reshape(-1, *x.shape[2:])
    if per == "sequence":
        x = x.mean(axis=2, keepdims=True)
    x = x - x.mean(axis=0)
    if not covariance:
        with np.errstate(invalid="ignore", divide="ignore"):
            x = x / x.std(axis=0)
    return x


def _block_sizes(budget: int, S: int, Na: int, Nb: int, pa: int, pb: int):
    """Rows of ``a`` and columns of ``b`` per block: the block product ``[r*pa, c*pb]`` and its operands
    (float64) within ``budget`` bytes."""
    def cost(r, c):
        return 8 * (r * pa * c * pb * 2 + S * (r * pa + c * pb))
    rows, cols = Na, Nb
    while cost(rows, cols) > budget and (rows > 1 or cols > 1):
        if rows >= cols and rows > 1:
            rows = (rows + 1) // 2
        else:
            cols = (cols + 1) // 2
    return rows, cols
