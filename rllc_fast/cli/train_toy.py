"""``rllc train-toy``: train the demo's toy model with log-spaced checkpoints into the cache (see
``rllc_fast.toy``)."""
from __future__ import annotations

import dataclasses

from ..progress import logger
from .args import positive_int
from .common import add_toy_arguments


def add_parser(sub) -> None:
    from ..toy import QUICK_RECIPE, ToyRecipe

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
    add_toy_arguments(toy)
    toy.set_defaults(func=run)


def run(args) -> int:
    """``rllc train-toy``: see the module doc."""
    from ..analysis.head_scores import scores_by_head
    from ..toy import QUICK_RECIPE, ToyRecipe, train_toy

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
    trained = train_toy(args.cache, recipe, progress=not args.quiet, log=logger(args.quiet), force=args.force)
    final = trained.final
    print(f"{len(trained.metrics)} checkpoints in {trained.directory}")
    print(f"loss on repeated random spans at step {final['step']}: first copy {final['loss_first_copy']:.2f}, "
          f"repeated copy {final['loss_repeat_copy']:.2f} nats (step 0: {trained.metrics[0]['loss_repeat_copy']:.2f})")
    prev, ind = scores_by_head(final["previous_token"]), scores_by_head(final["induction"])
    for name, kind in trained.head_types().items():
        print(f"  head {name}: previous-token {prev[name]:.2f}, induction {ind[name]:.2f}  -> {kind}")
    return 0
