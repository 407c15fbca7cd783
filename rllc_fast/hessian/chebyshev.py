"""Approximate rank: the number of eigenvalues above a threshold ``tau``, by the Chebyshev-filter estimator of
Ubaru & Saad (2016) with Jackson damping, for any symmetric operator given as a batched matvec.

The step function ``1[x >= tau]`` on the spectral interval ``[a, b]`` is expanded in Chebyshev polynomials
of the rescaled operator ``(2A - (a+b)I) / (b-a)``, damped with Jackson coefficients (no Gibbs
oscillation), and ``v^T p(A) v`` is averaged over Rademacher probes. The moments ``v^T T_k v`` up to
degree ``m`` come from ``ceil(m/2)`` matvecs (``T_{2k} = 2 T_k^2 - T_0``, ``T_{2k+1} = 2 T_{k+1} T_k - T_1``).
Every eigenvalue must lie in ``[a, b]`` (outside, Chebyshev polynomials explode): ``spectral_bounds``
estimates the extremes by power iteration, and ``count_above`` refuses an interval that does not hold them.

Vectors are rows of ``[J, n]`` tensors (one probe per row); ``matvec`` maps ``[J, n] -> [J, n]``.
"""
from __future__ import annotations

import math
from typing import Callable, Tuple

import numpy as np
import torch

Matvec = Callable[[torch.Tensor], torch.Tensor]


class SpectrumOutsideIntervalError(ValueError):
    """An eigenvalue found by power iteration lies outside the spectral interval of the rank estimator."""


def jackson_damping(degree: int) -> np.ndarray:
    """``[degree + 1]`` Jackson damping factors ``g_k`` (``g_0 = 1``)."""
    m = degree
    alpha = math.pi / (m + 2)
    k = np.arange(m + 1)
    return ((1 - k / (m + 2)) * math.sin(alpha) * np.cos(k * alpha)
            + math.cos(alpha) * np.sin(k * alpha) / (m + 2)) / math.sin(alpha)


def step_coefficients(degree: int, a: float, b: float, tau: float) -> np.ndarray:
    """``[degree + 1]`` damped Chebyshev coefficients of ``1[x >= tau]`` for ``x`` in ``[a, b]``."""
    if not a < tau < b:
        raise ValueError(f"tau = {tau} must lie inside the spectral interval ({a}, {b})")
    t = (2 * tau - (a + b)) / (b - a)
    theta = math.acos(t)
    k = np.arange(1, degree + 1)
    c = np.empty(degree + 1)
    c[0] = theta / math.pi  # = (acos(t) - acos(1)) / pi
    c[1:] = 2 * np.sin(k * theta) / (k * math.pi)
    return c * jackson_damping(degree)


def chebyshev_moments(matvec: Matvec, v: torch.Tensor, degree: int, a: float, b: float) -> torch.Tensor:
    """``[J, degree + 1]`` float64 moments ``v_j^T T_k(A~) v_j`` of the rescaled operator, from
    ``ceil(degree / 2)`` matvecs; ``a`` and ``b`` are floats or per-row ``[J]`` arrays."""
    a = torch.as_tensor(np.broadcast_to(np.asarray(a, dtype=np.float64), (v.shape[0],)).copy(), device=v.device)
    b = torch.as_tensor(np.broadcast_to(np.asarray(b, dtype=np.float64), (v.shape[0],)).copy(), device=v.device)
    center, half = ((a + b) / 2)[:, None].to(v.dtype), ((b - a) / 2)[:, None].to(v.dtype)

    def scaled(x):
        return (matvec(x) - center * x) / half

    dot = lambda x, y: (x.double() * y.double()).sum(1)
    half_degree = (degree + 1) // 2
    w_prev, w = v, scaled(v)  # T_0 v, T_1 v
    ws = [w_prev, w]
    for _ in range(1, half_degree):
        w_prev, w = w, 2 * scaled(w) - w_prev
        ws.append(w)
    mu0, mu1 = dot(v, v), dot(v, ws[1])
    moments = torch.zeros(v.shape[0], degree + 1, dtype=torch.float64, device=v.device)
    for k in range(len(ws)):
        if 2 * k <= degree:
            moments[:, 2 * k] = 2 * dot(ws[k], ws[k]) - mu0
        if 2 * k + 1 <= degree and k + 1 < len(ws):
            moments[:, 2 * k + 1] = 2 * dot(ws[k + 1], ws[k]) - mu1
    moments[:, 0], moments[:, 1] = mu0, mu1
    return moments


