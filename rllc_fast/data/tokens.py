"""Token datasets ``[N, T]`` from files and corpora.

Files: ``.npy`` (an integer array), ``.pt`` (an integer tensor), ``.bin``/``.u16`` (a raw ``uint16``
stream, as nanoGPT and the Pile write them), or text (``.txt``/``.py``/``.md``/... with a tokenizer).
A 1-D stream is cut into ``num_contexts`` windows of ``context_length`` tokens at seeded offsets; a
2-D array's rows are cut to ``context_length``. Built-in corpora (``stdlib_code``, ``stdlib_prose``)
are encoded with the tokenizer, or as UTF-8 bytes (ids 0..255) when no tokenizer is given.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .corpora import CORPORA
from .tokenizer import encode_stream

TEXT_SUFFIXES = (".txt", ".py", ".md", ".rst", ".json", ".jsonl", ".c", ".h", ".js")


def windows(stream: torch.Tensor, context_length: int, num_contexts: Optional[int] = None, seed: int = 0,
            what: str = "data") -> torch.Tensor:
    """``[num_contexts, context_length]`` windows of a 1-D stream at seeded random offsets
    (``num_contexts=None``: consecutive non-overlapping windows covering the stream)."""
    stream = stream.reshape(-1).long()
    if stream.numel() < context_length:
        raise ValueError(f"{what}: {stream.numel()} tokens, fewer than one context of {context_length}")
    if num_contexts is None:
        n = stream.numel() // context_length
        return stream[: n * context_length].reshape(n, context_length)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - context_length + 1, (num_contexts,), generator=g)
    return torch.stack([stream[s : s + context_length] for s in starts.tolist()])


def load_tokens(path: str | os.PathLike, context_length: int, num_contexts: Optional[int] = None,
                tokenizer=None, seed: int = 0) -> torch.Tensor:
    """An int64 token tensor ``[N, context_length]`` from a token or text file (see the module doc)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        array = torch.from_numpy(np.load(path, allow_pickle=False))
    elif suffix == ".pt":
        array = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(array, torch.Tensor):
            raise ValueError(f"{path}: holds a {type(array).__name__}, not a token tensor")
    elif suffix in (".bin", ".u16"):
        array = torch.from_numpy(np.fromfile(path, dtype=np.uint16).astype(np.int64))
    elif suffix in TEXT_SUFFIXES:
        if tokenizer is None:
            raise ValueError(f"{path}: a text file needs a tokenizer (argument: tokenizer, a tokenizers JSON file)")
        array = encode_stream(tokenizer, [path.read_text(encoding="utf-8", errors="replace")])
    else:
        raise ValueError(f"{path}: unknown data format {suffix!r}; use .npy, .pt, .bin/.u16 (uint16) or a text file")
    if array.dtype.is_floating_point or array.dtype == torch.bool:
        raise ValueError(f"{path}: token ids must be integers, found {array.dtype}")
    if array.numel() and int(array.min()) < 0:
        raise ValueError(f"{path}: negative token id {int(array.min())}")
    if array.dim() == 2:
        if array.shape[1] < context_length:
            raise ValueError(f"{path}: rows have {array.shape[1]} tokens, fewer than context_length {context_length}")
        rows = array[:, :context_length].long()
        if num_contexts is not None:
            g = torch.Generator().manual_seed(seed)
            rows = rows[torch.randperm(rows.shape[0], generator=g)[:num_contexts]]
        return rows
    if array.dim() != 1:
        raise ValueError(f"{path}: expected a 1-D token stream or 2-D [N, T] array, got shape {tuple(array.shape)}")
    return windows(array, context_length, num_contexts, seed, what=str(path))


def corpus_tokens(name: str, context_length: int, num_contexts: int, tokenizer=None, seed: int = 0,
                  max_bytes: int = 4_000_000) -> torch.Tensor:
    """``[num_contexts, context_length]`` windows of a built-in corpus (``stdlib_code``/``stdlib_prose``),
    reading at most ``max_bytes`` of it."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; built-in corpora are {sorted(CORPORA)}")
    texts = CORPORA[name](max_bytes=max_bytes)
    if tokenizer is None:
        stream = torch.frombuffer(bytearray("\n".join(texts).encode("utf-8")), dtype=torch.uint8).long()
    else:
        stream = encode_stream(tokenizer, texts)
    return windows(stream, context_length, num_contexts, seed, what=name)


SYNTHETIC_PREFIX = "synthetic:"


def data_from_spec(spec: str, context_length: int, num_contexts: Optional[int], tokenizer=None, seed: int = 0) -> torch.Tensor:
    """A built-in corpus name, ``synthetic:SOURCE`` (a source of the demo's synthetic distribution, or
    ``synthetic:mixture``), or a file path (the command line's ``--data``) as tokens ``[N, T]``."""
    if spec.startswith(SYNTHETIC_PREFIX):
        from .synthetic import SOURCES, synthetic_mixture, synthetic_source

        name = spec[len(SYNTHETIC_PREFIX):]
        if name not in (*SOURCES, "mixture"):
            raise ValueError(f"--data {spec!r}: choose synthetic:NAME with NAME in {[*SOURCES, 'mixture']}")
        n = num_contexts or 256
        if name == "mixture":
            return synthetic_mixture(n, context_length, seed=seed)
        return synthetic_source(name, n, context_length, seed=seed)
    if spec in CORPORA:
        return corpus_tokens(spec, context_length, num_contexts or 256, tokenizer, seed)
    if not os.path.exists(spec):
        raise FileNotFoundError(f"--data {spec!r} is neither a built-in corpus {sorted(CORPORA)}, synthetic:NAME, "
                                "nor an existing file")
    return load_tokens(spec, context_length, num_contexts, tokenizer, seed)
