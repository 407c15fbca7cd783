"""A resumable result store for sweeps: one SQLite file with a fixed schema (``SCHEMA_VERSION`` 2).

What a row is of:
- the checkpoint is known by its *content*: ``checkpoint_id`` is the sha256 of its file(s)
  (``rllc_fast.content_id``); its name, absolute path and training step are columns beside it, so two
  checkpoints of different runs with one file name are two checkpoints, and a row is never reused for a
  checkpoint of other content;
- the data: its name and ``data_hash``, a fingerprint of its content (changed data under one name is
  other data);
- the configuration: ``config_key`` hashes the settings that determine the estimate (SGLD config and
  engine; for a Hessian metric its options), and the settings are columns too (``SETTINGS_COLUMNS``: step
  size, nbeta, ..., engine). Rows of different configurations live side by side (a step-size study fits one
  store); ``rows()`` selects, per (checkpoint, data, component set), the configuration (and data content)
  written last, and warns (``SeveralConfigsWarning``) when there are several; ``rows(config="all")`` or
  ``rows(config=KEY)`` select explicitly.

``estimates`` holds one row per (checkpoint_id, data, data_hash, component_set, component, config_key) with the
summary numbers, the per-chain estimates (JSON) and the per-chain loss traces (a compressed ``.npz`` blob);
``metrics`` the Hessian metrics the same way (plus ``metric``); ``failures`` one row per unit that could not
be computed; ``analyses`` the rows of ``rllc analyze``; ``checkpoint_ids`` the cache of content ids by
(absolute path, signature: names, sizes, mtimes) so reruns do not re-hash unchanged checkpoints.

Opening: ``ResultStore(path)`` is a *writer*: it checks at once that the folder exists and that an existing
file is an rllc store, but creates the file only with its first write (so a sweep that fails on bad input
leaves nothing behind, and reading a missing store finds nothing stored). ``ResultStore(path,
readonly=True)`` is a *reader*: the file must exist and be an rllc store; it reads through SQLite's
read-only mode and never writes the file (with the WAL journal a reader may leave empty ``-wal``/``-shm``
companions, which change nothing). Any other SQLite file is refused by both before anything is done: an
rllc store carries ``PRAGMA application_id`` = ``APPLICATION_ID`` and its schema version in ``meta``.

Schema-1 stores (rllc_fast before content ids: rows keyed by file name) are refused with an error naming
``rllc upgrade-store``, which converts one in place (``upgrade_store``, one transaction): its rows get the
checkpoint id ``legacy:NAME``, which no content hash equals, so they are shown but never reused for a
checkpoint; their settings columns come from the stored config JSON, their ``data_hash`` and path are ''.

Every write is one transaction (``BEGIN IMMEDIATE``), so a killed process leaves either all the rows of an
estimate or none, and two processes writing to one store wait for each other instead of corrupting it
(SQLite's file locking; WAL journal).
"""
from __future__ import annotations

import io
import json
import os
import sqlite3
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

SCHEMA_VERSION = 2
APPLICATION_ID = 0x524C4C43  # b"RLLC": the SQLite header's application id of an rllc result store
LEGACY_ID_PREFIX = "legacy:"  # checkpoint ids of rows upgraded from a schema-1 store (never a content hash)