def power_iteration(matvec: Matvec, v0: torch.Tensor, iters: int = 30, shift=None) -> torch.Tensor:
    """``[J]`` Rayleigh quotients after ``iters`` steps of power iteration on ``A - shift I`` (row-wise shift
    ``[J]`` or None), plus the shift: the eigenvalue of ``A`` farthest from ``shift``."""
    shift = torch.zeros(v0.shape[0], dtype=torch.float64, device=v0.device) if shift is None else shift
    op = lambda x: matvec(x) - shift[:, None].to(x.dtype) * x
    v = v0 / v0.norm(dim=1, keepdim=True).clamp_min(1e-30)
    lam = torch.zeros_like(shift)
    for _ in range(iters):
        w = op(v)
        lam = (v.double() * w.double()).sum(1)
        v = w / w.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return lam + shift


def spectral_bounds(matvec: Matvec, v0: torch.Tensor, iters: int = 30) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(lowest, highest)`` eigenvalue estimates ``[J]`` per row: power iteration finds the eigenvalue of
    largest magnitude, then power iteration shifted by it finds the other end. Estimates lie inside the
    true extremes (they approach them from within)."""
    first = power_iteration(matvec, v0, iters)
    other = power_iteration(matvec, v0.flip(1), iters, shift=first)
    return torch.minimum(first, other), torch.maximum(first, other)


def check_interval(low, high, a: float, b: float, names) -> None:
    """Raise ``SpectrumOutsideIntervalError`` when some row's ``[low, high]`` is not inside ``[a, b]``."""
    bad = [f"{n}: eigenvalues found in [{lo:.4g}, {hi:.4g}]" for n, lo, hi in zip(names, low.tolist(), high.tolist())
           if lo < a or hi > b]
    if bad:
        raise SpectrumOutsideIntervalError(
            f"the spectral interval [{a:.4g}, {b:.4g}] does not contain the spectrum ({'; '.join(bad)}): "
            "Chebyshev polynomials explode outside it, so the rank would be meaningless; widen the interval "
            "or use interval='adaptive'")


def count_above(matvec: Matvec, probes: torch.Tensor, a, b, tau, degree: int) -> torch.Tensor:
    """``[J]`` per-probe estimates ``v^T p(A) v`` of the number of eigenvalues ``>= tau`` (``probes`` Rademacher,
    rows zero outside the operator's space). Their mean over probes is the approximate rank. ``a``, ``b``
    and ``tau`` are floats or per-row ``[J]`` arrays (each row its own interval and threshold)."""
    if degree < 2:
        raise ValueError(f"degree must be >= 2, got {degree}")
    J = probes.shape[0]
    a, b, tau = (np.broadcast_to(np.asarray(x, dtype=np.float64), (J,)) for x in (a, b, tau))
    coeffs = np.stack([step_coefficients(degree, a[j], b[j], tau[j]) for j in range(J)])
    return (chebyshev_moments(matvec, probes, degree, a, b) * torch.as_tensor(coeffs, device=probes.device)).sum(1)


def adaptive_interval(low, high, margin: float = 1.2) -> Tuple[float, float, float]:
    """The paper's adaptive method: ``(-margin L, margin L)`` with ``L`` the largest |eigenvalue| found;
    returns ``(a, b, L)``."""
    largest = float(max(abs(float(low)), abs(float(high))))
    if largest == 0.0:
        largest = 1e-12
    return -margin * largest, margin * largest, largest


def matrix_rank(matrix: torch.Tensor, tau: float, interval="adaptive", degree: int = 100, num_probes: int = 100,
                seed: int = 0, tau_fraction=None, power_iters: int = 50):
    """Approximate rank of a symmetric ``[n, n]`` matrix (for checks against known spectra): returns
    ``(estimate, standard error, (a, b))``. ``tau`` is absolute; ``interval`` is ``(a, b)`` or "adaptive".
    The probes and the start vector are drawn from a CPU generator (the same for a seed on every device) and
    copied once to the matrix's device and dtype, where all the work runs."""
    n = matrix.shape[0]
    gen = torch.Generator().manual_seed(seed)
    probes = (torch.randint(0, 2, (num_probes, n), generator=gen) * 2 - 1).to(device=matrix.device,
                                                                               dtype=matrix.dtype)
    start = torch.randn(1, n, generator=gen, dtype=matrix.dtype).to(matrix.device)
    matvec = lambda x: x @ matrix
    low, high = spectral_bounds(matvec, start, power_iters)
    if interval == "adaptive":
        a, b, largest = adaptive_interval(low[0], high[0])
        tau = tau if tau_fraction is None else tau_fraction * largest
    else:
        a, b = map(float, interval)
        check_interval(low, high, a, b, ["matrix"])
    samples = count_above(matvec, probes, a, b, tau, degree).cpu().numpy()
    return float(samples.mean()), float(samples.std(ddof=1) / np.sqrt(num_probes)), (a, b)
