"""The batched engine: every (component, chain) replica stepped together.

Replicas are packed as rows of one ``[R, n_max]`` float32 buffer (row ``r`` holds its
component's slices flattened in order; ``lengths[r]`` marks the used part). Each SGLD step:
  1. one minibatch for all replicas (the shared schedule; ``l(w*)`` on it is computed once, before);
  2. every live replica's loss and gradient, from one of two paths:
     - **structured** (TransformerLens models, head components, and query heads and key/value groups
       under grouped-query attention; token or KL loss): the model at ``w*`` runs once on the batch;
       replicas of layer ``l`` reuse everything below ``l`` and the other heads of ``l``, and compute
       their own heads and the layers above in batched products over replicas, in chunks that fit
       ``max_memory``; gradients only for each replica's own row (``rllc_fast.engine.structured``, ``rllc_fast.engine.head_replicas``);
     - **generic** (any ``nn.Module``, any component): a loop that writes the replica's row into the
       model, runs forward/backward with gradients for that component only, and puts ``w*`` back;
  3. one ``sgld_step`` op updates every replica at once (fused CUDA kernel on GPU, tiled PyTorch on
     CPU), RMSProp-preconditioned when asked; a diverged replica (NaN/Inf loss) gets
     ``lengths[r] = 0`` and is never touched again.
A steady-state step makes no host sync: losses, distances and divergence flags stay in device
tensors, read by the host every ``SYNC_EVERY`` steps and at the end; the next batch is copied while
this step runs; the CUDA noise counter is advanced on the device.
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
from ..observables import ProbeRecorder
from ..ops import sgld_step
from ..result import ComponentLLC
from ..sgld import replica_generator, replica_seed
from ..progress import Progress
from .probes import GenericProbeLosses, HeadProbeLosses
from .common import frozen_parameters, pack, pack_grad, restore_slices, unpack_row
from .graph import CudaGraphUnsupported, StepGraphs
from .structured import HeadReplicaGrads, memory_plan, plan

Replica = Tuple[str, Component, int]


SYNC_EVERY = 16
"""SGLD steps between the engine's host reads (progress and the divergence flags the generic path
uses to skip replicas): losses, distances and divergence stay on the device in between."""


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
    observer: Optional[ProbeRecorder] = None,
    cuda_graph: bool = False,
) -> Dict[str, ComponentLLC]:
    """Sample every replica together; ``observer`` (optional) records probe-set losses at its observed draws;
    ``cuda_graph``: replay the step as CUDA graphs (``rllc_fast.engine.graph``; checked by the caller with
    ``cuda_graph_problem``)."""
    params = dict(model.named_parameters())
    device = next(iter(params.values())).device
    replicas: List[Replica] = [
        (name, comp, chain) for name, comp in components.items() for chain in range(config.num_chains)
    ]
    R = len(replicas)
    n_max = max(c.numel for _, c, _ in replicas)
    draws, steps = config.num_draws, config.num_steps
    touched = sorted({n for c in components.values() for n in c.param_names})
    budget, block_bytes = memory_plan(device, max_memory)
    head_of, _, _ = plan(model, components, loss_fn, structured)

    with frozen_parameters(model, touched) as originals:
        w_star = torch.zeros(R, n_max, device=device)
        for r, (_, comp, _) in enumerate(replicas):
            w_star[r, : comp.numel] = pack(comp, originals)
        w = w_star.clone()
        grad = torch.zeros_like(w)
        lengths = torch.tensor([c.numel for _, c, _ in replicas], device=device)
        sources, probes = [], []
        if head_of:
            idx = [r for r, (n, _, _) in enumerate(replicas) if n in head_of]
            units = [head_of[replicas[r][0]] for r in idx]
            heads = HeadReplicaGrads(model, loss_fn, idx, units, schedule, budget, block_bytes)
            sources.append(heads)
            if observer is not None:
                probes.append(HeadProbeLosses(heads.hr, observer, idx, units, heads.limit, block_bytes))
        generic = [r for r, (n, _, _) in enumerate(replicas) if n not in head_of]
        if generic:
            sources.append(_GenericGrads(model, params, originals, loss_fn, replicas, generic))
            if observer is not None:
                probes.append(GenericProbeLosses(model, params, originals, observer, replicas, generic))
        updater = _Updater(replicas, w, w_star, grad, lengths, config, device)
        trace = _DeviceTrace(R, draws, steps, device, progress, [config.draw_index(t) for t in range(steps)])
        graphs = StepGraphs(cuda_graph, device=device)
        batch = schedule[0]
        static = batch  # the tokens every step's closure reads (a fixed buffer when graphs replay it)

        def gradients() -> None:  # every replica's loss and gradient at step trace.step, divergence flagged
            grad.zero_()
            trace.values.fill_(math.nan)
            for source in sources:
                source(static, w, grad, trace.host_live, trace.values)
            trace.record(lengths)

        def update() -> None:  # the SGLD update; ||w - w*||^2 before it into the fixed buffer trace.sq_dist
            trace.sq_dist.copy_(updater.step())
            trace.advance()

        for t in range(steps):
            upcoming = schedule[t + 1] if t + 1 < steps else None  # copied ahead (non-blocking on CUDA)
            static = _into_static(static, batch, t, strict=cuda_graph)
            graphs("gradients", gradients)
            slot = observer.index(config.draw_index(t)) if observer is not None else -1
            for probe in probes if slot >= 0 else ():
                probe(w, slot, trace.host_live)
            graphs("update", update)
            if (t + 1) % SYNC_EVERY == 0:
                trace.sync(t + 1)
                if observer is not None:
                    observer.flush()
            batch = upcoming
        losses, dists, diverged_at = trace.finish()

    kept = list(config.kept_steps)
    results: Dict[str, ComponentLLC] = {}
    for name, comp in components.items():
        rows = [r for r, (n, _, _) in enumerate(replicas) if n == name]
        results[name] = ComponentLLC(
            name=name, numel=comp.numel, nbeta=config.nbeta, loss_trace=losses[rows],
            init_loss_trace=init_losses[kept], distance_trace=dists[rows], diverged_at=diverged_at[rows],
        )
    return results


class _DeviceTrace:
    """Per-replica losses, distances and divergence kept on the device; read by the host every
    ``SYNC_EVERY`` steps (progress) and at the end.

    Divergence is found on the device: a live replica whose loss is not finite gets ``diverged_at = t``
    and ``lengths = 0`` (the update leaves it as it is from then on); nothing else is touched. The step
    counter ``step`` lives on the device too, and a step that keeps no draw writes to a spare column, so
    recording a step takes no Python argument (what a replayed CUDA graph needs).
    """

    def __init__(self, R: int, draws: int, steps: int, device, progress: Progress, draw_of_step: List[int]):
        self.R, self.draws, self.steps, self.progress = R, draws, steps, progress
        self.values = torch.full((R,), math.nan, dtype=torch.float64, device=device)  # this step's losses
        self.live = torch.ones(R, dtype=torch.bool, device=device)
        self.diverged_at = torch.full((R,), -1, dtype=torch.int64, device=device)
        self.losses = torch.full((R, draws + 1), math.nan, dtype=torch.float64, device=device)  # + spare column
        self.sq = torch.full((R, draws + 1), math.nan, dtype=torch.float32, device=device)
        self.sq_dist = torch.zeros(R, dtype=torch.float32, device=device)  # ||w - w*||^2 before this step
        self.step = torch.zeros(1, dtype=torch.int64, device=device)          # the current step t
        self.column = torch.tensor([d if d >= 0 else draws for d in draw_of_step] + [draws],
                                   dtype=torch.int64, device=device)        # [steps + 1]: step -> column
        self.host_live = np.ones(R, dtype=bool)   # as last read by the host (may lag the device)
        self.reported = 0

    def record(self, lengths: torch.Tensor) -> None:
        """Flag step ``self.step``'s divergences and keep the live replicas' losses and distances in its draw's
        column (the spare column when the step keeps no draw)."""
        bad = torch.isfinite(self.values).logical_not_().logical_and_(self.live)
        torch.where(bad, self.step, self.diverged_at, out=self.diverged_at)
        lengths.masked_fill_(bad, 0)
        self.live.logical_and_(bad.logical_not_())
        dead = self.live.logical_not()
        column = self.column.index_select(0, self.step)
        self.losses.index_copy_(1, column, self.values.masked_fill(dead, math.nan)[:, None])
        self.sq.index_copy_(1, column, self.sq_dist.masked_fill(dead, math.nan)[:, None])

    def advance(self) -> None:
        """The next step (on the device)."""
        self.step.add_(1)

    def sync(self, done: int) -> np.ndarray:
        """One host read after ``done`` steps: refresh ``host_live`` and the progress bar; return ``diverged_at``."""
        diverged_at = self.diverged_at.cpu().numpy()
        self.host_live = diverged_at < 0
        total = int(np.where(self.host_live, done, self.steps).sum())  # a diverged replica counts as finished
        self.progress.update(total - self.reported)
        self.reported = total
        return diverged_at

    def finish(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(losses [R, draws] float64, distances [R, draws], diverged_at [R])`` on the host."""
        diverged_at = self.sync(self.steps)
        losses = self.losses[:, : self.draws].cpu().numpy()
        sq = self.sq[:, : self.draws].cpu().numpy().astype(np.float64)
        return losses, np.sqrt(np.maximum(sq, 0.0)), diverged_at


