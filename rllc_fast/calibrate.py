"""Step-size calibration: a short SGLD run per candidate step size, to pick one before a long sweep."""
from __future__ import annotations

import dataclasses
import warnings
from typing import Iterable, List, Optional

from .components import as_component_dict
from .config import SGLDConfig
from .llc import estimate_llc
from .result import ChainsDivergedError


def calibrate_step_size(
    model,
    data,
    step_sizes: Iterable[float] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
    config: Optional[SGLDConfig] = None,
    components=None,
    num_draws: int = 50,
    **estimate_kwargs,
) -> List[dict]:
    """Run ``estimate_llc`` for each step size (``num_draws`` draws, other settings from ``config``) and
    return one row per (step size, component): ``step_size, component, llc_mean, llc_std`` (across
    chains), ``diverged_chains``, ``num_chains`` and ``final_distance`` (mean ``||v - v*||`` at the last
    draw). A good step size has no diverged chain, an LLC that does not change much with the
    step size, and chains that agree (small ``llc_std``). Use ``pandas.DataFrame(rows)`` to tabulate.
    """
    config = SGLDConfig() if config is None else config
    components = as_component_dict(model, components)
    rows: List[dict] = []
    for eps in step_sizes:
        cfg = dataclasses.replace(config, step_size=float(eps), num_draws=num_draws)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                result = estimate_llc(model, data, cfg, components=components, **estimate_kwargs)
        except ChainsDivergedError as err:  # some component lost every chain; report all as measured
            result = err.result
        for name in result.components:
            e = result[name]
            last = e.distance_trace[~e.diverged, -1]
            rows.append(dict(step_size=float(eps), component=name, llc_mean=e.llc_mean, llc_std=e.llc_std,
                             diverged_chains=e.num_diverged, num_chains=cfg.num_chains,
                             final_distance=float(last.mean()) if last.size else float("nan")))
    return rows
