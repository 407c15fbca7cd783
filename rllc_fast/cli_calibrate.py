"""The ``rllc calibrate`` subcommand: LLC, distance and sampler diagnostics against the step size, per
component, for one model (a checkpoint, or the built-in model of ``rllc estimate``) on one data
distribution; a table on the terminal, ``calibrate.csv`` and ``calibrate.png`` in ``--out``."""
from __future__ import annotations

import sys
import time
from pathlib import Path

DEFAULT_STEP_SIZES = "1e-4,3e-4,1e-3,3e-3,1e-2"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "calibrate",
        help="LLC, ||w - w*|| and sampler diagnostics against SGLD step size per component, to choose a step size",
        description=(
            "Run a short SGLD estimate at each --step-sizes value for every component of one model (a checkpoint, "
            "or without --checkpoint the built-in model of `rllc estimate`) on one --data distribution. Prints, per "
            "step size and component, the LLC, the distance from w* at the last draw, R-hat, ESS and the growth of "
            "||w - w*||, with the problems they point to; writes calibrate.csv and calibrate.png (LLC and distance "
            "against step size) to --out. See docs/diagnostics.md."
        ),
    )
    p.add_argument("--checkpoint", help="a checkpoint file (*.pt), a Hugging Face directory, or a folder of checkpoints "
                                        "(its last one, or the one of --step); default: the built-in model")
    p.add_argument("--step", type=int, help="with a folder of checkpoints: the checkpoint of this training step")
    p.add_argument("--like", help="a checkpoint whose architecture the checkpoint must match (needed for plain state dicts)")
    p.add_argument("--data", metavar="[NAME=]SPEC",
                   help="the data distribution, as in `rllc sweep --data`: stdlib_code, stdlib_prose, synthetic:SOURCE "
                        "(code, induction, dyck, ngram, mixture) or a token/text file; needed with --checkpoint "
                        "(default for the built-in model: held-out stdlib source bytes, as `rllc estimate`)")
    p.add_argument("--tokenizer", help="tokenizers JSON file for text data")
    p.add_argument("--context", type=int, help="tokens per context (default: min(64, the model's n_ctx))")
    p.add_argument("--num-contexts", type=int, default=256, help="contexts of data (default 256)")
    p.add_argument("--components", default="heads,whole",
                   help="comma-separated component sets: whole, heads, layers (default heads,whole: with the whole "
                        "model, refined LLCs above it are flagged)")
    p.add_argument("--step-sizes", default=DEFAULT_STEP_SIZES,
                   help=f"comma-separated SGLD step sizes to try (default {DEFAULT_STEP_SIZES})")
    p.add_argument("--out", default="rllc-calibrate", help="output folder for calibrate.csv and calibrate.png "
                                                           "(default ./rllc-calibrate)")
    g = p.add_argument_group("built-in model (without --checkpoint; as `rllc estimate`)")
    g.add_argument("--train-steps", type=int, default=300)
    g.add_argument("--n-layers", type=int, default=2)
    g.add_argument("--n-heads", type=int, default=4)
    g.add_argument("--d-model", type=int, default=64)
    s = p.add_argument_group("SGLD (besides the step size; defaults as `rllc estimate` but --burnin)")
    s.add_argument("--nbeta", type=float, default=30.0)
    s.add_argument("--localization", type=float, default=200.0, help="gamma (default 200)")
    s.add_argument("--chains", type=int, default=4)
    s.add_argument("--draws", type=int, default=50)
    s.add_argument("--burnin", type=int, default=20,
                   help="SGLD steps discarded before the draws (default 20, unlike `rllc estimate`'s 0: step sizes are "
                        "compared on settled chains)")
    s.add_argument("--thinning", type=int, default=1)
    s.add_argument("--sampler", choices=["sgld", "rmsprop"], default="sgld")
    s.add_argument("--batch-size", type=int, default=16, help="contexts per SGLD minibatch (default 16)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--engine", choices=["batched", "generic", "reference"], default="batched")
    s.add_argument("--max-memory", help="activation memory for replica chunks, e.g. 8GB (default: automatic)")
    s.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or logs")
    p.set_defaults(func=run)


