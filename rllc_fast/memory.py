"""Memory budgets for the batched engine: parsing ``max_memory`` and the automatic default."""
from __future__ import annotations

import re
from typing import Optional, Union

import torch

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: Union[int, float, str], name: str = "max_memory") -> int:
    """``4e9``, ``"4GB"``, ``"512 MiB"`` -> bytes (int > 0)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number of bytes or a string like '4GB', got {value!r}")
    if isinstance(value, (int, float)):
        nbytes = int(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{name}: cannot read {value!r}; write e.g. '4GB', '512MiB' or a number of bytes")
        nbytes = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    else:
        raise TypeError(f"{name} must be a number of bytes or a string like '4GB', got {type(value).__name__}")
    if nbytes <= 0:
        raise ValueError(f"{name} must be > 0 bytes (got {value!r})")
    return nbytes


def available_bytes(device: torch.device) -> Optional[int]:
    """Free memory on ``device`` now: CUDA free memory, or the OS's MemAvailable for the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def default_budget(device: torch.device) -> int:
    """The automatic ``max_memory``: 60% of free GPU memory; on CPU 30% of available RAM, at most 4 GiB
    (larger replica chunks do not run faster on a CPU, they only hold more memory)."""
    free = available_bytes(device)
    if device.type == "cuda":
        return int(0.6 * free)
    return int(min(4 * 2**30, 0.3 * free)) if free else 2 * 2**30
