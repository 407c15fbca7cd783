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
from importlib import metadata

import torch

from . import cli_analyze, cli_calibrate, cli_demo, cli_export
from .atomic import write_json_atomically
from .data.tokens import RAW_DTYPES
from .models.families import SUPPORTED_MODEL_TYPES
from .cli_args import apply_formatter, join_negative_values, positive_int, steps
from .cli_common import (NUM_CONTEXTS, add_model_arguments, add_sgld_arguments, component_sets, context_for, data_specs,
                         device_of, load_like, model_and_data, sgld_config, spec_tokens)
from .progress import close_bars, is_terminal, logger, quiet_libraries


def _estimate_parser(sub) -> None:
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
    p.add_argument("--output", help="write the full result (config, per-chain traces) as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bars or logs")
    p.set_defaults(func=_cmd_estimate)


def _cmd_estimate(args) -> int:
    from . import estimate_llc
    from .sweep import COMPONENT_SETS

    log = logger(args.quiet)
    config = sgld_config(args, "estimate")
    device = device_of(args)
    model, _, data = model_and_data(args, "estimate", log)
    comps = None if args.components == "whole" else COMPONENT_SETS[args.components](model)
    t0 = time.time()
    try:
        result = estimate_llc(model, data.tokens, config, components=comps, engine=args.engine, device=device,
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


def _sweep_parser(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="rLLCs of every checkpoint x data x component set, into a resumable result store",
        description=(
            "Estimate the rLLC of each component set (whole, heads, groups, layers, mlps) of every checkpoint in "
            "--checkpoints "
            "on every --data distribution. Each finished (checkpoint, data, component set) is written to the "
            "SQLite --store in one transaction; rerunning skips what is stored with the same config and "
            "recomputes the rest. Unloadable checkpoints are recorded as failures and skipped."
        ),
    )
    p.add_argument("--checkpoints", required=True,
                   help="a directory of checkpoints: *.pt (rllc_fast or TransformerLens state dicts) or Hugging Face "
                        f"directories (step1000/ ...; model_type {', '.join(SUPPORTED_MODEL_TYPES)}), ordered by training "
                        "step; or one checkpoint file or "
                        "Hugging Face directory; or a glob pattern in quotes ('run/step*.pt'); or a Hugging Face hub "
                        "name (EleutherAI/pythia-70m) or models--org--name folder of the local hub cache "
                        "(HF_HUB_CACHE/HF_HOME, offline): its stepN revisions")
    p.add_argument("--steps", type=steps,
                   help="only the checkpoints at these training steps: 0,1000,5000 (each must exist) or an "
                        "inclusive range 1000:5000 (also 1000: and :5000) (default: all)")
    p.add_argument("--revisions", metavar="REV[,REV...]",
                   help="hub caches only: these revisions (step0,step1000,...) instead of every stepN revision")
    p.add_argument("--data", action="append", required=True, metavar="[NAME=]SPEC",
                   help="a data distribution: built-in corpus (stdlib_code, stdlib_prose), synthetic:SOURCE (code, induction, dyck, ngram, mixture) or a token/text file "
                        "(.npy, .pt, raw .bin of --dtype, .txt with --tokenizer); repeat for several; NAME= names it")
    p.add_argument("--components", default="heads",
                   help="comma-separated component sets: whole, heads, groups (grouped-query attention), layers, mlps")
    p.add_argument("--store", required=True, help="SQLite result store (created by the first result; its folder "
                                                  "must exist)")
    p.add_argument("--tokenizer", help="tokenizers JSON file for text data (default: UTF-8 bytes for built-in corpora)")
    p.add_argument("--context", type=positive_int,
                   help="tokens per context, at most the model's n_ctx (default: the model's n_ctx, read from --like "
                        "or the first checkpoint that loads)")
    p.add_argument("--num-contexts", type=positive_int, default=NUM_CONTEXTS, help="contexts per data distribution")
    p.add_argument("--dtype", default="uint16", choices=RAW_DTYPES,
                   help="element type of raw .bin token files (int32 etc. for larger vocabularies)")
    p.add_argument("--like", help="a checkpoint whose architecture every checkpoint must match "
                                  "(default: the first checkpoint that loads); needed for plain state dicts")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available; under torchrun cuda:LOCAL_RANK)")
    p.add_argument("--distributed", action="store_true",
                   help="run as one rank of a torchrun job (detected anyway when torchrun sets WORLD_SIZE > 1): "
                        "each rank computes a cost-balanced shard into STORE.rank<R>.sqlite, rank 0 merges")
    add_sgld_arguments(p)
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


