"""The structured path: head replicas of a TransformerLens model sharing one ``w*`` pass per batch.

Which components take it (``plan``), the loss at ``w*`` by the same code (``optimum_loss_fn``), and the
per-step loss and gradient of every head, query-head or group replica (``HeadReplicaGrads``), in chunks of
replicas that fit the memory budget, with the unembedding's row blocks out of the same budget
(``unembed_block_bytes``). The model side is ``engine.head_replicas`` (``HeadReplicas``); the loss side is
any ``losses.FeatureLoss`` (the token and KL losses).
"""
from __future__ import annotations

import inspect
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..components import Component
from ..losses import FeatureLoss, NextTokenLoss
from ..memory import default_budget, parse_bytes
from . import head_replicas
from .chunks import halves, layer_chunks
from .unembed_loss import low_rank_allowed, low_rank_token_losses


def plan(model: nn.Module, components: Dict[str, Component], loss_fn: Callable, structured: bool = True
         ) -> Tuple[Dict[str, head_replicas.Unit], List[str], Optional[str]]:
    """Which components take the structured path: ``({name: Unit(layer, index, kind)}, [generic names], reason)``
    (``head_replicas.head_of``: heads, and query heads and key/value groups under grouped-query attention).

    ``reason`` says why nothing is structured (None when some component is, or none could be).
    """
    if not structured:
        return {}, list(components), "the generic path was asked for"
    reason = head_replicas.unsupported_reason(model)
    if reason is None and not isinstance(loss_fn, FeatureLoss):
        reason = "the loss is a custom loss_fn (the structured path needs the token or KL loss)"
    if reason is not None:
        return {}, list(components), reason
    heads, rest = {}, []
    for name, comp in components.items():
        lh = head_replicas.head_of(model, comp)
        if lh is None:
            rest.append(name)
        else:
            heads[name] = lh
    return heads, rest, None if heads else "no component is a single attention head or key/value group"


def optimum_loss_fn(model: nn.Module, components: Dict[str, Component], loss_fn: Callable, structured: bool = True,
                    max_memory=None) -> Callable:
    """The ``loss_fn(model, batch)`` that gives this engine's ``l(w*)``: when every component takes the
    structured path, the structured path's own blocks, norms and unembedding (``l(w*)`` and the replicas'
    ``l(w_t)`` from one code path, and without TransformerLens's hooks and materialized attention), with the
    unembedding's row blocks sized as the engine sizes them (``memory_plan``); else ``loss_fn`` itself."""
    heads, rest, _ = plan(model, components, loss_fn, structured)
    if not heads or rest:
        return loss_fn
    device = next(model.parameters()).device
    return StructuredLoss(model, loss_fn, memory_plan(device, max_memory)[1])


class StructuredLoss:
    """``loss_fn(model, batch)`` at ``w*`` from ``HeadReplicas.final_features`` and ``loss_fn.feature_losses``
    (``loss_fn`` itself where the final features are not available); ``block_bytes`` as the engine's."""

    def __init__(self, model: nn.Module, loss_fn: Callable, block_bytes: Optional[int] = None):
        self.hr, self.loss_fn = head_replicas.HeadReplicas(model), loss_fn
        self.block_kw = {"block_bytes": block_bytes} if _takes_block_bytes(loss_fn) else {}

    @torch.no_grad()
    def __call__(self, model: nn.Module, batch) -> torch.Tensor:
        x = self.hr.final_features(batch)
        if x is None:
            return self.loss_fn(model, batch)
        unembed = self.hr.model.unembed
        return self.loss_fn.feature_losses(x[None], unembed.W_U, unembed.b_U, batch, self.loss_fn.prepare(batch),
                                           **self.block_kw)[0]

UNEMBED_SHARE = 8
"""With a memory budget, the unembedding's row blocks get ``budget / UNEMBED_SHARE`` and replica chunks
the rest (``rllc_fast.engine.unembed_loss``)."""


def unembed_block_bytes(budget: int) -> int:
    """Bytes for the unembedding's row-block temporaries out of a ``budget`` of bytes."""
    return budget // UNEMBED_SHARE

def memory_plan(device, max_memory=None) -> Tuple[int, Optional[int]]:
    """``(budget, block_bytes)``: the bytes replica chunks may hold (``max_memory``, else the device's default;
    at most ``CPU_CHUNK_BYTES`` on a CPU) and the unembedding's row-block bytes out of it (None, the CPU-cache
    default, on a CPU without ``max_memory``)."""
    device = torch.device(device)
    budget = default_budget(device) if max_memory is None else parse_bytes(max_memory)
    if device.type == "cpu":
        budget = min(budget, CPU_CHUNK_BYTES)
    return budget, (None if device.type == "cpu" and max_memory is None else unembed_block_bytes(budget))


CPU_CHUNK_BYTES = 256 * 2**20
"""On a CPU, replica chunks are also capped at this working set: measured on the paper's model
(2 cores), chunks of about 256 MiB ran 2x faster per replica than 1 GiB ones (cache misses in the
upper layers' attention), and no slower than single replicas."""


