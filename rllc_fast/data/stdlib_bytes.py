"""A built-in offline corpus: the Python standard library's own source, as byte tokens (vocab 256)."""
from __future__ import annotations

import sysconfig
from pathlib import Path

import torch


def stdlib_byte_tokens(num_contexts: int, context_length: int, seed: int = 0, max_files: int = 400) -> torch.Tensor:
    """``[num_contexts, context_length]`` int64 windows of UTF-8 bytes of the stdlib's ``.py`` files.

    Files are taken in sorted order (up to ``max_files``) and windows start at seeded random offsets,
    so the result is the same on every machine with the same Python version.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))[:max_files]
    if not files:
        raise FileNotFoundError(f"no .py files under the standard library folder {root}")
    blob = b"\n".join(p.read_bytes() for p in files)
    data = torch.frombuffer(bytearray(blob), dtype=torch.uint8).long()
    if data.numel() <= context_length:
        raise ValueError(f"the corpus ({data.numel()} bytes) is shorter than context_length {context_length}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - context_length, (num_contexts,), generator=g)
    return torch.stack([data[s : s + context_length] for s in starts.tolist()])
