"""The benchmarks' models: the paper's 2-layer attention-only shape, full or reduced, briefly trained."""
import functools

import torch

import rllc_fast as r
from rllc_fast.data.stdlib_bytes import stdlib_byte_tokens
from rllc_fast.models.train import train_next_token

# The paper's architecture (2 layers, 8 heads, attention-only, LayerNorm, shortformer positions)
# shrunk so that devinterp's head-by-head sweep finishes in minutes on 2 CPU cores.
REDUCED = dict(d_model=64, n_heads=8, d_head=8, n_ctx=32, d_vocab=256)
# Issue 19's small case: few replicas (2 layers x 4 heads), longer contexts; where per-step overhead shows.
SMALL = dict(d_model=64, n_heads=4, d_head=16, n_ctx=64, d_vocab=256)
FULL = dict(n_ctx=256)  # the paper's model (d_model 256, 5k vocabulary), contexts cut to 256 tokens


def _trained(shape: dict, train_steps: int):
    """(model, held-out byte tokens [512, n_ctx]) of an attention-only ``shape``, trained on stdlib source bytes."""
    torch.manual_seed(0)
    model = r.models.attn_only(seed=0, **shape)
    train_next_token(model, stdlib_byte_tokens(2048, shape["n_ctx"], seed=0), train_steps, seed=0)
    return model, stdlib_byte_tokens(512, shape["n_ctx"], seed=1)


@functools.lru_cache(maxsize=None)
def trained_reduced(train_steps: int = 200):
    """(model, held-out byte tokens [512, 32]) of the reduced shape, trained on stdlib source bytes."""
    return _trained(REDUCED, train_steps)


@functools.lru_cache(maxsize=None)
def trained_small(train_steps: int = 200):
    """(model, held-out byte tokens [512, 64]) of the ``SMALL`` shape, trained like ``trained_reduced``."""
    return _trained(SMALL, train_steps)


@functools.lru_cache(maxsize=None)
def full_size():
    """(model, tokens [64, 256]) of the paper's full shape, random weights (timing only)."""
    model = r.models.attn_only(seed=0, **FULL)
    return model, torch.randint(0, 5000, (64, 256), generator=torch.Generator().manual_seed(0))
