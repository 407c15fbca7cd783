"""What every engine needs: parameter save/restore around sampling, and packing a component's slices
into one flat float32 row (progress reports: ``rllc_fast.progress``)."""
from __future__ import annotations

import contextlib
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



MATMUL_PRECISIONS = ("fp32", "tf32", "bf16")


@contextlib.contextmanager
def matmul_precision(precision: str, device) -> Iterator[None]:
    """Run the block's matrix products at ``precision``; every flag touched is restored on exit.

    - ``"fp32"``: full float32 products (on CUDA TF32 is switched off inside, whatever the user's global
      setting, so ``l(w*)`` and ``l(w_t)`` round alike);
    - ``"tf32"``: TF32 tensor-core products on CUDA (``torch.set_float32_matmul_precision("high")``
      inside); on other devices the same as ``"fp32"`` (CPUs have no TF32 products);
    - ``"bf16"``: ``torch.autocast(dtype=torch.bfloat16)`` on CPU and CUDA (products in bfloat16; norms,
      softmax and losses in float32); elsewhere (e.g. ``meta``) a no-op.
    The engine wraps both ``l(w*)`` and the sampling in the same context, so the paired difference
    ``l(w_t) - l(w*)`` is taken between losses of one precision.
    """
    if precision not in MATMUL_PRECISIONS:
        raise ValueError(f"matmul_precision must be one of {MATMUL_PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    with contextlib.ExitStack() as stack:
        if device.type == "cuda":
            before = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
            stack.callback(torch.set_float32_matmul_precision, before)
        if precision == "bf16" and device.type in ("cpu", "cuda"):
            stack.enter_context(torch.autocast(device_type=device.type, dtype=torch.bfloat16))
        yield


@torch.no_grad()
def unpack_row(comp, params, row: torch.Tensor) -> None:
    """Write ``row`` (packed like ``pack``) into the component's slices of ``params`` (the inverse of ``pack``)."""
    offset = 0
    for s in comp.slices:
        v = s.view(params[s.param])
        k = v.numel()
        v.copy_(row[offset : offset + k].view_as(v))
        offset += k


@torch.no_grad()
def restore_slices(comp, params, originals) -> None:
    """Put the component's slices of ``params`` back to their values in ``originals`` (``{name: tensor}``)."""
    for s in comp.slices:
        s.view(params[s.param]).copy_(s.view(originals[s.param]))
