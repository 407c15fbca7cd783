"""Hutchinson estimates of refined Hessian traces ``Tr(H_VV)`` and of the Fisher information trace.

``trace``: the Hessian of the mean loss over ``num_batches`` batches of the data, restricted to each
component's weights ``V`` (the paper's weight refinement; data refinement = other data). Each probe
``v`` gives ``v_V . (H v)_V``, whose mean over Rademacher probes is ``Tr(H_VV)``:

- ``probes="shared"``: one probe over all components' weights at once serves every component (one HVP
  per probe and batch, whatever the number of components; unbiased per block, but each block's
  variance includes its coupling to the other blocks);
- ``probes="per-component"``: each component gets probes on its own weights (one HVP per probe,
  component and batch, batched together like the SGLD engine's replicas; lower variance per block).

``hutchpp=True`` uses Hutch++ (Meyer et al. 2021) per component: a third of the HVPs find the top of the
spectrum, whose trace is then exact, and Hutchinson estimates the rest. The standard error is over the
probes (the data is fixed: the estimate converges to the exact trace of that data's Hessian).

``fim_trace``: the same estimator with next tokens (or classes) drawn from the model's own predictive
distribution on the given contexts (Appendix D.2): the expected Hessian of the loss on model-drawn labels
is the Fisher information. Labels are drawn anew for every batch, so the standard error is over batches.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.normalise import row_data
from ..progress import Progress
from ..losses import check_tokens
from .operator import BatchHessian, DataHessian, Support, only_grad_for
from .result import HessianResult, summarise
from .setup import KEEP_GRAPHS, STRIDE, prepare, prepare_rows, warn_unused

PROBE_KINDS = ("shared", "per-component")


def _jobs(names: Sequence[str], num_probes: int, probes: str, first: int = 0):
    """The probe jobs: (owner component or None for a shared probe, stream); streams ``first + p``."""
    if probes == "shared":
        return [(None, first + p) for p in range(num_probes)]
    return [(name, i * STRIDE + first + p) for i, name in enumerate(names) for p in range(num_probes)]


def _probe_rows(support: Support, jobs, seed: int) -> torch.Tensor:
    owners = [o for o, _ in jobs]
    streams = [s for _, s in jobs]
    if owners[0] is None:
        return support.shared_probes(seed, streams)
    return support.component_probes(owners, seed, streams)


def _quadratic_forms(support: Support, jobs, v: torch.Tensor, hv: torch.Tensor) -> torch.Tensor:
    """``[J, components]`` for shared probes; ``[J]`` (own component) for per-component probes."""
    if jobs[0][0] is None:
        return support.block_dots(v, hv)
    return support.component_dots(v, hv, [o for o, _ in jobs])


def _hutchinson(model, losses, batches, support, names, num_probes, probes, method, chunk, seed, bar,
                fresh_probes: bool = False):
    """Per batch (``losses[b]`` its loss_fn), ``{component: [num_probes]}`` of ``v_V.(H v)_V``. The same probes
    serve every batch (so their batch means are Hutchinson samples of the mean Hessian) unless ``fresh_probes``.
    The quadratic forms stay on the device until every batch is done; one copy brings them to the host."""
    on_device = []
    for b, batch in enumerate(batches):
        jobs = _jobs(names, num_probes, probes, first=b * num_probes if fresh_probes else 0)
        op = BatchHessian(model, losses[b], batch, support, method, chunk)
        forms = []
        for i in range(0, len(jobs), chunk):
            part = jobs[i:i + chunk]
            v = _probe_rows(support, part, seed)
            forms.append(_quadratic_forms(support, part, v, op.apply(v)).detach().double())
            bar.update(len(part))
        on_device.append(torch.cat(forms))
    per_batch = []
    for forms in torch.stack(on_device).cpu().numpy():  # [batches, P, C] (shared) or [batches, C * P]
        if probes == "shared":
            per_batch.append({n: forms[:, j] for j, n in enumerate(names)})
        else:  # component-major order
            per_batch.append({n: forms[j * num_probes:(j + 1) * num_probes] for j, n in enumerate(names)})
    return per_batch


def _check_common(num_probes, probes, hutchpp):
    if not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"num_probes must be an integer >= 1, got {num_probes!r}")
    if probes not in PROBE_KINDS:
        raise ValueError(f"probes must be one of {PROBE_KINDS}, got {probes!r}")
    if hutchpp and num_probes < 3:
        raise ValueError(f"Hutch++ splits num_probes in three (sketch, its products, residual probes); "
                         f"need num_probes >= 3, got {num_probes}")


def trace(model: nn.Module, data, components=None, num_probes: int = 50, num_batches: int = 100, batch_size: int = 8,
          loss_fn: Optional[Callable] = None, probes: str = "shared", hutchpp: bool = False, hvp: str = "auto",
          probe_chunk: Optional[int] = None, seed: int = 0, device=None, progress: bool = False) -> HessianResult:
    """Hutchinson estimates of ``Tr(H_VV)`` per component (see the module doc), with standard errors.

    model:       the model at ``w*`` (TransformerLens or any module ``loss_fn`` understands).
    data:        tokens ``[N, T]`` (default loss: next-token cross-entropy) or anything ``loss_fn`` takes,
                 as a tensor or tuple of tensors with rows on dim 0, or batches of them (a list, a DataLoader,
                 a Dataset: stacked into rows); ``num_batches * batch_size`` rows are used.
    components:  None (whole model), a Component, a list or a dict (e.g. ``heads(model)``).
    num_probes:  Rademacher probes (per component with ``probes="per-component"``); HVPs per batch =
                 num_probes (shared) or num_probes x components (per-component).
    hvp:         "auto", "double-backward" or "forward-over-reverse"; ``probe_chunk`` HVPs per batched call.
    Returns a ``HessianResult`` with metric ``"hessian-trace"``: value = trace (nats per weight^2).
    """
    _check_common(num_probes, probes, hutchpp)
    t0 = time.time()
    setup, loss_fn = prepare_rows(model, components, data, loss_fn, num_batches, batch_size, seed, hvp, probe_chunk,
                                  device)
    comps, support, batches, method, chunk, names = (setup.comps, setup.support, setup.batches, setup.method,
                                                     setup.chunk, setup.names)
    with only_grad_for(model, support.names):
        warn_unused(model, loss_fn, batches[0], support, comps)
        if hutchpp:
            samples = _hutchpp(model, loss_fn, batches, support, names, num_probes, method, chunk, seed, progress)
        else:
            total = len(batches) * num_probes * (1 if probes == "shared" else len(names))
            bar = Progress(total, progress, desc="Hessian trace", unit="HVP")
            per_batch = _hutchinson(model, [loss_fn] * len(batches), batches, support, names, num_probes, probes,
                                    method, chunk, seed, bar)
            bar.close()
            samples = {n: np.mean([pb[n] for pb in per_batch], axis=0) for n in names}
    estimates = {n: summarise(n, support.sizes[n], samples[n]) for n in names}
    config = dict(num_probes=num_probes, num_batches=num_batches, batch_size=batch_size, probes=probes,
                  hutchpp=hutchpp, hvp=method, probe_chunk=chunk, seed=seed, loss=repr(loss_fn))
    return HessianResult("hessian-trace", estimates, config, time.time() - t0)


def _hutchpp(model, loss_fn, batches, support, names, num_probes, method, chunk, seed,
             progress) -> Dict[str, np.ndarray]:
    """Hutch++ per component: ``{component: samples}`` whose mean is the estimate (exact top-k part plus
    the residual Hutchinson samples), k = num_probes // 3."""
    k = num_probes // 3
    bar = Progress(3 * k * len(names) * len(batches), progress, desc="Hessian trace (Hutch++)", unit="HVP")
    hessian = DataHessian(model, loss_fn, batches, support, method, chunk, keep_graphs=len(batches) <= KEEP_GRAPHS,
                          on_hvp=bar.update)
    owners = [n for n in names for _ in range(k)]
    sketch = support.component_probes(owners, seed, [i * STRIDE + p for i in range(len(names)) for p in range(k)])
    residual = support.component_probes(owners, seed, [i * STRIDE + k + p for i in range(len(names))
                                                        for p in range(k)])
    a_sketch = hessian.matvec(sketch, owners)
    bases = []
    for j, name in enumerate(names):  # orthonormal basis of each component's sketch, in its own coordinates
        idx = support.index[name]
        q, _ = torch.linalg.qr(a_sketch[j * k:(j + 1) * k][:, idx].double().T)
        basis = torch.zeros(k, support.numel, dtype=torch.float64, device=sketch.device)
        basis[:q.shape[1], idx] = q.T  # a component with fewer than k weights: its whole space
        bases.append(basis)
    basis = torch.cat(bases)  # [C*k, numel]
    projected = residual.double().clone()
    for j in range(len(names)):
        rows = slice(j * k, (j + 1) * k)
        projected[rows] -= (projected[rows] @ basis[rows].T) @ basis[rows]
    a_basis = hessian.matvec(basis.float(), owners)
    a_proj = hessian.matvec(projected.float(), owners)
    bar.close()
    samples = []
    for j in range(len(names)):
        rows = slice(j * k, (j + 1) * k)
        top = (basis[rows] * a_basis[rows].double()).sum()
        proj = projected[rows]
        # the residual's A-products projected again: (I - QQ^T) A (I - QQ^T) g
        a_p = a_proj[rows].double()
        a_p = a_p - (a_p @ basis[rows].T) @ basis[rows]
        samples.append(top + (proj * a_p).sum(1))
    on_host = torch.stack(samples).cpu().numpy()  # [C, k]: one copy to the host
    return {name: on_host[j] for j, name in enumerate(names)}


