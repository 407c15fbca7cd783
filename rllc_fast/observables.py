"""Observables: per-token losses on fixed probe sets, recorded for every replica at the observed draws.

A *probe set* is a fixed batch of contexts, the same for every draw, chain and component: token ids
``[N, T]`` (next-token cross-entropy at each of the ``T-1`` predicted positions), or, with a custom
``loss_fn``, any batch that ``loss_fn.per_token(model, batch) -> [N, P]`` (or ``[N]``) scores. At each
observed draw the engines evaluate every live replica on every probe set, forward only, at the same
weights as the draw's ``l(w_t)`` (before that step's update). ``check_probes`` validates the sets once,
``ProbeRecorder`` holds what the engines record and turns it into ``rllc_fast.observations.Observations``.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Tuple

import numpy as np
import torch
from torch import nn

from .atomic import write_arrays_atomically, write_json_atomically
from .config import SGLDConfig
from .data import batch_to
from .losses import check_tokens, next_token_loss, vocab_size
from .memory import default_budget, parse_bytes
from .observations import INDEX_FILE, Observations, probe_files

OBSERVABLE_DTYPES = ("float32", "float16")
IN_MEMORY_BYTES = 1 << 30
"""Observed losses larger than this (all probe sets together) need ``observables_dir`` (memory-mapped files)."""
LOGIT_COPIES = 3
"""A next-token pass over one probe context holds about this many ``[T, vocab]`` float32 arrays at once
(the logits, cross-entropy's log-softmax, slack for the model's own temporaries): ``rows_per_pass`` sizes
passes by it."""
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def per_token_fn(loss_fn: Callable, token_loss: bool) -> Callable:
    """``per_token(model, batch) -> [N, P]``: next-token cross-entropy for token runs (also KL runs: probes
    are texts), else ``loss_fn.per_token``; a clear error when the custom loss has none."""
    if token_loss:
        return next_token_loss.per_token
    per_token = getattr(loss_fn, "per_token", None)
    if not callable(per_token):
        raise ValueError(
            "observables need per-token losses, but loss_fn has no per_token(model, batch) method; give "
            "loss_fn a per_token(model, batch) -> [N, P] (or [N]) method returning the terms whose mean is "
            "loss_fn(model, batch), or drop observables"
        )
    return per_token


def check_probes(observables, model: nn.Module, token_loss: bool) -> Dict[str, object]:
    """``{name: batch}`` from ``observables`` (a dict, or a sequence of ``(name, batch)`` pairs); each name
    a plain file-safe word given once; token probes checked against the model's vocabulary and context."""
    pairs = list(observables.items()) if isinstance(observables, dict) else list(observables)
    out: Dict[str, object] = {}
    if not pairs:
        raise ValueError("observables is empty; give at least one probe set {name: tokens}, or None")
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise TypeError(f"observables: expected (name, batch) pairs, got {pair!r:.80}")
        name, batch = pair
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"observables: probe set name {name!r} must be a word of letters, digits, '_', '.' "
                             "or '-' (it names files)")
        if name in out:
            raise ValueError(f"observables: the name {name!r} is given twice; give each probe set its own name")
        if token_loss:
            if isinstance(batch, np.ndarray):
                batch = torch.from_numpy(batch)
            check_tokens(batch, model, what=f"observables[{name!r}]")
        out[name] = batch
    return out