_TABLES = {
    "meta": "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "estimates": """CREATE TABLE estimates (
    checkpoint_id   TEXT    NOT NULL,  -- sha256 of the checkpoint's content (rllc_fast.content_id); 'legacy:NAME' from schema 1
    checkpoint      TEXT    NOT NULL,  -- checkpoint name (file or directory name)
    checkpoint_path TEXT    NOT NULL,  -- its absolute path when the row was written ('' from schema 1)
    step            INTEGER NOT NULL,  -- training step of the checkpoint
    data            TEXT    NOT NULL,  -- data distribution name
    data_hash       TEXT    NOT NULL,  -- fingerprint of the data's content (sweep.data_fingerprint; '' from schema 1)
    component_set   TEXT    NOT NULL,  -- 'whole', 'heads', 'layers' or a custom set's name
    component       TEXT    NOT NULL,  -- e.g. '1:3' for layer 1 head 3, 'whole', 'layer0'
    config_key      TEXT    NOT NULL,  -- hash of the SGLD config + engine (from schema 1: + data fingerprint)
    config_json     TEXT    NOT NULL,  -- the SGLD config and engine, readable
    step_size       REAL,              -- the SGLD settings (SETTINGS_COLUMNS), from config_json
    nbeta           REAL,
    localization    REAL,
    num_draws       INTEGER,
    num_burnin      INTEGER,
    thinning        INTEGER,
    batch_size      INTEGER,           -- NULL: the full data set every step
    sampler         TEXT,
    seed            INTEGER,
    engine          TEXT,
    numel           INTEGER NOT NULL,  -- weights in the component
    llc_mean        REAL,              -- mean over non-diverged chains (NULL when all diverged)
    llc_std         REAL,
    llc_sem         REAL,
    init_loss       REAL,              -- l(w*) in nats, mean over the draws' minibatches
    num_chains      INTEGER NOT NULL,
    num_diverged    INTEGER NOT NULL,
    rhat            REAL,              -- sampler diagnostics (rllc_fast.diagnostics; DIAGNOSTIC_COLUMNS): split R-hat,
    ess             REAL,              -- bulk ESS and its fraction of the draws of the excess-loss trace, and the
    ess_fraction    REAL,              -- relative growth of ||w - w*|| over the last half of the draws
    distance_growth REAL,              -- (NULL where undefined, e.g. R-hat of one chain)
    llc_per_chain   TEXT    NOT NULL,  -- JSON list, null for a diverged chain
    traces          BLOB    NOT NULL,  -- np.savez_compressed: loss_trace, init_loss_trace, distance_trace, diverged_at
    seconds         REAL    NOT NULL,  -- wall time of the estimate call that produced the row
    written_at      TEXT    NOT NULL,  -- UTC, ISO 8601 with microseconds
    PRIMARY KEY (checkpoint_id, data, data_hash, component_set, component, config_key)
)""",
    "metrics": """CREATE TABLE metrics (  -- Hessian-based metrics (rllc_fast.hessian), beside the rLLCs
    checkpoint_id   TEXT    NOT NULL,
    checkpoint      TEXT    NOT NULL,
    checkpoint_path TEXT    NOT NULL,
    step            INTEGER NOT NULL,
    data            TEXT    NOT NULL,
    data_hash       TEXT    NOT NULL,
    component_set   TEXT    NOT NULL,
    component       TEXT    NOT NULL,
    metric          TEXT    NOT NULL,  -- 'hessian-trace', 'fim-trace' or 'hessian-rank'
    config_key      TEXT    NOT NULL,  -- hash of the metric and its options (from schema 1: + data fingerprint)
    config_json     TEXT    NOT NULL,
    numel           INTEGER NOT NULL,
    value           REAL,              -- the estimate (trace or eigenvalue count)
    sem             REAL,              -- its standard error (NULL from one sample)
    num_samples     INTEGER NOT NULL,
    info_json       TEXT    NOT NULL,  -- e.g. the rank's spectral interval per component
    seconds         REAL    NOT NULL,
    written_at      TEXT    NOT NULL,
    PRIMARY KEY (checkpoint_id, data, data_hash, component_set, component, metric, config_key)
)""",
    "analyses": """CREATE TABLE analyses (  -- rllc_fast.analysis results (`rllc analyze`), long format
    analysis      TEXT    NOT NULL,  -- 'head-score', 'head-type', 'composition', 'ablation', 'icl', 'tokens', 'cluster'
    checkpoint    TEXT    NOT NULL,  -- checkpoint name ('' when the row spans checkpoints, e.g. a clustering)
    step          INTEGER NOT NULL,  -- its training step (-1 when spanning checkpoints)
    data          TEXT    NOT NULL,  -- data name ('' when none)
    name          TEXT    NOT NULL,  -- what was measured, e.g. 'induction', 'K', 'mean', 'kmeans-k2'
    head          TEXT    NOT NULL,  -- the head 'l:h' (or head set 'l:h+l:h')
    other         TEXT    NOT NULL,  -- a second head or a label ('' when none): the later head of a composition
    value         REAL,
    info_json     TEXT    NOT NULL,
    written_at    TEXT    NOT NULL,
    PRIMARY KEY (analysis, checkpoint, data, name, head, other)
)""",
    "failures": """CREATE TABLE failures (  -- units that could not be computed (e.g. an unreadable checkpoint)
    checkpoint_id   TEXT    NOT NULL,
    checkpoint      TEXT    NOT NULL,
    checkpoint_path TEXT    NOT NULL,
    step            INTEGER NOT NULL,
    data            TEXT    NOT NULL,
    component_set   TEXT    NOT NULL,
    config_key      TEXT    NOT NULL,
    error           TEXT    NOT NULL,
    written_at      TEXT    NOT NULL,
    PRIMARY KEY (checkpoint_id, data, component_set)
)""",
    "checkpoint_ids": """CREATE TABLE checkpoint_ids (  -- cache of rllc_fast.content_id: path + signature -> id
    path          TEXT PRIMARY KEY,  -- absolute path of the checkpoint file or directory
    signature     TEXT NOT NULL,     -- JSON [[name, size, mtime_ns], ...] of the hashed files
    checkpoint_id TEXT NOT NULL,
    hashed_at     TEXT NOT NULL
)""",
}

#: The settings of an rLLC row, as columns of ``estimates`` and ``rows()``.
SETTINGS_COLUMNS = ["step_size", "nbeta", "localization", "num_chains", "num_draws", "num_burnin", "thinning",
                    "batch_size", "sampler", "seed", "engine"]
_CONFIG_FIELDS = ["step_size", "nbeta", "localization", "num_draws", "num_burnin", "thinning", "batch_size",
                  "sampler", "seed"]  # columns taken from SGLDConfig.to_dict() (num_chains: from the traces)
_IDENTITY = ["checkpoint", "checkpoint_path", "checkpoint_id", "step", "data", "data_hash"]
ANALYSIS_COLUMNS = ["analysis", "checkpoint", "step", "data", "name", "head", "other", "value", "info_json"]
METRIC_COLUMNS = _IDENTITY + ["component_set", "component", "metric", "numel", "value", "sem",
                              "num_samples", "config_key", "config_json", "written_at"]
#: The sampler diagnostics of an rLLC row (``SamplerDiagnostics.as_dict()``), as columns.
DIAGNOSTIC_COLUMNS = ["rhat", "ess", "ess_fraction", "distance_growth"]
SUMMARY_COLUMNS = _IDENTITY + ["component_set", "component", "numel", "llc_mean", "llc_std", "llc_sem",
                               "init_loss", "num_diverged", *DIAGNOSTIC_COLUMNS, "config_key"] + SETTINGS_COLUMNS + \
    ["written_at"]
FAILURE_COLUMNS = ["checkpoint", "checkpoint_path", "checkpoint_id", "step", "data", "component_set", "config_key",
                   "error", "written_at"]


class StoreError(ValueError):
    """A file that cannot be used as this rllc_fast's result store (another SQLite file, not SQLite, another
    schema version, or written to through a read-only store); the message names the file and the fix."""


class SeveralConfigsWarning(UserWarning):
    """``rows()``/``metric_rows()`` found several configurations and selected the latest per unit."""


@dataclass(frozen=True)
class UnitKey:
    """What one ``estimate_llc`` call of a sweep computes: a checkpoint x data x component set.

    checkpoint:    the checkpoint's name (file or directory name), for display;
    step:          its training step;
    checkpoint_id: its content id (``rllc_fast.content_id``): what rows are matched by;
    path:          its absolute path (a column, informative);
    data_hash:     the data's fingerprint (``sweep.data_fingerprint``): rows are matched by it too."""

    checkpoint: str
    step: int
    data: str
    component_set: str
    checkpoint_id: str
    path: str = ""
    data_hash: str = ""


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def pack_traces(estimate) -> bytes:
    """The per-chain traces of a ``ComponentLLC`` as compressed ``.npz`` bytes."""
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        loss_trace=estimate.loss_trace.astype(np.float32),
        init_loss_trace=estimate.init_loss_trace.astype(np.float32),
        distance_trace=estimate.distance_trace.astype(np.float32),
        diverged_at=estimate.diverged_at,
    )
    return buf.getvalue()


