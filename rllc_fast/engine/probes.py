"""Probe-set losses of many replicas at one observed draw, for the batched engine (forward only).

- ``HeadProbeLosses`` (structured path): each probe set's ``w*`` pass below every needed layer is run
  once, when the run starts, and reused at every draw (the probe contexts never change and only the
  replica's own head differs from ``w*``); per draw, each chunk of head replicas computes its own head,
  the layers above and the per-position unembedding losses (``unembed_position_losses``; for the last
  layer the factored ``low_rank_position_losses``), in chunks that fit the same memory budget as the
  gradients.
- ``GenericProbeLosses``: any model and component, a loop that writes each replica's row into the
  model, scores every probe set and puts ``w*`` back.
Both hand ``[r, N, P]`` losses to a ``rllc_fast.observables.ProbeRecorder``.
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np
import torch

from . import head_replicas
from ..losses import next_token_loss
from ..observables import ProbeRecorder
from .unembed_loss import low_rank_allowed, low_rank_position_losses, unembed_position_losses
from .chunks import layer_chunks
from .structured import low_rank_layers
from .common import restore_slices, unpack_row


class HeadProbeLosses:
    """Per-token probe losses of head replicas from shared ``w*`` passes (structured path).

    indices: the replica rows; units: their ``head_replicas.Unit`` (layer, index, kind); limit: bytes a chunk may hold."""

    def __init__(self, hr: head_replicas.HeadReplicas, recorder: ProbeRecorder, indices: List[int],
                 units: List[head_replicas.Unit], limit: int, block_bytes: Optional[int]):
        self.hr, self.recorder, self.block_bytes = hr, recorder, block_bytes
        self.low_rank = low_rank_layers(hr, next_token_loss)  # probes score the token loss
        layers = sorted({u.layer for u in units})
        device = next(hr.model.parameters()).device
        self.passes = []  # per probe group (sets of one context length scored together): its w* pass and chunks
        for group in recorder.groups:
            N, T = group.batch.shape
            self.passes.append((group, hr.shared(group.batch, layers),
                                layer_chunks(hr, indices, units, N, T, limit, device)))

    @torch.no_grad()
    def __call__(self, w: torch.Tensor, slot: int, live: np.ndarray) -> None:
        """Record every replica's losses at ``slot`` (diverged ones too: the recorder masks them)."""
        unembed = self.hr.model.unembed
        for group, shared, chunks in self.passes:
            for (layer, kind), parts in chunks.items():
                n = self.hr.numel_of(kind)
                for rows, heads in parts:
                    if layer in self.low_rank and low_rank_allowed(w.device):
                        factored = self.hr.final_logit_parts(shared, layer, heads, w[rows, :n], kind=kind)
                        losses = low_rank_position_losses(factored, shared.tokens, self.block_bytes)
                    else:
                        x = self.hr.replica_features(shared, layer, heads, w[rows, :n], kind=kind)
                        losses = unembed_position_losses(x, unembed.W_U, unembed.b_U, shared.tokens, self.block_bytes)
                    for name, part in group.split(losses, dim=1).items():
                        self.recorder.put(name, rows, slot, part)


class GenericProbeLosses:
    """Per-token probe losses of any replicas, one at a time (the model holds each replica's row in turn).

    Replicas the host knows to have diverged are skipped (their recorded losses are masked anyway)."""

    def __init__(self, model, params, originals, recorder: ProbeRecorder, replicas, indices: List[int]):
        self.model, self.params, self.originals = model, params, originals
        self.recorder, self.replicas, self.indices = recorder, replicas, indices

    @torch.no_grad()
    def __call__(self, w: torch.Tensor, slot: int, live: np.ndarray) -> None:
        """Record the losses of the replicas ``live`` (as last read by the host) says are live, at ``slot``."""
        rec = self.recorder
        for r in self.indices:
            if not live[r]:
                continue
            comp = self.replicas[r][1]
            unpack_row(comp, self.params, w[r, : comp.numel])
            for group in rec.groups:
                for name, values in rec.losses(self.model, group).items():
                    rec.put(name, r, slot, values[None])
            restore_slices(comp, self.params, self.originals)
