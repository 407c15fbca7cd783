"""``rllc demo``: train (or reuse) the toy model and show per-head rLLC curves separating by head type (see
``rllc_fast.demo``)."""
from __future__ import annotations

import dataclasses

from ..progress import logger
from .args import positive_int
from .common import add_toy_arguments


def add_parser(sub) -> None:
    from ..demo import FULL, QUICK

    demo = sub.add_parser(
        "demo",
        help="train a toy model offline and show per-head rLLC curves separating by head type (the default run)",
        description=(
            "Train (or reuse from the cache) a 2-layer attention-only model on a synthetic mixture "
            "(n-grams, repeated spans, brackets, code-like), sweep whole-model LLC and per-head wrLLC on the "
            "mixture and per-head drLLC on the code-like source over every checkpoint, label previous-token "
            "and induction heads, and write a report. About 9 minutes on 2 CPU cores (--quick: about 2)."
        ),
    )
    demo.add_argument("--out", default="rllc-demo", help="output folder")
    demo.add_argument("--draws", type=positive_int,
                      help=f"SGLD draws per chain (default {FULL.num_draws}; --quick {QUICK.num_draws})")
    demo.add_argument("--chains", type=positive_int,
                      help=f"SGLD chains per estimate (default {FULL.num_chains}; --quick {QUICK.num_chains})")
    add_toy_arguments(demo)
    demo.set_defaults(func=run)


def run(args) -> int:
    """``rllc demo``: see the module doc."""
    from ..demo import FULL, QUICK, format_summary, run_demo

    settings = QUICK if args.quick else FULL
    settings = dataclasses.replace(
        settings,
        recipe=dataclasses.replace(settings.recipe, seed=args.seed),
        num_draws=args.draws or settings.num_draws,
        num_chains=args.chains or settings.num_chains,
    )
    summary = run_demo(args.out, cache_dir=args.cache, settings=settings, progress=not args.quiet, log=logger(args.quiet))
    print(format_summary(summary))
    print(f"done in {summary['seconds']:.0f} s")
    return 0
