"""Building TransformerLens models without touching global random state.

``HookedTransformerConfig(seed=s)`` calls ``torch.manual_seed(s)``, ``np.random.seed(s)`` and
``random.seed(s)`` (which also reseeds every CUDA generator), and ``HookedTransformer`` reseeds torch again
before drawing its initial weights; a model without a seed draws them from torch's global generator. So
building a model used to reset (or advance) the caller's random state: data drawn after two builds was
drawn twice from the same seed. Here the seed is kept out of TransformerLens's hands: the weights are drawn
from torch's CPU generator seeded with ``cfg.seed`` inside ``isolated_random_state``, which puts every
global generator back as it was, and the seed is recorded on the model's config afterwards. The weights
equal TransformerLens's own seeded ones (they are initialised on the CPU, then moved).
"""
from __future__ import annotations

import contextlib
import copy
import random
import warnings
from typing import Iterator, Optional

import numpy as np
import torch


@contextlib.contextmanager
def isolated_random_state(device: Optional[str | torch.device] = None) -> Iterator[None]:
    """Inside, draw from (or reseed) torch's CPU generator, numpy's and Python's global RNGs and, when
    ``device`` is a CUDA device, its generator; on exit each is restored to its state on entry."""
    device = torch.device(device) if device is not None else None
    cuda = []
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        cuda = [device.index if device.index is not None else torch.cuda.current_device()]
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def hooked_config(**fields):
    """``HookedTransformerConfig(**fields)`` without its global reseeding: a ``seed`` field is recorded on
    the config (``hooked_transformer`` then draws the weights from it) but seeds nothing global."""
    from transformer_lens import HookedTransformerConfig

    seed = fields.pop("seed", None)
    cfg = HookedTransformerConfig(**fields, seed=None)
    cfg.seed = seed
    return cfg


def hooked_transformer(cfg):
    """A ``HookedTransformer`` of ``cfg`` (a ``HookedTransformerConfig``), TransformerLens's warnings
    silenced, whose initial weights depend only on ``cfg.seed`` (``None``: on torch's global generator,
    which is restored afterwards; use it when the weights are to be loaded). Global random state is
    left as it was; ``cfg`` itself is not changed (the model gets a copy)."""
    from transformer_lens import HookedTransformer

    seed = cfg.seed
    unseeded = copy.copy(cfg)
    unseeded.seed = None
    with isolated_random_state(cfg.device), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*")
        if seed is not None:
            torch.default_generator.manual_seed(seed)
        model = HookedTransformer(unseeded)
    model.cfg.seed = seed
    return model


def move_to(module: torch.nn.Module, device) -> None:
    """Move ``module`` to ``device`` unless it is there already (``"cuda"`` matches any CUDA device, so a model on
    ``cuda:0`` is not moved for it), quietly for TransformerLens models, which print when moved."""
    device = torch.device(device)
    here = next(module.parameters(), None)
    if here is None or (here.device.type == device.type and device.index in (None, here.device.index)):
        return
    try:
        module.to(device, print_details=False)
    except TypeError:
        module.to(device)
