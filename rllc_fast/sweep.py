"""Sweeps: checkpoints x data distributions x component sets, one batched ``estimate_llc`` per cell,
written to a resumable ``ResultStore``.

A *unit* is one (checkpoint, data, component set): all its components run as one batched call and
their rows are written in one transaction. A checkpoint is known by its content id (``rllc_fast.content_id``,
cached in the store by path, size and mtime), so a same-named checkpoint of another run is never taken for
a stored one. A rerun skips components already stored for the same checkpoint id under the same
``config_key`` and computes the rest (missing, or stored only with another config: the rows of every
configuration are kept side by side); a checkpoint that cannot be loaded is recorded in the store's
``failures`` table and the sweep goes on. The store file is created only when the first unit is written.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .components import as_component_dict, groups, heads, layers, mlps, whole
from .content_id import checkpoint_ids, data_fingerprint, signature
from .config import SGLDConfig
from .data import ModelDistribution
from .distributed import (Rank, barrier, device_for, init as dist_init, merge_rank_stores, rank_from_env,
                          rank_store_path, rank_store_paths, shard)
from .engine.common import MATMUL_PRECISIONS
from .engine.graph import CudaGraphUnsupported
from .llc import estimate_llc
from .losses import check_tokens
from .models.build import move_to
from .models.checkpoints import Checkpoint, CheckpointError, select_checkpoints
from .progress import Progress
from .observable_jobs import OBSERVABLE_METRICS, ObservablesJob
from .result import ChainsDivergedError
from .store import ResultStore, UnitKey

COMPONENT_SETS: Dict[str, Callable] = {"whole": lambda m: {"whole": whole(m)}, "heads": heads, "layers": layers,
                                       "groups": groups, "mlps": mlps}
#: What a sweep can measure: the rLLC (SGLD) or a Hessian-based metric of ``rllc_fast.hessian``.
METRICS = ("llc", "hessian-trace", "fim-trace", "hessian-rank") + OBSERVABLE_METRICS


@dataclass
class SweepReport:
    """What a sweep did: units computed, skipped (already stored) and failed (with the error)."""

    computed: List[UnitKey] = field(default_factory=list)
    skipped: List[UnitKey] = field(default_factory=list)
    failed: Dict[UnitKey, str] = field(default_factory=dict)
    rows_written: int = 0
    seconds: float = 0.0
    #: Warnings about computed estimates, e.g. refined LLCs above the whole-model LLC (``check_against_whole``).
    warnings: List[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{len(self.computed)} unit(s) computed ({self.rows_written} rows), {len(self.skipped)} already "
                 f"stored, {len(self.failed)} failed, in {self.seconds:.0f} s"]
        lines += [f"failed: {u.checkpoint} / {u.data} / {u.component_set}: {err}" for u, err in self.failed.items()]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def config_key(config: SGLDConfig, engine: str, matmul_precision: str = "fp32") -> str:
    """The hash of the settings stored with each row: with equal checkpoint id, data (name and fingerprint)
    and key, the same estimate would be recomputed. ``matmul_precision`` enters only when it is not "fp32"
    (the keys of rows written before it existed stay valid)."""
    settings = {"config": config.to_dict(), "engine": engine}
    if matmul_precision != "fp32":
        settings["matmul_precision"] = matmul_precision
    text = json.dumps(settings, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class _LLCJob:
    """How a sweep computes and stores rLLCs (``estimate_llc``, the ``estimates`` table)."""

    metric = "llc"

    def __init__(self, config: SGLDConfig, engine: str, device, max_memory, log, progress: bool = False,
                 matmul_precision: str = "fp32", cuda_graph: bool = False):
        self.config, self.engine, self.device, self.max_memory, self.log = config, engine, device, max_memory, log
        self.progress = progress  # the estimate's own SGLD progress inside a unit
        self.precision = matmul_precision
        self.cuda_graph = cuda_graph  # not in the key: a replayed step runs the eager step's kernels

    def key(self) -> str:
        return config_key(self.config, self.engine, self.precision)

    def done(self, store: ResultStore, unit: UnitKey, key: str) -> set:
        return store.done(unit, key)

    def run(self, model, data, comps, unit: UnitKey):
        kw = dict(components=comps, engine=self.engine, device=self.device, max_memory=self.max_memory,
                  progress=self.progress, matmul_precision=self.precision)
        try:
            if self.cuda_graph:
                try:
                    return estimate_llc(model, data, self.config, cuda_graph=True, **kw)
                except CudaGraphUnsupported as why:  # e.g. a component set off the structured path: run it eagerly
                    self.log(f"{unit.checkpoint} / {unit.data} / {unit.component_set}: without CUDA graphs: {why}")
            return estimate_llc(model, data, self.config, **kw)
        except ChainsDivergedError as err:  # keep the other components; the lost ones are stored as diverged
            self.log(f"{unit.checkpoint} / {unit.data} / {unit.component_set}: {err}")
            return err.result

    def write(self, store: ResultStore, unit: UnitKey, key: str, result, seconds: float) -> int:
        return store.write(unit, key, self.config, self.engine, list(result), seconds, self.precision)


class _HessianJob:
    """How a sweep computes and stores a Hessian metric (``rllc_fast.hessian``, the ``metrics`` table)."""

    def __init__(self, metric: str, options: Mapping, device, progress: bool = False):
        from . import hessian

        self.metric, self.options, self.device = metric, dict(options or {}), device
        self.progress = progress  # the metric's own progress inside a unit (not part of the key)
        self.fn = {"hessian-trace": hessian.trace, "fim-trace": hessian.fim_trace,
                   "hessian-rank": hessian.approx_rank}[metric]

    def key(self) -> str:
        text = json.dumps({"metric": self.metric, "options": self.options}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def done(self, store: ResultStore, unit: UnitKey, key: str) -> set:
        return store.metrics_done(unit, self.metric, key)

    def run(self, model, data, comps, unit: UnitKey):
        if isinstance(data, ModelDistribution):
            raise ValueError(f"data {unit.data!r}: Hessian metrics take token data, not a ModelDistribution")
        return self.fn(model, data, comps, device=self.device, progress=self.progress, **self.options)

    def write(self, store: ResultStore, unit: UnitKey, key: str, result, seconds: float) -> int:
        return store.write_metrics(unit, key, result, seconds)


def _component_set(name: str, spec) -> Callable:
    if callable(spec):
        return spec
    if spec is None and name in COMPONENT_SETS:
        return COMPONENT_SETS[name]
    raise ValueError(f"component set {name!r}: use one of {sorted(COMPONENT_SETS)} or give a callable model -> components")


def run_sweep(
    checkpoints: Union[str, Sequence[Checkpoint]],
    data: Mapping[str, object],
    config: SGLDConfig,
    store: Union[str, ResultStore],
    component_sets: Union[Sequence[str], Mapping[str, Optional[Callable]]] = ("heads",),
    like=None,
    engine: str = "batched",
    device=None,
    max_memory=None,
    progress: bool = True,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
    metric: str = "llc",
    hessian_options: Optional[Mapping] = None,
    distributed: Optional[bool] = None,
    load: Optional[Callable[[Checkpoint], nn.Module]] = None,
    observables: Optional[Mapping[str, object]] = None,
    observe_every: int = 1,
    sampling_probe: Optional[str] = None,
    bif_per: str = "sequence",
    matmul_precision: str = "fp32",
    cuda_graph: bool = False,
) -> SweepReport:
    """Estimate every (checkpoint, data, component set) into ``store`` and return a ``SweepReport``.

    checkpoints:    a checkpoint folder, file, Hugging Face directory or glob (``rllc_fast.models.select_checkpoints``)
                    or Checkpoints.
    data:           ``{name: tokens [N, T] or ModelDistribution}``; each name is a data distribution.
    component_sets: names from ``COMPONENT_SETS`` ("whole", "heads", "groups", "layers", "mlps") or
                    ``{name: model -> components}``.
    store:          a store path (its folder must exist; the file is created by the first written unit, and a
                    file that is not an rllc store is refused before any work) or a writable ``ResultStore``.
    like:           a model or config every checkpoint must match; default: the first checkpoint that loads.
    load:           ``load(checkpoint) -> nn.Module``: your own loader (any model class; then ``like`` is not
                    checked and component sets must suit the model, e.g. ``{"whole": None}`` or callables).
                    Give ``checkpoints`` as ``Checkpoint(path, step, kind)`` objects for files ``select_checkpoints``
                    does not list. An error it raises marks that checkpoint failed, as an unreadable file does.
    device:         where every unit runs, whatever the metric (default: cuda when available, else the CPU);
                    under torchrun a bare "cuda" (or the default) is ``cuda:LOCAL_RANK``
                    (``rllc_fast.distributed.device_for``).
    metric:         "llc" (default: SGLD with ``config``, ``engine``) or a Hessian metric from ``METRICS``
                    ("hessian-trace", "fim-trace", "hessian-rank"), computed by ``rllc_fast.hessian`` with the
                    keyword arguments ``hessian_options`` (e.g. ``{"num_probes": 20}``); ``config`` is then unused.
    matmul_precision: "fp32" (default), "tf32" or "bf16" for the SGLD runs (``estimate_llc``'s); part of the
                    rows' config key and stored settings when not "fp32".
    cuda_graph:     metric "llc": ``estimate_llc(cuda_graph=True)`` for every unit where it can run (CUDA,
                    structured components); the others run eagerly, with a log line saying why. Not in the key.
    observables:    probe sets ``{name: tokens [N, T]}`` for ``metric`` "susceptibility" or "bif"
                    (``rllc_fast.observable_jobs``): each unit is one SGLD run (``config``, ``engine``) over its
                    components plus the whole model with these probe sets observed every ``observe_every``-th
                    draw; its rLLC rows are stored as for "llc", and beside them per (component, probe set) the
                    susceptibility to that probe set (``sampling_probe`` names the probe set drawn from the
                    sampling data) or per (component, probe pair) the Bayesian influence (``bif_per``:
                    "sequence" or "token"), with the arrays in ``STORE.observations/`` (``observable_rows``).
    distributed:    None (default): run as one rank of a ``torchrun`` job when its environment says
                    ``WORLD_SIZE > 1``, else in one process; False: always one process; True: like None,
                    and say so when there is only one rank. See ``rllc_fast.distributed``: each rank computes
                    a cost-balanced shard into its own file beside the store, rank 0 merges; every rank
                    returns the report of the whole job.
    """
    t_start = time.time()
    if isinstance(checkpoints, (str, bytes)) or hasattr(checkpoints, "__fspath__"):
        checkpoints = select_checkpoints(checkpoints)
    checkpoints = list(checkpoints)
    if not data:
        raise ValueError("data: give at least one data distribution {name: tokens}")
    if isinstance(component_sets, Mapping):
        sets = {k: _component_set(k, v) for k, v in component_sets.items()}
    else:
        sets = {k: _component_set(k, None) for k in component_sets}
    if not sets:
        raise ValueError("component_sets: give at least one (e.g. ['heads'])")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if matmul_precision not in MATMUL_PRECISIONS:
        raise ValueError(f"matmul_precision must be one of {MATMUL_PRECISIONS}, got {matmul_precision!r}")
    rank = rank_from_env() if distributed is not False else Rank()
    device = device_for(rank, device)  # resolved once: every unit of either metric runs there
    inner = progress and rank.is_main  # progress inside each unit
    store_path = store.path if isinstance(store, ResultStore) else os.fspath(store)
    if metric in OBSERVABLE_METRICS:
        job = ObservablesJob(metric, config, engine, observables or {}, store_path, device, max_memory, observe_every,
                             sampling_probe, bif_per, log, inner, matmul_precision)
    elif observables:
        raise ValueError(f"observables are recorded for metric 'susceptibility' or 'bif', not {metric!r}")
    elif metric == "llc":
        job = _LLCJob(config, engine, device, max_memory, log, inner, matmul_precision, cuda_graph)
    else:
        job = _HessianJob(metric, hessian_options, device, inner)
    if distributed and not rank.active:
        log("distributed sweep: no torchrun environment (WORLD_SIZE > 1); running in one process")
    # Of the ranks, only rank 0 opens the shared store (SQLite is not safe between machines). Opening checks
    # the folder and refuses a file that is not an rllc store; the file is created by the first write.
    if not isinstance(store, ResultStore) and rank.is_main:
        store = ResultStore(store)
    if isinstance(store, ResultStore) and store.readonly:
        raise ValueError(f"store: {store.path} was opened read-only; a sweep needs ResultStore({store.path!r})")
    target = store
    if rank.active:
        dist_init(rank, device=device)
        if rank.is_main:
            merged = merge_rank_stores(store)  # finished work of an interrupted distributed run
            if merged:
                log(f"merged {merged} rows left by an earlier distributed run into {store_path}")
        barrier(rank)
        target = ResultStore(rank_store_path(store_path, rank.rank))
    fingerprints = {name: data_fingerprint(d) for name, d in data.items()}
    keys = {name: job.key() for name in data}
    signatures = {str(c.path.absolute()): _signature_or_none(c.path) for c in checkpoints}  # before hashing
    ids, unreadable = _checkpoint_ids(checkpoints, store, rank)
    report = SweepReport()
    all_units = []
    for ckpt in checkpoints:
        path = str(ckpt.path.absolute())
        cid = ids.get(path, f"unreadable:{path}")  # never a content hash: such a unit is recorded as failed
        all_units += [(ckpt, UnitKey(ckpt.name, ckpt.step, d, s, cid, path, fingerprints[d]), d, s)
                      for d in data for s in sets]
    opener = _checkpoint_loader(load)
    if rank.active:
        cfg = getattr(like, "cfg", like) or _first_config(checkpoints, opener)
        owner = shard([_unit_cost(s, cfg) for _, _, _, s in all_units], rank.world_size)
        mine = [u for u, r in zip(all_units, owner) if r == rank.rank]
        stored = _stored_components(job, store, all_units, keys, rank)
    else:
        mine = all_units
    bar = Progress(len(all_units), progress and rank.is_main, desc="sweep", unit="unit", every=0)  # a line per unit

    def advance() -> None:
        """One more of this rank's units is done; rank 0 also counts what the other ranks have written."""
        own = len(report.computed) + len(report.skipped) + len(report.failed)
        others = _units_of_other_ranks(store_path, rank) if rank.active and bar.enabled and rank.single_host else 0
        bar.update_to(own + others)

    reference = like

    def warn(message: str) -> None:
        """A warning about computed estimates: one log line, and a line of the report's summary."""
        log(f"warning: {message}")
        report.warnings.append(message)

    for ckpt, units in itertools.groupby(mine, key=lambda u: u[0]):  # each checkpoint loaded once
        model, load_error = None, unreadable.get(str(ckpt.path.absolute()))
        if load_error is not None:
            log(f"skipping checkpoint: {load_error}")
        for _, unit, data_name, set_name in units:
            bar.set_description(f"step {ckpt.step} {data_name} {set_name}")
            if load_error is None and model is None:
                try:
                    model = opener(ckpt, reference, device)
                    if _signature_or_none(ckpt.path) != signatures[str(ckpt.path.absolute())]:
                        raise CheckpointError(f"{ckpt.path} changed on disk after the sweep hashed it; its rows would "
                                              "carry the old content's id: rerun the sweep once it is written")
                    if reference is None:
                        reference = getattr(model, "cfg", None)
                        _check_data(data, model)
                        _check_data({f"observables[{n!r}]": t for n, t in (observables or {}).items()}, model)
                except CheckpointError as err:
                    load_error = str(err)
                    log(f"skipping checkpoint: {load_error}")
            if load_error is not None:
                target.record_failure(unit, keys[data_name], load_error)
                report.failed[unit] = load_error
                advance()
                continue
            comps = as_component_dict(model, sets[set_name](model))
            done = stored[unit] if rank.active else job.done(store, unit, keys[data_name])
            todo = {k: c for k, c in comps.items() if k not in done}
            if not todo:
                report.skipped.append(unit)
                advance()
                continue
            t0 = time.time()
            where = f"{unit.checkpoint} (step {unit.step}) / {unit.data} / {unit.component_set}"
            with runtime_warnings_as_lines(lambda message: warn(f"{where}: {message}")):
                result = job.run(model, data[data_name], todo, unit)
            report.rows_written += job.write(target, unit, keys[data_name], result, time.time() - t0)
            report.computed.append(unit)
            if metric == "llc" or metric in OBSERVABLE_METRICS:
                for message in check_against_whole(target, unit, keys[data_name]):
                    warn(message)
            advance()
    if rank.active:
        report = _finish_distributed(store, rank, report, bar, log)
    bar.close()
    report.seconds = time.time() - t_start
    return report


@contextlib.contextmanager
def runtime_warnings_as_lines(emit: Callable[[str], None]):
    """Inside the block, ``RuntimeWarning``s (the sampler's: diverged chains, ``SamplerWarning``) are caught and
    handed to ``emit`` as one-line messages, so a sweep's log keeps one readable line each; other warnings are
    shown as usual. The warning filters are as they were afterwards."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        yield
    for w in caught:
        if issubclass(w.category, RuntimeWarning):
            emit(" ".join(str(w.message).split()))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def check_against_whole(store: ResultStore, unit: UnitKey, key: str) -> List[str]:
    """Messages for refined LLCs of ``unit``'s checkpoint and data (configuration ``key``) that exceed the
    whole-model LLC stored for the same checkpoint, data and configuration by more than 3 combined standard
    errors (``diagnostics.refined_exceeding_whole``); none while the whole model's row is missing."""
    from .diagnostics import refined_exceeding_whole

    stored = store.checkpoint_estimates(unit, key)
    whole = stored.get(("whole", "whole"))
    if whole is None:
        return []
    refined = {f"{s} {c}": v for (s, c), v in stored.items() if s != "whole"}
    above = refined_exceeding_whole({k: v[0] for k, v in refined.items()}, whole[0],
                                    {k: v[1] for k, v in refined.items()}, whole[1], warn=False)
    if not above:
        return []
    listed = ", ".join(f"{k} {whole[0] + v:.3g}" for k, v in above.items())
    return [f"{unit.checkpoint} (step {unit.step}) / {unit.data}: refined LLC(s) above the whole-model LLC "
            f"{whole[0]:.3g}: {listed}; a refined LLC should not exceed the LLC, so these are most likely sampler "
            "artefacts: lower --step-size (run `rllc calibrate`) and check the diagnostics"]


def _unit_cost(set_name: str, cfg) -> float:
    """A unit's relative cost for sharding: its component count (one batched replica each) plus one for the
    shared forward pass, from the model config ``cfg`` (None: every set counts as one component)."""
    n_layers, n_heads = (getattr(cfg, "n_layers", 1), getattr(cfg, "n_heads", 1)) if cfg is not None else (1, 1)
    n_groups = (getattr(cfg, "n_key_value_heads", None) or n_heads) if cfg is not None else 1
    return 1.0 + {"whole": 1, "layers": n_layers, "mlps": n_layers, "heads": n_layers * n_heads,
                  "groups": n_layers * n_groups}.get(set_name, 1)


def _first_config(checkpoints, opener):
    """The model config of the first checkpoint that loads (None when none does, or the model has no ``cfg``)."""
    for ckpt in checkpoints:
        try:
            return getattr(opener(ckpt, None, "cpu"), "cfg", None)
        except CheckpointError:
            continue
    return None


def _checkpoint_loader(load: Optional[Callable]) -> Callable:
    """``open(ckpt, like, device) -> model``: ``Checkpoint.load``, or the user's ``load(ckpt)`` moved to
    ``device``, its errors turned into a ``CheckpointError`` that names the checkpoint."""
    if load is None:
        return lambda ckpt, like, device: ckpt.load(like=like, device=device)
    if not callable(load):
        raise TypeError(f"load must be a callable load(checkpoint) -> nn.Module, got {type(load).__name__}")

    def open_with_user_loader(ckpt, like, device):
        try:
            model = load(ckpt)
        except Exception as err:  # the user's loader: any failure marks the checkpoint failed
            raise CheckpointError(f"{ckpt.path}: load() raised {type(err).__name__}: {err}") from err
        if not isinstance(model, nn.Module):
            raise CheckpointError(f"{ckpt.path}: load() returned a {type(model).__name__}, not an nn.Module")
        move_to(model, device)
        return model.eval()

    return open_with_user_loader


def _signature_or_none(path) -> Optional[str]:
    """``content_id.signature`` (file names, sizes, mtimes) of a checkpoint, None when it cannot be read."""
    try:
        return signature(path)
    except OSError:
        return None


def _checkpoint_ids(checkpoints, store, rank: Rank):
    """``(ids, errors)`` of ``content_id.checkpoint_ids`` for every checkpoint: hashed by rank 0 (through the
    store's cache of ids) and sent to every rank (a collective call when distributed)."""
    if not rank.active:
        return checkpoint_ids([c.path for c in checkpoints], store)
    import torch.distributed as dist

    box = [checkpoint_ids([c.path for c in checkpoints], store) if rank.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _stored_components(job, store, units, keys, rank: Rank) -> dict:
    """``{unit: names of its components already in the store}`` for every unit: rank 0 reads ``store``,
    every rank receives the answer (a collective call)."""
    import torch.distributed as dist

    box = [{u: job.done(store, u, keys[d]) for _, u, d, _ in units} if rank.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _units_of_other_ranks(store_path: str, rank: Rank) -> int:
    """Units the other ranks have written to their files so far (rank 0's view of the whole job; only
    called when every rank runs on rank 0's machine, where SQLite's locking holds)."""
    own = rank_store_path(store_path, rank.rank)
    return sum(ResultStore(p).unit_count() for p in rank_store_paths(store_path) if p != own)


def _finish_distributed(store: ResultStore, rank: Rank, report: SweepReport, bar: Progress, log) -> SweepReport:
    """Wait for every rank, merge their files into ``store`` (rank 0), and return the whole job's report."""
    import torch.distributed as dist

    barrier(rank)
    if rank.is_main:
        merged = merge_rank_stores(store)
        log(f"distributed sweep: {rank.world_size} ranks; merged {merged} rows into {store.path}")
    parts = [None] * rank.world_size
    dist.all_gather_object(parts, (report.computed, report.skipped, report.failed, report.rows_written,
                                   report.warnings))
    barrier(rank)
    whole = SweepReport()
    for computed, skipped, failed, rows, warned in parts:
        whole.computed += computed
        whole.skipped += skipped
        whole.failed.update(failed)
        whole.rows_written += rows
        whole.warnings += warned
    bar.update_to(len(whole.computed) + len(whole.skipped) + len(whole.failed))
    return whole


def _check_data(data: Mapping[str, object], model) -> None:
    """Every token distribution fits the model (ids within the vocabulary, contexts within n_ctx)."""
    for name, d in data.items():
        tokens = d.contexts if isinstance(d, ModelDistribution) else d
        if isinstance(tokens, torch.Tensor):
            check_tokens(tokens, model, what=name if name.startswith("observables[") else f"data {name!r}")