def _logits(model: nn.Module, x) -> torch.Tensor:
    out = model(x)
    logits = getattr(out, "logits", out)
    if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point or logits.dim() < 2:
        raise ValueError("fim_trace: the model must return logits [..., classes] (a float tensor) on the data")
    return logits


def sampled_label_loss(labels: torch.Tensor) -> Callable:
    """``loss_fn(model, x)``: mean cross-entropy of the model's logits on ``x`` against ``labels``."""

    def loss(model, x):
        logits = _logits(model, x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))

    return loss


def draw_labels(model: nn.Module, x, generator: torch.Generator) -> torch.Tensor:
    """Labels drawn from the model's own predictive distribution at every position of ``x``, on the model's
    device: one uniform per position from ``generator`` (a CPU generator, so a seed gives the same labels on
    every device) is copied over and inverted through the cumulative distribution (float64) there; the
    ``[positions, classes]`` probabilities never leave the device."""
    with torch.no_grad():
        logits = _logits(model, x).float()
        flat = logits.reshape(-1, logits.shape[-1])
        cdf = torch.softmax(flat.double(), dim=-1).cumsum_(dim=-1)
        u = torch.rand(flat.shape[0], 1, generator=generator, dtype=torch.float64).to(flat.device)
        labels = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=flat.shape[-1] - 1)
    return labels.view(logits.shape[:-1])


