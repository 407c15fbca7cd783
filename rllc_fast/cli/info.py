"""``rllc info``: the ops backend, the device and the versions of the libraries rllc_fast runs on."""
from __future__ import annotations

from importlib import metadata

import torch


def add_parser(sub) -> None:
    info = sub.add_parser("info", help="backend, device and library versions", description="Print the ops backend, device and versions.")
    info.set_defaults(func=run)


def run(args) -> int:
    """``rllc info``: see the module doc."""
    import numpy

    from .. import __version__, ops

    print(f"rllc_fast {__version__}")
    print(f"ops backend: {ops.backend()}")
    print(f"torch {torch.__version__} (CUDA build: {torch.version.cuda}), CUDA available: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()}")
    print(f"transformer_lens {_version('transformer_lens')}, transformers {_version('transformers')}, "
          f"numpy {numpy.__version__}")
    print(f"CPU threads: {torch.get_num_threads()}")
    return 0


def _version(distribution: str) -> str:
    """The installed version of ``distribution`` (from its package metadata)."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"
