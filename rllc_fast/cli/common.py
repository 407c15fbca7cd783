"""What the ``rllc`` commands share: the SGLD flags and their ``SGLDConfig``, ``--data`` specs and their tokens,
``--context`` against the model's n_ctx, one checkpoint (``--checkpoint``, ``--like``), the built-in model of
``rllc estimate``, the toy-run flags of ``demo`` and ``train-toy``, how a command opens a result store
(``open_store``, ``store_notes``) and the exit statuses.

Every function takes the subcommand's name (``estimate``, ``analyze scores``) for its errors, which read
``rllc COMMAND: --FLAG VALUE: what is wrong``."""
from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple, Optional

from ..config import SAMPLERS, SGLDConfig
from ..engine.common import MATMUL_PRECISIONS
from ..data.tokens import RAW_DTYPES
from ..models.families import SUPPORTED_MODEL_TYPES
from .args import batch_size, nonnegative_int, positive_int

#: Exit status after Ctrl-C (128 + SIGINT), with one line saying so.
EXIT_INTERRUPTED = 130
#: Exit status of ``rllc sweep`` when some checkpoint could not be loaded or estimated (recorded as failures).
EXIT_FAILURES = 3
#: Contexts per data distribution when --num-contexts is not given.
NUM_CONTEXTS = 256
#: Tokens per context of the built-in model of ``rllc estimate`` (its n_ctx) when --context is not given.
BUILTIN_CONTEXT = 64
#: Contexts of held-out standard-library bytes the built-in model is estimated on when --data is not given.
BUILTIN_HELD_OUT = 512

#: The SGLD flags: flag -> (SGLDConfig field, type, help). Their defaults are SGLDConfig's own (one source of
#: truth: the CLI and the Python API give the same numbers by default) unless a command states otherwise.
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
#: The engines of ``--engine`` and what each does.
ENGINES = {"batched": "all replicas together, structured path for heads", "generic": "batched, loop path",
           "reference": "one chain at a time"}


def add_sgld_arguments(p, defaults=None, exclude=()) -> None:
    """The SGLD flags (``SGLD_FLAGS`` but those in ``exclude``), ``--max-memory`` and ``--engine``, as the group
    "SGLD" of ``p``. Defaults are ``SGLDConfig``'s; ``defaults`` ``{flag: (value, why)}`` replaces one where the
    command needs another value, and its help states the value, SGLDConfig's and why."""
    defaults = dict(defaults or {})
    if not set(defaults) | set(exclude) <= set(SGLD_FLAGS):
        raise ValueError(f"add_sgld_arguments: {sorted(set(defaults) | set(exclude))}: choose from {list(SGLD_FLAGS)}")
    library = {f.name: f.default for f in dataclasses.fields(SGLDConfig)}
    g = p.add_argument_group("SGLD")
    for flag, (field, kind, text) in SGLD_FLAGS.items():
        if flag in exclude:
            continue
        default = library[field]
        if flag in defaults:
            default, why = defaults[flag]
            text = f"{text} (default: {default}, not SGLDConfig's {library[field]}: {why})"
        g.add_argument(f"--{flag}", type=kind, default=default, help=text,
                       choices=SAMPLERS if field == "sampler" else None)
    g.add_argument("--max-memory", help="activation memory for replica chunks, e.g. 8GB (default: automatic)")
    g.add_argument("--matmul-precision", choices=list(MATMUL_PRECISIONS), default="fp32",
                   help="matrix products for l(w*) and l(w_t) alike: fp32 (default), tf32 (CUDA; fp32 elsewhere) or "
                        "bf16 (autocast)")
    g.add_argument("--engine", choices=list(ENGINES), default="batched",
                   help="; ".join(f"{name}: {text}" for name, text in ENGINES.items()))