class HeadReplicaGrads:
    """Loss and gradient of head replicas from one shared ``w*`` pass per batch (structured path).

    Replicas are grouped by layer and kind (``head_replicas.Unit``) and processed in chunks of at most ``budget``
    bytes (the engine caps it at ``CPU_CHUNK_BYTES`` on a CPU) less the unembedding's ``block_bytes``, as
    ``HeadReplicas.bytes_per_replica`` models them; a chunk that runs out of device memory is halved and
    retried, with a warning. Every replica is computed every step, diverged ones too (their rows are
    frozen by the update), so no step needs to know on the host which are live.
    """

    def __init__(self, model, loss_fn, indices: List[int], units: List[head_replicas.Unit], schedule,
                 budget: int, block_bytes: Optional[int] = None):
        self.hr = head_replicas.HeadReplicas(model)
        self.loss_fn = loss_fn
        self.block_bytes = block_bytes
        self.block_kw = {"block_bytes": block_bytes} if _takes_block_bytes(loss_fn) else {}
        self.low_rank_layers = low_rank_layers(self.hr, loss_fn)
        first = schedule[0]
        N, T = first.shape
        device = next(model.parameters()).device
        self.limit = max(1, budget - (block_bytes or 0))  # bytes a chunk may hold (probe passes use it too)
        self.chunks = layer_chunks(self.hr, indices, units, N, T, self.limit, device)

    def __call__(self, batch, w, grad, live, values) -> None:
        shared = self.hr.shared(batch, sorted({layer for layer, _ in self.chunks}))
        prepared = self.loss_fn.prepare(batch)
        for (layer, kind), chunks in self.chunks.items():
            i = 0
            while i < len(chunks):
                if self._chunk_fits(shared, prepared, batch, layer, kind, chunks[i], w, grad, values):
                    i += 1
                    continue
                chunks[i : i + 1] = halves(*chunks[i])  # kept for the later steps too
                what = "" if kind == self.hr.kind else f" ({kind}s)"
                warnings.warn(f"out of device memory in a chunk of {len(chunks[i][1]) + len(chunks[i + 1][1])} "
                              f"replicas of layer {layer}{what}: retrying in halves (pass a smaller max_memory to "
                              "start there)", RuntimeWarning, stacklevel=2)

    def _chunk_fits(self, shared, prepared, batch, layer, kind, chunk, w, grad, values) -> bool:
        """Loss and gradient of one chunk into ``values``/``grad``; False (nothing written) when the device
        ran out of memory and the chunk can be halved."""
        rows, hs = chunk
        try:
            self._run_chunk(shared, prepared, batch, layer, kind, rows, hs, w, grad, values)
            return True
        except torch.OutOfMemoryError:
            if len(hs) == 1 or (w.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
                raise  # a single replica cannot be halved; under CUDA-graph capture, capture fails and goes eager
        if w.device.type == "cuda":  # the failed chunk's tensors are released now that the handler is left
            torch.cuda.empty_cache()
        return False

    def _run_chunk(self, shared, prepared, batch, layer, kind, rows, hs, w, grad, values) -> None:
        n = self.hr.numel_of(kind)
        unembed = self.hr.model.unembed
        leaf = w[rows, :n].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            if layer in self.low_rank_layers and low_rank_allowed(leaf.device):
                parts = self.hr.final_logit_parts(shared, layer, hs, leaf, kind=kind)
                losses = low_rank_token_losses(parts, batch, self.block_bytes)
                del parts
            else:
                x = self.hr.replica_features(shared, layer, hs, leaf, kind=kind)
                losses = self.loss_fn.feature_losses(x, unembed.W_U, unembed.b_U, batch, prepared, **self.block_kw)
                del x
            losses.sum().backward()
        grad[rows, :n] = leaf.grad
        values[rows] = losses.detach()


def low_rank_layers(hr: head_replicas.HeadReplicas, loss_fn) -> frozenset:
    """Layers whose replicas' token losses come from the factored last-layer logits
    (``HeadReplicas.final_logit_parts``, ``unembed_loss.low_rank_token_losses``: the same losses, each replica's
    own unembedding product of inner size ``k d_head`` instead of ``d_model``), when float32 products allow it
    (``unembed_loss.low_rank_allowed``, checked per call): the last layer, for ``NextTokenLoss`` itself (not a
    subclass, whose ``feature_losses`` may differ)."""
    last = hr.cfg.n_layers - 1
    if type(loss_fn) is not NextTokenLoss or hr.low_rank_reason(last) is not None:  # a subclass may change the loss
        return frozenset()
    return frozenset({last})


def _takes_block_bytes(loss_fn) -> bool:
    try:
        return "block_bytes" in inspect.signature(loss_fn.feature_losses).parameters
    except (TypeError, ValueError):
        return False
