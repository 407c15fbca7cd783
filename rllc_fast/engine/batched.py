"""The batched engine, generic path: every (component, chain) replica stepped together.

Replicas are packed as rows of one ``[R, n_max]`` float32 buffer (row ``r`` holds its
component's slices flattened in order; ``lengths[r]`` marks the used part). Each SGLD step:
  1. one minibatch for all replicas (the shared schedule; ``l(w*)`` on it is computed once, before);
  2. for each live replica: write its row into the model's slices, forward/backward with gradients
     for that component only, pack the gradient, put the slices back to ``w*`` (a loop: this path
     serves any ``nn.Module``);
  3. one ``sgld_step`` op updates every replica at once (fused CUDA kernel on GPU, tiled PyTorch
     on CPU); a diverged replica gets ``lengths[r] = 0`` and is never touched again.
On CPU each replica's noise comes from the same generator as in the reference engine, so with the
same seed both engines follow the same chains up to float rounding; on CUDA the op draws Philox
noise from ``[seed, step]``.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch
from torch import nn

from ..components import Component
from ..config import SGLDConfig
from ..ops import sgld_step
from ..result import ComponentLLC
from ..sgld import replica_generator, replica_seed
from .common import Progress, frozen_parameters


def run_batched(
    model: nn.Module,
    schedule,
    loss_fn: Callable,
    components: Dict[str, Component],
    config: SGLDConfig,
    init_losses: np.ndarray,
    progress: Progress,
) -> Dict[str, ComponentLLC]:
    params = dict(model.named_parameters())
    device = next(iter(params.values())).device
    replicas: List[Tuple[str, Component, int]] = [
        (name, comp, chain) for name, comp in components.items() for chain in range(config.num_chains)
    ]
    R = len(replicas)
    n_max = max(c.numel for _, c, _ in replicas)
    burnin, draws, steps = config.num_burnin, config.num_draws, config.num_steps
    touched = sorted({n for c in components.values() for n in c.param_names})
    losses = np.full((R, draws), np.nan)
    dists = np.full((R, draws), np.nan)
    diverged_at = np.full(R, -1)

    with frozen_parameters(model, touched) as originals:
        w_star = torch.zeros(R, n_max, device=device)
        for r, (_, comp, _) in enumerate(replicas):
            w_star[r, : comp.numel] = _pack(comp, originals)
        w = w_star.clone()
        grad = torch.zeros_like(w)
        lengths = torch.tensor([c.numel for _, c, _ in replicas], device=device)
        on_cpu = device.type == "cpu"
        noise = torch.zeros_like(w) if on_cpu else None
        gens = [replica_generator(config.seed, name, chain, device) for name, _, chain in replicas] if on_cpu else None
        rng_state = torch.tensor([replica_seed(config.seed, "batched", 0), 0], device=device)
        sq_dist = torch.zeros(R, device=device)
        for t in range(steps):
            batch = schedule[t]
            grad.zero_()
            sq_prev = sq_dist.tolist()
            for r, (_, comp, _) in enumerate(replicas):
                if diverged_at[r] >= 0:
                    continue
                _unpack(comp, params, w[r, : comp.numel])
                for n in comp.param_names:
                    params[n].requires_grad_(True)
                    params[n].grad = None
                loss = loss_fn(model, batch)
                value = float(loss.detach())
                if math.isfinite(value):
                    if loss.requires_grad:
                        loss.backward()
                    grad[r, : comp.numel] = _pack_grad(comp, params)
                    if t >= burnin:
                        losses[r, t - burnin] = value
                        dists[r, t - burnin] = math.sqrt(max(sq_prev[r], 0.0))
                else:
                    diverged_at[r] = t
                    lengths[r] = 0
                    progress.update(steps - t)
                for n in comp.param_names:
                    params[n].requires_grad_(False)
                    params[n].grad = None
                _restore(comp, params, originals)
            if on_cpu:
                for r, (_, comp, _) in enumerate(replicas):
                    torch.randn(comp.numel, generator=gens[r], out=noise[r, : comp.numel])
            else:
                rng_state[1] = t
            sq_dist = sgld_step(w, grad, w_star, lengths, step_size=config.step_size, nbeta=config.nbeta,
                                localization=config.localization, noise=noise, rng_state=None if on_cpu else rng_state)
            progress.update(int((diverged_at < 0).sum()))

    results: Dict[str, ComponentLLC] = {}
    for name, comp in components.items():
        rows = [r for r, (n, _, _) in enumerate(replicas) if n == name]
        results[name] = ComponentLLC(
            name=name, numel=comp.numel, nbeta=config.nbeta, loss_trace=losses[rows],
            init_loss_trace=init_losses[burnin:], distance_trace=dists[rows], diverged_at=diverged_at[rows],
        )
    return results


def _pack(comp: Component, tensors) -> torch.Tensor:
    return torch.cat([s.view(tensors[s.param]).reshape(-1).float() for s in comp.slices])


def _pack_grad(comp: Component, params) -> torch.Tensor:
    parts = []
    for s in comp.slices:
        p = params[s.param]
        g = s.view(p.grad) if p.grad is not None else torch.zeros_like(s.view(p))
        parts.append(g.reshape(-1).float())
    return torch.cat(parts)


@torch.no_grad()
def _unpack(comp: Component, params, row: torch.Tensor) -> None:
    offset = 0
    for s in comp.slices:
        v = s.view(params[s.param])
        k = v.numel()
        v.copy_(row[offset : offset + k].view_as(v))
        offset += k


@torch.no_grad()
def _restore(comp: Component, params, originals) -> None:
    for s in comp.slices:
        s.view(params[s.param]).copy_(s.view(originals[s.param]))
