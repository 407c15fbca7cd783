"""The reference engine: one component, one chain, one step at a time.

Plain and obviously correct; the batched engine is tested against it. For every component and
chain it starts at ``w*``, runs ``config.num_steps`` SGLD steps on the component's slices only
(``rllc_fast.sgld.sgld_delta``, or ``rmsprop_sgld_delta``), records the loss of each kept step's
minibatch *before* that step's update, and puts the weights back to ``w*`` afterwards.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import numpy as np
import torch
from torch import nn

from ..components import Component
from ..config import SGLDConfig
from ..observables import ProbeRecorder
from ..result import ComponentLLC
from ..sgld import replica_generator, rmsprop_sgld_delta, sgld_delta
from ..progress import Progress
from .common import frozen_parameters, grad_view, pack, pack_grad


def run_reference(
    model: nn.Module,
    schedule,
    loss_fn: Callable,
    components: Dict[str, Component],
    config: SGLDConfig,
    init_losses: np.ndarray,
    progress: Progress,
    max_memory=None,
    observer: Optional[ProbeRecorder] = None,
    cuda_graph: bool = False,
) -> Dict[str, ComponentLLC]:
    """Sample every (component, chain) in turn; ``init_losses`` is l(w*) per step ``[num_steps]``;
    ``observer`` (optional) records probe-set losses at its observed draws (replica row
    ``component index * chains + chain``). The signature is every engine's; ``max_memory`` is unused here
    (one replica at a time), and ``cuda_graph`` must be False (``engine.graph.cuda_graph_problem``)."""
    if cuda_graph:
        raise ValueError("cuda_graph=True needs engine='batched', got the reference engine")
    params = dict(model.named_parameters())
    device = next(iter(params.values())).device
    draws, steps = config.num_draws, config.num_steps
    results: Dict[str, ComponentLLC] = {}
    touched = sorted({n for c in components.values() for n in c.param_names})
    with frozen_parameters(model, touched) as originals:
        for c, (name, comp) in enumerate(components.items()):
            for n in comp.param_names:
                params[n].requires_grad_(True)
            losses = np.full((config.num_chains, draws), np.nan)
            dists = np.full((config.num_chains, draws), np.nan)
            diverged_at = np.full(config.num_chains, -1)
            for chain in range(config.num_chains):
                gen = replica_generator(config.seed, name, chain, device)
                square_avg = torch.zeros(comp.numel, device=device) if config.sampler == "rmsprop" else None
                for t in range(steps):
                    for n in comp.param_names:
                        params[n].grad = None
                    loss = loss_fn(model, schedule[t])
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        diverged_at[chain] = t
                        progress.update(steps - t)
                        break
                    d = config.draw_index(t)
                    if d >= 0:
                        losses[chain, d] = value
                        dists[chain, d] = _distance(comp, params, originals)
                        slot = observer.index(d) if observer is not None else -1
                        for group in observer.groups if slot >= 0 else ():
                            for probe, values in observer.losses(model, group).items():
                                observer.put(probe, c * config.num_chains + chain, slot, values[None])
                    if loss.requires_grad:
                        loss.backward()
                    _sgld_update(comp, params, originals, gen, config, square_avg)
                    progress.update(1)
                with torch.no_grad():  # back to w* for the next chain
                    for n in comp.param_names:
                        params[n].copy_(originals[n])
            for n in comp.param_names:
                params[n].requires_grad_(False)
                params[n].grad = None
            results[name] = ComponentLLC(
                name=name,
                numel=comp.numel,
                nbeta=config.nbeta,
                loss_trace=losses,
                init_loss_trace=init_losses[list(config.kept_steps)],
                distance_trace=dists,
                diverged_at=diverged_at,
            )
    return results


@torch.no_grad()
def _sgld_update(comp: Component, params, originals, gen: torch.Generator, config: SGLDConfig,
                 square_avg) -> None:
    """One SGLD step on the component's slices, with one ``randn(numel)`` draw for the whole component."""
    noise = torch.randn(comp.numel, generator=gen, device=gen.device)
    if square_avg is not None:  # RMSProp: the preconditioner spans the whole component
        delta = rmsprop_sgld_delta(pack(comp, params), pack_grad(comp, params), pack(comp, originals), noise, square_avg, config.step_size, config.nbeta,
                                   config.localization, config.rmsprop_alpha, config.rmsprop_eps)
    offset = 0
    for s in comp.slices:
        v = s.view(params[s.param])
        k = v.numel()
        if square_avg is None:
            step = sgld_delta(
                v, grad_view(s, params), s.view(originals[s.param]), noise[offset : offset + k].view_as(v),
                config.step_size, config.nbeta, config.localization,
            )
        else:
            step = delta[offset : offset + k].view_as(v)
        v.add_(step.to(v.dtype))
        offset += k


@torch.no_grad()
def _distance(comp: Component, params, originals) -> float:
    total = 0.0
    for s in comp.slices:
        d = s.view(params[s.param]).float() - s.view(originals[s.param]).float()
        total += float((d * d).sum())
    return math.sqrt(total)