def _cmd_sweep(args) -> int:
    from .models.checkpoints import CheckpointError, select_checkpoints
    from .models.hub_cache import RevisionNotCached
    from .store import ResultStore
    from .sweep import run_sweep

    sets = component_sets(args, "sweep")
    config = sgld_config(args, "sweep") if args.metric == "llc" else None
    try:
        series = select_checkpoints(args.checkpoints, args.steps, args.revisions)
    except RevisionNotCached as err:
        raise SystemExit(f"rllc sweep: --revisions {args.revisions}: {err}") from None
    except (FileNotFoundError, CheckpointError) as err:  # the source
        raise SystemExit(f"rllc sweep: --checkpoints {args.checkpoints}: {err}") from None
    except ValueError as err:  # the steps or revisions
        flag = f"--revisions {args.revisions}" if str(err).startswith("revisions") else f"--steps {args.steps}"
        raise SystemExit(f"rllc sweep: {flag}: {err}") from None
    like = load_like(args, "sweep")
    cfg, source = _model_config(series, like, args)
    context = context_for(args, cfg, source, "sweep")
    data = {name: spec_tokens(spec, args, context, "sweep") for name, spec in data_specs(args.data, "sweep").items()}
    from .distributed import rank_from_env

    rank = rank_from_env()
    store = cli_export.open_store(args.store, "rllc sweep", readonly=False) if rank.is_main else args.store  # checks only
    device = device_of(args)
    log = logger(args.quiet or not rank.is_main)
    log(f"{len(series)} checkpoint(s) x {len(data)} data x {len(sets)} component set(s) -> {args.store}"
        f" ({args.metric}{f', {rank.world_size} ranks' if rank.active else ''})")
    try:
        report = run_sweep(series, data, config, store, sets, like=like,
                           engine=args.engine, device=device, max_memory=args.max_memory, progress=not args.quiet,
                           log=log, metric=args.metric,
                           hessian_options=None if config else _hessian_options(args),
                           distributed=True if args.distributed else None)
    except ValueError as err:
        raise SystemExit(f"rllc sweep: {err}") from None
    except KeyboardInterrupt:
        close_bars()
        if rank.is_main:
            stored = ResultStore(args.store, readonly=True).unit_count() if os.path.isfile(args.store) else 0
            print(f"rllc sweep: interrupted: {stored} unit(s) stored in {args.store}; rerun the same command to "
                  "resume", file=sys.stderr)
        return 130
    finally:
        if rank.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    if rank.is_main:
        print(report.summary())
    return 0 if not report.failed else 3


def _model_config(series, like, args):
    """``(config, where from)`` of the run's architecture: ``--like``'s, else the first checkpoint's that loads."""
    from .models.checkpoints import CheckpointError

    if like is not None:
        return like.cfg, args.like
    errors = []
    for ckpt in series:
        try:
            return ckpt.load().cfg, ckpt.name
        except CheckpointError as err:
            errors.append(str(err))
    raise SystemExit(f"rllc sweep: --checkpoints {args.checkpoints}: no checkpoint loads; the first: {errors[0]}")


def _plot_parser(sub) -> None:
    p = sub.add_parser(
        "plot",
        help="figures and an HTML report from a sweep's result store",
        description="Write per-head rLLC curves (one panel per layer), data differences, layer and whole-model "
                    "curves as PNGs plus index.html with every figure and a table of the numbers.",
    )
    p.add_argument("--store", required=True, help="the SQLite result store of `rllc sweep`")
    p.add_argument("--out", default="rllc-report", help="output folder")
    p.add_argument("--diff", nargs=2, action="append", metavar=("DATA_A", "DATA_B"),
                   help="plot per-head rLLC on DATA_A minus on DATA_B; repeatable (default: every data distribution minus the alphabetically first)")
    p.add_argument("--clusters", metavar="JSON",
                   help="clusters.json of `rllc analyze cluster`: colour each head by its cluster (one colour family "
                        "per cluster)")
    p.add_argument("--config-key", default="latest", metavar="KEY|latest|all",
                   help="which configuration's rows: latest (default: per checkpoint, data and component set the one "
                        "written last; a note lists the others), a config key, or all (figures per configuration)")
    p.add_argument("--quiet", action="store_true", help="no logs")
    p.set_defaults(func=_cmd_plot)


