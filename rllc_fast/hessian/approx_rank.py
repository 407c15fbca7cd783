"""``approx_rank``: the approximate rank of each component's Hessian block ``H_VV`` (Appendix D.3), by the
Chebyshev-Jackson estimator of ``chebyshev.py`` with the paper's "fixed" or "adaptive" spectral interval.

All components run together: each probe lives on one component's weights and every matvec is one batched
set of HVPs over all components' probes, restricted back to each probe's component.
"""
from __future__ import annotations

import time
from typing import Callable, Optional, Tuple, Union

import numpy as np
from torch import nn

from ..progress import Progress
from .chebyshev import adaptive_interval, check_interval, count_above, spectral_bounds
from .operator import DataHessian, only_grad_for
from .result import HessianResult, summarise
from .setup import KEEP_GRAPHS, STRIDE, prepare_rows, warn_unused


def approx_rank(model: nn.Module, data, components=None, tau: Optional[float] = None,
                interval: Union[str, Tuple[float, float]] = "adaptive", tau_fraction: float = 0.07,
                degree: int = 100, num_probes: int = 10, num_batches: int = 3, batch_size: int = 8,
                power_iters: int = 30, margin: float = 1.2, loss_fn: Optional[Callable] = None, hvp: str = "auto",
                probe_chunk: Optional[int] = None, seed: int = 0, device=None, progress: bool = False) -> HessianResult:
    """Number of eigenvalues of each component's Hessian block above ``tau``, with standard errors.

    interval:  "adaptive" (the paper's: ``(-margin L, margin L)`` per component, ``L`` the largest |eigenvalue|
               from power iteration, and ``tau = tau_fraction * L`` unless ``tau`` is given) or a fixed ``(a, b)``
               with an absolute ``tau`` (the paper's fixed method: ``(-1000, 6000)``, ``tau = 500``). A fixed
               interval that does not hold the power-iteration extremes raises ``SpectrumOutsideIntervalError``.
    degree:    Chebyshev degree (``ceil(degree/2)`` matvecs per probe); the step's width is about
               ``2 pi (b - a) / (2 degree)``, so resolving ``tau`` needs ``degree >> (b - a) / tau``.
    Defaults follow the paper (3 batches, degree 100) with 10 probes. Returns metric ``"hessian-rank"``;
    ``info`` holds each component's interval, threshold and power-iteration extremes.
    """
    for name, value in dict(num_probes=num_probes, degree=degree, power_iters=power_iters).items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    fixed = interval != "adaptive"
    if fixed:
        try:
            a_fixed, b_fixed = (float(x) for x in interval)
        except (TypeError, ValueError):
            raise ValueError(f"interval must be 'adaptive' or a pair (a, b), got {interval!r}") from None
        if not a_fixed < b_fixed:
            raise ValueError(f"interval (a, b) needs a < b, got {interval!r}")
        if tau is None or not a_fixed < tau < b_fixed:
            raise ValueError(f"a fixed interval needs an absolute tau inside it, got tau={tau!r} for {interval!r}")
    t0 = time.time()
    setup, loss_fn = prepare_rows(model, components, data, loss_fn, num_batches, batch_size, seed, hvp, probe_chunk,
                                  device)
    comps, support, batches, method, chunk, names = (setup.comps, setup.support, setup.batches, setup.method,
                                                     setup.chunk, setup.names)
    owners = [n for n in names for _ in range(num_probes)]
    streams = [i * STRIDE + p for i in range(len(names)) for p in range(num_probes)]
    matvecs = 2 * power_iters + (degree + 1) // 2
    bar = Progress(matvecs * len(owners) * len(batches), progress, desc="Hessian rank", unit="HVP")
    info = {}
    with only_grad_for(model, support.names):
        warn_unused(model, loss_fn, batches[0], support, comps)
        hessian = DataHessian(model, loss_fn, batches, support, method, chunk, keep_graphs=len(batches) <= KEEP_GRAPHS,
                              on_hvp=bar.update)
        start = support.component_probes(names, seed + 1, [i * STRIDE for i in range(len(names))])
        low, high = spectral_bounds(lambda v: hessian.matvec(v, names), start, power_iters)
        if fixed:
            check_interval(low, high, a_fixed, b_fixed, names)
        probes = support.component_probes(owners, seed, streams)
        bounds = []
        lows, highs = low.tolist(), high.tolist()  # the intervals are needed on the host: one copy
        for j, name in enumerate(names):
            if fixed:
                a, b, t = a_fixed, b_fixed, tau
            else:
                a, b, largest = adaptive_interval(lows[j], highs[j], margin)
                t = tau if tau is not None else tau_fraction * largest
            bounds.append((a, b, t))
            info[name] = {"interval": [a, b], "tau": t, "lowest_eigenvalue": lows[j], "highest_eigenvalue": highs[j]}
        per_row = np.repeat(np.array(bounds), num_probes, axis=0)  # [J, 3]: every probe its component's
        counts = count_above(lambda v: hessian.matvec(v, owners), probes, per_row[:, 0], per_row[:, 1],
                             per_row[:, 2], degree).cpu().numpy()
        samples = {n: counts[j * num_probes:(j + 1) * num_probes] for j, n in enumerate(names)}
    bar.close()
    estimates = {n: summarise(n, support.sizes[n], samples[n]) for n in names}
    config = dict(tau=tau, interval=interval if not fixed else [a_fixed, b_fixed], tau_fraction=tau_fraction,
                  degree=degree, num_probes=num_probes, num_batches=num_batches, batch_size=batch_size,
                  power_iters=power_iters, margin=margin, hvp=method, probe_chunk=chunk, seed=seed)
    return HessianResult("hessian-rank", estimates, config, time.time() - t0, info)