def run(args) -> int:
    """``rllc calibrate``: see the module doc."""
    import torch

    from .calibrate import calibrate_step_size, format_calibration, plot_calibration
    from .config import SGLDConfig
    from .sweep import COMPONENT_SETS

    step_sizes = _step_sizes(args.step_sizes)
    sets = [s.strip() for s in args.components.split(",") if s.strip()]
    if not sets or any(s not in COMPONENT_SETS for s in sets):
        raise SystemExit(f"rllc calibrate: --components {args.components!r}: choose from {sorted(COMPONENT_SETS)}")
    if args.step is not None and not args.checkpoint:
        raise SystemExit("rllc calibrate: --step needs --checkpoint FOLDER")
    try:
        config = SGLDConfig(nbeta=args.nbeta, localization=args.localization, num_chains=args.chains,
                            num_draws=args.draws, num_burnin=args.burnin, thinning=args.thinning, sampler=args.sampler,
                            batch_size=args.batch_size, seed=args.seed)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"rllc calibrate: {err}") from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.checkpoint:
        model, label = _load_checkpoint(args)
        if not args.data:
            raise SystemExit("rllc calibrate: --checkpoint needs --data [NAME=]SPEC (e.g. synthetic:mixture)")
    else:
        model, label = builtin_model(args), "the built-in model"
    context = args.context or min(64, model.cfg.n_ctx)
    data, data_name = _data(args, context)
    components = {}
    for s in sets:
        components.update(COMPONENT_SETS[s](model))
    _log(args, f"calibrating {label} on {data_name}: {len(components)} component(s) x step sizes "
               f"{', '.join(f'{s:g}' for s in step_sizes)} ({args.chains} chains x {args.draws} draws)")
    t0 = time.time()
    rows = calibrate_step_size(model, data, step_sizes, config, components=components, num_draws=args.draws,
                               engine=args.engine, device=device, progress=not args.quiet, max_memory=args.max_memory)
    _log(args, f"sampled in {time.time() - t0:.0f} s")
    print(format_calibration(rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import pandas as pd

    from .atomic import write_atomically

    csv = write_atomically(out / "calibrate.csv", lambda tmp: pd.DataFrame(rows).to_csv(tmp, index=False))
    png = plot_calibration(rows, out / "calibrate.png", f"step-size calibration: {label} on {data_name}")
    _log(args, f"wrote {csv} and {png}")
    return 0


def builtin_model(args):
    """The model of ``rllc estimate``: an attention-only transformer (``--n-layers``, ``--n-heads``, ``--d-model``,
    context ``--context`` or 64, 256-byte vocabulary) trained for ``--train-steps`` Adam steps on standard-library
    source bytes, seeded by ``--seed``."""
    import torch

    from .data.stdlib_bytes import stdlib_byte_tokens
    from .models import attn_only
    from .models.train import train_next_token

    context = args.context or 64
    torch.manual_seed(args.seed)
    model = attn_only(seed=args.seed, n_layers=args.n_layers, d_model=args.d_model, n_heads=args.n_heads,
                      d_head=args.d_model // args.n_heads, n_ctx=context, d_vocab=256)
    _log(args, f"training the built-in model ({sum(p.numel() for p in model.parameters()):,} parameters) for "
               f"{args.train_steps} steps")
    train_next_token(model, stdlib_byte_tokens(2048, context, seed=args.seed), args.train_steps, args.seed,
                     progress=not args.quiet)
    return model


def _load_checkpoint(args):
    """The model of ``--checkpoint`` (file, HF directory, or a folder's last checkpoint or that of ``--step``)
    and a label for it; ``SystemExit`` naming the flag on failure."""
    from .models.checkpoints import Checkpoint, CheckpointError, checkpoint_series

    path = Path(args.checkpoint).expanduser()
    try:
        like = None
        if args.like:
            like_path = Path(args.like)
            like = Checkpoint(like_path, 0, "hf" if like_path.is_dir() else "rllc").load()
        if path.is_dir() and not (path / "config.json").is_file():  # a folder of checkpoints
            series = checkpoint_series(path)
            if args.step is None:
                chosen = series[-1]
            else:
                found = [c for c in series if c.step == args.step]
                if not found:
                    raise SystemExit(f"rllc calibrate: --step {args.step}: {path} has steps "
                                     f"{[c.step for c in series]}")
                chosen = found[0]
        else:
            if not path.exists():
                raise SystemExit(f"rllc calibrate: --checkpoint {path} does not exist")
            chosen = next((c for c in checkpoint_series(path.parent) if c.path.resolve() == path.resolve()), None)
            if chosen is None:
                raise SystemExit(f"rllc calibrate: --checkpoint {path}: not a checkpoint (*.pt, *.pth or a Hugging "
                                 "Face directory with config.json)")
        return chosen.load(like=like), f"{chosen.name} (step {chosen.step})"
    except (FileNotFoundError, CheckpointError, ValueError) as err:
        raise SystemExit(f"rllc calibrate: --checkpoint: {err}") from None


def _data(args, context: int):
    """``(tokens [N, T], name)`` of ``--data`` (or the built-in model's held-out bytes)."""
    from .data import data_from_spec, load_tokenizer

    if not args.data:
        from .data.stdlib_bytes import stdlib_byte_tokens

        return stdlib_byte_tokens(512, context, seed=args.seed + 1), "held-out stdlib bytes"
    name, sep, spec = args.data.partition("=")
    if not sep:
        name, spec = Path(args.data).stem if Path(args.data).exists() else args.data, args.data
    try:
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
        return data_from_spec(spec, context, args.num_contexts, tokenizer, seed=args.seed), name
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"rllc calibrate: --data {args.data!r}: {err}") from None


def _step_sizes(text: str):
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(not v > 0 or v == float("inf") for v in values):
        raise SystemExit(f"rllc calibrate: --step-sizes {text!r}: give comma-separated numbers > 0, e.g. "
                         f"{DEFAULT_STEP_SIZES}")
    return sorted(set(values))


def _log(args, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr)
