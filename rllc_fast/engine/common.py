"""What every engine needs: parameter save/restore around sampling, packing a component's slices
into one flat float32 row, and progress reporting."""
from __future__ import annotations

import contextlib
import sys
from typing import Dict, Iterator, List

import torch
from torch import nn


@contextlib.contextmanager
def frozen_parameters(model: nn.Module, touched: List[str]) -> Iterator[Dict[str, torch.Tensor]]:
    """Turn gradients off for every parameter and yield ``{name: copy of w*}`` for ``touched``.

    On exit (also after an error) the touched parameters get their ``w*`` values back bit for bit,
    and every parameter its ``requires_grad`` flag and ``grad``.
    """
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    grads = {n: p.grad for n, p in params.items()}
    originals = {n: params[n].detach().clone() for n in touched}
    try:
        for p in params.values():
            p.requires_grad_(False)
        yield originals
    finally:
        with torch.no_grad():
            for n, value in originals.items():
                params[n].copy_(value)
        for n, p in params.items():
            p.requires_grad_(flags[n])
            p.grad = grads[n]


def pack(comp, tensors) -> torch.Tensor:
    """The component's slices of ``tensors`` (``{param name: tensor}``) flattened in order, float32 ``[numel]``."""
    return torch.cat([s.view(tensors[s.param]).reshape(-1).float() for s in comp.slices])


def grad_view(s, params) -> torch.Tensor:
    """Slice ``s`` of its parameter's ``.grad`` (zeros when the parameter has no gradient)."""
    p = params[s.param]
    return s.view(p.grad) if p.grad is not None else torch.zeros_like(s.view(p))


def pack_grad(comp, params) -> torch.Tensor:
    """The component's gradient flattened like ``pack``, float32 ``[numel]``."""
    return torch.cat([grad_view(s, params).reshape(-1).float() for s in comp.slices])


class Progress:
    """A tqdm bar (SGLD steps by default) when enabled (writes to stderr), otherwise silent."""

    def __init__(self, total: int, enabled: bool, desc: str = "SGLD steps", unit: str = "step"):
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    @property
    def enabled(self) -> bool:
        return self._bar is not None

    def update_to(self, n: int) -> None:
        """Show ``n`` done (never moves backwards)."""
        if self._bar is not None and n > self._bar.n:
            self._bar.update(n - self._bar.n)

    def set_description(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_description(text)

    def set_postfix(self, **values) -> None:
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
