"""A resumable result store for sweeps: one SQLite file with a fixed schema.

One row per (checkpoint, data, component_set, component) in ``estimates``, holding the summary
numbers, the per-chain estimates (JSON) and the per-chain loss traces (a compressed ``.npz`` blob),
plus ``config_key``: a hash of everything that determines the estimate (SGLD config, engine, loss,
data fingerprint). A rerun skips rows whose key matches and recomputes the others.

Every write is one transaction (``BEGIN IMMEDIATE``), so a killed process leaves either all the rows
of an estimate or none, and two processes writing to one store wait for each other instead of
corrupting it (SQLite's file locking; WAL journal).
"""
from __future__ import annotations

import io
import json
import os
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterable

import numpy as np

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS estimates (
    checkpoint    TEXT    NOT NULL,  -- checkpoint name (file or directory name)
    step          INTEGER NOT NULL,  -- training step of the checkpoint
    data          TEXT    NOT NULL,  -- data distribution name
    component_set TEXT    NOT NULL,  -- 'whole', 'heads', 'layers' or a custom set's name
    component     TEXT    NOT NULL,  -- e.g. '1:3' for layer 1 head 3, 'whole', 'layer0'
    config_key    TEXT    NOT NULL,  -- hash of SGLD config + engine + loss + data fingerprint
    config_json   TEXT    NOT NULL,  -- the SGLD config and engine, readable
    numel         INTEGER NOT NULL,  -- weights in the component
    llc_mean      REAL,              -- mean over non-diverged chains (NULL when all diverged)
    llc_std       REAL,
    llc_sem       REAL,
    init_loss     REAL,              -- l(w*) in nats, mean over the draws' minibatches
    num_chains    INTEGER NOT NULL,
    num_diverged  INTEGER NOT NULL,
    llc_per_chain TEXT    NOT NULL,  -- JSON list, null for a diverged chain
    traces        BLOB    NOT NULL,  -- np.savez_compressed: loss_trace, init_loss_trace, distance_trace, diverged_at
    seconds       REAL    NOT NULL,  -- wall time of the estimate call that produced the row
    written_at    TEXT    NOT NULL,
    PRIMARY KEY (checkpoint, data, component_set, component)
);
CREATE TABLE IF NOT EXISTS metrics (  -- Hessian-based metrics (rllc_fast.hessian), beside the rLLCs
    checkpoint    TEXT    NOT NULL,
    step          INTEGER NOT NULL,
    data          TEXT    NOT NULL,
    component_set TEXT    NOT NULL,
    component     TEXT    NOT NULL,
    metric        TEXT    NOT NULL,  -- 'hessian-trace', 'fim-trace' or 'hessian-rank'
    config_key    TEXT    NOT NULL,  -- hash of the metric's settings + data fingerprint
    config_json   TEXT    NOT NULL,
    numel         INTEGER NOT NULL,
    value         REAL,              -- the estimate (trace or eigenvalue count)
    sem           REAL,              -- its standard error (NULL from one sample)
    num_samples   INTEGER NOT NULL,
    info_json     TEXT    NOT NULL,  -- e.g. the rank's spectral interval per component
    seconds       REAL    NOT NULL,
    written_at    TEXT    NOT NULL,
    PRIMARY KEY (checkpoint, data, component_set, component, metric)
);
CREATE TABLE IF NOT EXISTS analyses (  -- rllc_fast.analysis results (`rllc analyze`), long format
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
);
CREATE TABLE IF NOT EXISTS failures (
    checkpoint    TEXT NOT NULL,
    step          INTEGER NOT NULL,
    data          TEXT NOT NULL,
    component_set TEXT NOT NULL,
    config_key    TEXT NOT NULL,
    error         TEXT NOT NULL,
    written_at    TEXT NOT NULL,
    PRIMARY KEY (checkpoint, data, component_set)
);
"""

ANALYSIS_COLUMNS = ["analysis", "checkpoint", "step", "data", "name", "head", "other", "value", "info_json"]
METRIC_COLUMNS = ["checkpoint", "step", "data", "component_set", "component", "metric", "numel", "value", "sem",
                  "num_samples", "config_key"]
SUMMARY_COLUMNS = ["checkpoint", "step", "data", "component_set", "component", "numel", "llc_mean", "llc_std",
                   "llc_sem", "init_loss", "num_chains", "num_diverged", "config_key"]


@dataclass(frozen=True)
class UnitKey:
    """What one ``estimate_llc`` call of a sweep computes: a checkpoint x data x component set."""

    checkpoint: str
    step: int
    data: str
    component_set: str


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())


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


class ResultStore:
    """The sweep's result store at ``path`` (created when missing)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        try:
            con = self._open()
            try:
                con.executescript(_SCHEMA)  # idempotent; runs in its own transaction
            finally:
                con.close()
            with self._connect() as con:
                found = con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                if found is None:
                    con.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            if found is not None and int(found[0]) != SCHEMA_VERSION:
                raise ValueError(f"{self.path}: result store schema {found[0]}, this rllc_fast reads {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as err:
            raise ValueError(f"{self.path}: not an rllc_fast result store (SQLite): {err}") from err

    def _open(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=120.0, isolation_level=None)
        con.execute("PRAGMA busy_timeout=120000")
        con.execute("PRAGMA journal_mode=WAL")
        return con

    @contextmanager
    def _connect(self):
        """A connection inside one write transaction (committed on success, rolled back on error)."""
        con = self._open()
        try:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
        finally:
            con.close()

    # ---- reading -------------------------------------------------------------------------
    def done(self, unit: UnitKey, config_key: str) -> set:
        """Names of the unit's components stored with ``config_key``."""
        with self._connect() as con:
            rows = con.execute(
                "SELECT component FROM estimates WHERE checkpoint=? AND data=? AND component_set=? AND config_key=?",
                (unit.checkpoint, unit.data, unit.component_set, config_key),
            ).fetchall()
        return {r[0] for r in rows}

    def rows(self):
        """Every estimate as a pandas DataFrame (``SUMMARY_COLUMNS`` + ``llc_per_chain``), ordered by
        step, data, set, component; ``llc_mean`` etc. are NaN where every chain diverged."""
        import pandas as pd

        with self._connect() as con:
            df = pd.read_sql_query(
                f"SELECT {', '.join(SUMMARY_COLUMNS)}, llc_per_chain FROM estimates "
                "ORDER BY step, checkpoint, data, component_set, component",
                con,
            )
        for col in ("llc_mean", "llc_std", "llc_sem", "init_loss"):
            df[col] = df[col].astype(float)
        df["llc_per_chain"] = [[np.nan if v is None else v for v in json.loads(s)] for s in df["llc_per_chain"]]
        return df

    def metrics_done(self, unit: UnitKey, metric: str, config_key: str) -> set:
        """Names of the unit's components whose ``metric`` is stored with ``config_key``."""
        with self._connect() as con:
            rows = con.execute(
                "SELECT component FROM metrics WHERE checkpoint=? AND data=? AND component_set=? AND metric=? "
                "AND config_key=?", (unit.checkpoint, unit.data, unit.component_set, metric, config_key),
            ).fetchall()
        return {r[0] for r in rows}

    def metric_rows(self, metric: str | None = None):
        """The Hessian-metric rows (``METRIC_COLUMNS``) as a DataFrame, optionally of one ``metric``."""
        return self._table("metrics", METRIC_COLUMNS, "metric", metric, ("value", "sem"),
                           "metric, step, checkpoint, data, component_set, component")

    def analysis_rows(self, analysis: str | None = None):
        """Rows of ``rllc analyze`` (``ANALYSIS_COLUMNS``) as a DataFrame, optionally of one ``analysis``."""
        return self._table("analyses", ANALYSIS_COLUMNS, "analysis", analysis, ("value",),
                           "analysis, step, checkpoint, data, name, head, other")

    def _table(self, table: str, columns, key: str, value: str | None, float_columns, order_by: str):
        """``columns`` of ``table`` as a DataFrame ordered by ``order_by``, only rows with ``key = value``
        when ``value`` is given; ``float_columns`` as float (SQLite NULL becomes NaN)."""
        import pandas as pd

        where, args = (f"WHERE {key}=?", (value,)) if value else ("", ())
        with self._connect() as con:
            df = pd.read_sql_query(f"SELECT {', '.join(columns)} FROM {table} {where} ORDER BY {order_by}",
                                   con, params=args)
        for col in float_columns:
            df[col] = df[col].astype(float)
        return df

    def write_analysis(self, analysis: str, rows: Iterable[dict]) -> int:
        """Write rows of one ``analysis`` in one transaction (replacing rows with the same key). Each row is a
        dict with ``head`` and ``value`` and optionally ``checkpoint``, ``step``, ``data``, ``name``,
        ``other``, ``info``. Returns the row count."""
        packed = [(analysis, r.get("checkpoint", ""), int(r.get("step", -1)), r.get("data", ""), r.get("name", ""),
                   r["head"], r.get("other", ""), _nan_to_none(r["value"]),
                   json.dumps(r.get("info", {}), sort_keys=True, default=str), _now()) for r in rows]
        with self._connect() as con:
            con.executemany(f"INSERT OR REPLACE INTO analyses VALUES ({', '.join('?' * 10)})", packed)
        return len(packed)

    def failures(self):
        """Units that failed (e.g. an unreadable checkpoint), as a DataFrame."""
        import pandas as pd

        with self._connect() as con:
            return pd.read_sql_query("SELECT * FROM failures ORDER BY step, checkpoint, data, component_set", con)

    def traces(self, checkpoint: str, data: str, component_set: str, component: str) -> Dict[str, np.ndarray]:
        """The stored per-chain traces of one estimate: loss_trace [chains, draws], init_loss_trace [draws],
        distance_trace [chains, draws], diverged_at [chains]."""
        with self._connect() as con:
            row = con.execute(
                "SELECT traces FROM estimates WHERE checkpoint=? AND data=? AND component_set=? AND component=?",
                (checkpoint, data, component_set, component),
            ).fetchone()
        if row is None:
            raise KeyError(f"no estimate for ({checkpoint}, {data}, {component_set}, {component}) in {self.path}")
        return unpack_traces(row[0])

    # ---- writing -------------------------------------------------------------------------
    def write(self, unit: UnitKey, config_key: str, config_json: str, estimates: Iterable, seconds: float) -> int:
        """Write a unit's ``ComponentLLC`` estimates in one transaction (replacing older rows of the same
        components) and clear the unit's failure record. Returns the number of rows written."""
        rows = []
        for e in estimates:
            rows.append((
                unit.checkpoint, unit.step, unit.data, unit.component_set, e.name, config_key, config_json,
                int(e.numel), _nan_to_none(e.llc_mean), _nan_to_none(e.llc_std), _nan_to_none(e.llc_sem),
                _nan_to_none(e.init_loss), int(e.loss_trace.shape[0]), int(e.num_diverged),
                json.dumps([_nan_to_none(v) for v in e.llc_per_chain]), pack_traces(e), float(seconds), _now(),
            ))
        with self._connect() as con:
            con.executemany(f"INSERT OR REPLACE INTO estimates VALUES ({', '.join('?' * 18)})", rows)
            con.execute(
                "DELETE FROM failures WHERE checkpoint=? AND data=? AND component_set=?",
                (unit.checkpoint, unit.data, unit.component_set),
            )
        return len(rows)

    def write_metrics(self, unit: UnitKey, config_key: str, result, seconds: float) -> int:
        """Write a ``HessianResult``'s per-component estimates in one transaction; returns the row count."""
        config_json = json.dumps(result.config, sort_keys=True, default=str)
        rows = [(unit.checkpoint, unit.step, unit.data, unit.component_set, e.name, result.metric, config_key,
                 config_json, int(e.numel), _nan_to_none(e.value), _nan_to_none(e.sem), int(len(e.samples)),
                 json.dumps(result.info.get(e.name, {}), sort_keys=True), float(seconds), _now()) for e in result]
        with self._connect() as con:
            con.executemany(f"INSERT OR REPLACE INTO metrics VALUES ({', '.join('?' * 15)})", rows)
            con.execute("DELETE FROM failures WHERE checkpoint=? AND data=? AND component_set=?",
                        (unit.checkpoint, unit.data, unit.component_set))
        return len(rows)

    def unit_count(self) -> int:
        """How many (checkpoint, data, component set) units have rows here (estimates, metrics or failures)."""
        with self._connect() as con:
            return con.execute("SELECT COUNT(*) FROM (SELECT checkpoint, data, component_set FROM estimates UNION "
                               "SELECT checkpoint, data, component_set FROM metrics UNION SELECT checkpoint, data, "
                               "component_set FROM failures)").fetchone()[0]

    def merge_from(self, other_path: str | os.PathLike) -> int:
        """Copy every row of another store file (same schema; e.g. a rank's file of a distributed sweep)
        into this one in one transaction, replacing rows with the same key; a unit stored there clears
        its failure record here. Returns the number of rows copied."""
        other_path = os.fspath(other_path)
        if not os.path.isfile(other_path):
            raise FileNotFoundError(f"no store at {other_path}")
        ResultStore(other_path)  # creates missing tables, checks the schema version
        total = 0
        con = self._open()
        try:
            con.execute("ATTACH DATABASE ? AS other", (other_path,))  # not allowed inside a transaction
            con.execute("BEGIN IMMEDIATE")
            try:
                for table in ("estimates", "metrics", "analyses"):
                    total += con.execute(f"INSERT OR REPLACE INTO {table} SELECT * FROM other.{table}").rowcount
                con.execute("DELETE FROM failures WHERE (checkpoint, data, component_set) IN (SELECT checkpoint, "
                            "data, component_set FROM other.estimates UNION SELECT checkpoint, data, component_set "
                            "FROM other.metrics)")
                total += con.execute("INSERT OR REPLACE INTO failures SELECT * FROM other.failures").rowcount
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
            con.execute("DETACH DATABASE other")
        finally:
            con.close()
        return total

    def record_failure(self, unit: UnitKey, config_key: str, error: str) -> None:
        with self._connect() as con:
            con.execute(
                "INSERT OR REPLACE INTO failures VALUES (?, ?, ?, ?, ?, ?, ?)",
                (unit.checkpoint, unit.step, unit.data, unit.component_set, config_key, error, _now()),
            )

    def __repr__(self) -> str:
        with self._connect() as con:
            n = con.execute("SELECT COUNT(*) FROM estimates").fetchone()[0]
            m = con.execute("SELECT COUNT(*) FROM metrics").fetchone()[0]
            f = con.execute("SELECT COUNT(*) FROM failures").fetchone()[0]
        return f"ResultStore({self.path!r}: {n} estimates, {m} Hessian metrics, {f} failures)"

