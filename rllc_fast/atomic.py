"""Atomic file writes: write a temporary file in the target's folder, then rename it over the target, so a
reader (or a resumed run) never sees a half-written file."""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Callable


def write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path`` (folders created); return ``path``. The file gets
    the permissions a plain ``open()`` would give it (0666 less the umask): the temporary file is created with
    ``os.open(..., 0o666)``, so the umask applies without being read or changed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_arrays_atomically(path: str | os.PathLike, arrays) -> Path:
    """One array as ``.npy`` (``np.save``), or ``{name: array}`` as ``.npz`` (``np.savez``), at ``path``,
    atomically (the name is kept as given: numpy adds no suffix to an open file)."""
    import numpy as np

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            if isinstance(arrays, dict):
                np.savez(f, **arrays)
            else:
                np.save(f, arrays)

    return write_atomically(path, write)


def write_json_atomically(path: str | os.PathLike, payload, indent=None) -> Path:
    """``payload`` as JSON at ``path``, atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=indent)

    return write_atomically(path, write)
