"""The paper's 2-layer attention-only transformer as a TransformerLens ``HookedTransformer``."""
from __future__ import annotations

import torch

from .build import hooked_config, hooked_transformer

# Appendix F.1: 2 layers, d_model 256, 8 heads of 32, context 1024, 5k vocabulary, LayerNorm,
# learnable shortformer positions: 3,355,016 parameters, 32,864 per head.
PAPER_CONFIG = dict(
    n_layers=2,
    d_model=256,
    n_heads=8,
    d_head=32,
    n_ctx=1024,
    d_vocab=5000,
    attn_only=True,
    normalization_type="LN",
    positional_embedding_type="shortformer",
)


def attn_only(seed: int = 0, device: str | torch.device = "cpu", **overrides):
    """A randomly initialised attention-only ``HookedTransformer``; the paper's shape by default.

    Any ``HookedTransformerConfig`` field can be overridden, e.g. ``attn_only(d_model=64, n_heads=4,
    d_head=16, n_ctx=32, d_vocab=512)``. ``seed`` fixes the initial weights; global random state
    (torch, numpy, ``random``) is left as it was.
    """
    fields = {**PAPER_CONFIG, **overrides}
    if "d_head" not in overrides and "d_model" in overrides and "n_heads" in overrides:
        fields["d_head"] = overrides["d_model"] // overrides["n_heads"]
    return hooked_transformer(hooked_config(**fields, seed=seed, device=str(device)))
