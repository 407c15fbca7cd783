"""``rllc estimate``: the per-component rLLCs of one model, a checkpoint or the small built-in model."""
from __future__ import annotations

import time

from ..atomic import write_json_atomically
from ..progress import logger
from .common import add_model_arguments, add_sgld_arguments, device_of, model_and_data, sgld_config


def add_parser(sub) -> None:
    p = sub.add_parser(
        "estimate",
        help="per-component rLLCs of one model: a checkpoint (--checkpoint) or a small built-in model",
        description=(
            "Estimate the rLLC of each component of one model with SGLD: the checkpoint --checkpoint on the data "
            "--data, or (without --checkpoint) a small attention-only transformer trained for --train-steps on "
            "byte tokens of the Python standard library's source (offline), on held-out bytes of it."
        ),
    )
    add_model_arguments(p)
    p.add_argument("--components", choices=["heads", "groups", "layers", "mlps", "whole"], default="heads",
                   help="one rLLC per head, per key/value group (grouped-query attention), per layer, per MLP, or of "
                        "the whole model")
    add_sgld_arguments(p)
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay each SGLD step as CUDA graphs after a few eager steps (CUDA; heads, query heads or "
                        "groups only; fp32 or tf32)")
    p.add_argument("--output", help="write the full result (config, per-chain traces) as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bars or logs")
    p.set_defaults(func=run)


def run(args) -> int:
    """``rllc estimate``: see the module doc."""
    from .. import estimate_llc
    from ..sweep import COMPONENT_SETS

    log = logger(args.quiet)
    config = sgld_config(args, "estimate")
    device = device_of(args)
    model, _, data = model_and_data(args, "estimate", log)
    comps = None if args.components == "whole" else COMPONENT_SETS[args.components](model)
    t0 = time.time()
    try:
        result = estimate_llc(model, data.tokens, config, components=comps, engine=args.engine, device=device,
                              matmul_precision=args.matmul_precision, cuda_graph=args.cuda_graph,
                              progress=not args.quiet, max_memory=args.max_memory)
    except ValueError as err:
        raise SystemExit(f"rllc estimate: {err}") from None
    print(result.summary())
    log(f"sampled {len(result)} component(s) x {config.num_chains} chains x {config.num_steps} steps in "
        f"{time.time() - t0:.0f} s")
    if args.output:
        write_json_atomically(args.output, result.to_dict())
        log(f"wrote {args.output}")
    return 0
