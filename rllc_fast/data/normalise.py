"""What a data argument is, decided in one place for every consumer (``estimate_llc``'s minibatch schedule
and the Hessian metrics).

- a tensor ``[N, ...]``: ``N`` rows (a token tensor ``[N, T]`` for the default next-token loss);
- a tuple of tensors sharing their first dimension, e.g. ``(x, y)``: ``N`` rows whose batches are tuples;
- a ``torch.utils.data.Dataset`` with ``__len__``;
- a list (or any other re-iterable, such as a ``DataLoader``) of batches, each a tensor or a tuple of
  tensors. A list of tensors is always a list of batches: columns such as ``(x, y)`` go in a tuple.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, default_collate


def num_rows(tensors: Sequence[torch.Tensor]) -> int:
    """The common first (row) dimension of ``tensors``; ``ValueError`` when they differ or it is 0."""
    n = tensors[0].shape[0] if tensors[0].dim() > 0 else 0
    for i, t in enumerate(tensors):
        if t.dim() == 0 or t.shape[0] != n:
            raise ValueError(
                f"data tensors must share their first (row) dimension: tensor 0 has {n} rows, tensor {i} "
                f"has shape {tuple(t.shape)}"
            )
    if n == 0:
        raise ValueError("data is empty (0 rows)")
    return n


@dataclass(frozen=True)
class NormalisedData:
    """A data argument, classified by ``normalise_data``: exactly one of ``rows`` (tensors sharing their first
    dimension, ``[N, ...]`` each), ``dataset`` (a sized ``Dataset``) and ``batches`` (a re-iterable of batches,
    taken in order) is set. ``tuple_rows``: a batch of ``rows`` is a tuple of tensors, not one tensor."""

    rows: Optional[Tuple[torch.Tensor, ...]] = None
    tuple_rows: bool = False
    dataset: Optional[Dataset] = None
    batches: Optional[Iterable] = None

    @property
    def num_rows(self) -> int:
        """``N`` of row data (``ValueError`` for a dataset or batches: call ``as_rows`` first)."""
        if self.rows is None:
            raise ValueError("data given as a Dataset or batches has no rows until as_rows() stacks them")
        return num_rows(self.rows)

    def take(self, index: torch.Tensor, device=None):
        """The batch of rows ``index`` (a tensor, or a tuple for tuple rows), on ``device`` when given."""
        picked = tuple(t[index] if device is None else t[index].to(device) for t in self.rows)
        return picked if self.tuple_rows else picked[0]

    def as_rows(self) -> "NormalisedData":
        """The same data as rows: batches concatenated along their first dimension (all tensors, or all tuples
        of as many tensors), a dataset's items collated in order. ``TypeError`` for other batches."""
        if self.rows is not None:
            return self
        if self.dataset is not None:
            collated = default_collate([self.dataset[i] for i in range(len(self.dataset))])
            return _rows(collated, "the Dataset's items, collated")
        batches = list(self.batches)
        if not batches:
            raise ValueError("data yielded no batches (it is empty)")
        if all(isinstance(b, torch.Tensor) for b in batches):
            return NormalisedData(rows=(_cat(batches, 0),))
        width = len(batches[0]) if isinstance(batches[0], (tuple, list)) else None
        if width and all(isinstance(b, (tuple, list)) and len(b) == width
                         and all(isinstance(t, torch.Tensor) for t in b) for b in batches):
            columns = tuple(_cat([b[j] for b in batches], j) for j in range(width))
            num_rows(columns)
            return NormalisedData(rows=columns, tuple_rows=True)
        kinds = sorted({type(b).__name__ for b in batches})
        raise TypeError(f"data: batches must all be tensors, or all tuples of as many tensors, to be stacked into "
                        f"rows; got {', '.join(kinds)}")


def normalise_data(data: Any) -> NormalisedData:
    """Classify ``data`` (see the module doc), checking what can be checked without iterating it.

    Raises ``TypeError`` for what is no data (a one-shot iterator, a string, a dict, ...) and ``ValueError``
    for empty data or tensors that disagree (rows of different lengths; a list of tensors of different
    shapes or dtypes, which is read as batches although it looks like columns)."""
    if isinstance(data, torch.Tensor):
        return _rows(data, "data")
    if isinstance(data, tuple) and data and all(isinstance(t, torch.Tensor) for t in data):
        return _rows(data, "data")
    if isinstance(data, list) and data and all(isinstance(t, torch.Tensor) for t in data):
        _check_alike(data)
        return NormalisedData(batches=data)
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        if len(data) == 0:
            raise ValueError("data is an empty Dataset")
        return NormalisedData(dataset=data)
    if isinstance(data, (DataLoader, Iterable)) and not isinstance(data, (str, bytes, dict)):
        if isinstance(data, Iterator):
            raise TypeError(
                "data is a one-shot iterator; pass a re-iterable (a list of batches, a Dataset or "
                "a DataLoader) so that it can be read again"
            )
        if isinstance(data, (list, tuple)) and not data:
            raise ValueError("data is an empty list of batches")
        return NormalisedData(batches=data)
    raise TypeError(
        "data must be a tensor [N, ...], a tuple of tensors (x, y, ...), a Dataset, a DataLoader or a "
        f"re-iterable of batches (e.g. a list of tensors), not {type(data).__name__}"
    )


def row_data(data: Any):
    """``data`` (anything ``normalise_data`` accepts) as rows: a tensor ``[N, ...]``, or a tuple of tensors
    sharing their first dimension; batches are concatenated in order and a Dataset's items collated."""
    rows = normalise_data(data).as_rows()
    return rows.rows if rows.tuple_rows else rows.rows[0]


def _rows(data, what: str) -> NormalisedData:
    tensors = (data,) if isinstance(data, torch.Tensor) else tuple(data)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        raise TypeError(f"{what}: expected tensors, got {', '.join(type(t).__name__ for t in tensors)}")
    num_rows(tensors)
    return NormalisedData(rows=tensors, tuple_rows=not isinstance(data, torch.Tensor))


def _check_alike(batches) -> None:
    first = batches[0]
    for i, b in enumerate(batches):
        if b.dim() == 0 or b.shape[1:] != first.shape[1:] or b.dtype != first.dtype:
            raise ValueError(
                f"data is a list of tensors, read as a list of batches, but batch {i} is {b.dtype} "
                f"{tuple(b.shape)} and batch 0 {first.dtype} {tuple(first.shape)}; pass columns such as "
                "(x, y) as a tuple, batches as tensors of one shape past the first dimension"
            )


def _cat(tensors, column: int) -> torch.Tensor:
    try:
        return torch.cat(tensors)
    except RuntimeError as err:
        raise ValueError(f"data: the batches cannot be stacked into rows (tensor {column} of each): {err}") from None
