"""Head replicas grouped by layer in chunks that fit a memory budget (the structured path's unit of work)."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from . import head_replicas


def layer_chunks(hr: head_replicas.HeadReplicas, indices: List[int], units: List[head_replicas.Unit], N: int, T: int,
                 limit: int, device) -> Dict[Tuple[int, str], List[Tuple[object, torch.Tensor]]]:
    """``{(layer, kind): [(replica rows, head or group indices [k]), ...]}``: the replicas ``indices`` (unit
    ``units[i]`` each: layer, index, kind) grouped by layer and kind, in chunks whose ``hr.bytes_per_replica`` on
    ``[N, T]`` tokens fit in ``limit`` bytes."""
    chunks: Dict[Tuple[int, str], List[Tuple[object, torch.Tensor]]] = {}
    for layer, kind in sorted({(u.layer, u.kind) for u in units}):
        rows = [(r, u.index) for r, u in zip(indices, units) if (u.layer, u.kind) == (layer, kind)]
        size = max(1, limit // hr.bytes_per_replica(N, T, layer, kind))
        chunks[layer, kind] = [replica_chunk(rows[i : i + size], device) for i in range(0, len(rows), size)]
    return chunks


def halves(rows, heads) -> List[Tuple[object, torch.Tensor]]:
    """A chunk ``(rows, heads)`` split into two (the retry after running out of device memory)."""
    k = len(heads) // 2
    if isinstance(rows, slice):
        return [(slice(rows.start, rows.start + k), heads[:k]), (slice(rows.start + k, rows.stop), heads[k:])]
    return [(rows[:k], heads[:k]), (rows[k:], heads[k:])]


def replica_chunk(rows: List[Tuple[int, int]], device) -> Tuple[object, torch.Tensor]:
    """``(replica rows, head or group indices [k] long)``: rows as a slice when consecutive (plain views, no
    gathers)."""
    idx = [r for r, _ in rows]
    heads = torch.tensor([h for _, h in rows], device=device)
    if idx == list(range(idx[0], idx[0] + len(idx))):
        return slice(idx[0], idx[0] + len(idx)), heads
    return torch.tensor(idx, device=device), heads
