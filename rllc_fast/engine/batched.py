"""The batched engine: every (component, chain) replica stepped together.

Replicas are packed as rows of one ``[R, n_max]`` float32 buffer (row ``r`` holds its
component's slices flattened in order; ``lengths[r]`` marks the used part). Each SGLD step:
  1. one minibatch for all replicas (the shared schedule; ``l(w*)`` on it is computed once, before);
  2. every live replica's loss and gradient, from one of two paths:
     - **structured** (TransformerLens models, head components, token or KL loss): the model at ``w*``
       runs once on the batch; replicas of layer ``l`` reuse everything below ``l`` and the other
       heads of ``l``, and compute their own head and the layers above in batched products over
       replicas, in chunks that fit ``max_memory``; gradients only for each replica's own row
       (``rllc_fast.models.tl_heads``);
     - **generic** (any ``nn.Module``, any component): a loop that writes the replica's row into the
       model, runs forward/backward with gradients for that component only, and puts ``w*`` back;
  3. one ``sgld_step`` op updates every replica at once (fused CUDA kernel on GPU, tiled PyTorch on
     CPU), RMSProp-preconditioned when asked; a diverged replica (NaN/Inf loss) gets
     ``lengths[r] = 0`` and is never touched again.
On CPU each replica's noise comes from the same generator as in the reference engine, so with the
same seed both engines follow the same chains up to float rounding; on CUDA the op draws Philox
noise from ``[seed, step]``.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..components import Component
from ..config import SGLDConfig
from ..memory import default_budget, parse_bytes
from ..models import tl_heads
from ..ops import sgld_step
from ..result import ComponentLLC
from ..sgld import replica_generator, replica_seed
from ..progress import Progress
from .common import frozen_parameters, pack, pack_grad

Replica = Tuple[str, Component, int]


def plan(model: nn.Module, components: Dict[str, Component], loss_fn: Callable, structured: bool = True
         ) -> Tuple[Dict[str, Tuple[int, int]], List[str], Optional[str]]:
    """Which components take the structured path: ``({name: (layer, head)}, [generic names], reason)``.

    ``reason`` says why nothing is structured (None when some component is, or none could be).
    """
    if not structured:
        return {}, list(components), "the generic path was asked for"
    reason = tl_heads.unsupported_reason(model)
    if reason is None and not (hasattr(loss_fn, "prepare") and hasattr(loss_fn, "feature_losses")):
        reason = "the loss is a custom loss_fn (the structured path needs the token or KL loss)"
    if reason is not None:
        return {}, list(components), reason
    heads, rest = {}, []
    for name, comp in components.items():
        lh = tl_heads.head_of(model, comp)
        if lh is None:
            rest.append(name)
        else:
            heads[name] = lh
    return heads, rest, None if heads else "no component is a single attention head"


def run_batched(
    model: nn.Module,
    schedule,
    loss_fn: Callable,
    components: Dict[str, Component],
    config: SGLDConfig,
    init_losses: np.ndarray,
    progress: Progress,
    max_memory=None,
    structured: bool = True,
) -> Dict[str, ComponentLLC]:
    params = dict(model.named_parameters())
    device = next(iter(params.values())).device
    replicas: List[Replica] = [
        (name, comp, chain) for name, comp in components.items() for chain in range(config.num_chains)
    ]
    R = len(replicas)
    n_max = max(c.numel for _, c, _ in replicas)
    draws, steps = config.num_draws, config.num_steps
    touched = sorted({n for c in components.values() for n in c.param_names})
    losses = np.full((R, draws), np.nan)
    dists = np.full((R, draws), np.nan)
    diverged_at = np.full(R, -1)
    budget = default_budget(device) if max_memory is None else parse_bytes(max_memory)
    head_of, _, _ = plan(model, components, loss_fn, structured)

    with frozen_parameters(model, touched) as originals:
        w_star = torch.zeros(R, n_max, device=device)
        for r, (_, comp, _) in enumerate(replicas):
            w_star[r, : comp.numel] = pack(comp, originals)
        w = w_star.clone()
        grad = torch.zeros_like(w)
        lengths = torch.tensor([c.numel for _, c, _ in replicas], device=device)
        sources = []
        if head_of:
            idx = [r for r, (n, _, _) in enumerate(replicas) if n in head_of]
            sources.append(_HeadReplicaGrads(model, loss_fn, idx, [head_of[replicas[r][0]] for r in idx],
                                             schedule, budget))
        generic = [r for r, (n, _, _) in enumerate(replicas) if n not in head_of]
        if generic:
            sources.append(_GenericGrads(model, params, originals, loss_fn, replicas, generic))
        updater = _Updater(replicas, w, w_star, grad, lengths, config, device)
        sq_dist = torch.zeros(R, device=device)
        for t in range(steps):
            batch = schedule[t]
            grad.zero_()
            values = np.full(R, np.nan)
            live = diverged_at < 0
            for source in sources:
                source(batch, w, grad, live, values)
            d = config.draw_index(t)
            sq_prev = sq_dist.tolist()
            for r in np.flatnonzero(live):
                if not math.isfinite(values[r]):
                    diverged_at[r] = t
                    lengths[r] = 0
                    progress.update(steps - t)
                elif d >= 0:
                    losses[r, d] = values[r]
                    dists[r, d] = math.sqrt(max(sq_prev[r], 0.0))
            sq_dist = updater.step(t)
            progress.update(int((diverged_at < 0).sum()))

    kept = list(config.kept_steps)
    results: Dict[str, ComponentLLC] = {}
    for name, comp in components.items():
        rows = [r for r, (n, _, _) in enumerate(replicas) if n == name]
        results[name] = ComponentLLC(
            name=name, numel=comp.numel, nbeta=config.nbeta, loss_trace=losses[rows],
            init_loss_trace=init_losses[kept], distance_trace=dists[rows], diverged_at=diverged_at[rows],
        )
    return results


class _Updater:
    """The update of all replicas: one fused ``sgld_step`` op (RMSProp state passed to it when asked)."""

    def __init__(self, replicas, w, w_star, grad, lengths, config: SGLDConfig, device):
        self.replicas, self.w, self.w_star, self.grad, self.lengths = replicas, w, w_star, grad, lengths
        self.config = config
        self.on_cpu = device.type == "cpu"
        self.noise = torch.zeros_like(w) if self.on_cpu else None
        if self.on_cpu:
            self.gens = [replica_generator(config.seed, name, chain, device) for name, _, chain in replicas]
        self.rng_state = torch.tensor([replica_seed(config.seed, "batched", 0), 0], device=device)
        self.square_avg = torch.zeros_like(w) if config.sampler == "rmsprop" else None

    @torch.no_grad()
    def step(self, t: int) -> torch.Tensor:
        """Update every live replica in place; return ``||w_r - w*_r||^2`` per replica ``[R]``."""
        cfg = self.config
        if self.on_cpu:  # the reference engine's per-replica streams
            for r, (_, comp, _) in enumerate(self.replicas):
                torch.randn(comp.numel, generator=self.gens[r], out=self.noise[r, : comp.numel])
        self.rng_state[1] = t
        return sgld_step(self.w, self.grad, self.w_star, self.lengths, step_size=cfg.step_size,
                         nbeta=cfg.nbeta, localization=cfg.localization,
                         noise=self.noise if self.on_cpu else None,
                         rng_state=None if self.on_cpu else self.rng_state,
                         square_avg=self.square_avg, rmsprop_alpha=cfg.rmsprop_alpha, rmsprop_eps=cfg.rmsprop_eps)


class _GenericGrads:
    """Loss and gradient of each replica by a loop over replicas (any model, any component)."""

    def __init__(self, model, params, originals, loss_fn, replicas: List[Replica], indices: List[int]):
        self.model, self.params, self.originals, self.loss_fn = model, params, originals, loss_fn
        self.replicas, self.indices = replicas, indices

    def __call__(self, batch, w, grad, live, values) -> None:
        params = self.params
        for r in self.indices:
            if not live[r]:
                continue
            comp = self.replicas[r][1]
            _unpack(comp, params, w[r, : comp.numel])
            for n in comp.param_names:
                params[n].requires_grad_(True)
                params[n].grad = None
            loss = self.loss_fn(self.model, batch)
            value = float(loss.detach())
            values[r] = value
            if math.isfinite(value):
                if loss.requires_grad:
                    loss.backward()
                grad[r, : comp.numel] = pack_grad(comp, params)
            for n in comp.param_names:
                params[n].requires_grad_(False)
                params[n].grad = None
            _restore(comp, params, self.originals)


CPU_CHUNK_BYTES = 256 * 2**20
"""On a CPU, replica chunks are also capped at this working set: measured on the paper's model
(2 cores), chunks of about 256 MiB ran 2x faster per replica than 1 GiB ones (cache misses in the
upper layers' attention), and no slower than single replicas."""


class _HeadReplicaGrads:
    """Loss and gradient of head replicas from one shared ``w*`` pass per batch (structured path).

    Replicas are grouped by layer and processed in chunks of at most ``budget`` bytes of activations
    (and at most ``CPU_CHUNK_BYTES`` on a CPU).
    """

    def __init__(self, model, loss_fn, indices: List[int], layer_heads: List[Tuple[int, int]], schedule, budget: int):
        self.hr = tl_heads.HeadReplicas(model)
        self.loss_fn = loss_fn
        first = schedule[0]
        N, T = first.shape
        self.by_layer: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.chunk: Dict[int, int] = {}
        device = next(model.parameters()).device
        for layer in sorted({l for l, _ in layer_heads}):
            rows = [(r, h) for r, (l, h) in zip(indices, layer_heads) if l == layer]
            self.by_layer[layer] = (
                torch.tensor([r for r, _ in rows], device=device),
                torch.tensor([h for _, h in rows], device=device),
            )
            limit = budget if device.type != "cpu" else min(budget, CPU_CHUNK_BYTES)
            self.chunk[layer] = max(1, limit // self.hr.bytes_per_replica(N, T, layer))

    def __call__(self, batch, w, grad, live, values) -> None:
        live_t = torch.as_tensor(live, device=w.device)
        todo = {}
        for layer, (rows, heads) in self.by_layer.items():
            keep = live_t[rows]
            if bool(keep.any()):
                todo[layer] = (rows[keep], heads[keep])
        if not todo:
            return
        shared = self.hr.shared(batch, list(todo))
        prepared = self.loss_fn.prepare(batch)
        n = self.hr.numel
        unembed = self.hr.model.unembed
        for layer, (rows, heads) in todo.items():
            size = self.chunk[layer]
            for start in range(0, len(rows), size):
                idx, hs = rows[start : start + size], heads[start : start + size]
                leaf = w[idx, :n].detach().clone().requires_grad_(True)
                with torch.enable_grad():
                    x = self.hr.replica_features(shared, layer, hs, leaf)
                    losses = self.loss_fn.feature_losses(x, unembed.W_U, unembed.b_U, batch, prepared)
                    del x
                    losses.sum().backward()
                grad[idx, :n] = leaf.grad
                values[idx.cpu().numpy()] = losses.detach().double().cpu().numpy()


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
