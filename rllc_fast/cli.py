"""The ``rllc`` command line: ``rllc demo``, ``rllc train-toy``, ``rllc estimate``, ``rllc sweep``, ``rllc plot``
and ``rllc info``.

Every subcommand takes ``--config FILE`` (TOML or YAML) whose keys are its long flags (``step-size``
or ``step_size``); flags given on the command line win over the file."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from . import cli_analyze, cli_calibrate, cli_demo
from .atomic import write_json_atomically


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
    p.add_argument("--train-steps", type=int, default=300, help="Adam steps of the built-in model (default 300)")
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--context", type=int, default=64, help="tokens per context (default 64)")
    _sgld_arguments(p)
    p.add_argument("--output", help="write the full result (config, per-chain traces) as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bars or logs")
    p.set_defaults(func=_cmd_estimate)


def _sgld_arguments(p) -> None:
    """The SGLD flags shared by ``estimate`` and ``sweep`` (the paper's settings, 50 draws by default)."""
    g = p.add_argument_group("SGLD")
    g.add_argument("--step-size", type=float, default=1e-3)
    g.add_argument("--nbeta", type=float, default=30.0)
    g.add_argument("--localization", type=float, default=200.0, help="gamma (default 200)")
    g.add_argument("--chains", type=int, default=4)
    g.add_argument("--draws", type=int, default=50)
    g.add_argument("--burnin", type=int, default=0)
    g.add_argument("--thinning", type=int, default=1, help="SGLD steps per kept draw (default 1)")
    g.add_argument("--sampler", choices=["sgld", "rmsprop"], default="sgld",
                   help="plain SGLD (default, the paper's) or RMSProp-preconditioned SGLD")
    g.add_argument("--batch-size", type=int, default=16, help="contexts per SGLD minibatch (default 16)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-memory", help="activation memory for replica chunks, e.g. 8GB (default: automatic)")
    g.add_argument("--engine", choices=["batched", "generic", "reference"], default="batched",
                   help="batched (default: all replicas together, structured path for heads), generic "
                        "(batched, loop path) or reference (one chain at a time)")


def _sgld_config(args):
    from . import SGLDConfig

    return SGLDConfig(step_size=args.step_size, nbeta=args.nbeta, localization=args.localization,
                      num_chains=args.chains, num_draws=args.draws, num_burnin=args.burnin,
                      thinning=args.thinning, sampler=args.sampler, batch_size=args.batch_size, seed=args.seed)


def _cmd_estimate(args) -> int:
    from . import estimate_llc, heads, layers
    from .data.stdlib_bytes import stdlib_byte_tokens
    from .models import attn_only
    from .models.train import train_next_token

    torch.manual_seed(args.seed)
    config = _sgld_config(args)
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
        write_json_atomically(args.output, result.to_dict())
        _log(args, f"wrote {args.output}")
    return 0


def _sweep_parser(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="rLLCs of every checkpoint x data x component set, into a resumable result store",
        description=(
            "Estimate the rLLC of each component set (whole, heads, layers) of every checkpoint in --checkpoints "
            "on every --data distribution. Each finished (checkpoint, data, component set) is written to the "
            "SQLite --store in one transaction; rerunning skips what is stored with the same config and "
            "recomputes the rest. Unloadable checkpoints are recorded as failures and skipped."
        ),
    )
    p.add_argument("--checkpoints", required=True,
                   help="directory of checkpoints: *.pt (rllc_fast or TransformerLens state dicts) or Hugging Face "
                        "GPT-NeoX directories (step1000/ ...), ordered by training step")
    p.add_argument("--data", action="append", required=True, metavar="[NAME=]SPEC",
                   help="a data distribution: built-in corpus (stdlib_code, stdlib_prose), synthetic:SOURCE (code, induction, dyck, ngram, mixture) or a token/text file "
                        "(.npy, .pt, .bin uint16, .txt with --tokenizer); repeat for several; NAME= names it")
    p.add_argument("--components", default="heads",
                   help="comma-separated component sets: whole, heads, layers (default heads)")
    p.add_argument("--store", required=True, help="SQLite result store (created if missing)")
    p.add_argument("--tokenizer", help="tokenizers JSON file for text data (default: UTF-8 bytes for built-in corpora)")
    p.add_argument("--context", type=int, default=64, help="tokens per context (default 64; at most the model's n_ctx)")
    p.add_argument("--num-contexts", type=int, default=256, help="contexts per data distribution (default 256)")
    p.add_argument("--like", help="a checkpoint whose architecture every checkpoint must match "
                                  "(default: the first checkpoint that loads); needed for plain state dicts")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available; under torchrun cuda:LOCAL_RANK)")
    p.add_argument("--distributed", action="store_true",
                   help="run as one rank of a torchrun job (detected anyway when torchrun sets WORLD_SIZE > 1): "
                        "each rank computes a cost-balanced shard into STORE.rank<R>.sqlite, rank 0 merges")
    _sgld_arguments(p)
    _hessian_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars or logs")
    p.set_defaults(func=_cmd_sweep)


