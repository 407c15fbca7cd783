"""``rllc sweep``: the rLLC (or a Hessian metric) of every checkpoint x data distribution x component set, into a
resumable result store (see ``rllc_fast.sweep``); also one rank of a torchrun job."""
from __future__ import annotations

import os
import sys

from ..data.tokens import RAW_DTYPES
from ..models.families import SUPPORTED_MODEL_TYPES
from ..observable_jobs import OBSERVABLE_METRICS
from ..progress import close_bars, logger
from .args import positive_int, steps
from .common import (EXIT_FAILURES, EXIT_INTERRUPTED, NUM_CONTEXTS, add_sgld_arguments, component_sets, context_for,
                     data_specs, device_of, load_like, open_store, sgld_config, spec_tokens)


def add_parser(sub) -> None:
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
    p.add_argument("--cuda-graph", action="store_true",
                   help="metric llc: replay each SGLD step as CUDA graphs in every unit where it can run (CUDA; heads, "
                        "query heads or groups); the other units run eagerly, with a log line")
    _hessian_arguments(p)
    _observable_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars or logs")
    p.set_defaults(func=run)


#: Per metric, the paper's probes and data batches (Appendix D) used when the flags are not given.
HESSIAN_DEFAULTS = {"hessian-trace": (50, 100), "fim-trace": (5, 30), "hessian-rank": (10, 3)}


def _hessian_arguments(p) -> None:
    g = p.add_argument_group("Hessian metrics (--metric hessian-trace, fim-trace, hessian-rank)")
    g.add_argument("--metric", choices=["llc", *HESSIAN_DEFAULTS, *OBSERVABLE_METRICS], default="llc",
                   help="llc (default: SGLD rLLC), a Hessian metric, or an observables metric (susceptibility, bif: "
                        "the rLLC run with probe sets observed, see below), written beside the rLLCs in the store")
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


def _observable_arguments(p) -> None:
    g = p.add_argument_group("observables (--metric susceptibility or bif)")
    g.add_argument("--observable", action="append", default=[], metavar="NAME=SPEC",
                   help="a probe set: fixed contexts of a corpus, synthetic:SOURCE or token file (as --data), whose "
                        "per-token losses every replica records at each draw; repeat for several")
    g.add_argument("--sampling-probe", metavar="NAME",
                   help="susceptibility: the --observable drawn from the sampling data (the baseline loss L)")
    g.add_argument("--probe-contexts", type=positive_int, default=16, help="contexts per probe set (default 16)")
    g.add_argument("--observe-every", type=positive_int, default=1, help="record every Nth draw (default 1)")
    g.add_argument("--bif-per", choices=["sequence", "token"], default="sequence",
                   help="bif: correlate per-sequence mean losses (default) or every token pair")


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


def run(args) -> int:
    """``rllc sweep``: see the module doc."""
    from ..models.checkpoints import CheckpointError, select_checkpoints
    from ..models.hub_cache import RevisionNotCached
    from ..store import ResultStore
    from ..sweep import run_sweep

    sets = component_sets(args, "sweep")
    config = sgld_config(args, "sweep") if args.metric == "llc" or args.metric in OBSERVABLE_METRICS else None
    if args.observable and args.metric not in OBSERVABLE_METRICS:
        raise SystemExit(f"rllc sweep: --observable is recorded for --metric susceptibility or bif, not {args.metric}")
    probe_specs = data_specs(args.observable, "sweep", flag="--observable")
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
    observables = {name: spec_tokens(spec, args, context, "sweep", args.probe_contexts)
                   for name, spec in probe_specs.items()}
    from ..distributed import rank_from_env

    rank = rank_from_env()
    store = open_store(args.store, "rllc sweep", readonly=False) if rank.is_main else args.store  # checks only
    device = device_of(args)
    log = logger(args.quiet or not rank.is_main)
    log(f"{len(series)} checkpoint(s) x {len(data)} data x {len(sets)} component set(s) -> {args.store}"
        f" ({args.metric}{f', {rank.world_size} ranks' if rank.active else ''})")
    try:
        report = run_sweep(series, data, config, store, sets, like=like,
                           engine=args.engine, device=device, max_memory=args.max_memory, progress=not args.quiet,
                           matmul_precision=args.matmul_precision, cuda_graph=args.cuda_graph,
                           log=log, metric=args.metric,
                           hessian_options=None if config else _hessian_options(args),
                           observables=observables or None, observe_every=args.observe_every,
                           sampling_probe=args.sampling_probe, bif_per=args.bif_per,
                           distributed=True if args.distributed else None)
    except ValueError as err:
        raise SystemExit(f"rllc sweep: {err}") from None
    except KeyboardInterrupt:
        close_bars()
        if rank.is_main:
            stored = ResultStore(args.store, readonly=True).unit_count() if os.path.isfile(args.store) else 0
            print(f"rllc sweep: interrupted: {stored} unit(s) stored in {args.store}; rerun the same command to "
                  "resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if rank.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    if rank.is_main:
        print(report.summary())
    return 0 if not report.failed else EXIT_FAILURES


def _model_config(series, like, args):
    """``(config, where from)`` of the run's architecture: ``--like``'s, else the first checkpoint's that loads."""
    from ..models.checkpoints import CheckpointError

    if like is not None:
        return like.cfg, args.like
    errors = []
    for ckpt in series:
        try:
            return ckpt.load().cfg, ckpt.name
        except CheckpointError as err:
            errors.append(str(err))
    raise SystemExit(f"rllc sweep: --checkpoints {args.checkpoints}: no checkpoint loads; the first: {errors[0]}")