def rows_per_pass(batch, model: nn.Module, budget: int):
    """How many probe contexts one forward pass may score within ``budget`` bytes (``LOGIT_COPIES`` float32
    ``[T, vocab]`` arrays per context), or None (all at once) for batches that are not token tensors or a
    model whose vocabulary is unknown."""
    vocab = vocab_size(model)
    if not isinstance(batch, torch.Tensor) or batch.dim() != 2 or vocab is None:
        return None
    return max(1, budget // (LOGIT_COPIES * batch.shape[1] * vocab * 4))


class ProbeRecorder:
    """The observed per-token losses of ``R`` replicas: ``[R, D, N, P]`` per probe set, in RAM or as
    memory-mapped files in ``directory``. Forward passes over a probe set (at ``w*`` here, per replica in the
    generic and reference engines: ``losses``) go in row chunks whose logits fit ``max_memory`` (default
    ``rllc_fast.memory.default_budget``).

    Engines call ``index(d)`` (the observed slot of kept draw ``d``, or -1), then ``put`` for every
    replica row; ``put`` keeps device tensors until ``flush`` (the batched engine flushes at its host reads,
    so observing adds no host sync to a step). ``finish`` masks what diverged chains recorded from their
    divergence on and returns ``Observations``.
    """

    def __init__(self, probes: Dict[str, object], per_token: Callable, model: nn.Module, num_replicas: int,
                 config: SGLDConfig, every: int = 1, directory=None, dtype: str = "float32", max_memory=None):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"observe_every must be an int >= 1 (got {every!r})")
        if dtype not in OBSERVABLE_DTYPES:
            raise ValueError(f"observables_dtype must be one of {OBSERVABLE_DTYPES}, got {dtype!r}")
        self.probes, self.per_token, self.every, self.config = probes, per_token, every, config
        self.draws = np.arange(0, config.num_draws, every)
        self.steps = np.asarray(list(config.kept_steps))[self.draws]
        self.dtype = np.dtype(dtype)
        self.directory = Path(directory) if directory is not None else None
        device = next(model.parameters()).device
        self.on_device = {n: batch_to(torch.as_tensor(b) if isinstance(b, np.ndarray) else b, device) for n, b in probes.items()}
        budget = default_budget(device) if max_memory is None else parse_bytes(max_memory)
        self.groups = probe_groups(self.on_device)
        self.rows = {g.names: rows_per_pass(g.batch, model, budget) for g in self.groups}
        self.at_optimum = {n: v.float().cpu().numpy() for g in self.groups for n, v in self.losses(model, g).items()}
        shapes = {n: (num_replicas, len(self.draws)) + a.shape for n, a in self.at_optimum.items()}
        total = sum(math.prod(s) for s in shapes.values()) * self.dtype.itemsize
        if self.directory is None and total > IN_MEMORY_BYTES:
            raise ValueError(
                f"observables: {total / 2**30:.1f} GiB of per-token losses would be held in RAM; pass "
                "observables_dir=FOLDER (memory-mapped files), a larger observe_every, fewer probe contexts, "
                "or observables_dtype='float16'"
            )
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            stale = self.directory / INDEX_FILE
            if stale.exists():
                stale.unlink()  # the folder is rewritten: never leave an index that describes other arrays
            self.arrays = {n: np.memmap(probe_files(self.directory, n)["losses"], dtype=self.dtype, mode="w+",
                                        shape=s) for n, s in shapes.items()}
        else:
            self.arrays = {n: np.empty(s, dtype=self.dtype) for n, s in shapes.items()}
        for a in self.arrays.values():
            a.fill(np.nan)
        self.pending: List[tuple] = []

    def losses(self, model: nn.Module, group: "ProbeGroup") -> Dict[str, torch.Tensor]:
        """``{name: [N, P]}`` per-token losses of ``model`` (as it is now) on the probe sets of ``group``: one
        pass over their contexts together, in row chunks whose logits fit the budget."""
        values = per_token_losses(self.per_token, model, group.batch, group.names[0], self.rows[group.names])
        return group.split(values)

    def index(self, draw: int) -> int:
        """The observed slot of kept draw ``draw`` (``draw // every`` when it is observed), else -1."""
        return draw // self.every if draw >= 0 and draw % self.every == 0 else -1

    def put(self, name: str, rows, slot: int, values: torch.Tensor) -> None:
        """Record ``values [r, N, P]`` for replica ``rows`` (a slice, an index list/tensor or an int) at ``slot``."""
        if isinstance(rows, (int, np.integer)):
            rows = slice(int(rows), int(rows) + 1)
        self.pending.append((name, rows, slot, values.detach()))

    def flush(self) -> None:
        """Copy the recorded device tensors to the arrays (one host read)."""
        for name, rows, slot, values in self.pending:
            host = values.float().cpu().numpy().astype(self.dtype, copy=False)
            if isinstance(rows, torch.Tensor):
                rows = rows.cpu().numpy()
            self.arrays[name][rows, slot] = host
        self.pending.clear()

    def finish(self, components: List[str], num_chains: int, diverged_at: np.ndarray) -> Observations:
        """Flush, set a diverged replica's losses to NaN from its divergence step on, write the index (when
        memory-mapped) and return the ``Observations`` ``[component, chain, draw, N, P]``."""
        self.flush()
        for r, step in enumerate(np.asarray(diverged_at)):
            if step >= 0:
                for a in self.arrays.values():
                    a[r, self.steps >= step] = np.nan
        C = len(components)
        losses = {n: a.reshape((C, num_chains) + a.shape[1:]) for n, a in self.arrays.items()}
        tokens = {n: (b.cpu().numpy() if isinstance(b, torch.Tensor) and not b.dtype.is_floating_point else None)
                  for n, b in self.probes.items()}
        obs = Observations(names=list(self.probes), components=list(components), num_chains=num_chains,
                           draws=self.draws, steps=self.steps, losses=losses, at_optimum=self.at_optimum,
                           tokens=tokens, directory=self.directory)
        if self.directory is not None:
            for n in obs.names:
                files = probe_files(self.directory, n)
                self.arrays[n].flush()
                write_arrays_atomically(files["at_optimum"], self.at_optimum[n])
                if tokens[n] is not None:
                    write_arrays_atomically(files["tokens"], tokens[n])
            write_json_atomically(self.directory / INDEX_FILE, obs.index())  # last: the folder is complete
        return obs