#: Per metric, the paper's probes and data batches (Appendix D) used when the flags are not given.
HESSIAN_DEFAULTS = {"hessian-trace": (50, 100), "fim-trace": (5, 30), "hessian-rank": (10, 3)}


def _hessian_arguments(p) -> None:
    g = p.add_argument_group("Hessian metrics (--metric other than llc)")
    g.add_argument("--metric", choices=["llc", *HESSIAN_DEFAULTS], default="llc",
                   help="llc (default: SGLD rLLC) or a Hessian metric written beside it in the store")
    g.add_argument("--probes", type=int, help="Rademacher probes (default: trace 50, fim-trace 5, rank 10)")
    g.add_argument("--hessian-batches", type=int,
                   help="data batches of --hessian-batch-size contexts (default: trace 100, fim-trace 30, rank 3); "
                        "needs --num-contexts >= batches x batch size")
    g.add_argument("--hessian-batch-size", type=int, default=8, help="contexts per Hessian batch (default 8)")
    g.add_argument("--probe-kind", choices=["shared", "per-component"], default="shared",
                   help="one probe for all components (default) or probes per component (traces)")
    g.add_argument("--hutchpp", action="store_true", help="Hutch++ instead of Hutchinson (hessian-trace)")
    g.add_argument("--degree", type=int, default=100, help="Chebyshev degree (hessian-rank, default 100)")
    g.add_argument("--tau", type=float, help="eigenvalue threshold (hessian-rank; default 0.07 x largest |eigenvalue|)")
    g.add_argument("--interval", default="adaptive",
                   help="spectral interval for hessian-rank: adaptive (default) or A,B (fixed; needs --tau)")


def _hessian_options(args) -> dict:
    """The ``rllc_fast.hessian`` keyword arguments of ``rllc sweep --metric ...``."""
    probes, batches = HESSIAN_DEFAULTS[args.metric]
    options = dict(num_probes=args.probes or probes, num_batches=args.hessian_batches or batches,
                   batch_size=args.hessian_batch_size, seed=args.seed)
    if args.metric == "hessian-rank":
        interval = args.interval
        if interval != "adaptive":
            try:
                interval = tuple(float(x) for x in interval.split(","))
            except ValueError:
                raise SystemExit(f"rllc sweep: --interval {args.interval!r}: use adaptive or A,B") from None
        options.update(degree=args.degree, tau=args.tau, interval=interval)
    else:
        options["probes"] = args.probe_kind
        if args.metric == "hessian-trace":
            options["hutchpp"] = args.hutchpp
    return options


def _data_specs(specs, command: str = "rllc sweep"):
    """``[NAME=]SPEC`` strings as ``{name: spec}``; names must be unique (errors name ``command``)."""
    out = {}
    for item in specs:
        name, sep, spec = item.partition("=")
        if not sep:
            spec = item
            name = item if not os.path.exists(item) else os.path.splitext(os.path.basename(item))[0]
        if not name or not spec:
            raise SystemExit(f"{command}: --data {item!r}: expected [NAME=]SPEC")
        if name in out:
            raise SystemExit(f"{command}: two --data distributions are named {name!r}; name them NAME=SPEC")
        out[name] = spec
    return out


def _cmd_sweep(args) -> int:
    from .data import data_from_spec, load_tokenizer
    from .models.checkpoints import Checkpoint, checkpoint_series
    from .sweep import COMPONENT_SETS, run_sweep

    sets = [s.strip() for s in args.components.split(",") if s.strip()]
    unknown = [s for s in sets if s not in COMPONENT_SETS]
    if unknown or not sets:
        raise SystemExit(f"rllc sweep: --components {args.components!r}: choose from {sorted(COMPONENT_SETS)}")
    try:
        series = checkpoint_series(args.checkpoints)
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
        data = {name: data_from_spec(spec, args.context, args.num_contexts, tokenizer, seed=args.seed)
                for name, spec in _data_specs(args.data).items()}
        like = None
        if args.like:
            kind = "hf" if os.path.isdir(args.like) else "rllc"
            like = Checkpoint(Path(args.like), 0, kind).load()
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"rllc sweep: {err}") from None
    from .distributed import rank_from_env

    rank = rank_from_env()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if rank.is_main:
        _log(args, f"{len(series)} checkpoint(s) x {len(data)} data x {len(sets)} component set(s) -> {args.store}"
                   f" ({args.metric}{f', {rank.world_size} ranks' if rank.active else ''})")
    llc = args.metric == "llc"
    try:
        report = run_sweep(series, data, _sgld_config(args) if llc else None, args.store, sets, like=like,
                           engine=args.engine, device=device, max_memory=args.max_memory, progress=not args.quiet,
                           log=lambda m: _log(args, m) if rank.is_main else None, metric=args.metric,
                           hessian_options=None if llc else _hessian_options(args),
                           distributed=True if args.distributed else None)
    except ValueError as err:
        raise SystemExit(f"rllc sweep: {err}") from None
    finally:
        if rank.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    if rank.is_main:
        print(report.summary())
    return 0 if not report.failed else 3


