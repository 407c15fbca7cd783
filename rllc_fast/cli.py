"""The ``rllc`` command line: ``rllc estimate`` and ``rllc info``."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch


def _estimate_parser(sub) -> None:
    p = sub.add_parser(
        "estimate",
        help="per-component rLLCs of a small built-in model (trained briefly on stdlib source bytes)",
        description=(
            "Train a small attention-only transformer for --train-steps on byte tokens of the Python "
            "standard library's source (offline), then estimate the rLLC of each component with SGLD."
        ),
    )
    p.add_argument("--components", choices=["heads", "layers", "whole"], default="heads")
    p.add_argument("--engine", choices=["batched", "generic", "reference"], default="batched",
                   help="batched (default: all replicas together, structured path for heads), generic "
                        "(batched, loop path) or reference (one chain at a time)")
    p.add_argument("--train-steps", type=int, default=300, help="Adam steps of the built-in model (default 300)")
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--context", type=int, default=64, help="tokens per context (default 64)")
    p.add_argument("--step-size", type=float, default=1e-3)
    p.add_argument("--nbeta", type=float, default=30.0)
    p.add_argument("--localization", type=float, default=200.0)
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--draws", type=int, default=50)
    p.add_argument("--burnin", type=int, default=0)
    p.add_argument("--thinning", type=int, default=1, help="SGLD steps per kept draw (default 1)")
    p.add_argument("--sampler", choices=["sgld", "rmsprop"], default="sgld",
                   help="plain SGLD (default, the paper's) or RMSProp-preconditioned SGLD")
    p.add_argument("--max-memory", help="activation memory for replica chunks, e.g. 8GB (default: automatic)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="write the full result (config, per-chain traces) as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_estimate)


def _cmd_estimate(args) -> int:
    from . import SGLDConfig, estimate_llc, heads, layers, whole
    from .data.stdlib_bytes import stdlib_byte_tokens
    from .models import attn_only
    from .models.train import train_next_token

    torch.manual_seed(args.seed)
    config = SGLDConfig(step_size=args.step_size, nbeta=args.nbeta, localization=args.localization,
                        num_chains=args.chains, num_draws=args.draws, num_burnin=args.burnin,
                        thinning=args.thinning, sampler=args.sampler, batch_size=args.batch_size, seed=args.seed)
    model = attn_only(seed=args.seed, n_layers=args.n_layers, d_model=args.d_model, n_heads=args.n_heads,
                      d_head=args.d_model // args.n_heads, n_ctx=args.context, d_vocab=256)
    train = stdlib_byte_tokens(2048, args.context, seed=args.seed)
    held_out = stdlib_byte_tokens(512, args.context, seed=args.seed + 1)
    _log(args, f"training a {sum(p.numel() for p in model.parameters()):,}-parameter model for {args.train_steps} steps")
    t0 = time.time()
    loss = train_next_token(model, train, args.train_steps, args.seed, progress=not args.quiet)
    _log(args, f"trained in {time.time() - t0:.0f} s, final training loss {loss:.3f} nats/byte")
    comps = {"heads": heads, "layers": layers, "whole": lambda m: None}[args.components](model)
    t0 = time.time()
    result = estimate_llc(model, held_out, config, components=comps, engine=args.engine, progress=not args.quiet,
                          max_memory=args.max_memory)
    print(result.summary())
    _log(args, f"sampled {len(result)} component(s) x {args.chains} chains x {config.num_steps} steps in {time.time() - t0:.0f} s")
    if args.output:
        _write_json_atomically(args.output, result.to_dict())
        _log(args, f"wrote {args.output}")
    return 0


def _write_json_atomically(path: str, payload: dict) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f)
    os.replace(tmp, path)


def _cmd_info(args) -> int:
    import numpy
    import transformer_lens

    from . import __version__, ops

    print(f"rllc_fast {__version__}")
    print(f"ops backend: {ops.backend()}")
    print(f"torch {torch.__version__} (CUDA build: {torch.version.cuda}), CUDA available: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()}")
    print(f"transformer_lens {transformer_lens.__version__ if hasattr(transformer_lens, '__version__') else '?'}, numpy {numpy.__version__}")
    print(f"CPU threads: {torch.get_num_threads()}")
    return 0


def _log(args, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rllc", description="Refined local learning coefficients, fast.")
    sub = parser.add_subparsers(dest="command", required=True)
    _estimate_parser(sub)
    info = sub.add_parser("info", help="backend, device and library versions", description="Print the ops backend, device and versions.")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