def unpack_traces(blob: bytes) -> Dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _nan_to_none(x: float):
    return None if x is None or not np.isfinite(x) else float(x)


def _uri(path: str, mode: str) -> str:
    return Path(path).absolute().as_uri() + f"?mode={mode}"


def _identify(con: sqlite3.Connection) -> Tuple[str, Optional[int]]:
    """What the open database is: ``("rllc", version)``, ``("legacy", 1)`` (a schema-1 rllc store, which set
    no application id), ``("empty", None)`` (no tables: a new file) or ``("foreign", None)``. Raises
    ``sqlite3.DatabaseError`` for a file that is not SQLite."""
    app = con.execute("PRAGMA application_id").fetchone()[0]
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    version = None
    if "meta" in tables:
        found = con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        version = int(found[0]) if found is not None and str(found[0]).isdigit() else None
    if app == APPLICATION_ID and version is not None:
        return "rllc", version
    if app == 0 and version == 1 and "estimates" in tables:
        return "legacy", 1
    if app == 0 and not tables:
        return "empty", None
    return "foreign", None


def _refusal(path: str, kind: str, version: Optional[int]) -> Optional[str]:
    """The error text for a database that is not a usable store, or None when it is (``_identify``'s answer)."""
    if kind == "rllc" and version == SCHEMA_VERSION:
        return None
    if kind == "legacy":
        return (f"store {path} has schema 1 (an earlier rllc_fast, which knew checkpoints by file name only); "
                f"upgrade it in place with `rllc upgrade-store --store {path}` (its rows are kept, never reused "
                "for new checkpoints), or use a new store file")
    if kind == "rllc":
        return (f"store {path} has schema {version}, this rllc_fast reads schema {SCHEMA_VERSION}; use the "
                "rllc_fast that wrote it, or a new store file")
    if kind == "empty":
        return f"{path} is an empty SQLite file, not an rllc result store; pass the store a sweep wrote"
    return (f"{path} is an SQLite database but not an rllc result store (no rllc application id and schema); "
            "refusing to read or change it: pass another --store path")


def _unreadable(path: str, err: sqlite3.DatabaseError) -> str:
    """The error text for a file SQLite cannot read."""
    if "not a database" in str(err):
        return f"{path} is not an rllc result store (not an SQLite database); pass another --store path"
    return (f"cannot open the store {path}: {err} (check its permissions: a store in WAL mode needs a writable "
            "folder even to be read)")


