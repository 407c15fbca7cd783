"""Sweeps over several processes with ``torch.distributed``, launched by ``torchrun`` (also under Slurm).

Every rank enumerates the same work list of (checkpoint, data, component set) units, takes a
deterministic shard of it balanced by estimated cost (``shard``), runs its units on its own device
(``cuda:LOCAL_RANK`` or the CPU) and writes them to its own SQLite file beside the store
(``STORE.rank<R>.sqlite``), so ranks on different machines never write one SQLite file at once (SQLite
locking is not reliable over network file systems). Only rank 0 opens the store itself: it reads
which components are already stored and sends that to every rank, and it merges every rank file into
the store at the end, and also at the start, so a rerun after a rank died keeps that rank's finished
units and computes only what is missing. Rank 0's progress bar counts the other ranks' files only
when all ranks are on its machine; otherwise it counts its own units until the end. The store's
folder must be shared by all ranks.

A single process (no ``WORLD_SIZE`` in the environment, or ``WORLD_SIZE=1``) never touches
``torch.distributed``.
"""
from __future__ import annotations

import heapq
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

import torch


@dataclass(frozen=True)
class Rank:
    """This process's place in the job: ``rank`` of ``world_size``, ``local_rank`` of the
    ``local_world_size`` ranks on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def single_host(self) -> bool:
        """Whether every rank runs on this machine (``LOCAL_WORLD_SIZE == WORLD_SIZE``)."""
        return self.local_world_size == self.world_size


def rank_from_env() -> Rank:
    """The ``Rank`` that ``torchrun`` put in the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``LOCAL_WORLD_SIZE``: when absent, ranks are taken to be on different machines); ``Rank()`` (one
    process) when they are absent."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError as err:
        raise ValueError("torchrun environment: RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE must be integers "
                         f"({err})") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"torchrun environment: RANK={rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={world})")
    return Rank(rank, world, local, local_world)


def init(rank: Rank, backend: str | None = None, device=None) -> None:
    """Join the process group for work on ``device`` (default: ``device_for(rank)``): ``nccl``, with
    ``torch.cuda.set_device`` to the rank's GPU, for a CUDA device, else ``gloo`` (``backend`` overrides
    the choice). Nothing for a single process or when already joined. A rank whose CUDA device this
    machine lacks (more ranks per machine than GPUs) raises ValueError before joining."""
    import torch.distributed as dist

    if not rank.active or dist.is_initialized():
        return
    device = torch.device(device_for(rank, device))
    if device.type == "cuda":
        index = rank.local_rank if device.index is None else device.index
        count = torch.cuda.device_count()
        if index >= count:
            raise ValueError(f"device: rank {rank.rank} (LOCAL_RANK={rank.local_rank}) needs cuda:{index} but this "
                             f"machine has {count} CUDA device(s); start at most {count} rank(s) per machine "
                             f"(torchrun --nproc-per-node={max(count, 1)}) or run the ranks on the CPU (--device cpu)")
        torch.cuda.set_device(index)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    dist.init_process_group(backend)


def device_for(rank: Rank, device=None):
    """The rank's device: ``device`` when given (a bare "cuda" becomes ``cuda:LOCAL_RANK``), else
    ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device) == "cuda" and rank.active:
        return f"cuda:{rank.local_rank}"
    return device


def barrier(rank: Rank) -> None:
    if rank.active:
        import torch.distributed as dist

        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[rank.local_rank])
        else:
            dist.barrier()


def shard(costs: Sequence[float], world_size: int) -> List[int]:
    """The rank of each unit: longest-processing-time first (largest cost to the least-loaded rank; ties
    to the earlier unit and the lower rank), so every rank computes the same assignment."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    owner = [0] * len(costs)
    loads = [(0.0, r) for r in range(world_size)]
    heapq.heapify(loads)
    for i in sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i)):
        load, r = heapq.heappop(loads)
        owner[i] = r
        heapq.heappush(loads, (load + float(costs[i]), r))
    return owner


def rank_store_path(store_path, rank: int) -> Path:
    """``STORE.rank<R>.sqlite`` beside the store ``STORE.sqlite``."""
    p = Path(store_path)
    return p.with_name(f"{p.stem}.rank{rank}{p.suffix or '.sqlite'}")


def rank_store_paths(store_path) -> List[Path]:
    """Every rank file beside the store (of this or an earlier, interrupted run)."""
    p = Path(store_path)
    return sorted(p.parent.glob(f"{p.stem}.rank*{p.suffix or '.sqlite'}"))


def merge_rank_stores(store) -> int:
    """Merge every rank file beside ``store`` (a ``ResultStore``) into it and delete them; returns the
    number of rows merged."""
    total = 0
    for path in rank_store_paths(store.path):
        total += store.merge_from(path)
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)
    return total
