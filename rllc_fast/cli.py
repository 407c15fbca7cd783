"""The ``rllc`` command line: ``rllc demo``, ``rllc train-toy``, ``rllc estimate``, ``rllc sweep``, ``rllc plot``
and ``rllc info``.

Every subcommand takes ``--config FILE`` (TOML or YAML) whose keys are its long flags (``step-size``
or ``step_size``); flags given on the command line win over the file."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from importlib import metadata

import torch

from . import cli_analyze, cli_calibrate, cli_demo, cli_export
from .atomic import write_json_atomically
from .data.tokens import RAW_DTYPES
from .cli_args import apply_formatter, batch_size, join_negative_values, positive_int, steps
from .config import SAMPLERS, SGLDConfig
from .progress import close_bars, is_terminal, logger, quiet_libraries

#: Contexts per data distribution when --num-contexts is not given.
NUM_CONTEXTS = 256
#: Tokens per context of the built-in model of ``rllc estimate`` (its n_ctx) when --context is not given.
BUILTIN_CONTEXT = 64


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
    p.add_argument("--checkpoint", metavar="PATH",
                   help="a checkpoint file (*.pt, *.pth) or Hugging Face GPT-NeoX directory (default: train the "
                        "built-in model)")
    p.add_argument("--data", metavar="[NAME=]SPEC",
                   help="data to estimate on, as for `rllc sweep` (needed with --checkpoint; default for the "
                        "built-in model: held-out standard-library bytes)")
    p.add_argument("--tokenizer", help="tokenizers JSON file for text data (default: UTF-8 bytes for built-in corpora)")
    p.add_argument("--num-contexts", type=positive_int, default=NUM_CONTEXTS, help="contexts of --data")
    p.add_argument("--dtype", default="uint16", choices=RAW_DTYPES,
                   help="element type of a raw .bin token file (int32 etc. for larger vocabularies)")
    p.add_argument("--like", help="a checkpoint of the same architecture; needed when --checkpoint is a plain state "
                                  "dict")
    p.add_argument("--components", choices=["heads", "layers", "whole"], default="heads",
                   help="one rLLC per head, per layer, or of the whole model")
    p.add_argument("--context", type=positive_int,
                   help=f"tokens per context (default: the model's n_ctx; the built-in model's is {BUILTIN_CONTEXT})")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    g = p.add_argument_group("built-in model (without --checkpoint)")
    g.add_argument("--train-steps", type=positive_int, default=300, help="Adam steps of the built-in model")
    g.add_argument("--n-layers", type=positive_int, default=2, help="its layers")
    g.add_argument("--n-heads", type=positive_int, default=4, help="its attention heads per layer")
    g.add_argument("--d-model", type=positive_int, default=64, help="its residual width (a multiple of --n-heads)")
    _sgld_arguments(p)
    p.add_argument("--output", help="write the full result (config, per-chain traces) as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bars or logs")
    p.set_defaults(func=_cmd_estimate)


#: The SGLD flags of ``estimate`` and ``sweep``: flag -> (SGLDConfig field, type, help). Their defaults are
#: SGLDConfig's own (one source of truth: the CLI and the Python API give the same numbers by default).
SGLD_FLAGS = {
    "step-size": ("step_size", float, "SGLD step epsilon"),
    "nbeta": ("nbeta", float, "n*beta: inverse temperature times the sample size"),
    "localization": ("localization", float, "gamma: strength of the pull back to w* (0: none)"),
    "chains": ("num_chains", int, "independent chains per component"),
    "draws": ("num_draws", int, "loss draws kept per chain"),
    "burnin": ("num_burnin", int, "SGLD steps run and discarded before the first draw"),
    "thinning": ("thinning", int, "SGLD steps per kept draw"),
    "sampler": ("sampler", str, "plain SGLD (the paper's) or RMSProp-preconditioned SGLD"),
    "batch-size": ("batch_size", batch_size, "contexts per SGLD minibatch, or 'full' (every context at every step)"),
    "seed": ("seed", int, "seeds the data sample, the minibatch order and every chain's noise"),
}


def _sgld_arguments(p) -> None:
    """The SGLD flags shared by ``estimate`` and ``sweep`` (``SGLD_FLAGS``, with ``SGLDConfig``'s defaults)."""
    defaults = {f.name: f.default for f in dataclasses.fields(SGLDConfig)}
    g = p.add_argument_group("SGLD")
    for flag, (field, kind, text) in SGLD_FLAGS.items():
        g.add_argument(f"--{flag}", type=kind, default=defaults[field], help=text,
                       choices=SAMPLERS if field == "sampler" else None)
    g.add_argument("--max-memory", help="activation memory for replica chunks, e.g. 8GB (default: automatic)")
    g.add_argument("--engine", choices=["batched", "generic", "reference"], default="batched",
                   help="batched (all replicas together, structured path for heads), generic "
                        "(batched, loop path) or reference (one chain at a time)")


def _sgld_config(args, command: str) -> SGLDConfig:
    """``SGLDConfig`` of the SGLD flags; its own validation errors name the flag (``rllc COMMAND: --FLAG V: ...``)."""
    values = {field: getattr(args, flag.replace("-", "_")) for flag, (field, _, _) in SGLD_FLAGS.items()}
    try:
        return SGLDConfig(**values)
    except (ValueError, TypeError) as err:
        flag = next((f for f, (field, _, _) in SGLD_FLAGS.items() if str(err).startswith(field + " ")), None)
        where = f"--{flag} {getattr(args, flag.replace('-', '_'))}: " if flag else ""
        raise SystemExit(f"rllc {command}: {where}{err}") from None


def _cmd_estimate(args) -> int:
    from . import estimate_llc, heads, layers

    log = logger(args.quiet)
    config = _sgld_config(args, "estimate")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.checkpoint:
        model, data = _checkpoint_and_data(args)
    else:
        if args.like:
            raise SystemExit("rllc estimate: --like needs --checkpoint (the built-in model has its own architecture)")
        model, data = _builtin_model_and_data(args, log)
    comps = {"heads": heads, "layers": layers, "whole": lambda m: None}[args.components](model)
    t0 = time.time()
    try:
        result = estimate_llc(model, data, config, components=comps, engine=args.engine, device=device,
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


def _builtin_model_and_data(args, log):
    """The built-in model, trained for ``--train-steps``, and the data to estimate it on (held-out bytes or --data)."""
    from .data.stdlib_bytes import stdlib_byte_tokens
    from .models import attn_only
    from .models.train import train_next_token

    if args.d_model % args.n_heads:
        raise SystemExit(f"rllc estimate: --d-model {args.d_model} is not a multiple of --n-heads {args.n_heads}")
    context = args.context or BUILTIN_CONTEXT
    data = _data(args, context, "estimate") if args.data else None
    torch.manual_seed(args.seed)
    model = attn_only(seed=args.seed, n_layers=args.n_layers, d_model=args.d_model, n_heads=args.n_heads,
                      d_head=args.d_model // args.n_heads, n_ctx=context, d_vocab=256)
    train = stdlib_byte_tokens(2048, context, seed=args.seed)
    if data is None:
        data = stdlib_byte_tokens(512, context, seed=args.seed + 1)
    log(f"training a {sum(p.numel() for p in model.parameters()):,}-parameter model for {args.train_steps} steps")
    t0 = time.time()
    loss = train_next_token(model, train, args.train_steps, args.seed, progress=not args.quiet)
    log(f"trained in {time.time() - t0:.0f} s, final training loss {loss:.3f} nats/byte")
    return model, data


def _checkpoint_and_data(args):
    """The model of ``--checkpoint`` and the tokens of ``--data`` (``--context`` defaults to its n_ctx)."""
    from .models.checkpoints import CheckpointError, checkpoint_at

    if not args.data:
        raise SystemExit("rllc estimate: --checkpoint needs --data [NAME=]SPEC: the data to estimate on")
    like = _like(args, "estimate")
    try:
        ckpt = checkpoint_at(args.checkpoint)
        model = ckpt.load(like=like)
    except (FileNotFoundError, CheckpointError) as err:
        raise SystemExit(f"rllc estimate: --checkpoint {args.checkpoint}: {err}") from None
    return model, _data(args, _context(args, model.cfg, ckpt.name, "estimate"), "estimate")


def _like(args, command: str):
    """The model of ``--like`` (None when not given)."""
    from .models.checkpoints import CheckpointError, checkpoint_at

    if not args.like:
        return None
    try:
        return checkpoint_at(args.like).load()
    except (FileNotFoundError, CheckpointError) as err:
        raise SystemExit(f"rllc {command}: --like {args.like}: {err}") from None


def _context(args, cfg, source: str, command: str) -> int:
    """``--context``, or the model's n_ctx when not given; more than n_ctx is an error naming the flag."""
    if args.context is None:
        return cfg.n_ctx
    if args.context > cfg.n_ctx:
        raise SystemExit(f"rllc {command}: --context {args.context} exceeds the model's n_ctx {cfg.n_ctx} ({source}); "
                         f"give --context {cfg.n_ctx} or less, or leave it out (default: the model's n_ctx)")
    return args.context


def _data(args, context: int, command: str):
    """The tokens ``[N, context]`` of the single ``--data`` of ``estimate``."""
    from .data import data_from_spec, load_tokenizer

    (name, spec), = _data_specs([args.data], f"rllc {command}").items()
    try:
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
        return data_from_spec(spec, context, args.num_contexts, tokenizer, seed=args.seed, dtype=args.dtype)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"rllc {command}: {err}") from None


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
                   help="a directory of checkpoints: *.pt (rllc_fast or TransformerLens state dicts) or Hugging Face "
                        "GPT-NeoX directories (step1000/ ...), ordered by training step; or one checkpoint file or "
                        "Hugging Face directory; or a glob pattern in quotes ('run/step*.pt')")
    p.add_argument("--steps", type=steps,
                   help="only the checkpoints at these training steps: 0,1000,5000 (each must exist) or an "
                        "inclusive range 1000:5000 (also 1000: and :5000) (default: all)")
    p.add_argument("--data", action="append", required=True, metavar="[NAME=]SPEC",
                   help="a data distribution: built-in corpus (stdlib_code, stdlib_prose), synthetic:SOURCE (code, induction, dyck, ngram, mixture) or a token/text file "
                        "(.npy, .pt, raw .bin of --dtype, .txt with --tokenizer); repeat for several; NAME= names it")
    p.add_argument("--components", default="heads",
                   help="comma-separated component sets: whole, heads, layers")
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
    from .models.checkpoints import CheckpointError, select_checkpoints
    from .store import ResultStore
    from .sweep import COMPONENT_SETS, run_sweep

    sets = [s.strip() for s in args.components.split(",") if s.strip()]
    unknown = [s for s in sets if s not in COMPONENT_SETS]
    if unknown or not sets:
        raise SystemExit(f"rllc sweep: --components {args.components!r}: choose from {sorted(COMPONENT_SETS)}")
    config = _sgld_config(args, "sweep") if args.metric == "llc" else None
    try:
        series = select_checkpoints(args.checkpoints, args.steps)
    except (FileNotFoundError, CheckpointError) as err:  # the source
        raise SystemExit(f"rllc sweep: --checkpoints {args.checkpoints}: {err}") from None
    except ValueError as err:  # the steps
        raise SystemExit(f"rllc sweep: --steps {args.steps}: {err}") from None
    like = _like(args, "sweep")
    cfg, source = _model_config(series, like, args)
    context = _context(args, cfg, source, "sweep")
    try:
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
        data = {name: data_from_spec(spec, context, args.num_contexts, tokenizer, seed=args.seed, dtype=args.dtype)
                for name, spec in _data_specs(args.data).items()}
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"rllc sweep: {err}") from None
    from .distributed import rank_from_env

    rank = rank_from_env()
    store = cli_export.open_store(args.store, "rllc sweep", readonly=False) if rank.is_main else args.store  # checks only
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
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
