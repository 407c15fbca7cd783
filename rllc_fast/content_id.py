"""Content ids of checkpoints: what a result store knows a checkpoint by (never its file name alone).

A checkpoint's id is the sha256 (64 hex digits) of its content: of the file for a ``*.pt``/``*.pth``
checkpoint; for a Hugging Face directory, of its ``config.json`` and weight files (``model*.safetensors``,
``pytorch_model*.bin`` and their ``*.index.json``), each with its name and size. Two copies of one file
get one id wherever they lie; two different files with one name get two.

Hashing a large checkpoint takes seconds, so ids are cached by a *signature* of the hashed files (name,
size in bytes, mtime in ns per file) under the checkpoint's absolute path; the cache is a table of the
result store (``ResultStore.cached_checkpoint_ids`` / ``remember_checkpoint_ids``), so a rerun of a sweep
does not re-hash unchanged files. A file rewritten in place gets a new mtime, so it is hashed again.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import torch

_CHUNK = 1 << 20  # bytes read per hash update
_HF_FILES = re.compile(r"^(config\.json|(model|pytorch_model)(-[^/]*)?\.(safetensors|bin)(\.index\.json)?)$")


def hashed_files(path: str | os.PathLike) -> List[Path]:
    """The files whose bytes make a checkpoint's id: the file itself, or a Hugging Face directory's
    ``config.json`` and weight files (sorted by name)."""
    path = Path(path)
    if path.is_dir():
        return sorted((f for f in path.iterdir() if f.is_file() and _HF_FILES.match(f.name)), key=lambda f: f.name)
    return [path]


def signature(path: str | os.PathLike) -> str:
    """``[[name, size, mtime_ns], ...]`` of the hashed files as JSON: equal signatures at one path mean the
    cached id still holds. Raises ``OSError`` when a file cannot be read."""
    entries = []
    for f in hashed_files(path):
        st = f.stat()
        entries.append([f.name, st.st_size, st.st_mtime_ns])
    return json.dumps(entries)


def _sha256_files(path: Path) -> str:
    """The sha256 hex digest of the checkpoint at ``path`` (see the module docstring)."""
    files = hashed_files(path)
    if len(files) == 1 and files[0] == path:
        return _sha256_file(path).hexdigest()
    h = hashlib.sha256(b"rllc_fast hf-directory\0")
    for f in files:
        h.update(f"{f.name}\0{f.stat().st_size}\0{_sha256_file(f).hexdigest()}\0".encode())
    return h.hexdigest()


def _sha256_file(path: Path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                return h
            h.update(block)


def checkpoint_ids(paths: Iterable[str | os.PathLike], store=None) -> Tuple[Dict[str, str], Dict[str, str]]:
    """``(ids, errors)``: the content id of each checkpoint path (keys: absolute paths as strings), and for
    each path that cannot be read the error text instead (it is then missing from ``ids``).

    ``store``: a ``ResultStore`` whose cache answers for paths with an unchanged signature and learns the
    newly hashed ones (written with the store's next write, never creating it); None: hash every path."""
    wanted = {}
    errors: Dict[str, str] = {}
    for p in paths:
        key = str(Path(p).absolute())
        try:
            wanted[key] = signature(key)
        except OSError as err:
            errors[key] = f"{key}: cannot read the checkpoint to hash it: {err}"
    cached = store.cached_checkpoint_ids(list(wanted)) if store is not None else {}
    ids: Dict[str, str] = {}
    learned: Dict[str, Tuple[str, str]] = {}
    for key, sig in wanted.items():
        hit: Optional[Tuple[str, str]] = cached.get(key)
        if hit is not None and hit[0] == sig:
            ids[key] = hit[1]
            continue
        try:
            ids[key] = _sha256_files(Path(key))
        except OSError as err:
            errors[key] = f"{key}: cannot read the checkpoint to hash it: {err}"
            continue
        if _unchanged(key, sig):  # a file rewritten while it was hashed is hashed again next time
            learned[key] = (sig, ids[key])
    if store is not None and learned:
        store.remember_checkpoint_ids(learned)
    return ids, errors


def _unchanged(path: str, sig: str) -> bool:
    try:
        return signature(path) == sig
    except OSError:
        return False


def data_fingerprint(data) -> str:
    """A short hash of a data distribution's content (tokens; a ModelDistribution's contexts and reference
    weights), so a store notices when data under the same name changed (also probe sets: a changed probe
    set is other input)."""
    h = hashlib.sha256()
    h.update(type(data).__name__.encode())  # a tuple is columns (x, y), a list is batches: other data

    def add_tensor(t: torch.Tensor) -> None:
        t = t.detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")

    from .data import ModelDistribution

    if isinstance(data, ModelDistribution):
        h.update(b"model-distribution")
        for _, p in sorted(data.reference_model.state_dict().items()):
            add_tensor(p)
        data = data.contexts
    if isinstance(data, torch.Tensor):
        add_tensor(data)
    elif isinstance(data, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in data):
        for t in data:
            add_tensor(t)
    else:
        raise TypeError(f"sweep data must be token tensors or ModelDistribution, got {type(data).__name__}")
    return h.hexdigest()[:16]
