"""``rllc plot``: figures and an HTML report from a sweep's result store (see ``rllc_fast.report``)."""
from __future__ import annotations

import json

from ..progress import logger
from .common import open_store, store_notes


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plot",
        help="figures and an HTML report from a sweep's result store",
        description="Write per-head rLLC curves (one panel per layer), data differences, layer and whole-model "
                    "curves as PNGs plus index.html with every figure and a table of the numbers; for sweeps with "
                    "--metric susceptibility also the response matrix's principal components and a page of "
                    "per-token attributions.",
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
    p.add_argument("--tokenizer", help="tokenizers JSON file: show the attributions page's tokens as text (default: "
                                       "their ids)")
    p.add_argument("--quiet", action="store_true", help="no logs")
    p.set_defaults(func=run)


def run(args) -> int:
    """``rllc plot``: see the module doc."""
    from ..report import write_report

    store = open_store(args.store, "rllc plot", readonly=True)
    colours = key = None
    if args.clusters:
        from ..analysis.clustering import cluster_key

        try:
            with open(args.clusters) as f:
                clusters = json.load(f)
            colours = {h: tuple(c) for h, c in clusters["colours"].items()}
            key = cluster_key(clusters["labels"])
        except (OSError, ValueError, KeyError) as err:
            raise SystemExit(f"rllc plot: --clusters {args.clusters}: not a clusters.json of `rllc analyze cluster` "
                             f"({err})") from None
    decode = None
    if args.tokenizer:
        from ..data import load_tokenizer

        try:
            tokenizer = load_tokenizer(args.tokenizer)
        except (OSError, ValueError) as err:
            raise SystemExit(f"rllc plot: --tokenizer {args.tokenizer}: {err}") from None
        decode = lambda t: tokenizer.decode([int(t)])  # noqa: E731
    try:
        with store_notes("rllc plot"):
            page = write_report(store, args.out, differences=[tuple(d) for d in args.diff or ()], colours=colours,
                                config=args.config_key, key_colours=key, key_title="cluster (colour family)",
                                decode=decode)
    except ValueError as err:
        raise SystemExit(f"rllc plot: {err}") from None
    logger(args.quiet)(f"wrote {page} and its figures")
    print(page)
    return 0
