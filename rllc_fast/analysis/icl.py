"""In-context-learning (ICL) scores (Olsson et al. 2022; paper Figure 10).

The ICL score is the mean loss at a late token minus the mean loss at an early token of each context
(nats; negative when later tokens are predicted better because of the context). Olsson et al. use
tokens 500 and 50 of 1024-token contexts; ``icl_positions`` scales those to a context length.
``per_head_icl_scores`` repeats it with each head ablated in turn (Figure 10: the ICL score with the
*other* induction head mean-ablated dates each head's formation).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .ablation import ablation_hooks, clean_z, head_names, parse_heads, per_token_loss
from ..components import head_name


def icl_positions(context_length: int) -> Tuple[int, int]:
    """``(early, late)`` token indices: 50 and 500 scaled from 1024 to ``context_length`` (at least 1 and
    2 apart from the ends)."""
    if context_length < 4:
        raise ValueError(f"the ICL score needs contexts of at least 4 tokens, got {context_length}")
    early = max(1, round(50 * context_length / 1024))
    late = min(context_length - 1, max(early + 1, round(500 * context_length / 1024)))
    return early, late


def icl_score(model, tokens: torch.Tensor, early: Optional[int] = None, late: Optional[int] = None,
              ablate=None, kind: str = "mean", z=None) -> float:
    """Mean loss of token ``late`` minus mean loss of token ``early`` over ``tokens [N, T]`` (defaults:
    ``icl_positions(T)``), optionally with the heads ``ablate`` ablated (``kind``, see ``ablation``; ``z``:
    the data's ``clean_z`` when already computed)."""
    T = tokens.shape[1]
    d_early, d_late = icl_positions(T)
    early = d_early if early is None else early
    late = d_late if late is None else late
    if not 1 <= early < late <= T - 1:
        raise ValueError(f"ICL positions need 1 <= early < late <= T-1 = {T - 1}; got early={early}, late={late}")
    hooks = ablation_hooks(model, tokens, ablate, kind, z) if ablate else ()
    loss = per_token_loss(model, tokens, hooks)  # column t predicts token t+1
    return (loss[:, late - 1].mean() - loss[:, early - 1].mean()).item()


def per_head_icl_scores(model, tokens: torch.Tensor, heads=None, kind: str = "mean", **positions) -> Dict[str, float]:
    """``{"l:h": ICL score with that head ablated}`` for ``heads`` (default all), plus ``"none"``: the clean
    ICL score. ``positions``: ``early``/``late`` as in ``icl_score``."""
    heads = parse_heads(model, heads if heads is not None else head_names(model))
    out = {"none": icl_score(model, tokens, **positions)}
    z = clean_z(model, tokens) if kind != "zero" else None
    for l, h in heads:
        out[head_name(l, h)] = icl_score(model, tokens, ablate=[(l, h)], kind=kind, z=z, **positions)
    return out