def _as_positions(values: torch.Tensor, name: str) -> torch.Tensor:
    """A per-token loss as ``[N, P]`` (a per-sample ``[N]`` becomes ``[N, 1]``)."""
    if not isinstance(values, torch.Tensor) or values.dim() not in (1, 2):
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"observables[{name!r}]: per_token must return [N, P] or [N] losses, got {shape}")
    return values[:, None] if values.dim() == 1 else values


class ProbeGroup(NamedTuple):
    """Probe sets scored in one pass: token sets of one context length, concatenated (``batch [sum N, T]``),
    or a single set of any other kind. ``sizes``: each set's contexts."""

    names: Tuple[str, ...]
    sizes: Tuple[int, ...]
    batch: object

    def split(self, values: torch.Tensor, dim: int = 0) -> Dict[str, torch.Tensor]:
        """``values`` along ``dim`` (the contexts) back into ``{name: part}``."""
        if len(self.names) == 1:
            return {self.names[0]: values}
        return dict(zip(self.names, values.split(list(self.sizes), dim=dim)))


def probe_groups(probes: Dict[str, object]) -> List[ProbeGroup]:
    """The probe sets as ``ProbeGroup``s: token tensors ``[N, T]`` of equal ``T`` together (fewer, larger passes
    per replica and draw), anything else alone (those first; the groups' order changes no recorded value)."""
    by_length: Dict[int, List[str]] = {}
    groups: List[ProbeGroup] = []
    for name, batch in probes.items():
        if isinstance(batch, torch.Tensor) and batch.dim() == 2 and not batch.dtype.is_floating_point:
            by_length.setdefault(int(batch.shape[1]), []).append(name)
        else:
            groups.append(ProbeGroup((name,), (0,), batch))
    for names in by_length.values():
        parts = [probes[n] for n in names]
        batch = parts[0] if len(parts) == 1 else torch.cat(parts)
        groups.append(ProbeGroup(tuple(names), tuple(int(p.shape[0]) for p in parts), batch))
    return groups


def per_token_losses(per_token: Callable, model: nn.Module, batch, name: str, rows=None) -> torch.Tensor:
    """``[N, P]`` per-token losses of ``model`` (as it is now) on probe ``batch``, without gradient; a tensor
    ``batch`` is scored ``rows`` contexts at a time when given (None: all at once)."""
    with torch.no_grad():
        if rows is None or not isinstance(batch, torch.Tensor) or rows >= batch.shape[0]:
            return _as_positions(per_token(model, batch), name)
        return torch.cat([_as_positions(per_token(model, batch[i:i + rows]), name)
                          for i in range(0, batch.shape[0], rows)])
