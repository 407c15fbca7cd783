"""Step-size calibration: a short SGLD run per candidate step size, to pick one before a long sweep.

``calibrate_step_size`` returns one row per (step size, component) with the LLC, the distance travelled,
the sampler diagnostics (``rllc_fast.diagnostics``) and the problems they point to; ``suggest_step_size``
picks the largest step size without problems over which the LLC is stable; ``calibration_figure`` / ``plot_calibration`` draw the LLC
and the final distance against the step size per component (``rllc calibrate`` does all three).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import numpy as np

from .components import as_component_dict, whole_model_component
from .config import SGLDConfig
from .diagnostics import refined_exceeding_whole, step_size_problems
from .llc import estimate_llc
from .plotting import LLC_LABEL, head_colour, log_step_axis, save_figure, sort_key, subplots
from .result import ChainsDivergedError


#: The step sizes ``calibrate_step_size`` tries by default (and ``rllc calibrate --step-sizes``).
STEP_SIZES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
#: Draws per chain of each step size's run by default: a short run per step size (``rllc calibrate --draws``).
CALIBRATION_DRAWS = 50

#: Joins the problems of one row (the messages themselves contain ";" and ":").
PROBLEM_SEPARATOR = " | "


def calibrate_step_size(
    model,
    data,
    step_sizes: Iterable[float] = STEP_SIZES,
    config: Optional[SGLDConfig] = None,
    components=None,
    num_draws: int = CALIBRATION_DRAWS,
    **estimate_kwargs,
) -> List[dict]:
    """Run ``estimate_llc`` for each step size (``num_draws`` draws, other settings from ``config``) and
    return one row per (step size, component):

    - ``step_size, component, llc_mean, llc_std`` (across chains), ``diverged_chains``, ``num_chains``;
    - ``final_distance``: mean ``||v - v*||`` at the last draw over the chains that did not diverge;
    - the diagnostics ``rhat, rhat_limit, ess, ess_fraction, distance_growth`` (``SamplerDiagnostics``);
    - ``problems``: what is wrong, each with its fix, joined by " | " ("" when nothing is): the step size
      itself (``step_size_problems``), diverged chains, the diagnostics (``problems``), and a refined LLC
      above the whole-model LLC when one of ``components`` is the whole model.

    The warnings ``estimate_llc`` would raise for these runs are not raised: they are the ``problems``
    column. A good step size has no problems, an LLC that does not change much with the step size, and
    chains that agree (small ``llc_std``). Use ``pandas.DataFrame(rows)`` to tabulate and
    ``suggest_step_size(rows)`` for the largest step size without problems over which the LLC is stable.
    Give ``config`` a burn-in (e.g. ``num_burnin=20``) to compare step sizes on settled chains: without one,
    the warm-up from ``w*`` is a large part of 50 draws and can raise R-hat above 1.1 at good step sizes.
    """
    config = SGLDConfig() if config is None else config
    components = as_component_dict(model, components)
    whole = whole_model_component(model, components) if len(components) > 1 else None
    rows: List[dict] = []
    for eps in step_sizes:
        cfg = dataclasses.replace(config, step_size=float(eps), num_draws=num_draws)
        try:
            with warnings.catch_warnings():  # divergence and diagnostics go into the rows instead
                warnings.simplefilter("ignore", RuntimeWarning)
                result = estimate_llc(model, data, cfg, components=components, **estimate_kwargs)
        except ChainsDivergedError as err:  # some component lost every chain; report all as measured
            result = err.result
        above = {}
        if whole is not None:
            w = result[whole]
            above = refined_exceeding_whole({k: e.llc_mean for k, e in result.estimates.items() if k != whole},
                                            w.llc_mean, {k: e.llc_sem for k, e in result.estimates.items()},
                                            w.llc_sem, warn=False)
        before = step_size_problems(cfg.step_size, cfg.localization, cfg.sampler)
        for name in result.components:
            e = result[name]
            last = e.distance_trace[~e.diverged, -1]
            found = list(before)
            if e.num_diverged:
                found.append(f"{e.num_diverged} of {cfg.num_chains} chains diverged (NaN/Inf loss): lower step_size")
            found += e.diagnostics.problems()
            if name in above:
                found.append(f"above the whole-model LLC by {above[name]:.3g}: lower step_size")
            rows.append(dict(step_size=float(eps), component=name, llc_mean=e.llc_mean, llc_std=e.llc_std,
                             diverged_chains=e.num_diverged, num_chains=cfg.num_chains,
                             final_distance=float(last.mean()) if last.size else float("nan"),
                             **e.diagnostics.as_dict(), problems=PROBLEM_SEPARATOR.join(found)))
    return rows


def suggest_step_size(rows: Sequence[dict], tolerance: float = 0.1) -> Optional[float]:
    """A step size from ``calibrate_step_size``'s ``rows``: the largest one at which no component has a
    problem and up to which the LLC is stable, or None when every step size has problems.

    Walking up the step sizes without problems from the smallest, each next one is accepted while the
    median over components of ``|llc(next) / llc(previous) - 1|`` stays within ``tolerance`` (default 10%):
    a larger step mixes faster but biases the LLC upwards (``step_size_problems``), and the diagnostics
    see unstable or unsettled chains, not every bias."""
    steps = sorted({r["step_size"] for r in rows})
    clean = [s for s in steps if not any(r["problems"] for r in rows if r["step_size"] == s)]
    if not clean:
        return None
    llc = {(r["step_size"], r["component"]): r["llc_mean"] for r in rows}
    chosen = clean[0]
    for nxt in clean[1:]:
        changes = [abs(llc[nxt, c] / v - 1) for (s, c), v in llc.items() if s == chosen and v != 0 and (nxt, c) in llc]
        if not changes or float(np.median(changes)) > tolerance:
            break
        chosen = nxt
    return chosen


def calibration_figure(rows: Sequence[dict], title: str = "step-size calibration"):
    """Two panels against the step size (log axis), one line per component: (a) the LLC (symmetric log
    axis: bad step sizes reach 1e10 and more), (b) the mean ``||v - v*||`` at the last draw (log axis).
    Points of a (step size, component) with problems get a black cross, step sizes at which some component
    lost every chain a red band, the suggested step size a dotted line. Returns the figure."""
    if not rows:
        raise ValueError("rows is empty: run calibrate_step_size first")
    names = sorted({r["component"] for r in rows}, key=sort_key)
    fig, axes = subplots(1, 2, figsize=(13.5, 4.6))
    for i, name in enumerate(names):
        mine = sorted((r for r in rows if r["component"] == name), key=lambda r: r["step_size"])
        x = np.array([r["step_size"] for r in mine])
        bad = np.array([bool(r["problems"]) for r in mine])
        colour = head_colour(name, i, len(names))
        for ax, key in zip(axes, ("llc_mean", "final_distance")):
            y = np.array([r[key] for r in mine], dtype=float)
            ax.plot(x, y, marker="o", markersize=3.5, linewidth=1.4, color=colour, label=name)
            ax.plot(x[bad], y[bad], linestyle="none", marker="x", markersize=9, color="black")
    suggested = suggest_step_size(rows)
    lost = sorted({r["step_size"] for r in rows if r["diverged_chains"] == r["num_chains"]})
    for ax, label in zip(axes, ("(a) LLC  $\\hat\\lambda$", "(b) $||w - w^*||$ at the last draw")):
        for step in lost:  # nothing to plot there: mark it
            ax.axvspan(step / 1.25, step * 1.25, color="red", alpha=0.15, linewidth=0)
        steps = [r["step_size"] for r in rows]
        log_step_axis(ax, steps, label="SGLD step size")
        ax.set_xlim(min(steps) / 1.6, max(steps) * 1.6)  # every step size, even where all chains diverged
        ax.set_title(label)
        if suggested is not None:
            ax.axvline(suggested, color="grey", linestyle=":", linewidth=1.2)
    axes[0].set_yscale("symlog", linthresh=1.0)
    axes[0].set_ylabel(LLC_LABEL)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("$||w - w^*||$ (weight units)")
    axes[0].plot([], [], linestyle="none", marker="x", color="black", label="problems")
    if lost:
        axes[0].fill_between([], [], [], color="red", alpha=0.15, label="every chain diverged (a component)")
    if suggested is not None:
        axes[0].plot([], [], color="grey", linestyle=":", label=f"suggested {suggested:g}")
    ncol = 1 + len(names) // 20
    fig.legend(*axes[0].get_legend_handles_labels(), loc="center right", fontsize=7, ncol=ncol, title="component",
               title_fontsize=7)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1 - 0.16 * ncol, 1))
    return fig


def plot_calibration(rows: Sequence[dict], path, title: str = "step-size calibration") -> Path:
    """``calibration_figure(rows, title)`` written as a PNG to ``path``."""
    return save_figure(calibration_figure(rows, title), path)


def format_calibration(rows: Sequence[dict]) -> str:
    """A plain-text table of ``rows`` (one line per step size and component; problems in short) and, per
    step size, how many components have problems, then the suggested step size."""
    head = (f"{'step':>8} {'component':>10} {'llc_mean':>11} {'llc_std':>9} {'div':>5} {'distance':>10} "
            f"{'rhat':>6} {'ess':>7} {'growth':>8}  problems")
    lines = [head]
    for r in rows:
        short = "; ".join(_label(p) for p in r["problems"].split(PROBLEM_SEPARATOR)) if r["problems"] else ""
        lines.append(f"{r['step_size']:8.2g} {r['component']:>10} {_num(r['llc_mean'], 11)} {_num(r['llc_std'], 9)} "
                     f"{r['diverged_chains']:>2}/{r['num_chains']:<2} {_num(r['final_distance'], 10)} "
                     f"{_num(r['rhat'], 6, 3)} {_num(r['ess'], 7, fixed=True)} {_num(r['distance_growth'], 8, 3)}  {short}")
    for step in sorted({r["step_size"] for r in rows}):
        mine = [r for r in rows if r["step_size"] == step]
        flagged = [r["component"] for r in mine if r["problems"]]
        lines.append(f"step size {step:g}: {len(flagged)} of {len(mine)} component(s) with problems"
                     + (f" ({', '.join(flagged[:6])}{', ...' if len(flagged) > 6 else ''})" if flagged else ""))
    suggested = suggest_step_size(rows)
    lines.append(f"suggested step size: {suggested:g} (the largest without problems up to which the LLC changes by "
                 "<= 10% per step size)" if suggested is not None
                 else "no step size is free of problems: try smaller step sizes or more draws (--draws, --burnin)")
    return "\n".join(lines)


def _label(problem: str) -> str:
    """The head of a problem message: the text before its first " (" or ":"."""
    return problem.split(":")[0].split(" (")[0]


def _num(x: float, width: int, digits: int = 4, fixed: bool = False) -> str:
    """``x`` in ``width`` characters: ``digits`` significant digits, or no decimals when ``fixed``; "-" for NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return f"{'-':>{width}}"
    return f"{x:{width}.0f}" if fixed else f"{x:{width}.{digits}g}"
