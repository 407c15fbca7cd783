"""``rllc upgrade-store``: convert a schema-1 result store (an earlier rllc_fast) to schema 2, in place."""
from __future__ import annotations


def add_parser(sub) -> None:
    u = sub.add_parser(
        "upgrade-store", help="convert a schema-1 result store (an earlier rllc_fast) to this one, in place",
        description="Convert a schema-1 store in one transaction. Its rows were keyed by checkpoint file name; "
                    "they get checkpoint ids legacy:NAME, which no checkpoint's content hash equals, so they are "
                    "kept and shown but never reused by a sweep.")
    u.add_argument("--store", required=True, help="the schema-1 SQLite result store")
    u.set_defaults(func=run)


def run(args) -> int:
    """``rllc upgrade-store``: see the module doc."""
    from ..store import StoreError, upgrade_store

    try:
        n = upgrade_store(args.store)
    except (FileNotFoundError, StoreError) as err:
        raise SystemExit(f"rllc upgrade-store: --store {args.store}: {err}") from None
    print(f"{args.store}: " + ("already schema 2; nothing to do" if n is None else
                               f"upgraded to schema 2 ({n} rows kept, with legacy checkpoint ids)"))
    return 0
