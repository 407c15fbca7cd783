"""A reference model as the data distribution of a data-refined LLC (paper, appendix F.3)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..losses import KLToReference


@dataclass
class ModelDistribution:
    """Data for ``estimate_llc`` whose loss is eq. (11): ``KL(M(S_<=k) || f_w(S_<=k))``.

    reference_model: the model ``M`` whose next-token distribution stands in for the data
        (run under ``no_grad``; it is never changed).
    contexts: the contexts ``S`` the distributions are compared on, in any form ``estimate_llc``
        accepts as data (a token tensor ``[N, T]``, a Dataset, a DataLoader, ...).
    """

    reference_model: nn.Module
    contexts: Any

    def __post_init__(self) -> None:
        if not isinstance(self.reference_model, nn.Module):
            raise TypeError(
                f"reference_model must be an nn.Module, got {type(self.reference_model).__name__}"
            )

    def loss_fn(self):
        """The eq. (11) loss as ``loss_fn(model, tokens)``."""
        return KLToReference(self.reference_model)
