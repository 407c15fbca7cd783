"""The ``rllc calibrate`` subcommand: LLC, distance and sampler diagnostics against the step size, per
component, for one model (a checkpoint, or the built-in model of ``rllc estimate``) on one data
distribution; a table on the terminal, ``calibrate.csv`` and ``calibrate.png`` in ``--out``."""
from __future__ import annotations

import time
from pathlib import Path

from ..calibrate import CALIBRATION_DRAWS, STEP_SIZES
from ..progress import logger
from .common import (add_model_arguments, add_sgld_arguments, component_sets, device_of, model_and_data,
                     sgld_config)

#: --step-sizes when not given: ``calibrate_step_size``'s.
DEFAULT_STEP_SIZES = ",".join(f"{s:g}" for s in STEP_SIZES)
#: The SGLD defaults of ``rllc calibrate`` that are not SGLDConfig's: flag -> (value, why), shown in --help.
SGLD_DEFAULTS = {
    "draws": (CALIBRATION_DRAWS, "a short run per step size, as in calibrate_step_size"),
    "burnin": (20, "step sizes are compared on settled chains (without burn-in the warm-up from w* is a large part "
                   "of 50 draws and can push R-hat above 1.1 at good step sizes)"),
}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "calibrate",
        help="LLC, ||w - w*|| and sampler diagnostics against SGLD step size per component, to choose a step size",
        description=(
            "Run a short SGLD estimate at each --step-sizes value for every component of one model (a checkpoint, "
            "or without --checkpoint the built-in model of `rllc estimate`) on one --data distribution. Prints, per "
            "step size and component, the LLC, the distance from w* at the last draw, R-hat, ESS and the growth of "
            "||w - w*||, with the problems they point to; writes calibrate.csv and calibrate.png (LLC and distance "
            "against step size) to --out. SGLD settings are SGLDConfig's but --draws and --burnin (see each). "
            "See docs/diagnostics.md."
        ),
    )
    add_model_arguments(p, folders=True)
    p.add_argument("--components", default="heads,whole",
                   help="comma-separated component sets: whole, heads, groups, layers, mlps (with the whole model, refined LLCs "
                        "above it are flagged)")
    p.add_argument("--step-sizes", default=DEFAULT_STEP_SIZES, help="comma-separated SGLD step sizes to try")
    p.add_argument("--out", default="rllc-calibrate", help="output folder for calibrate.csv and calibrate.png")
    add_sgld_arguments(p, defaults=SGLD_DEFAULTS, exclude=("step-size",))
    p.add_argument("--quiet", action="store_true", help="no progress bars or logs")
    p.set_defaults(func=run)


def run(args) -> int:
    """``rllc calibrate``: see the module doc."""
    from ..calibrate import calibrate_step_size, format_calibration, plot_calibration
    from ..sweep import COMPONENT_SETS

    step_sizes = _step_sizes(args.step_sizes)
    sets = component_sets(args, "calibrate")
    config = sgld_config(args, "calibrate", step_size=step_sizes[0])  # each run replaces the step size
    log = logger(args.quiet)
    device = device_of(args)
    model, label, data = model_and_data(args, "calibrate", log)
    components = {}
    for s in sets:
        components.update(COMPONENT_SETS[s](model))
    log(f"calibrating {label} on {data.name}: {len(components)} component(s) x step sizes "
        f"{', '.join(f'{s:g}' for s in step_sizes)} ({config.num_chains} chains x {config.num_draws} draws)")
    t0 = time.time()
    rows = calibrate_step_size(model, data.tokens, step_sizes, config, components=components,
                               num_draws=config.num_draws, engine=args.engine, device=device,
                               matmul_precision=args.matmul_precision,
                               progress=not args.quiet, max_memory=args.max_memory)
    log(f"sampled in {time.time() - t0:.0f} s")
    print(format_calibration(rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import pandas as pd

    from ..atomic import write_atomically

    csv = write_atomically(out / "calibrate.csv", lambda tmp: pd.DataFrame(rows).to_csv(tmp, index=False))
    png = plot_calibration(rows, out / "calibrate.png", f"step-size calibration: {label} on {data.name}")
    log(f"wrote {csv} and {png}")
    return 0


def _step_sizes(text: str):
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(not v > 0 or v == float("inf") for v in values):
        raise SystemExit(f"rllc calibrate: --step-sizes {text!r}: give comma-separated numbers > 0, e.g. "
                         f"{DEFAULT_STEP_SIZES}")
    return sorted(set(values))