def sgld_config(args, command: str, **fixed) -> SGLDConfig:
    """``SGLDConfig`` of the SGLD flags, with ``fixed`` (fields the command sets itself, such as the step size of a
    command without ``--step-size``); SGLDConfig's own validation errors name the flag
    (``rllc COMMAND: --FLAG V: ...``)."""
    flags = {flag: field for flag, (field, _, _) in SGLD_FLAGS.items() if field not in fixed}
    try:
        return SGLDConfig(**{field: getattr(args, flag.replace("-", "_")) for flag, field in flags.items()}, **fixed)
    except (ValueError, TypeError) as err:
        flag = next((f for f, field in flags.items() if str(err).startswith(field + " ")), None)
        where = f"--{flag} {getattr(args, flag.replace('-', '_'))}: " if flag else ""
        raise SystemExit(f"rllc {command}: {where}{err}") from None


def component_sets(args, command: str) -> list:
    """The names of ``--components``: comma-separated component sets of ``rllc_fast.sweep.COMPONENT_SETS``."""
    from ..sweep import COMPONENT_SETS

    sets = [s.strip() for s in args.components.split(",") if s.strip()]
    if not sets or any(s not in COMPONENT_SETS for s in sets):
        raise SystemExit(f"rllc {command}: --components {args.components!r}: choose from {sorted(COMPONENT_SETS)}")
    return sets


def device_of(args) -> str:
    """``--device``, or cuda when available, else cpu."""
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def add_model_arguments(p, folders: bool = False) -> None:
    """The flags of one model on one data distribution (``estimate``, ``calibrate``): ``--checkpoint``, with
    ``folders`` also a folder of checkpoints and ``--step`` (see ``load_checkpoint``), ``--like``, ``--data``,
    ``--tokenizer``, ``--num-contexts``, ``--dtype``, ``--context``, ``--device``, and the group of the built-in
    model used without ``--checkpoint``."""
    what = f"a checkpoint file (*.pt, *.pth) or Hugging Face directory (model_type {', '.join(SUPPORTED_MODEL_TYPES)})"
    if folders:
        what += ", or a folder of checkpoints (its last one, or the one at --step)"
    p.add_argument("--checkpoint", metavar="PATH", help=f"{what} (default: train the built-in model)")
    if folders:
        p.add_argument("--step", type=nonnegative_int,
                       help="with --checkpoint FOLDER: the checkpoint of this training step (default: the last)")
    p.add_argument("--like", help="a checkpoint of the same architecture; needed when --checkpoint is a plain state "
                                  "dict")
    p.add_argument("--data", metavar="[NAME=]SPEC",
                   help="the data, as for `rllc sweep`: stdlib_code, stdlib_prose, synthetic:SOURCE (code, induction, "
                        "dyck, ngram, mixture) or a token/text file (needed with --checkpoint; default for the "
                        "built-in model: held-out standard-library bytes)")
    p.add_argument("--tokenizer", help="tokenizers JSON file for text data (default: UTF-8 bytes for built-in corpora)")
    p.add_argument("--num-contexts", type=positive_int, default=NUM_CONTEXTS, help="contexts of --data")
    p.add_argument("--dtype", default="uint16", choices=RAW_DTYPES,
                   help="element type of a raw .bin token file (int32 etc. for larger vocabularies)")
    p.add_argument("--context", type=positive_int,
                   help=f"tokens per context (default: the model's n_ctx; the built-in model's is {BUILTIN_CONTEXT})")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    g = p.add_argument_group("built-in model (without --checkpoint)")
    g.add_argument("--train-steps", type=positive_int, default=300, help="Adam steps of the built-in model")
    g.add_argument("--n-layers", type=positive_int, default=2, help="its layers")
    g.add_argument("--n-heads", type=positive_int, default=4, help="its attention heads per layer")
    g.add_argument("--d-model", type=positive_int, default=64, help="its residual width (a multiple of --n-heads)")