class ResultStore:
    """The sweep's result store at ``path``: a writer (default; the file is created by the first write) or,
    with ``readonly=True``, a reader that never changes the file. See the module docstring."""

    def __init__(self, path: str | os.PathLike, readonly: bool = False):
        self.path = os.fspath(path)
        self.readonly = bool(readonly)
        self._pending_ids: Dict[str, Tuple[str, str]] = {}
        self._wal = False  # whether this object has seen the file in WAL mode
        if readonly:
            if not os.path.isfile(self.path):
                raise FileNotFoundError(f"store {self.path} does not exist; pass the store a sweep wrote")
            self._check(empty_ok=False)
            return
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"store {self.path}: its folder {folder} does not exist; create it first "
                                    f"(mkdir -p {folder}) or choose a store path in an existing folder")
        if os.path.isdir(self.path):
            raise StoreError(f"store {self.path} is a directory; pass a file path such as {self.path}/results.sqlite")
        if self._exists():
            self._check(empty_ok=True)

    def _exists(self) -> bool:
        """Whether the file holds a database (a 0-byte file is a store not yet written)."""
        try:
            return os.path.getsize(self.path) > 0
        except OSError:
            return False

    def _check(self, empty_ok: bool) -> None:
        """Refuse (``StoreError``) a file that is not an rllc store of this schema; reads only."""
        try:
            con = sqlite3.connect(_uri(self.path, "ro"), uri=True, timeout=120.0, isolation_level=None)
            try:
                kind, version = _identify(con)
            finally:
                con.close()
        except sqlite3.DatabaseError as err:
            raise StoreError(_unreadable(self.path, err)) from None
        if kind == "empty" and empty_ok:
            return
        problem = _refusal(self.path, kind, version)
        if problem:
            raise StoreError(problem)

    # ---- connections ---------------------------------------------------------------------
    @contextmanager
    def _read(self):
        """A connection to read through, or None where a writer's file is not written yet. A reader's is read-only
        (SQLite ``mode=ro``); a writer's is ``mode=rw`` (never creating the file) so that, closing last, it
        removes the WAL companions a read-only connection would leave behind."""
        if not self.readonly and not self._exists():
            yield None
            return
        mode = "ro" if self.readonly else "rw"
        con = sqlite3.connect(_uri(self.path, mode), uri=True, timeout=120.0, isolation_level=None)
        try:
            con.execute("PRAGMA busy_timeout=120000")
            yield con
        finally:
            con.close()

    @contextmanager
    def _write(self, attach: Optional[str] = None):
        """A connection inside one write transaction (committed on success, rolled back on error). Creates
        the file and schema when missing; refuses a file that is not an rllc store. ``attach``: another
        store file attached read-only as ``other`` (ATTACH is not allowed inside a transaction)."""
        if self.readonly:
            raise StoreError(f"store {self.path} was opened read-only; open ResultStore({self.path!r}) to write")
        con = sqlite3.connect(_uri(self.path, "rwc"), uri=True, timeout=120.0, isolation_level=None)
        try:
            con.execute("PRAGMA busy_timeout=120000")
            if attach is not None:
                con.execute("ATTACH DATABASE ? AS other", (_uri(attach, "ro"),))
            con.execute("BEGIN IMMEDIATE")
            try:
                created = self._prepare(con)
                if self._pending_ids:
                    self._insert_ids(con, self._pending_ids)
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
            self._pending_ids = {}
            if attach is not None:
                con.execute("DETACH DATABASE other")
            if created or not self._wal:
                try:  # WAL: readers do not block writers; set once the file is known to be an rllc store
                    self._wal = con.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
                except sqlite3.OperationalError:  # locked by another writer: the next write tries again
                    pass
        finally:
            con.close()

    def _prepare(self, con: sqlite3.Connection) -> bool:
        """Inside the write transaction: create the schema in an empty file (returns True), or check that the
        file is an rllc store of this schema (returns False)."""
        try:
            kind, version = _identify(con)
        except sqlite3.DatabaseError as err:
            raise StoreError(_unreadable(self.path, err)) from None
        if kind == "empty":
            for ddl in _TABLES.values():
                con.execute(ddl)
            con.execute(f"PRAGMA application_id={APPLICATION_ID}")
            con.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            con.execute("INSERT INTO meta VALUES ('created_at', ?)", (_now(),))
            return True
        problem = _refusal(self.path, kind, version)
        if problem:
            raise StoreError(problem)
        return False

    def _query(self, sql: str, args: Sequence = ()) -> list:
        with self._read() as con:
            return [] if con is None else con.execute(sql, tuple(args)).fetchall()

    def _frame(self, sql: str, columns: Sequence[str], args: Sequence = ()):
        import pandas as pd

        with self._read() as con:
            if con is None:
                return pd.DataFrame({c: [] for c in columns})
            return pd.read_sql_query(sql, con, params=tuple(args))

    # ---- reading -------------------------------------------------------------------------
    def done(self, unit: UnitKey, config_key: str) -> set:
        """Names of the unit's components stored for its checkpoint id and data hash with ``config_key``."""
        rows = self._query("SELECT component FROM estimates WHERE checkpoint_id=? AND data=? AND data_hash=? AND "
                           "component_set=? AND config_key=?",
                           (unit.checkpoint_id, unit.data, unit.data_hash, unit.component_set, config_key))
        return {r[0] for r in rows}

    def checkpoint_estimates(self, unit: UnitKey, config_key: str) -> Dict[Tuple[str, str], Tuple[float, float]]:
        """``{(component_set, component): (llc_mean, llc_sem)}`` of every estimate stored for ``unit``'s checkpoint
        id and data (name and hash) with ``config_key``, whatever its component set (NaN where SQLite has NULL)."""
        rows = self._query("SELECT component_set, component, llc_mean, llc_sem FROM estimates WHERE checkpoint_id=? "
                           "AND data=? AND data_hash=? AND config_key=?",
                           (unit.checkpoint_id, unit.data, unit.data_hash, config_key))
        nan = float("nan")
        return {(r[0], r[1]): (nan if r[2] is None else r[2], nan if r[3] is None else r[3]) for r in rows}

    def rows(self, config: str = "latest", traces: bool = False):
        """The estimates as a pandas DataFrame: ``SUMMARY_COLUMNS`` (identity, numbers, ``config_key`` and
        the settings ``SETTINGS_COLUMNS``) + ``llc_per_chain`` (a list per row, NaN for a diverged chain),
        ordered by step, checkpoint, data, set, component; ``llc_mean`` etc. are NaN where every chain diverged.

        config: "latest" (default): per (checkpoint, data, component set) the configuration and data content
                (``data_hash``) written last, with a ``SeveralConfigsWarning`` naming every stored configuration
                when there are several; "all": every row; a config key: that configuration's rows (the latest
                data content per unit; ``ValueError`` listing the stored keys when it has none).
        traces: add the per-chain traces as columns ``loss_trace`` [chains, draws], ``init_loss_trace``
                [draws], ``distance_trace`` [chains, draws], ``diverged_at`` [chains] (numpy arrays)."""
        extra = ", traces" if traces else ""
        df = self._frame(f"SELECT {', '.join(SUMMARY_COLUMNS)}, llc_per_chain{extra} FROM estimates ORDER BY step, "
                         "checkpoint, checkpoint_id, data, component_set, component, config_key",
                         SUMMARY_COLUMNS + ["llc_per_chain"] + (["traces"] if traces else []))
        for col in ("llc_mean", "llc_std", "llc_sem", "init_loss", *DIAGNOSTIC_COLUMNS, "step_size", "nbeta",
                    "localization"):
            df[col] = df[col].astype(float)
        df["llc_per_chain"] = [[np.nan if v is None else v for v in json.loads(s)] for s in df["llc_per_chain"]]
        if traces:
            unpacked = [unpack_traces(b) for b in df.pop("traces")]
            for name in ("loss_trace", "init_loss_trace", "distance_trace", "diverged_at"):
                df[name] = [t[name] for t in unpacked]
        return _select_config(df, config, ["checkpoint_id", "data", "component_set"], "rLLC estimates", self.path)

    def metrics_done(self, unit: UnitKey, metric: str, config_key: str) -> set:
        """Names of the unit's components whose ``metric`` is stored with ``config_key``."""
        rows = self._query("SELECT component FROM metrics WHERE checkpoint_id=? AND data=? AND data_hash=? AND "
                           "component_set=? AND metric=? AND config_key=?",
                           (unit.checkpoint_id, unit.data, unit.data_hash, unit.component_set, metric, config_key))
        return {r[0] for r in rows}

    def metric_rows(self, metric: str | None = None, config: str = "latest"):
        """The Hessian-metric rows (``METRIC_COLUMNS``) as a DataFrame, optionally of one ``metric``;
        ``config`` selects configurations as in ``rows()`` (per checkpoint, data, set and metric). The rows of
        observables metrics (``KIND:PROBE``) are left out unless named: see ``observable_rows``."""
        df = self._table("metrics", METRIC_COLUMNS, "metric", metric, ("value", "sem"),
                         "metric, step, checkpoint, checkpoint_id, data, component_set, component, config_key")
        if metric is None:
            df = df[~df["metric"].astype(str).str.contains(":", regex=False)].reset_index(drop=True)
        return _select_config(df, config, ["checkpoint_id", "data", "component_set", "metric"],
                              "Hessian metrics", self.path)

    def observable_rows(self, kind: str, config: str = "latest"):
        """Rows of an observables metric of ``rllc sweep`` (``kind``: "susceptibility" or "bif", stored in the
        ``metrics`` table as ``KIND:PROBE`` or ``bif:QUERY~TRAIN``): ``METRIC_COLUMNS`` plus ``probe`` (the part
        after the colon) and ``info`` (a dict per row: where the arrays behind it lie, the sampling probe...).
        ``config`` as in ``metric_rows``."""
        df = self._frame(f"SELECT {', '.join(METRIC_COLUMNS)}, info_json FROM metrics WHERE metric LIKE ? ORDER BY "
                         "metric, step, checkpoint, checkpoint_id, data, component_set, component, config_key",
                         METRIC_COLUMNS + ["info_json"], (f"{kind}:%",))
        for col in ("value", "sem"):
            df[col] = df[col].astype(float)
        df["probe"] = [m.split(":", 1)[1] for m in df["metric"]]
        df["info"] = [json.loads(s) for s in df.pop("info_json")]
        return _select_config(df, config, ["checkpoint_id", "data", "component_set", "metric"], f"{kind} rows",
                              self.path)

    def analysis_rows(self, analysis: str | None = None):
        """Rows of ``rllc analyze`` (``ANALYSIS_COLUMNS``) as a DataFrame, optionally of one ``analysis``."""
        return self._table("analyses", ANALYSIS_COLUMNS, "analysis", analysis, ("value",),
                           "analysis, step, checkpoint, data, name, head, other")

    def _table(self, table: str, columns, key: str, value: str | None, float_columns, order_by: str):
        """``columns`` of ``table`` as a DataFrame ordered by ``order_by``, only rows with ``key = value``
        when ``value`` is given; ``float_columns`` as float (SQLite NULL becomes NaN)."""
        where, args = (f"WHERE {key}=?", (value,)) if value else ("", ())
        df = self._frame(f"SELECT {', '.join(columns)} FROM {table} {where} ORDER BY {order_by}", columns, args)
        for col in float_columns:
            df[col] = df[col].astype(float)
        return df

    def configs(self):
        """Every stored configuration as a DataFrame, one row per (table, metric, config_key): ``table``
        ("estimates" or "metrics"), ``metric`` ("llc" for estimates), ``config_key``, the settings
        (``SETTINGS_COLUMNS``; NaN for metrics, whose settings are in ``config_json``), ``config_json``,
        ``rows``, ``data`` and ``data_hashes`` (distinct values, comma-separated) and ``last_written``;
        oldest first."""
        import pandas as pd

        settings = ", ".join(f"MAX({c}) AS {c}" for c in SETTINGS_COLUMNS)
        common = ("MAX(config_json) AS config_json, COUNT(*) AS rows, GROUP_CONCAT(DISTINCT data) AS data, "
                  "GROUP_CONCAT(DISTINCT data_hash) AS data_hashes, MAX(written_at) AS last_written")
        a = self._frame(f"SELECT 'estimates' AS \"table\", 'llc' AS metric, config_key, {settings}, {common} "
                        "FROM estimates GROUP BY config_key", [])
        b = self._frame(f"SELECT 'metrics' AS \"table\", metric, config_key, {common} FROM metrics "
                        "GROUP BY metric, config_key", [])
        frames = [f for f in (a, b) if len(f)]
        columns = ["table", "metric", "config_key"] + SETTINGS_COLUMNS + ["config_json", "rows", "data",
                                                                         "data_hashes", "last_written"]
        if not frames:
            return pd.DataFrame({c: [] for c in columns})
        out = pd.concat(frames, ignore_index=True).reindex(columns=columns)
        return out.sort_values(["last_written", "config_key"]).reset_index(drop=True)

    def failures(self):
        """Units that failed (e.g. an unreadable checkpoint), as a DataFrame (``FAILURE_COLUMNS``)."""
        return self._frame(f"SELECT {', '.join(FAILURE_COLUMNS)} FROM failures ORDER BY step, checkpoint, data, "
                           "component_set", FAILURE_COLUMNS)

    def traces(self, checkpoint: str, data: str, component_set: str, component: str,
               config_key: Optional[str] = None) -> Dict[str, np.ndarray]:
        """The stored per-chain traces of one estimate: loss_trace [chains, draws], init_loss_trace [draws],
        distance_trace [chains, draws], diverged_at [chains].

        checkpoint: the checkpoint's name or its content id; config_key: the configuration (needed when the
        store holds several for this estimate). ``KeyError`` when nothing matches; ``ValueError`` listing the
        candidates when several rows do."""
        sql = ("SELECT checkpoint_id, checkpoint_path, config_key, step_size, traces FROM estimates WHERE "
               "(checkpoint=? OR checkpoint_id=?) AND data=? AND component_set=? AND component=?")
        args = [checkpoint, checkpoint, data, component_set, component]
        if config_key is not None:
            sql += " AND config_key=?"
            args.append(config_key)
        found = self._query(sql, args)
        what = f"({checkpoint}, {data}, {component_set}, {component}{', ' + config_key if config_key else ''})"
        if not found:
            raise KeyError(f"no estimate for {what} in {self.path}")
        if len(found) > 1:
            listed = "; ".join(f"checkpoint_id {r[0][:16]}... ({r[1] or 'legacy row'}), config_key {r[2]} "
                               f"(step_size {r[3]})" for r in found)
            raise ValueError(f"{len(found)} estimates match {what} in {self.path}: {listed}; pass config_key=KEY "
                             "and/or the checkpoint id as checkpoint")
        return unpack_traces(found[0][4])

    def cached_checkpoint_ids(self, paths: Sequence[str]) -> Dict[str, Tuple[str, str]]:
        """``{absolute path: (signature, checkpoint id)}`` cached here (see ``rllc_fast.content_id``),
        including ids learned but not yet written."""
        out: Dict[str, Tuple[str, str]] = {}
        wanted = list(paths)
        asked = set(wanted)
        for i in range(0, len(wanted), 500):  # SQLite's bound-parameter limit
            chunk = wanted[i:i + 500]
            out.update({p: (s, c) for p, s, c in self._query(
                f"SELECT path, signature, checkpoint_id FROM checkpoint_ids WHERE path IN ({', '.join('?' * len(chunk))})",
                chunk)})
        out.update({p: v for p, v in self._pending_ids.items() if p in asked})
        return out

    def unit_count(self) -> int:
        """How many (checkpoint, data, component set) units have rows here (estimates, metrics or failures)."""
        found = self._query("SELECT COUNT(*) FROM (SELECT checkpoint_id, data, component_set FROM estimates UNION "
                            "SELECT checkpoint_id, data, component_set FROM metrics UNION SELECT checkpoint_id, data, "
                            "component_set FROM failures)")
        return found[0][0] if found else 0

    def __repr__(self) -> str:
        counts = [self._query(f"SELECT COUNT(*) FROM {t}") for t in ("estimates", "metrics", "failures")]
        n, m, f = (c[0][0] if c else 0 for c in counts)
        mode = ", read-only" if self.readonly else ""
        return f"ResultStore({self.path!r}{mode}: {n} estimates, {m} Hessian metrics, {f} failures)"

    # ---- writing -------------------------------------------------------------------------
    def remember_checkpoint_ids(self, entries: Mapping[str, Tuple[str, str]]) -> None:
        """Cache ``{absolute path: (signature, checkpoint id)}``: written now when the store file exists, else
        with its first write (a store is never created just to cache ids)."""
        if self.readonly:
            return
        self._pending_ids.update(entries)
        if self._exists():
            with self._write():
                pass  # _write inserts the pending ids

    @staticmethod
    def _insert_ids(con, entries: Mapping[str, Tuple[str, str]]) -> None:
        now = _now()
        con.executemany("INSERT OR REPLACE INTO checkpoint_ids VALUES (?, ?, ?, ?)",
                        [(p, s, c, now) for p, (s, c) in entries.items()])

    def write(self, unit: UnitKey, config_key: str, config, engine: str, estimates: Iterable, seconds: float,
              matmul_precision: str = "fp32") -> int:
        """Write a unit's ``ComponentLLC`` estimates in one transaction (replacing older rows of the same
        components, checkpoint id and ``config_key``) and clear the unit's failure record. ``config``: the
        ``SGLDConfig`` (its fields become the settings columns), ``engine`` its engine name,
        ``matmul_precision`` recorded in ``config_json`` when not "fp32". Returns the number of rows written."""
        settings = config.to_dict()
        missing = [f for f in _CONFIG_FIELDS if f not in settings]
        if missing:
            raise ValueError(f"config: an SGLDConfig is needed (its to_dict() lacks {missing})")
        described = {"config": settings, "engine": engine}
        if matmul_precision != "fp32":
            described["matmul_precision"] = matmul_precision
        config_json = json.dumps(described, sort_keys=True)
        columns = ["checkpoint_id", "checkpoint", "checkpoint_path", "step", "data", "data_hash", "component_set",
                   "component", "config_key", "config_json", *_CONFIG_FIELDS, "engine", "numel", "llc_mean",
                   "llc_std", "llc_sem", "init_loss", "num_chains", "num_diverged", *DIAGNOSTIC_COLUMNS,
                   "llc_per_chain", "traces", "seconds", "written_at"]
        rows = []
        for e in estimates:
            diagnostics = e.diagnostics.as_dict()
            rows.append((
                unit.checkpoint_id, unit.checkpoint, unit.path, unit.step, unit.data, unit.data_hash,
                unit.component_set, e.name, config_key, config_json, *(settings[f] for f in _CONFIG_FIELDS), engine,
                int(e.numel), _nan_to_none(e.llc_mean), _nan_to_none(e.llc_std), _nan_to_none(e.llc_sem),
                _nan_to_none(e.init_loss), int(e.loss_trace.shape[0]), int(e.num_diverged),
                *(_nan_to_none(diagnostics[c]) for c in DIAGNOSTIC_COLUMNS),
                json.dumps([_nan_to_none(v) for v in e.llc_per_chain]), pack_traces(e), float(seconds), _now(),
            ))
        with self._write() as con:
            con.executemany(f"INSERT OR REPLACE INTO estimates ({', '.join(columns)}) VALUES "
                            f"({', '.join('?' * len(columns))})", rows)
            self._clear_failure(con, unit)
        return len(rows)

    @staticmethod
    def _clear_failure(con, unit: UnitKey) -> None:
        """A computed unit supersedes the failure of its checkpoint (by content, or an earlier file at its path)."""
        con.execute("DELETE FROM failures WHERE (checkpoint_id=? OR (checkpoint_path=? AND checkpoint_path != '')) "
                    "AND data=? AND component_set=?", (unit.checkpoint_id, unit.path, unit.data, unit.component_set))

    def write_metrics(self, unit: UnitKey, config_key: str, result, seconds: float) -> int:
        """Write a ``HessianResult``'s per-component estimates in one transaction; returns the row count."""
        rows = [{"component": e.name, "metric": result.metric, "numel": e.numel, "value": e.value, "sem": e.sem,
                 "num_samples": len(e.samples), "info": result.info.get(e.name, {})} for e in result]
        return self.write_metric_rows(unit, config_key, result.config, rows, seconds)

    def write_metric_rows(self, unit: UnitKey, config_key: str, config, rows: Iterable[dict], seconds: float) -> int:
        """Write rows of the ``metrics`` table for ``unit`` in one transaction (replacing rows with the same key);
        each row a dict with ``component``, ``metric``, ``numel``, ``value``, ``sem``, ``num_samples`` and ``info``
        (JSON-ready); ``config`` is stored as JSON. Returns the row count."""
        config_json = json.dumps(config, sort_keys=True, default=str)
        packed = [(unit.checkpoint_id, unit.checkpoint, unit.path, unit.step, unit.data, unit.data_hash,
                   unit.component_set, r["component"], r["metric"], config_key, config_json, int(r["numel"]),
                   _nan_to_none(r["value"]), _nan_to_none(r["sem"]), int(r["num_samples"]),
                   json.dumps(r.get("info", {}), sort_keys=True, default=str), float(seconds), _now()) for r in rows]
        with self._write() as con:
            con.executemany(f"INSERT OR REPLACE INTO metrics VALUES ({', '.join('?' * 18)})", packed)
            self._clear_failure(con, unit)
        return len(packed)

    def write_analysis(self, analysis: str, rows: Iterable[dict]) -> int:
        """Write rows of one ``analysis`` in one transaction (replacing rows with the same key). Each row is a
        dict with ``head`` and ``value`` and optionally ``checkpoint``, ``step``, ``data``, ``name``,
        ``other``, ``info``. Returns the row count."""
        packed = [(analysis, r.get("checkpoint", ""), int(r.get("step", -1)), r.get("data", ""), r.get("name", ""),
                   r["head"], r.get("other", ""), _nan_to_none(r["value"]),
                   json.dumps(r.get("info", {}), sort_keys=True, default=str), _now()) for r in rows]
        with self._write() as con:
            con.executemany(f"INSERT OR REPLACE INTO analyses VALUES ({', '.join('?' * 10)})", packed)
        return len(packed)

    def record_failure(self, unit: UnitKey, config_key: str, error: str) -> None:
        with self._write() as con:
            con.execute("INSERT OR REPLACE INTO failures VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (unit.checkpoint_id, unit.checkpoint, unit.path, unit.step, unit.data, unit.component_set,
                         config_key, error, _now()))

    def merge_from(self, other_path: str | os.PathLike) -> int:
        """Copy every row of another store file (an rllc store of this schema; e.g. a rank's file of a
        distributed sweep, opened read-only) into this one in one transaction, replacing rows with the same
        key; a unit stored there clears its failure record here. Returns the number of rows copied."""
        other_path = os.fspath(other_path)
        ResultStore(other_path, readonly=True)  # exists, is an rllc store of this schema
        total = 0
        with self._write(attach=other_path) as con:
            for table in ("estimates", "metrics", "analyses", "checkpoint_ids"):
                cols = ", ".join(r[1] for r in con.execute(f"PRAGMA main.table_info({table})"))
                n = con.execute(f"INSERT OR REPLACE INTO main.{table} ({cols}) SELECT {cols} FROM other.{table}").rowcount
                total += n if table != "checkpoint_ids" else 0
            con.execute("DELETE FROM main.failures WHERE (checkpoint_id, data, component_set) IN (SELECT checkpoint_id, "
                        "data, component_set FROM other.estimates UNION SELECT checkpoint_id, data, component_set "
                        "FROM other.metrics)")
            cols = ", ".join(r[1] for r in con.execute("PRAGMA main.table_info(failures)"))
            total += con.execute(f"INSERT OR REPLACE INTO main.failures ({cols}) SELECT {cols} FROM other.failures").rowcount
        return total


