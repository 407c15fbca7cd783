"""The ``rllc demo`` and ``rllc train-toy`` subcommands (see ``rllc_fast.demo`` and ``rllc_fast.toy``)."""
from __future__ import annotations

import dataclasses

from .cli_args import positive_int
from .progress import logger


def _toy_arguments(p) -> None:
    p.add_argument("--cache", help="folder for trained toy runs (default $RLLC_CACHE, else ~/.cache/rllc_fast)")
    p.add_argument("--quick", action="store_true", help="the small version (about 2 minutes on 2 cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the toy run (weights, data, SGLD)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or logs")


def add_parsers(sub) -> None:
    from .demo import FULL, QUICK
    from .toy import QUICK_RECIPE, ToyRecipe

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
    _toy_arguments(demo)
    demo.set_defaults(func=_cmd_demo)

    toy = sub.add_parser(
        "train-toy",
        help="train the demo's toy model with log-spaced checkpoints (cached)",
        description=(
            "Train a 2-layer attention-only model on the synthetic mixture with log-spaced checkpoints, "
            "deterministic under --seed, into the cache (reused when already trained); print the checkpoint "
            "folder and the final head scores."
        ),
    )
    toy.add_argument("--steps", type=positive_int,
                     help=f"training steps (default {ToyRecipe().steps}; --quick {QUICK_RECIPE.steps})")
    toy.add_argument("--checkpoints", type=int, help=f"about this many log-spaced checkpoints (default "
                                                     f"{ToyRecipe().checkpoints}; --quick {QUICK_RECIPE.checkpoints})")
    toy.add_argument("--force", action="store_true", help="train again even when the cache has this run")
    _toy_arguments(toy)
    toy.set_defaults(func=_cmd_train_toy)


def _cmd_demo(args) -> int:
    from .demo import FULL, QUICK, format_summary, run_demo

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


def _cmd_train_toy(args) -> int:
    from .analysis.head_scores import scores_by_head
    from .toy import QUICK_RECIPE, ToyRecipe, train_toy

    recipe = QUICK_RECIPE if args.quick else ToyRecipe()
    changes = {"seed": args.seed}
    if args.steps is not None:
        changes["steps"] = args.steps
    if args.checkpoints is not None:
        changes["checkpoints"] = args.checkpoints
    try:
        recipe = dataclasses.replace(recipe, **changes)
        recipe.check()
    except ValueError as err:
        raise SystemExit(f"rllc train-toy: {err}") from None
    run = train_toy(args.cache, recipe, progress=not args.quiet, log=logger(args.quiet), force=args.force)
    final = run.final
    print(f"{len(run.metrics)} checkpoints in {run.directory}")
    print(f"loss on repeated random spans at step {final['step']}: first copy {final['loss_first_copy']:.2f}, "
          f"repeated copy {final['loss_repeat_copy']:.2f} nats (step 0: {run.metrics[0]['loss_repeat_copy']:.2f})")
    prev, ind = scores_by_head(final["previous_token"]), scores_by_head(final["induction"])
    for name, kind in run.head_types().items():
        print(f"  head {name}: previous-token {prev[name]:.2f}, induction {ind[name]:.2f}  -> {kind}")
    return 0
