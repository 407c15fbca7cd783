"""What every Hessian metric (``trace``, ``fim_trace``, ``approx_rank``) prepares before its HVPs: the data as
rows, its batches, the components and their support on the device, the HVP method; and the probe-stream
layout and graph-keeping limit they share."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import List

import torch

from ..components import as_component_dict
from ..data.normalise import normalise_data, row_data
from ..models.build import move_to
from .operator import Support, default_loss, resolve_method, unused_parameters

#: Stream offset between components' probes (per-component probes of component i use streams i*STRIDE + p).
STRIDE = 1 << 24
#: Keep every batch's gradient graph in memory (instead of rebuilding it per matvec) up to this many batches.
KEEP_GRAPHS = 8


def data_batches(data, num_batches: int, batch_size: int, seed: int, device) -> List:
    """``num_batches`` disjoint batches of ``batch_size`` rows of ``data`` (anything ``normalise_data`` accepts;
    batches and datasets are stacked into rows first), drawn without replacement under ``seed``."""
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows = normalise_data(data).as_rows()
    n = rows.num_rows
    need = num_batches * batch_size
    if need > n:
        raise ValueError(f"data has {n} rows but num_batches x batch_size = {num_batches} x {batch_size} = {need}; "
                         "give more data or lower num_batches / batch_size")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:need]
    return [rows.take(order[i * batch_size:(i + 1) * batch_size], device) for i in range(num_batches)]


@dataclass
class Setup:
    """What every Hessian metric prepares: components, their support, device, data batches, HVP method."""

    comps: dict
    support: Support
    device: torch.device
    batches: list
    method: str
    chunk: int

    @property
    def names(self) -> List[str]:
        return self.support.component_names


def prepare(model, components, data, num_batches, batch_size, seed, hvp, probe_chunk, device) -> Setup:
    """Components and support on ``device`` (default: the model's), ``num_batches`` batches, HVP method/chunk."""
    if device is not None:
        move_to(model, device)  # quietly, and not at all when already there ("cuda" for a model on cuda:0)
    device = next(model.parameters()).device
    comps = as_component_dict(model, components)
    support = Support(model, comps, device)
    batches = data_batches(data, num_batches, batch_size, seed, device)
    method, chunk = resolve_method(hvp, device, probe_chunk, support.numel)
    return Setup(comps, support, device, batches, method, chunk)


def prepare_rows(model, components, data, loss_fn, num_batches, batch_size, seed, hvp, probe_chunk, device):
    """``(prepare(...), loss_fn)`` for a metric's ``data`` argument, taken as rows (``row_data``: batches are
    stacked), and its ``loss_fn`` (None: next-token cross-entropy, ``default_loss``)."""
    data = row_data(data)
    loss_fn = default_loss(data, model, loss_fn)
    return prepare(model, components, data, num_batches, batch_size, seed, hvp, probe_chunk, device), loss_fn


def warn_unused(model, loss_fn, batch, support, comps) -> List[str]:
    """Components none of whose parameters the loss depends on (their trace is 0): warned, returned."""
    unused = set(unused_parameters(model, loss_fn, batch, support))
    dead = [name for name, c in comps.items() if set(c.param_names) <= unused]
    for name in dead:
        warnings.warn(f"component {name!r}: the loss does not depend on its parameters "
                      f"({', '.join(comps[name].param_names)}); its Hessian block is 0", stacklevel=3)
    return dead
