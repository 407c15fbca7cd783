"""Results of the Hessian metrics: one estimate with its standard error per component."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterator

import numpy as np


@dataclass
class HessianEstimate:
    """One component's estimate.

    value:   the estimate (trace: loss units per weight^2, summed over the component's weights; rank: a count).
    sem:     its standard error (NaN from a single sample).
    samples: the independent samples whose mean is ``value`` (per probe, or per data batch for ``fim_trace``).
    """

    name: str
    numel: int
    value: float
    sem: float
    samples: np.ndarray = field(repr=False)

    def to_dict(self) -> dict:
        return {"name": self.name, "numel": self.numel, "value": self.value, "sem": self.sem,
                "num_samples": int(len(self.samples))}


def summarise(name: str, numel: int, samples) -> HessianEstimate:
    samples = np.asarray(samples, dtype=np.float64)
    sem = float(samples.std(ddof=1) / np.sqrt(len(samples))) if len(samples) > 1 else float("nan")
    return HessianEstimate(name, int(numel), float(samples.mean()), sem, samples)


@dataclass
class HessianResult:
    """Per-component estimates of one metric (``"hessian-trace"``, ``"fim-trace"``, ``"hessian-rank"``).

    ``config`` holds the settings that produced them (probes, batches, method, interval, ...) and
    ``info`` what was measured on the way (e.g. the spectral interval found by power iteration)."""

    metric: str
    estimates: Dict[str, HessianEstimate]
    config: dict
    seconds: float
    info: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> HessianEstimate:
        return self.estimates[name]

    def __iter__(self) -> Iterator[HessianEstimate]:
        return iter(self.estimates.values())

    def __len__(self) -> int:
        return len(self.estimates)

    def values(self) -> Dict[str, float]:
        return {k: e.value for k, e in self.estimates.items()}

    def to_dict(self) -> dict:
        return {"metric": self.metric, "config": self.config, "seconds": self.seconds, "info": self.info,
                "estimates": [e.to_dict() for e in self]}

    def __repr__(self) -> str:
        body = ", ".join(f"{e.name}: {e.value:.4g} ± {e.sem:.2g}" for e in self)
        return f"HessianResult({self.metric}: {body})"
