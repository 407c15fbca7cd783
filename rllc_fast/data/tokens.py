"""Token datasets ``[N, T]`` from files and corpora.

Files: ``.npy`` (an integer array), ``.pt`` (an integer tensor), ``.bin`` (a raw little-endian stream
of ``dtype`` elements: ``uint16`` by default, as nanoGPT and the Pile write them; ``int32``, ``uint32``,
``int64`` ... for vocabularies beyond 65,536), ``.u16`` (raw ``uint16``), or text (``.txt``/``.py``/
``.md``/... with a tokenizer). A raw file whose size is not a multiple of the element size is refused,
and a ``uint16``/``int32`` read whose ids look like the halves of wider values (every odd-indexed id 0)
warns. A 1-D stream is cut into ``num_contexts`` windows of ``context_length`` tokens at seeded offsets;
a 2-D array's rows are cut to ``context_length``. Built-in corpora (``stdlib_code``, ``stdlib_prose``)
are encoded with the tokenizer, or as UTF-8 bytes (ids 0..255) when no tokenizer is given.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .corpora import CORPORA
from .tokenizer import encode_stream

TEXT_SUFFIXES = (".txt", ".py", ".md", ".rst", ".json", ".jsonl", ".c", ".h", ".js")
#: Element types of raw ``.bin`` token files (the command line's ``--dtype``).
RAW_DTYPES = ("uint8", "uint16", "int16", "int32", "uint32", "int64")
#: Contexts drawn from a built-in corpus or synthetic source when ``num_contexts`` is None.
DEFAULT_NUM_CONTEXTS = 256


def check_num_contexts(num_contexts: Optional[int]) -> None:
    """``num_contexts`` must be None (all / the default) or an integer >= 1 (the command line's ``--num-contexts``)."""
    if num_contexts is None:
        return
    if isinstance(num_contexts, bool) or not isinstance(num_contexts, (int, np.integer)) or num_contexts < 1:
        raise ValueError(f"num_contexts (--num-contexts) must be an integer >= 1, got {num_contexts!r}")


def read_raw_tokens(path: str | os.PathLike, dtype: str = "uint16") -> torch.Tensor:
    """A raw little-endian token stream of ``dtype`` elements (one of ``RAW_DTYPES``) as int64 ``[n]``.

    Raises ``ValueError`` for an unknown ``dtype`` or a file whose size is not a multiple of the element
    size; warns when the ids look like the low and high halves of wider integers (a file written as
    int32 or int64 read as ``uint16``, say), naming the ``dtype`` (``--dtype``) that fits."""
    path = Path(path)
    if dtype not in RAW_DTYPES:
        raise ValueError(f"dtype (--dtype) {dtype!r} of raw token file {path}: choose one of {RAW_DTYPES}")
    itemsize = np.dtype(dtype).itemsize
    size = path.stat().st_size
    if size % itemsize:
        raise ValueError(f"{path}: {size} bytes is not a multiple of the {itemsize}-byte {dtype} tokens; "
                         f"pass the file's element type with --dtype (dtype=...), one of {RAW_DTYPES}")
    array = np.fromfile(path, dtype=np.dtype(dtype).newbyteorder("<"))
    wider = _wider_dtype_suggested(array)
    if wider is not None:
        warnings.warn(f"{path}: read as {dtype}, every id at an index not divisible by "
                      f"{np.dtype(wider).itemsize // itemsize} is 0 while the others are not: this looks like a "
                      f"file of {wider} tokens; pass --dtype {wider} (dtype={wider!r})", stacklevel=2)
    return torch.from_numpy(array.astype(np.int64))


def _wider_dtype_suggested(array: np.ndarray) -> Optional[str]:
    """The widest signed type (int32, int64) whose little-endian values ``array`` looks like the pieces of:
    at least 8 of those values, each piece but the lowest 0, the lowest pieces not all 0."""
    for wider in ("int64", "int32"):
        ratio = np.dtype(wider).itemsize // array.itemsize
        if ratio < 2 or array.size % ratio or array.size < 8 * ratio:
            continue
        pieces = array.reshape(-1, ratio)
        if not pieces[:, 1:].any() and pieces[:, 0].any():
            return wider
    return None


def windows(stream: torch.Tensor, context_length: int, num_contexts: Optional[int] = None, seed: int = 0,
            what: str = "data") -> torch.Tensor:
    """``[num_contexts, context_length]`` windows of a 1-D stream at seeded random offsets
    (``num_contexts=None``: consecutive non-overlapping windows covering the stream)."""
    check_num_contexts(num_contexts)
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
                tokenizer=None, seed: int = 0, dtype: str = "uint16") -> torch.Tensor:
    """An int64 token tensor ``[N, context_length]`` from a token or text file (see the module doc).

    ``dtype``: the element type of a raw ``.bin`` file (one of ``RAW_DTYPES``; other files say their own)."""
    check_num_contexts(num_contexts)
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
    elif suffix == ".bin":
        array = read_raw_tokens(path, dtype)
    elif suffix == ".u16":
        array = read_raw_tokens(path, "uint16")
    elif suffix in TEXT_SUFFIXES:
        if tokenizer is None:
            raise ValueError(f"{path}: a text file needs a tokenizer (argument: tokenizer, a tokenizers JSON file)")
        array = encode_stream(tokenizer, [path.read_text(encoding="utf-8", errors="replace")])
    else:
        raise ValueError(f"{path}: unknown data format {suffix!r}; use .npy, .pt, .bin (raw, --dtype), .u16 or a text file")
    if array.dtype.is_floating_point or array.dtype == torch.bool:
        raise ValueError(f"{path}: token ids must be integers, found {array.dtype}")
    if array.dtype in (torch.uint16, torch.uint32, torch.uint64):  # torch has few kernels for these: int64
        array = torch.from_numpy(array.numpy().astype(np.int64))  # (a uint64 id >= 2**63 turns negative: refused)
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


def data_from_spec(spec: str, context_length: int, num_contexts: Optional[int], tokenizer=None, seed: int = 0,
                   dtype: str = "uint16") -> torch.Tensor:
    """A built-in corpus name, ``synthetic:SOURCE`` (a source of the demo's synthetic distribution, or
    ``synthetic:mixture``), or a file path (the command line's ``--data``) as tokens ``[N, T]``.

    ``num_contexts``: None or >= 1 (None: ``DEFAULT_NUM_CONTEXTS`` of a corpus or synthetic source, every
    window of a file); ``dtype``: the element type of a raw ``.bin`` file (``--dtype``)."""
    check_num_contexts(num_contexts)
    n = DEFAULT_NUM_CONTEXTS if num_contexts is None else num_contexts
    if spec.startswith(SYNTHETIC_PREFIX):
        from .synthetic import SOURCES, synthetic_mixture, synthetic_source

        name = spec[len(SYNTHETIC_PREFIX):]
        if name not in (*SOURCES, "mixture"):
            raise ValueError(f"--data {spec!r}: choose synthetic:NAME with NAME in {[*SOURCES, 'mixture']}")
        if name == "mixture":
            return synthetic_mixture(n, context_length, seed=seed)
        return synthetic_source(name, n, context_length, seed=seed)
    if spec in CORPORA:
        return corpus_tokens(spec, context_length, n, tokenizer, seed)
    if not os.path.exists(spec):
        raise FileNotFoundError(f"--data {spec!r} is neither a built-in corpus {sorted(CORPORA)}, synthetic:NAME, "
                                "nor an existing file")
    return load_tokens(spec, context_length, num_contexts, tokenizer, seed, dtype)