class _Updater:
    """The update of all replicas: one fused ``sgld_step`` op (RMSProp state passed to it when asked).

    On CUDA the op draws Philox noise from ``rng_state = [seed, step]``; the step counter lives on the
    device and is advanced there after each update (no host write per step)."""

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
    def step(self) -> torch.Tensor:
        """Update every live replica in place (the next step); return ``||w_r - w*_r||^2`` per replica ``[R]``."""
        cfg = self.config
        if self.on_cpu:  # the reference engine's per-replica streams
            for r, (_, comp, _) in enumerate(self.replicas):
                torch.randn(comp.numel, generator=self.gens[r], out=self.noise[r, : comp.numel])
        sq_dist = sgld_step(self.w, self.grad, self.w_star, self.lengths, step_size=cfg.step_size,
                            nbeta=cfg.nbeta, localization=cfg.localization,
                            noise=self.noise if self.on_cpu else None,
                            rng_state=None if self.on_cpu else self.rng_state,
                            square_avg=self.square_avg, rmsprop_alpha=cfg.rmsprop_alpha, rmsprop_eps=cfg.rmsprop_eps)
        if not self.on_cpu:
            self.rng_state[1:].add_(1)  # the step counter, advanced on the device: offset t at step t
        return sq_dist


class _GenericGrads:
    """Loss and gradient of each replica by a loop over replicas (any model, any component).

    Replicas the host knows to have diverged are skipped; one that diverged since the last host read
    is still computed (its loss is ignored and its update masked out on the device)."""

    def __init__(self, model, params, originals, loss_fn, replicas: List[Replica], indices: List[int]):
        self.model, self.params, self.originals, self.loss_fn = model, params, originals, loss_fn
        self.replicas, self.indices = replicas, indices

    def __call__(self, batch, w, grad, live: np.ndarray, values: torch.Tensor) -> None:
        params = self.params
        for r in self.indices:
            if not live[r]:
                continue
            comp = self.replicas[r][1]
            unpack_row(comp, params, w[r, : comp.numel])
            for n in comp.param_names:
                params[n].requires_grad_(True)
                params[n].grad = None
            loss = self.loss_fn(self.model, batch)
            values[r] = loss.detach().reshape(())
            if loss.requires_grad:
                loss.backward()
            grad[r, : comp.numel] = pack_grad(comp, params)
            for n in comp.param_names:
                params[n].requires_grad_(False)
                params[n].grad = None
            restore_slices(comp, params, self.originals)


def _into_static(static, batch, t: int, strict: bool):
    """``batch`` copied into the fixed token buffer ``static`` that the step's closures read (made from the first
    batch), so a replayed graph reads each step's tokens where it captured them. A batch that is not a tensor of
    the first one's shape and type replaces the buffer, or (``strict``: CUDA graphs) is refused by name."""
    same = (isinstance(batch, torch.Tensor) and isinstance(static, torch.Tensor) and batch.shape == static.shape
            and batch.dtype == static.dtype and batch.device == static.device)
    if t > 0 and same:
        static.copy_(batch, non_blocking=True)
        return static
    if strict and not isinstance(batch, torch.Tensor):
        raise CudaGraphUnsupported(f"cuda_graph=True needs token-tensor batches, got {type(batch).__name__} at step {t}")
    if strict and t > 0:
        raise CudaGraphUnsupported(f"cuda_graph=True needs every minibatch to have one shape: step {t}'s is "
                         f"{tuple(batch.shape)} {batch.dtype}, the first was {tuple(static.shape)} {static.dtype}; "
                         "use a batch_size that divides the data, or leave cuda_graph off")
    return batch.clone() if isinstance(batch, torch.Tensor) else batch