def data_specs(items, command: str, flag: str = "--data") -> dict:
    """``[NAME=]SPEC`` strings as ``{name: spec}`` (a file's name: its stem); names must be unique."""
    out = {}
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep:
            spec = item
            name = item if not os.path.exists(item) else os.path.splitext(os.path.basename(item))[0]
        if not name or not spec:
            raise SystemExit(f"rllc {command}: {flag} {item!r}: expected [NAME=]SPEC")
        if name in out:
            if flag != "--data":
                raise SystemExit(f"rllc {command}: {flag}: the name {name!r} is given twice; give each its own NAME=")
            raise SystemExit(f"rllc {command}: two --data distributions are named {name!r}; name them NAME=SPEC")
        out[name] = spec
    return out


def spec_tokens(spec: str, args, context: int, command: str, num_contexts: Optional[int] = None):
    """The tokens ``[N, context]`` of one data spec, with ``--num-contexts`` (or ``num_contexts``),
    ``--tokenizer``, ``--dtype`` and ``--seed`` of ``args``."""
    from ..data import data_from_spec, load_tokenizer

    try:
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
        n = args.num_contexts if num_contexts is None else num_contexts
        return data_from_spec(spec, context, n, tokenizer, seed=args.seed, dtype=args.dtype)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"rllc {command}: {err}") from None


class Data(NamedTuple):
    """One data distribution of the command line: its name, its spec and its tokens ``[N, T]``."""
    name: str
    spec: str
    tokens: object


def load_data(args, context: int, command: str) -> Data:
    """The single ``--data [NAME=]SPEC`` of ``args`` as ``Data``."""
    (name, spec), = data_specs([args.data], command).items()
    return Data(name, spec, spec_tokens(spec, args, context, command))


def context_for(args, cfg, source: str, command: str) -> int:
    """``--context``, or the model's n_ctx when not given; more than n_ctx is an error naming the flag."""
    if args.context is None:
        return cfg.n_ctx
    if args.context > cfg.n_ctx:
        raise SystemExit(f"rllc {command}: --context {args.context} exceeds the model's n_ctx {cfg.n_ctx} ({source}); "
                         f"give --context {cfg.n_ctx} or less, or leave it out (default: the model's n_ctx)")
    return args.context


def load_like(args, command: str):
    """The model of ``--like`` (None when not given)."""
    from ..models.checkpoints import CheckpointError, checkpoint_at

    if not args.like:
        return None
    try:
        return checkpoint_at(args.like).load()
    except (FileNotFoundError, CheckpointError) as err:
        raise SystemExit(f"rllc {command}: --like {args.like}: {err}") from None


def load_checkpoint(args, command: str):
    """``(model, Checkpoint)`` of ``--checkpoint`` (a checkpoint file or Hugging Face directory) with the
    architecture of ``--like``. Where the command has ``--step`` (``add_model_arguments(folders=True)``),
    ``--checkpoint`` may be a folder of checkpoints: its last one, or the one at ``--step``."""
    from ..models.checkpoints import CheckpointError, checkpoint_at, select_checkpoints

    step = getattr(args, "step", None)
    path = Path(args.checkpoint).expanduser()
    folder = hasattr(args, "step") and path.is_dir() and not (path / "config.json").is_file()
    if step is not None and not folder:
        raise SystemExit(f"rllc {command}: --step {step} needs --checkpoint FOLDER (a folder of checkpoints), "
                         f"not {args.checkpoint}")
    like = load_like(args, command)
    try:
        if folder:
            try:
                ckpt = select_checkpoints(path, None if step is None else [step])[-1]
            except ValueError as err:
                raise SystemExit(f"rllc {command}: --step {step}: {err}") from None
        else:
            ckpt = checkpoint_at(path)
        return ckpt.load(like=like), ckpt
    except (FileNotFoundError, CheckpointError) as err:
        raise SystemExit(f"rllc {command}: --checkpoint {args.checkpoint}: {err}") from None