_DESCRIBED = ["step_size", "nbeta", "localization", "num_chains", "num_draws", "batch_size", "sampler", "seed",
              "engine"]


def _describe(df, key: str) -> str:
    """The settings of configuration ``key`` as found in rows ``df`` (settings columns, else its config JSON)."""
    row = df[df["config_key"] == key].iloc[0]
    shown = [f"{c} {row[c]:g}" if isinstance(row[c], float) else f"{c} {row[c]}" for c in _DESCRIBED if c in row]
    return f"{key} ({', '.join(shown) if shown else row.get('config_json', '')})"


def _select_config(df, config: str, group: List[str], what: str, path: str):
    """The rows of ``df`` that ``config`` selects ("latest", "all" or a config key; see ``ResultStore.rows``):
    per ``group``, the (config_key, data_hash) variant written last, among those of the key when one is given."""
    if not isinstance(config, str) or not config:
        raise ValueError(f"config must be 'latest', 'all' or a config key, got {config!r}")
    if config == "all" or df.empty and config == "latest":
        return df
    df_all, keys = df, list(dict.fromkeys(df["config_key"]))
    if config != "latest":
        if config not in keys:
            raise ValueError(f"config key {config!r}: no {what} in {path} have it; stored config keys: "
                             f"{', '.join(keys) or 'none'} (see ResultStore.configs(), or `rllc export --table "
                             "configs`)")
        df = df[df["config_key"] == config].reset_index(drop=True)
    variant = ["config_key", "data_hash"]
    last = df.groupby(group + variant, sort=False)["written_at"].max().reset_index()
    ambiguous = last.groupby(group, sort=False).size().gt(1).any()
    if ambiguous:
        last = last.sort_values(["written_at"] + variant).groupby(group, sort=False).tail(1)
        chosen = set(map(tuple, last[group + variant].to_numpy().tolist()))
        df = df[[tuple(r) in chosen for r in df[group + variant].to_numpy().tolist()]].reset_index(drop=True)
    kind = [c for c in group if c not in ("checkpoint_id", "data", "component_set")]  # e.g. the metric
    several = (df_all.groupby(kind)["config_key"].nunique() > 1).any() if kind else len(keys) > 1
    # one data name whose selected rows have several contents (e.g. a token file regenerated between two sweeps)
    changed = sorted(d for d, n in df.groupby("data")["data_hash"].nunique().items() if n > 1)
    if ambiguous or (config == "latest" and several) or changed:
        per_key = last.groupby("config_key", sort=False).size()
        data_note = f" Data {', '.join(map(repr, changed))} also has several contents (data_hash)." if changed else ""
        warnings.warn(
            f"{path} holds {len(keys)} configuration(s) of {what}: {'; '.join(_describe(df_all, k) for k in keys)}."
            f"{data_note} Showing per (checkpoint, data, component set) the one written last: "
            f"{', '.join(f'{k} for {n} unit(s)' for k, n in per_key.items())}. Select one with config=KEY "
            "(`rllc plot --config-key KEY`) or every row with config='all'", SeveralConfigsWarning, stacklevel=3)
    return df