def _plot_parser(sub) -> None:
    p = sub.add_parser(
        "plot",
        help="figures and an HTML report from a sweep's result store",
        description="Write per-head rLLC curves (one panel per layer), data differences, layer and whole-model "
                    "curves as PNGs plus index.html with every figure and a table of the numbers.",
    )
    p.add_argument("--store", required=True, help="the SQLite result store of `rllc sweep`")
    p.add_argument("--out", default="rllc-report", help="output folder (default ./rllc-report)")
    p.add_argument("--diff", nargs=2, action="append", metavar=("DATA_A", "DATA_B"),
                   help="plot per-head rLLC on DATA_A minus on DATA_B; repeatable (default: every data distribution minus the alphabetically first)")
    p.add_argument("--clusters", metavar="JSON",
                   help="clusters.json of `rllc analyze cluster`: colour each head by its cluster (one colour family "
                        "per cluster)")
    p.add_argument("--quiet", action="store_true", help="no logs")
    p.set_defaults(func=_cmd_plot)


def _cmd_plot(args) -> int:
    from .report import write_report

    if not os.path.isfile(args.store):
        raise SystemExit(f"rllc plot: --store {args.store} does not exist")
    colours = None
    if args.clusters:
        try:
            with open(args.clusters) as f:
                colours = {h: tuple(c) for h, c in json.load(f)["colours"].items()}
        except (OSError, ValueError, KeyError) as err:
            raise SystemExit(f"rllc plot: --clusters {args.clusters}: not a clusters.json of `rllc analyze cluster` "
                             f"({err})") from None
    try:
        page = write_report(args.store, args.out, differences=[tuple(d) for d in args.diff or ()], colours=colours)
    except ValueError as err:
        raise SystemExit(f"rllc plot: {err}") from None
    _log(args, f"wrote {page} and its figures")
    print(page)
    return 0


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
    _sweep_parser(sub)
    _plot_parser(sub)
    cli_demo.add_parsers(sub)
    cli_analyze.add_parser(sub)
    cli_calibrate.add_parser(sub)
    info = sub.add_parser("info", help="backend, device and library versions", description="Print the ops backend, device and versions.")
    info.set_defaults(func=_cmd_info)
    for p in sub.choices.values():
        p.add_argument("--config", metavar="FILE", help="TOML or YAML file of flag values (command-line flags win)")
    return parser


def _read_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise SystemExit(f"rllc: --config {path} does not exist")
    with open(path, "rb") as f:
        if path.endswith((".yaml", ".yml")):
            import yaml

            values = yaml.safe_load(f) or {}
        else:
            import tomllib

            try:
                values = tomllib.load(f)
            except tomllib.TOMLDecodeError as err:
                raise SystemExit(f"rllc: --config {path}: not valid TOML: {err}") from None
    if not isinstance(values, dict):
        raise SystemExit(f"rllc: --config {path}: expected a table of flag = value")
    return values


def _config_path(argv) -> str | None:
    """The value of ``--config`` in ``argv`` (``--config F`` or ``--config=F``), without parsing the rest."""
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    return None


def _apply_config_file(parser, argv) -> None:
    """Load ``--config`` into the subcommand's defaults (and lift ``required`` for the keys it sets)."""
    path = _config_path(argv)
    sub = parser._subparsers._group_actions[0].choices.get(argv[0]) if argv else None
    if path is None or sub is None:
        return
    dests = {a.dest for a in sub._actions if a.dest not in ("help", "config")}
    values = {k.replace("-", "_"): v for k, v in _read_config_file(path).items()}
    unknown = sorted(set(values) - dests)
    if unknown:
        raise SystemExit(f"rllc {argv[0]}: --config {path}: unknown key(s) {unknown}; valid: {sorted(dests)}")
    for action in sub._actions:
        if action.dest in values:
            action.required = False
            if isinstance(action, argparse._AppendAction) and not isinstance(values[action.dest], list):
                values[action.dest] = [values[action.dest]]
    sub.set_defaults(**values)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    _apply_config_file(parser, argv)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
