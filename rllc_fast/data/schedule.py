"""The minibatch of every SGLD step, fixed once so every chain and component sees the same sequence.

Sharing the sequence is what lets ``l(w*)`` be measured once per step and paired with every
chain's ``l(w_t)`` on the same minibatch (see ``rllc_fast.llc``).
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, List, Optional

import torch
from torch.utils.data import DataLoader

from .normalise import normalise_data


class BatchSchedule:
    """``schedule[t]`` is the minibatch of SGLD step ``t`` (0 <= t < num_steps).

    Accepted ``data`` (see ``normalise_data``):
    - an integer token tensor ``[N, T]``: rows are shuffled (seeded) into batches of
      ``batch_size`` rows, reshuffled every epoch; ``batch_size=None`` uses all rows every step;
    - a tuple of tensors with the same first dimension (e.g. ``(x, y)``): rows are batched
      the same way and each batch is a tuple;
    - a ``torch.utils.data.Dataset`` with ``__len__``: sampled as above, collated by a DataLoader;
    - a list of batches, a ``DataLoader`` or any re-iterable of batches: taken in order, restarted
      when exhausted.
    """

    def __init__(self, data: Any, batch_size: Optional[int], num_steps: int, seed: int):
        self.num_steps = num_steps
        self._batches: List[Any] = []
        self._rows: Optional[List[torch.Tensor]] = None
        self._iterable: Optional[Iterable] = None
        self._iterator: Optional[Iterator] = None
        gen = torch.Generator().manual_seed(seed)
        self._data = normalise_data(data)
        if self._data.rows is not None:
            self._rows = _row_schedule(self._data.num_rows, batch_size, num_steps, gen)
        elif self._data.dataset is not None:
            dataset = self._data.dataset
            bs = len(dataset) if batch_size is None else batch_size
            _check_batch_size(bs, len(dataset))
            self._iterable = DataLoader(dataset, batch_size=bs, shuffle=True, generator=gen, drop_last=False)
        else:
            self._iterable = self._data.batches

    def __len__(self) -> int:
        return self.num_steps

    def __getitem__(self, t: int):
        if not 0 <= t < self.num_steps:
            raise IndexError(f"step {t} out of range [0, {self.num_steps})")
        if self._rows is not None:
            return self._data.take(self._rows[t])
        while len(self._batches) <= t:
            self._batches.append(self._next_batch())
        return self._batches[t]

    def _next_batch(self):
        if self._iterator is None:
            self._iterator = iter(self._iterable)
        try:
            return next(self._iterator)
        except StopIteration:
            if not self._batches:
                raise ValueError("data yielded no batches (it is empty)") from None
            self._iterator = iter(self._iterable)
            return next(self._iterator)

    @property
    def uniform(self) -> bool:
        """Whether every step's batch has one shape (rows of tensor data: fixed-size minibatches or the whole
        set); a Dataset's DataLoader or an iterable of batches may end an epoch with a smaller one."""
        return self._rows is not None

    def distinct_batch_ids(self) -> List[int]:
        """For each step, the id of its batch's first occurrence (steps with equal ids share a batch).

        Full-batch schedules reuse one batch, so ``l(w*)`` needs computing only once.
        """
        if self._rows is not None:
            first = {}
            ids = []
            for t, r in enumerate(self._rows):
                key = (r.data_ptr(), r.numel())
                ids.append(first.setdefault(key, t))
            return ids
        return list(range(self.num_steps))


def _check_batch_size(bs: int, n: int) -> None:
    if bs > n:
        raise ValueError(f"batch_size {bs} is larger than the data ({n} rows); lower batch_size or pass None")


def _row_schedule(n: int, batch_size: Optional[int], num_steps: int, gen: torch.Generator) -> List[torch.Tensor]:
    """Row indices per step: a seeded permutation cut into batches, a new one every epoch."""
    if batch_size is None:
        everything = torch.arange(n)
        return [everything] * num_steps
    _check_batch_size(batch_size, n)
    out: List[torch.Tensor] = []
    per_epoch = n // batch_size
    while len(out) < num_steps:
        perm = torch.randperm(n, generator=gen)
        for b in range(per_epoch):
            out.append(perm[b * batch_size : (b + 1) * batch_size])
            if len(out) == num_steps:
                break
    return out


def batch_to(batch, device: torch.device):
    """``batch`` (a tensor, or tuples/lists/dicts of them) on ``device``; CPU tensors bound for CUDA go through
    pinned memory, so the copy does not block the host."""
    if isinstance(batch, torch.Tensor):
        if device.type == "cuda" and batch.device.type == "cpu":  # pinned: the copy does not block the host
            return batch.pin_memory().to(device, non_blocking=True)
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(batch_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: batch_to(v, device) for k, v in batch.items()}
    return batch
