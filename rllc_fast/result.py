"""Results of LLC estimation: per-component estimates, traces and divergence records."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import cached_property
from typing import Dict, List, Optional

import numpy as np

from .config import SGLDConfig
from .diagnostics import SamplerDiagnostics, diagnose
from .observations import Observations


class ChainsDivergedError(RuntimeError):
    """Every chain of a component diverged (NaN/Inf loss); no estimate can be made for it.

    When raised by ``estimate_llc``, ``.result`` holds the ``LLCResult`` of the whole call (the other
    components' estimates and every trace)."""

    result = None


@dataclass
class ComponentLLC:
    """The estimate for one component.

    loss_trace:      [chains, draws] loss l(w_t) at each kept draw (nats); NaN from divergence on.
    init_loss_trace: [draws] l(w*) on the same minibatch as each draw (shared by all chains).
    distance_trace:  [chains, draws] ||v_t - v*|| before each draw's update (Euclidean, weight units).
    diverged_at:     [chains] SGLD step (0-based, burn-in included) whose loss was NaN/Inf, or -1.
    llc_per_chain:   [chains] nbeta * (mean loss_trace[c] - mean init_loss_trace); NaN if diverged.
    diagnostics:     R-hat, ESS and the trend of ||v - v*|| of the chains that did not diverge
                     (``rllc_fast.diagnostics``; ``.problems()`` says what is wrong and the fix).
    """

    name: str
    numel: int
    nbeta: float
    loss_trace: np.ndarray
    init_loss_trace: np.ndarray
    distance_trace: np.ndarray
    diverged_at: np.ndarray
    llc_per_chain: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.loss_trace = np.asarray(self.loss_trace, dtype=np.float64)
        self.init_loss_trace = np.asarray(self.init_loss_trace, dtype=np.float64)
        self.distance_trace = np.asarray(self.distance_trace, dtype=np.float64)
        self.diverged_at = np.asarray(self.diverged_at, dtype=np.int64)
        ok = ~self.diverged
        per_chain = np.full(self.loss_trace.shape[0], np.nan)
        per_chain[ok] = self.nbeta * (self.loss_trace[ok].mean(axis=1) - self.init_loss)
        self.llc_per_chain = per_chain

    @property
    def diverged(self) -> np.ndarray:
        """[chains] bool: the chain hit a NaN/Inf loss and is left out of the summary."""
        return self.diverged_at >= 0

    @property
    def num_diverged(self) -> int:
        return int(self.diverged.sum())

    @property
    def init_loss(self) -> float:
        """l(w*), averaged over the draws' minibatches."""
        return float(self.init_loss_trace.mean())

    @property
    def llc_mean(self) -> float:
        """Mean over the chains that did not diverge."""
        good = self.llc_per_chain[~self.diverged]
        return float(good.mean()) if good.size else float("nan")

    @property
    def llc_std(self) -> float:
        """Sample standard deviation (ddof=1) across non-diverged chains; NaN with one chain."""
        good = self.llc_per_chain[~self.diverged]
        return float(good.std(ddof=1)) if good.size > 1 else float("nan")

    @property
    def llc_sem(self) -> float:
        """Standard error of ``llc_mean``: ``llc_std / sqrt(chains used)``."""
        used = int((~self.diverged).sum())
        return self.llc_std / np.sqrt(used) if used > 1 else float("nan")

    @cached_property
    def diagnostics(self) -> SamplerDiagnostics:
        """Sampler diagnostics of the chains that did not diverge (see ``rllc_fast.diagnostics``)."""
        return diagnose(self.loss_trace, self.init_loss_trace, self.distance_trace, self.nbeta, self.diverged)

    def summary_row(self) -> dict:
        """llc_mean/std/sem, init_loss, chains and diverged chains, and the diagnostics' floats."""
        return {
            "component": self.name,
            "numel": self.numel,
            "llc_mean": self.llc_mean,
            "llc_std": self.llc_std,
            "llc_sem": self.llc_sem,
            "init_loss": self.init_loss,
            "num_chains": int(self.loss_trace.shape[0]),
            "num_diverged": self.num_diverged,
            **self.diagnostics.as_dict(),
        }

    def to_dict(self) -> dict:
        return {
            **self.summary_row(),
            "llc_per_chain": self.llc_per_chain.tolist(),
            "diverged_at": self.diverged_at.tolist(),
            "loss_trace": self.loss_trace.tolist(),
            "init_loss_trace": self.init_loss_trace.tolist(),
            "distance_trace": self.distance_trace.tolist(),
        }


@dataclass
class LLCResult:
    """Estimates for every component of one call of ``estimate_llc``; ``result["1:6"]`` is one."""

    estimates: Dict[str, ComponentLLC]
    config: SGLDConfig
    engine: str
    matmul_precision: str = "fp32"  # the precision l(w*) and l(w_t) were computed in (estimate_llc's argument)
    observations: Optional[Observations] = None  # probe-set losses when estimate_llc was given observables

    def __getitem__(self, name: str) -> ComponentLLC:
        try:
            return self.estimates[name]
        except KeyError:
            raise KeyError(f"no component {name!r}; have {list(self.estimates)}") from None

    def __iter__(self):
        return iter(self.estimates.values())

    def __len__(self) -> int:
        return len(self.estimates)

    @property
    def components(self) -> List[str]:
        return list(self.estimates)

    @property
    def llc_mean(self) -> Dict[str, float]:
        return {k: e.llc_mean for k, e in self.estimates.items()}

    @property
    def llc_std(self) -> Dict[str, float]:
        return {k: e.llc_std for k, e in self.estimates.items()}

    @property
    def loss_trace(self) -> np.ndarray:
        """[component, chain, draw] losses l(w_t) (NaN after a chain diverged)."""
        return np.stack([e.loss_trace for e in self.estimates.values()])

    @property
    def init_loss(self) -> Dict[str, float]:
        return {k: e.init_loss for k, e in self.estimates.items()}

    def diverged_chains(self) -> Dict[str, List[int]]:
        """Components with diverged chains: ``{name: [chain indices]}``."""
        return {
            k: np.flatnonzero(e.diverged).tolist() for k, e in self.estimates.items() if e.num_diverged
        }

    def diagnostics(self) -> Dict[str, SamplerDiagnostics]:
        """``{component: SamplerDiagnostics}``: R-hat, ESS, ESS fraction and growth of ||v - v*|| per component."""
        return {k: e.diagnostics for k, e in self.estimates.items()}

    def unreliable(self) -> Dict[str, List[str]]:
        """Components whose diagnostics cross a threshold: ``{component: [problem with its fix, ...]}``."""
        out = {k: d.problems() for k, d in self.diagnostics().items()}
        return {k: p for k, p in out.items() if p}

    def to_dataframe(self):
        """One row per component: llc_mean, llc_std, llc_sem, init_loss, num_chains, num_diverged, and the
        diagnostics rhat, ess, ess_fraction, distance_growth."""
        import pandas as pd

        return pd.DataFrame([e.summary_row() for e in self.estimates.values()])

    def to_dict(self) -> dict:
        return {
            "engine": self.engine,
            "matmul_precision": self.matmul_precision,
            "config": self.config.to_dict(),
            "components": {k: e.to_dict() for k, e in self.estimates.items()},
        }

    def summary(self) -> str:
        """A short table with R-hat and ESS, a line for each component that lost chains to divergence and one
        for each component whose diagnostics say the estimate is unreliable."""
        lines = [f"{'component':>12} {'llc_mean':>10} {'llc_std':>9} {'chains':>7} {'rhat':>6} {'ess':>7}"]
        for e in self.estimates.values():
            used = e.loss_trace.shape[0] - e.num_diverged
            d = e.diagnostics
            lines.append(f"{e.name:>12} {e.llc_mean:10.4f} {e.llc_std:9.4f} {used:>3}/{e.loss_trace.shape[0]:<3} "
                         f"{d.rhat:6.3f} {d.ess:7.1f}")
        for name, chains in self.diverged_chains().items():
            steps = self.estimates[name].diverged_at[chains].tolist()
            lines.append(
                f"note: {name}: chain(s) {chains} diverged (NaN/Inf loss at step(s) {steps}) and are "
                "excluded from the mean and std"
            )
        for name, found in self.unreliable().items():
            lines.extend(f"warning: {name}: {p}" for p in found)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"LLCResult(engine={self.engine!r}, matmul_precision={self.matmul_precision!r}, "
                f"components={len(self)})\n{self.summary()}")


def check_divergence(estimates: Dict[str, ComponentLLC], step_size: float) -> None:
    """Warn for components that lost some chains; raise if a component lost them all."""
    lost_all = [e.name for e in estimates.values() if e.num_diverged == e.loss_trace.shape[0]]
    if lost_all:
        raise ChainsDivergedError(
            f"every chain diverged (NaN/Inf loss) for component(s) {lost_all} at step size {step_size}; "
            "try a smaller step_size (e.g. 10x smaller), a larger localization, or a smaller nbeta"
        )
    some = {e.name: np.flatnonzero(e.diverged).tolist() for e in estimates.values() if e.num_diverged}
    if some:
        warnings.warn(
            f"chains diverged (NaN/Inf loss) and were excluded from the estimates: {some}; "
            "consider a smaller step_size",
            RuntimeWarning,
            stacklevel=3,
        )