def _cmd_plot(args) -> int:
    from .report import write_report

    store = cli_export.open_store(args.store, "rllc plot", readonly=True)
    colours = key = None
    if args.clusters:
        from .analysis.clustering import cluster_key

        try:
            with open(args.clusters) as f:
                clusters = json.load(f)
            colours = {h: tuple(c) for h, c in clusters["colours"].items()}
            key = cluster_key(clusters["labels"])
        except (OSError, ValueError, KeyError) as err:
            raise SystemExit(f"rllc plot: --clusters {args.clusters}: not a clusters.json of `rllc analyze cluster` "
                             f"({err})") from None
    try:
        with cli_export.store_notes("rllc plot"):
            page = write_report(store, args.out, differences=[tuple(d) for d in args.diff or ()], colours=colours,
                                config=args.config_key, key_colours=key, key_title="cluster (colour family)")
    except ValueError as err:
        raise SystemExit(f"rllc plot: {err}") from None
    logger(args.quiet)(f"wrote {page} and its figures")
    print(page)
    return 0


def _cmd_info(args) -> int:
    import numpy

    from . import __version__, ops

    print(f"rllc_fast {__version__}")
    print(f"ops backend: {ops.backend()}")
    print(f"torch {torch.__version__} (CUDA build: {torch.version.cuda}), CUDA available: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()}")
    print(f"transformer_lens {_version('transformer_lens')}, transformers {_version('transformers')}, "
          f"numpy {numpy.__version__}")
    print(f"CPU threads: {torch.get_num_threads()}")
    return 0


def _version(distribution: str) -> str:
    """The installed version of ``distribution`` (from its package metadata)."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rllc", description="Refined local learning coefficients, fast.")
    sub = parser.add_subparsers(dest="command", required=True)
    _estimate_parser(sub)
    _sweep_parser(sub)
    _plot_parser(sub)
    cli_demo.add_parsers(sub)
    cli_analyze.add_parser(sub)
    cli_export.add_parsers(sub)
    cli_calibrate.add_parser(sub)
    info = sub.add_parser("info", help="backend, device and library versions", description="Print the ops backend, device and versions.")
    info.set_defaults(func=_cmd_info)
    for p in sub.choices.values():
        p.add_argument("--config", metavar="FILE", help="TOML or YAML file of flag values (command-line flags win)")
    apply_formatter(parser)
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
            values[action.dest] = _checked_config_value(action, values[action.dest], f"rllc {argv[0]}: --config {path}")
    sub.set_defaults(**values)


def _checked_config_value(action, value, where: str):
    """A config file's ``value`` for ``action``, through the same type and choices checks as on the command line."""
    items = value if isinstance(value, list) else [value]
    key = action.option_strings[0].lstrip("-") if action.option_strings else action.dest
    try:
        if action.type is not None:
            items = [action.type(str(v)) for v in items]
    except (argparse.ArgumentTypeError, ValueError, TypeError) as err:
        raise SystemExit(f"{where}: {key} = {value!r}: {err or 'not a valid value'}") from None
    if action.choices is not None and any(v not in action.choices for v in items):
        raise SystemExit(f"{where}: {key} = {value!r}: choose from {list(action.choices)}")
    return items if isinstance(value, list) else items[0]


def main(argv=None) -> int:
    """Run one ``rllc`` command; return its exit status (130 after Ctrl-C, with one line saying so)."""
    parser = build_parser()
    argv = join_negative_values(parser, list(sys.argv[1:] if argv is None else argv))
    _apply_config_file(parser, argv)
    args = parser.parse_args(argv)
    quiet = bool(getattr(args, "quiet", False))
    try:
        # transformers' own bars (loading weights) show only on a terminal and without --quiet
        with quiet_libraries(bars=quiet or not is_terminal(), warnings=quiet):
            return args.func(args)
    except KeyboardInterrupt:
        close_bars()
        print(f"rllc {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
