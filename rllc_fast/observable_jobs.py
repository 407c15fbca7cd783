"""How a sweep computes and stores observables metrics: susceptibilities and Bayesian influence functions.

One unit (checkpoint, data, component set) is one ``estimate_llc`` call over the set's components plus
the whole model (the baseline of the susceptibilities), with the probe sets as observables. What is
written, per unit:

- a folder beside the store, ``<store>.observations/<unit folder>/``: the per-token probe losses
  (``Observations``, memory-mapped), and ``susceptibility.npz`` (per-token susceptibilities and their
  standard errors, ``[component, context, position]`` per probe set) or ``bif/<component>/<query>~<train>.npy``;
  files are written atomically and the observations' index last, so an interrupted unit leaves no folder
  that reads as finished;
- rows in the store (one transaction after the files): the rLLC estimates of the same run (``estimates``),
  and in ``metrics`` one row per (component, probe set) named ``susceptibility:PROBE`` (the aggregate
  susceptibility and its standard error) or per (component, probe pair) named ``bif:QUERY~TRAIN`` (value:
  the mean influence over the pair's entries; the matrix is the file); each row's ``info`` names its files.

The unit's key hashes the SGLD config, engine, probe sets' names and contents, ``observe_every``, the
sampling probe and the BIF options, so a stored row is never reused for other inputs.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, Mapping, Optional

import numpy as np

from .atomic import write_arrays_atomically
from .components import whole
from .config import SGLDConfig
from .content_id import data_fingerprint
from .influence import PER, bayesian_influence
from .llc import estimate_llc
from .result import ChainsDivergedError
from .susceptibility import susceptibilities

OBSERVABLE_METRICS = ("susceptibility", "bif")
WHOLE = "whole"  # the whole-model component added to every unit


def observations_root(store_path: str) -> Path:
    """The folder beside the store that holds every unit's observations."""
    return Path(f"{os.fspath(store_path)}.observations")