def check_one_checkpoint_per_step(df, where: str) -> None:
    """Raise ``ValueError`` when rows ``df`` (of ``rows()`` or ``metric_rows()``) hold several checkpoints (by
    content id) at one training step of one data and component set: curves over steps would mix runs."""
    if df.empty:
        return
    per_step = df.groupby(["data", "component_set", "step"])["checkpoint_id"].nunique()
    clash = per_step[per_step > 1]
    if clash.empty:
        return
    data, component_set, step = clash.index[0]
    at = df[(df["data"] == data) & (df["component_set"] == component_set) & (df["step"] == step)]
    shown = sorted({f"{p or n} ({c[:12]})" for n, p, c in zip(at["checkpoint"], at["checkpoint_path"], at["checkpoint_id"])})
    raise ValueError(f"{where}: {len(shown)} different checkpoints at step {step} (data {data!r}, {component_set}): "
                     f"{'; '.join(shown)}; curves over training would mix runs. Sweep each run into its own store, "
                     "or select the rows of one run from ResultStore.rows() (column checkpoint_path)")


def _diagnostics_of_traces(blob: bytes, nbeta) -> Dict[str, Optional[float]]:
    """The ``DIAGNOSTIC_COLUMNS`` of a stored row, recomputed from its traces (rows of schema 1, which had none);
    all None when ``nbeta`` is unknown."""
    if nbeta is None:
        return {}
    from .diagnostics import diagnose

    t = unpack_traces(blob)
    d = diagnose(t["loss_trace"], t["init_loss_trace"], t["distance_trace"], float(nbeta),
                 diverged=t["diverged_at"] >= 0).as_dict()
    return {c: _nan_to_none(d[c]) for c in DIAGNOSTIC_COLUMNS}