def builtin_model(args, context: int, command: str, log):
    """The built-in model of ``rllc estimate``: an attention-only transformer (``--n-layers``, ``--n-heads``,
    ``--d-model``, n_ctx ``context``, 256-byte vocabulary) trained for ``--train-steps`` Adam steps on
    standard-library source bytes, seeded by ``--seed``."""
    import time

    from ..data.stdlib_bytes import stdlib_byte_tokens
    from ..models import attn_only
    from ..models.train import train_next_token

    if args.d_model % args.n_heads:
        raise SystemExit(f"rllc {command}: --d-model {args.d_model} is not a multiple of --n-heads {args.n_heads}")
    model = attn_only(seed=args.seed, n_layers=args.n_layers, d_model=args.d_model, n_heads=args.n_heads,
                      d_head=args.d_model // args.n_heads, n_ctx=context, d_vocab=256)
    train = stdlib_byte_tokens(2048, context, seed=args.seed)
    log(f"training a {sum(p.numel() for p in model.parameters()):,}-parameter model for {args.train_steps} steps")
    t0 = time.time()
    loss = train_next_token(model, train, args.train_steps, args.seed, progress=not args.quiet)
    log(f"trained in {time.time() - t0:.0f} s, final training loss {loss:.3f} nats/byte")
    return model


def model_and_data(args, command: str, log):
    """``(model, label, Data)`` of ``estimate`` and ``calibrate``: the model of ``--checkpoint`` on ``--data``
    (``--context`` defaults to its n_ctx), or the built-in model (``builtin_model``) on ``--data`` or on
    held-out standard-library bytes."""
    if args.checkpoint:
        if not args.data:
            raise SystemExit(f"rllc {command}: --checkpoint needs --data [NAME=]SPEC: the data to run on "
                             "(e.g. synthetic:mixture)")
        model, ckpt = load_checkpoint(args, command)
        label = f"{ckpt.name} (step {ckpt.step})"
        return model, label, load_data(args, context_for(args, model.cfg, ckpt.name, command), command)
    if args.like:
        raise SystemExit(f"rllc {command}: --like needs --checkpoint (the built-in model has its own architecture)")
    if getattr(args, "step", None) is not None:
        raise SystemExit(f"rllc {command}: --step needs --checkpoint FOLDER (a folder of checkpoints)")
    context = args.context or BUILTIN_CONTEXT
    data = load_data(args, context, command) if args.data else None  # a bad --data fails before the training
    model = builtin_model(args, context, command, log)
    if data is None:
        from ..data.stdlib_bytes import stdlib_byte_tokens

        data = Data("held-out stdlib bytes", "", stdlib_byte_tokens(BUILTIN_HELD_OUT, context, seed=args.seed + 1))
    return model, "the built-in model", data


def add_toy_arguments(p) -> None:
    """The flags of a cached toy run (``demo``, ``train-toy``): ``--cache``, ``--quick``, ``--seed``, ``--quiet``."""
    p.add_argument("--cache", help="folder for trained toy runs (default $RLLC_CACHE, else ~/.cache/rllc_fast)")
    p.add_argument("--quick", action="store_true", help="the small version (about 2 minutes on 2 cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the toy run (weights, data, SGLD)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or logs")


def open_store(path: str, command: str, readonly: bool, flag: str = "--store"):
    """``ResultStore(path, readonly)``, or ``SystemExit`` naming ``command``, ``flag`` and the problem (a
    missing file or folder, a file that is not an rllc store, a schema-1 store)."""
    from ..store import ResultStore, StoreError

    try:
        return ResultStore(path, readonly=readonly)
    except (FileNotFoundError, StoreError) as err:
        raise SystemExit(f"{command}: {flag} {path}: {err}") from None


@contextmanager
def store_notes(command: str):
    """Print the store's ``SeveralConfigsWarning`` notes raised inside as ``COMMAND: note: ...`` on stderr
    (shown even with --quiet: they say which rows a result is made of)."""
    from ..store import SeveralConfigsWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SeveralConfigsWarning)
        try:
            yield
        finally:
            seen = set()
            for w in caught:
                if issubclass(w.category, SeveralConfigsWarning) and str(w.message) not in seen:
                    seen.add(str(w.message))
                    print(f"{command}: note: {w.message}", file=sys.stderr)
                elif not issubclass(w.category, SeveralConfigsWarning):
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