class ObservablesJob:
    """A sweep's job for ``metric`` "susceptibility" or "bif" (see the module docstring)."""

    def __init__(self, metric: str, config: SGLDConfig, engine: str, observables: Mapping[str, object],
                 store_path: str, device=None, max_memory=None, observe_every: int = 1,
                 sampling_probe: Optional[str] = None, bif_per: str = "sequence", log=print, progress: bool = False,
                 matmul_precision: str = "fp32"):
        if metric not in OBSERVABLE_METRICS:
            raise ValueError(f"metric must be one of {OBSERVABLE_METRICS}, got {metric!r}")
        if not observables:
            raise ValueError(f"metric {metric!r} needs probe sets: observables={{name: tokens}} "
                             "(rllc sweep --observable NAME=SPEC)")
        if metric == "susceptibility":
            if sampling_probe is None or sampling_probe not in observables:
                raise ValueError(f"metric 'susceptibility' needs sampling_probe, the name of the probe set drawn from "
                                 f"the sampling data (rllc sweep --sampling-probe NAME), one of {list(observables)}; "
                                 f"got {sampling_probe!r}")
            if len(observables) < 2:
                raise ValueError("metric 'susceptibility' needs a probe set besides the sampling probe")
        if bif_per not in PER:
            raise ValueError(f"bif_per must be one of {PER}, got {bif_per!r}")
        self.metric, self.config, self.engine, self.observables = metric, config, engine, dict(observables)
        self.store_path, self.device, self.max_memory, self.every = store_path, device, max_memory, observe_every
        self.sampling, self.bif_per, self.log, self.progress = sampling_probe, bif_per, log, progress
        self.precision = matmul_precision
        names = list(self.observables)
        self.row_metrics = ([f"susceptibility:{p}" for p in names if p != sampling_probe] if metric == "susceptibility"
                            else [f"bif:{a}~{b}" for i, a in enumerate(names) for b in names[i:]])

    def key(self) -> str:
        text = json.dumps({"metric": self.metric, "config": self.config.to_dict(), "engine": self.engine,
                           "probes": {n: data_fingerprint(t) for n, t in self.observables.items()},
                           "observe_every": self.every, "sampling": self.sampling,
                           "bif_per": self.bif_per if self.metric == "bif" else None,
                           "matmul_precision": self.precision}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def done(self, store, unit, key: str) -> set:
        """Components with every row of this job stored (a component missing one is recomputed)."""
        sets = [store.metrics_done(unit, m, key) for m in self.row_metrics]
        return set.intersection(*sets) if sets else set()

    def folder(self, unit) -> Path:
        """The unit's folder under ``observations_root``: checkpoint id, step, data name and content hash, component
        set and key (everything a row is keyed by, so the arrays of two units never share a folder)."""
        data = f"{_safe(unit.data)}.{unit.data_hash[:16]}"
        return (observations_root(self.store_path)
                / f"{unit.checkpoint_id[:16]}-{unit.step}-{data}-{_safe(unit.component_set)}-{self.key()}")

    def run(self, model, data, comps, unit):
        comps = dict(comps)
        own = list(comps)  # the set's components: the whole model added below is the baseline, not a row of the set
        if self.metric == "susceptibility" and not any(n != WHOLE for n in comps):
            raise ValueError(f"component set {unit.component_set!r}: susceptibilities need components besides the "
                             "whole model (e.g. --components heads)")
        comps.setdefault(WHOLE, whole(model))
        folder = self.folder(unit)
        try:
            result = estimate_llc(model, data, self.config, components=comps, engine=self.engine, device=self.device,
                                  max_memory=self.max_memory, progress=self.progress, observables=self.observables,
                                  observe_every=self.every, observables_dir=folder / "observations",
                                  matmul_precision=self.precision)
        except ChainsDivergedError as err:
            self.log(f"{unit.checkpoint} / {unit.data} / {unit.component_set}: {err}")
            result = err.result
        if result.observations is None:
            raise ValueError("every chain of the run diverged before the observations were written")
        rows = self._susceptibility_rows(result, folder) if self.metric == "susceptibility" else \
            self._bif_rows(result, folder, own)
        return [result[n] for n in own], rows

    def write(self, store, unit, key: str, out, seconds: float) -> int:
        from .sweep import config_key

        estimates, rows = out
        written = store.write(unit, config_key(self.config, self.engine, self.precision), self.config, self.engine,
                              estimates, seconds, self.precision)
        settings = {"config": self.config.to_dict(), "engine": self.engine, "metric": self.metric,
                    "matmul_precision": self.precision,
                    "observe_every": self.every, "sampling": self.sampling, "bif_per": self.bif_per}
        return written + store.write_metric_rows(unit, key, settings, rows, seconds)

    def _susceptibility_rows(self, result, folder: Path):
        sus = susceptibilities(result, sampling=self.sampling, whole=WHOLE)
        arrays = {f"{k}/{p}": v for k, d in (("per_token", sus.per_token), ("per_token_sem", sus.per_token_sem))
                  for p, v in d.items()}
        arrays["components"] = np.asarray(sus.components)
        write_arrays_atomically(folder / "susceptibility.npz", arrays)
        rel = folder.name
        return [{"component": c, "metric": f"susceptibility:{p}", "numel": result[c].numel,
                 "value": sus.aggregate[i, j], "sem": sus.aggregate_sem[i, j], "num_samples": int(sus.chains_used[i]),
                 "info": {"folder": rel, "sampling": self.sampling, "file": "susceptibility.npz", "row": i,
                          "init_loss": sus.init_loss, "sem_chains": float(sus.aggregate_sem_chains[i, j])}}
                for i, c in enumerate(sus.components) for j, p in enumerate(sus.probes)]

    def _bif_rows(self, result, folder: Path, own):
        obs, rows = result.observations, []
        for comp in own:
            for m in self.row_metrics:
                q, t = m.split(":", 1)[1].split("~")
                a, b = obs.component_losses(q, comp), obs.component_losses(t, comp)
                ok = np.isfinite(np.asarray(a, dtype=np.float64)).all(axis=(1, 2, 3))
                if ok.sum() * a.shape[1] < 3:
                    continue  # every chain diverged: no row (the rLLC row records the divergence)
                influence = bayesian_influence(a, b, per=self.bif_per, max_memory=self.max_memory)
                name = f"bif/{_safe(comp)}/{q}~{t}.npy"
                write_arrays_atomically(folder / name, influence)
                rows.append({"component": comp, "metric": m, "numel": result[comp].numel,
                             "value": float(np.nanmean(influence)), "sem": float("nan"),
                             "num_samples": int(ok.sum()),
                             "info": {"folder": folder.name, "file": name, "per": self.bif_per,
                                      "shape": list(influence.shape)}})
        return rows


def load_susceptibility_arrays(store_path: str, info: Dict) -> Dict[str, np.ndarray]:
    """The per-token arrays behind a ``susceptibility:PROBE`` row (its ``info``): ``{"per_token/PROBE": [component,
    context, position], "per_token_sem/PROBE": ..., "components": [component]}``."""
    with np.load(observations_root(store_path) / info["folder"] / info["file"]) as z:
        return {k: z[k] for k in z.files}


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