def fim_trace(model: nn.Module, contexts, components=None, num_probes: int = 5, num_batches: int = 30,
              batch_size: int = 8, probes: str = "shared", hvp: str = "auto", probe_chunk: Optional[int] = None,
              seed: int = 0, device=None, progress: bool = False) -> HessianResult:
    """Hutchinson estimates of the Fisher information trace per component (Appendix D.2).

    contexts: model inputs (tokens ``[N, T]`` for a language model: every position's next token is drawn
              from the model; or inputs of a classifier whose output is logits ``[N, classes]``), or
              batches of them (as for ``trace``).
    Defaults are the paper's (30 batches, 5 probes). Per batch, labels are drawn once and ``num_probes``
    probes of its own are averaged; the estimate is the mean over batches, its standard error over batches (needs
    ``num_batches >= 2``). Returns metric ``"fim-trace"``.
    """
    _check_common(num_probes, probes, False)
    t0 = time.time()
    contexts = row_data(contexts)
    if isinstance(contexts, torch.Tensor) and not contexts.dtype.is_floating_point:
        check_tokens(contexts, model, what="contexts")
    setup = prepare(model, components, contexts, num_batches, batch_size, seed, hvp, probe_chunk, device)
    comps, support, batches, method, chunk, names = (setup.comps, setup.support, setup.batches, setup.method,
                                                     setup.chunk, setup.names)
    generator = torch.Generator().manual_seed(seed + 1)
    losses = [sampled_label_loss(draw_labels(model, b, generator)) for b in batches]
    total = len(batches) * num_probes * (1 if probes == "shared" else len(names))
    bar = Progress(total, progress, desc="FIM trace", unit="HVP")
    with only_grad_for(model, support.names):
        warn_unused(model, losses[0], batches[0], support, comps)
        per_batch = _hutchinson(model, losses, batches, support, names,
                                num_probes, probes, method, chunk, seed, bar, fresh_probes=True)
    bar.close()
    samples = {n: np.array([pb[n].mean() for pb in per_batch]) for n in names}
    estimates = {n: summarise(n, support.sizes[n], samples[n]) for n in names}
    config = dict(num_probes=num_probes, num_batches=num_batches, batch_size=batch_size, probes=probes, hvp=method,
                  probe_chunk=chunk, seed=seed)
    return HessianResult("fim-trace", estimates, config, time.time() - t0)
