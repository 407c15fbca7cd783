"""The (refined) local learning coefficient estimator.

    lambda_hat(w*; V, q') = nbeta * ( mean_t l'(w_t) - mean_t l'(w*) )

``w_t`` are SGLD samples that move only the component's weights ``V`` (paper eq. 6), and ``l'``
is the loss on the chosen data ``q'``. **How l(w*) is measured**: the minibatch sequence of the
SGLD steps is fixed once per call (seeded by ``config.seed``) and shared by every chain and
component; ``l(w*)`` is evaluated on each kept step's minibatch, so each draw's ``l(w_t)`` is
paired with ``l(w*)`` on the same data (a lower-variance difference), and ``mean_t l(w*)`` is the
mean over the kept draws' minibatches (with the batched engine, when every component takes the
structured path, by that path's own blocks and unembedding: ``engine.structured.optimum_loss_fn``). Step
t's loss is taken *before* step t's update, so the first draw without burn-in is at ``w*`` itself (as in
devinterp).
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from .components import as_component_dict, whole_model_component
from .config import SGLDConfig
from .data import BatchSchedule, ModelDistribution, batch_to
from .diagnostics import SamplerWarning, refined_exceeding_whole, step_size_problems, warn_unreliable
from .engine.batched import run_batched
from .engine.graph import CudaGraphUnsupported, cuda_graph_problem
from .engine.structured import optimum_loss_fn, plan
from .engine.common import MATMUL_PRECISIONS
from .engine.common import matmul_precision as matmul_precision_context
from .engine.reference import run_reference
from .losses import check_tokens, next_token_loss
from .memory import parse_bytes
from .observables import ProbeRecorder, check_probes, per_token_fn
from .models.build import move_to
from .progress import Progress
from .result import ChainsDivergedError, LLCResult, check_divergence

#: Every engine: ``engine(model, schedule, loss_fn, components, config, init_losses, progress, max_memory=None,
#: observer=None) -> {name: ComponentLLC}``.
ENGINES = {"batched": run_batched, "generic": functools.partial(run_batched, structured=False),
           "reference": run_reference}


def estimate_llc(
    model: nn.Module,
    data,
    config: Optional[SGLDConfig] = None,
    components=None,
    loss_fn: Optional[Callable] = None,
    device=None,
    engine: str = "batched",
    progress: bool = False,
    max_memory=None,
    matmul_precision: str = "fp32",
    observables=None,
    observe_every: int = 1,
    observables_dir=None,
    observables_dtype: str = "float32",
    cuda_graph: bool = False,
) -> LLCResult:
    """Estimate the (weight- and/or data-refined) LLC of ``model`` at its current weights ``w*``.

    model:      any ``nn.Module``; its weights are the point ``w*`` and are left unchanged.
    data:       token tensor ``[N, T]`` (next-token cross-entropy, eq. 1), a tuple of tensors,
                a Dataset, a DataLoader or a re-iterable of batches (give ``loss_fn`` for non-token
                data), or a ``ModelDistribution`` (KL to a reference model, eq. 11). Passing other
                data than the training data gives a data-refined LLC.
    config:     ``SGLDConfig``; the paper's settings when None.
    components: None for the whole model (the plain LLC); a ``Component``, a list of them or a
                dict ``{name: Component}`` for one weight-refined estimate each.
    loss_fn:    ``loss_fn(model, batch) -> scalar tensor`` (mean loss over the batch, nats).
    device:     where to sample; the model is moved there (default: where the model is).
    engine:     "batched" (default: all component x chain replicas stepped together, one fused SGLD
                op per step; head components of TransformerLens models take the structured path that
                shares the layers below each head, everything else a loop over replicas),
                "generic" (batched, but the loop path for every component) or "reference" (plain
                loops: one component and chain at a time; what the others are tested against).
    progress:   show a progress bar on stderr.
    max_memory: activation memory the structured path may hold at once (bytes, or a string such as
                "8GB"); replicas are processed in chunks that fit. Default: 60% of free GPU memory,
                or min(4 GiB, 30% of available RAM) on a CPU.
    matmul_precision: "fp32" (default), "tf32" (TF32 products on CUDA; the same as "fp32" elsewhere) or
                "bf16" (bfloat16 autocast on CPU and CUDA), for l(w*) and l(w_t) alike
                (``rllc_fast.engine.common.matmul_precision``); no global flag is left changed.
    observables: probe sets ``{name: tokens [N, T]}`` (or ``(name, tokens)`` pairs; with a custom ``loss_fn``,
                batches its ``per_token(model, batch) -> [N, P]`` method scores): at every ``observe_every``-th
                kept draw, every replica's per-token loss on each set, forward only, at the draw's weights
                (``rllc_fast.observables``). Returned as ``result.observations`` (``Observations``:
                ``[component, chain, draw, context, position]`` per set), the input of
                ``rllc_fast.susceptibilities`` and ``rllc_fast.bayesian_influence``.
    observables_dir: folder for the observed losses as memory-mapped files (needed above 1 GiB of them);
                ``Observations.load(folder)`` reopens it. observables_dtype: "float32" or "float16" on disk.
    cuda_graph: replay each SGLD step as CUDA graphs after a few eager steps (``rllc_fast.engine.graph``):
                one launch per step instead of one per operation. Opt-in; CUDA, the batched engine, every
                component on the structured path, fp32 or tf32, minibatches of one shape. If capture fails
                the run warns and goes on eagerly.

    Warnings (``SamplerWarning``, a ``RuntimeWarning``; see ``rllc_fast.diagnostics`` and
    docs/diagnostics.md), each with the fix: before sampling, a step size that is unstable or biases the
    LLC for this localization; after it, components whose R-hat, ESS or ``||w - w*||`` trend say the
    estimate is unreliable, and refined LLCs above the whole model's when one component is the whole model.
    Diverged chains are handled as before (``RuntimeWarning``, or ``ChainsDivergedError`` if all diverged).
    """
    config = SGLDConfig() if config is None else config
    if not isinstance(config, SGLDConfig):
        raise TypeError(f"config must be an SGLDConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {sorted(ENGINES)}, got {engine!r}")
    if max_memory is not None:
        parse_bytes(max_memory)
    if matmul_precision not in MATMUL_PRECISIONS:
        raise ValueError(f"matmul_precision must be one of {MATMUL_PRECISIONS}, got {matmul_precision!r}")
    if not any(True for _ in model.parameters()):
        raise ValueError("model has no parameters")
    if device is not None:
        move_to(model, device)
    device = next(model.parameters()).device
    if not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph must be True or False, got {cuda_graph!r}")

    if isinstance(data, ModelDistribution):
        if loss_fn is not None:
            raise ValueError("a ModelDistribution brings its own loss (eq. 11); do not pass loss_fn as well")
        move_to(data.reference_model, device)
        loss_fn = data.loss_fn()
        data = data.contexts
        token_loss = True
    else:
        token_loss = loss_fn is None
        if token_loss:
            loss_fn = next_token_loss
        elif not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(model, batch) -> scalar tensor")

    comps = as_component_dict(model, components)
    if cuda_graph:
        generic = plan(model, comps, loss_fn)[1] if engine == "batched" else []
        problem = cuda_graph_problem(device, engine, matmul_precision, generic)
        if problem is not None:
            raise CudaGraphUnsupported(problem)
    for message in step_size_problems(config.step_size, config.localization, config.sampler):
        warnings.warn(message, SamplerWarning, stacklevel=2)
    if token_loss and isinstance(data, torch.Tensor):
        check_tokens(data, model)
    schedule = BatchSchedule(data, config.batch_size, config.num_steps, config.seed)
    if token_loss:
        check_tokens(schedule[0], model, what="data (first batch)")
    if cuda_graph and not schedule.uniform:
        raise CudaGraphUnsupported("cuda_graph=True needs minibatches of one shape: give the data as a token tensor "
                                   "[N, T] (a Dataset or an iterable of batches may end an epoch with a smaller batch)")
    batches = _OnDevice(schedule, device)
    observer = None
    if observables is not None:
        probes = check_probes(observables, model, token_loss)
        observer = ProbeRecorder(probes, per_token_fn(loss_fn, token_loss), model,
                                 len(comps) * config.num_chains, config, observe_every, observables_dir,
                                 observables_dtype, max_memory=max_memory)
    with matmul_precision_context(matmul_precision, device):
        star_loss = optimum_loss_fn(model, comps, loss_fn, max_memory=max_memory) if engine == "batched" else loss_fn
        init_losses = loss_at_optimum(model, batches, star_loss, schedule.distinct_batch_ids())

    total = len(comps) * config.num_chains * config.num_steps
    bar = Progress(total, progress)
    try:
        with matmul_precision_context(matmul_precision, device):
            estimates = ENGINES[engine](model, batches, loss_fn, comps, config, init_losses, bar,
                                        max_memory=max_memory, observer=observer, cuda_graph=cuda_graph)
    finally:
        bar.close()
    observations = None
    if observer is not None:
        diverged_at = np.concatenate([estimates[name].diverged_at for name in comps])
        observations = observer.finish(list(comps), config.num_chains, diverged_at)
    result = LLCResult(estimates=estimates, config=config, engine=engine, matmul_precision=matmul_precision,
                       observations=observations)
    try:
        check_divergence(estimates, config.step_size)
    except ChainsDivergedError as err:
        err.result = result  # what was measured, for callers that want the components that survived
        raise
    warn_unreliable(result.diagnostics(), config.step_size, stacklevel=2)
    whole = whole_model_component(model, comps)
    if whole is not None and len(comps) > 1:
        e = result[whole]
        refined_exceeding_whole({k: v.llc_mean for k, v in result.estimates.items() if k != whole}, e.llc_mean,
                                {k: v.llc_sem for k, v in result.estimates.items()}, e.llc_sem, stacklevel=2)
    return result


class _OnDevice:
    """``schedule[t]`` moved to ``device`` (tensors, and tuples/lists/dicts of them)."""

    def __init__(self, schedule: BatchSchedule, device: torch.device):
        self.schedule, self.device = schedule, device

    def __len__(self) -> int:
        return len(self.schedule)

    def __getitem__(self, t: int):
        return batch_to(self.schedule[t], self.device)


@torch.no_grad()
def loss_at_optimum(model: nn.Module, batches, loss_fn: Callable, batch_ids) -> np.ndarray:
    """l(w*) on every step's minibatch ``[num_steps]``; each distinct batch is evaluated once, and the
    values reach the host in one read at the end."""
    order = list(dict.fromkeys(batch_ids))
    values = []
    for b in order:
        loss = loss_fn(model, batches[b])
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn must return a scalar tensor (the mean loss), got {shape}")
        values.append(loss.detach().reshape(()).to(torch.float64))
    host = torch.stack(values).cpu().numpy() if values else np.empty(0)
    cache = dict(zip(order, host.tolist()))
    out = np.empty(len(batch_ids))
    for t, b in enumerate(batch_ids):
        value = cache[b]
        if not math.isfinite(value):
            raise ValueError(
                f"the loss at w* is {value} on the minibatch of step {t}: the model or data is broken "
                "before sampling starts (check for NaN weights or out-of-range inputs)"
            )
        out[t] = value
    return out
