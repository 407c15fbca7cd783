"""``rllc export``: a result store's rows as CSV or Parquet (read-only)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import open_store, store_notes

TABLES = ("estimates", "metrics", "analyses", "failures", "configs")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="a result store's rows as CSV or Parquet (read-only)",
        description="Write the rows of a result store's table (default: the rLLC estimates, every configuration, "
                    "with the settings as columns) to a CSV or Parquet file. Opens the store read-only.")
    p.add_argument("--store", required=True, help="the SQLite result store of `rllc sweep`")
    p.add_argument("--format", choices=["csv", "parquet"], default="csv", help="csv (default) or parquet (needs pyarrow)")
    p.add_argument("--table", choices=TABLES, default="estimates",
                   help="estimates (default), metrics (Hessian), analyses, failures or configs (one row per "
                        "configuration with its settings)")
    p.add_argument("--config-key", default="all", metavar="KEY|all|latest",
                   help="rows of one configuration (KEY), the latest per unit, or all (default)")
    p.add_argument("--traces", action="store_true",
                   help="add the per-chain traces (estimates): loss_trace [chains][draws], init_loss_trace, "
                        "distance_trace, diverged_at; JSON text in CSV, nested lists in Parquet")
    p.add_argument("--out", help="output file (default: STORE's name with .TABLE.csv/.parquet, beside it)")
    p.add_argument("--quiet", action="store_true", help="no logs")
    p.set_defaults(func=run)


def _frame(store, table: str, config: str, traces: bool):
    if traces and table != "estimates":
        raise SystemExit(f"rllc export: --traces: only the estimates table has traces (--table {table})")
    if table == "estimates":
        return store.rows(config, traces=traces)
    if table == "metrics":
        return store.metric_rows(config=config)
    if config != "all":
        raise SystemExit(f"rllc export: --config-key {config}: --table {table} has no configurations; leave it out")
    return {"analyses": store.analysis_rows, "failures": store.failures, "configs": store.configs}[table]()


def run(args) -> int:
    """``rllc export``: see the module doc."""
    store = open_store(args.store, "rllc export", readonly=True)
    if args.format == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise SystemExit("rllc export: --format parquet needs pyarrow (pip install pyarrow), or use --format csv") from None
    out = Path(args.out) if args.out else Path(args.store).with_name(f"{Path(args.store).stem}.{args.table}.{args.format}")
    if out.exists() and out.resolve() == Path(args.store).resolve():
        raise SystemExit(f"rllc export: --out {out} is the store itself; choose another file")
    if not out.parent.is_dir():
        raise SystemExit(f"rllc export: --out {out}: folder {out.parent} does not exist; create it first")
    try:
        with store_notes("rllc export"):
            df = _frame(store, args.table, args.config_key, args.traces)
    except ValueError as err:
        raise SystemExit(f"rllc export: {err}") from None
    from ..atomic import write_atomically

    list_columns = [c for c in ("llc_per_chain", "loss_trace", "init_loss_trace", "distance_trace", "diverged_at")
                    if c in df]
    for c in list_columns:  # numpy arrays -> nested lists (NaN -> None: JSON null, Parquet null)
        df[c] = [_plain(v) for v in df[c]]
    if args.format == "csv":
        for c in list_columns:
            df[c] = [json.dumps(v) for v in df[c]]
        write_atomically(out, lambda tmp: df.to_csv(tmp, index=False))
    else:
        write_atomically(out, lambda tmp: df.to_parquet(tmp, index=False, engine="pyarrow"))
    if not args.quiet:
        print(f"wrote {len(df)} rows of {args.table} to {out}", file=sys.stderr)
    print(out)
    return 0


def _plain(value):
    """A trace or per-chain list as nested Python lists, NaN as None."""
    import numpy as np

    arr = np.asarray(value)
    if arr.dtype.kind == "f":
        return [_plain(v) for v in arr] if arr.ndim > 1 else [None if not np.isfinite(v) else float(v) for v in arr]
    return arr.tolist()