def upgrade_store(path: str | os.PathLike) -> Optional[int]:
    """Convert a schema-1 store (rllc_fast before content ids) to this schema in place, in one transaction.
    Its rows get checkpoint ids ``legacy:NAME`` (never equal to a content hash: never reused for a checkpoint),
    settings columns from their config JSON, and '' as path and data hash. Returns the rows converted; None
    for a store already of this schema. Raises ``StoreError`` for a file that is not an rllc store."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"store {path} does not exist")
    con = sqlite3.connect(_uri(path, "rw"), uri=True, timeout=120.0, isolation_level=None)
    try:
        con.execute("PRAGMA busy_timeout=120000")
        con.execute("BEGIN IMMEDIATE")
        try:
            kind, version = _identify(con)
            if kind == "rllc" and version == SCHEMA_VERSION:
                con.execute("ROLLBACK")
                return None
            if kind != "legacy":
                raise StoreError(_refusal(path, kind, version))
            total = _upgrade_from_v1(con)
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")
        return total
    except sqlite3.DatabaseError as err:
        raise StoreError(_unreadable(path, err)) from None
    finally:
        con.close()


def _upgrade_from_v1(con: sqlite3.Connection) -> int:
    """The schema-1 -> 2 conversion inside an open transaction; returns the rows converted."""
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    old = {}
    for t in ("estimates", "metrics", "analyses", "failures"):
        if t in tables:
            con.execute(f"ALTER TABLE {t} RENAME TO v1_{t}")
            old[t] = f"v1_{t}"
    for name, ddl in _TABLES.items():
        if name != "meta":
            con.execute(ddl)
    con.row_factory = sqlite3.Row
    total = 0

    def legacy(name: str) -> str:
        return LEGACY_ID_PREFIX + name

    if "estimates" in old:
        for r in con.execute("SELECT * FROM v1_estimates").fetchall():
            try:
                cfg = json.loads(r["config_json"])
            except ValueError:
                cfg = {}
            settings, engine = cfg.get("config", {}) or {}, cfg.get("engine")
            diagnostics = _diagnostics_of_traces(r["traces"], settings.get("nbeta"))
            con.execute(
                "INSERT INTO estimates VALUES (" + ", ".join("?" * 35) + ")",
                (legacy(r["checkpoint"]), r["checkpoint"], "", r["step"], r["data"], "", r["component_set"],
                 r["component"], r["config_key"], r["config_json"], *(settings.get(f) for f in _CONFIG_FIELDS), engine,
                 r["numel"], r["llc_mean"], r["llc_std"], r["llc_sem"], r["init_loss"], r["num_chains"],
                 r["num_diverged"], *(diagnostics.get(c) for c in DIAGNOSTIC_COLUMNS), r["llc_per_chain"], r["traces"], r["seconds"], r["written_at"]))
            total += 1
    if "metrics" in old:
        for r in con.execute("SELECT * FROM v1_metrics").fetchall():
            con.execute("INSERT INTO metrics VALUES (" + ", ".join("?" * 18) + ")",
                        (legacy(r["checkpoint"]), r["checkpoint"], "", r["step"], r["data"], "", r["component_set"],
                         r["component"], r["metric"], r["config_key"], r["config_json"], r["numel"], r["value"],
                         r["sem"], r["num_samples"], r["info_json"], r["seconds"], r["written_at"]))
            total += 1
    if "analyses" in old:
        total += con.execute("INSERT INTO analyses SELECT * FROM v1_analyses").rowcount
    if "failures" in old:
        for r in con.execute("SELECT * FROM v1_failures").fetchall():
            con.execute("INSERT INTO failures VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (legacy(r["checkpoint"]), r["checkpoint"], "", r["step"], r["data"], r["component_set"],
                         r["config_key"], r["error"], r["written_at"]))
            total += 1
    con.row_factory = None
    for t in old.values():
        con.execute(f"DROP TABLE {t}")
    con.execute(f"PRAGMA application_id={APPLICATION_ID}")
    con.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))
    con.execute("INSERT OR REPLACE INTO meta VALUES ('upgraded_from_schema_1_at', ?)", (_now(),))
    return total
