"""SGLD hyperparameters for (refined) LLC estimation.

The defaults are the paper's (appendix F.2): step size 1e-3, n*beta = 30, localization
gamma = 200, 4 chains, 200 draws, no burn-in.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional


SAMPLERS = ("sgld", "rmsprop")


@dataclass(frozen=True)
class SGLDConfig:
    """Settings of the SGLD sampler behind ``lambda_hat = nbeta * (E[l(w)] - l(w*))``.

    step_size:    SGLD step epsilon (dimensionless; the noise has variance epsilon).
    nbeta:        n * beta, the inverse temperature times the sample size.
    localization: gamma, strength of the pull back to w* (0 disables it).
    num_chains:   independent chains per component.
    num_draws:    loss samples kept per chain (one every ``thinning`` SGLD steps after burn-in).
    num_burnin:   SGLD steps run and discarded before the first draw.
    thinning:     SGLD steps per kept draw after burn-in (1 keeps every step).
    batch_size:   sequences (rows) per minibatch; None means the full data set every step.
    seed:         seeds the minibatch order and every chain's noise.
    sampler:      "sgld" (plain SGLD, the paper's) or "rmsprop" (RMSProp-preconditioned SGLD as in
                  devinterp's ``rmsprop_sgld``: preconditioner ``1 / (sqrt(mean grad^2) + rmsprop_eps)``,
                  running mean with decay ``rmsprop_alpha``, applied to the drift and, square-rooted,
                  to the noise).
    """

    step_size: float = 1e-3
    nbeta: float = 30.0
    localization: float = 200.0
    num_chains: int = 4
    num_draws: int = 200
    num_burnin: int = 0
    batch_size: Optional[int] = 8
    seed: int = 0
    thinning: int = 1
    sampler: str = "sgld"
    rmsprop_alpha: float = 0.99
    rmsprop_eps: float = 0.1

    def __post_init__(self) -> None:
        _positive_float("step_size", self.step_size)
        _positive_float("nbeta", self.nbeta)
        if not _finite_number(self.localization) or self.localization < 0:
            raise ValueError(
                f"localization must be a finite number >= 0 (got {self.localization!r}); "
                "use 0 to switch the pull towards w* off"
            )
        _count("num_chains", self.num_chains, minimum=1)
        _count("num_draws", self.num_draws, minimum=1)
        _count("num_burnin", self.num_burnin, minimum=0)
        if self.batch_size is not None:
            _count("batch_size", self.batch_size, minimum=1, hint="or None for full batch")
        _count("thinning", self.thinning, minimum=1)
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS} (got {self.sampler!r})")
        if not _finite_number(self.rmsprop_alpha) or not 0 <= self.rmsprop_alpha < 1:
            raise ValueError(f"rmsprop_alpha must be in [0, 1) (got {self.rmsprop_alpha!r})")
        _positive_float("rmsprop_eps", self.rmsprop_eps)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int (got {type(self.seed).__name__})")

    @property
    def num_steps(self) -> int:
        """SGLD steps per chain: burn-in plus draws times thinning."""
        return self.num_burnin + self.num_draws * self.thinning

    def draw_index(self, step: int) -> int:
        """The draw recorded at SGLD step ``step`` (its loss before that step's update), or -1."""
        k = step - self.num_burnin
        return k // self.thinning if k >= 0 and k % self.thinning == 0 else -1

    @property
    def kept_steps(self) -> range:
        """The SGLD steps whose losses are kept as draws."""
        return range(self.num_burnin, self.num_steps, self.thinning)

    def to_dict(self) -> dict:
        return asdict(self)


def _finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _positive_float(name: str, value) -> None:
    if not _finite_number(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0 (got {value!r})")


def _count(name: str, value, minimum: int, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        extra = f" {hint}" if hint else ""
        raise ValueError(f"{name} must be an int >= {minimum}{extra} (got {value!r})")
