"""Q-, K- and V-composition scores between attention heads (Elhage et al. 2021; paper eq. 12, Figure 7).

For an earlier head h1 and a later head h2, with TransformerLens' row-vector weights
(``W_Q, W_K, W_V: [d_model, d_head]``, ``W_O: [d_head, d_model]``), ``W_OV = W_V W_O`` and
``W_QK = W_Q W_K^T`` (both ``[d_model, d_model]``, acting as ``x W``):

    score = ||W_OV(h1) M||_F / (||W_OV(h1)||_F ||M||_F),
    M = W_QK(h2) (Q), W_QK(h2)^T (K), W_OV(h2) (V),

i.e. how much of what h1 writes the query, key or value side of h2 reads. Every norm is computed in
factored form from ``[d_head, d_head]`` Gram matrices (never a ``[d_model, d_model]`` product), for all
head pairs of all checkpoint at once; ``dense_composition_score`` is the plain definition the tests
compare against.
"""
from __future__ import annotations

import itertools
from typing import Dict, Iterable

import torch
from ..components import parse_head_name

KINDS = ("Q", "K", "V")


def _weights(model):
    """``W_Q, W_K, W_V [L, H, d_model, d_head]``, ``W_O [L, H, d_head, d_model]`` (float64, detached)."""
    return tuple(getattr(model, name).detach().double() for name in ("W_Q", "W_K", "W_V", "W_O"))


def _gram(a: torch.Tensor) -> torch.Tensor:
    return a.transpose(-1, -2) @ a


def _factored_norm2(left_gram, middle, right_gram) -> torch.Tensor:
    """``||A B C||_F^2`` from ``A^T A`` (``left_gram``), ``B`` (``middle``) and ``C C^T`` (``right_gram``):
    ``tr(A^T A B C C^T B^T)``; broadcasting over leading dims."""
    return ((left_gram @ middle @ right_gram) * middle).sum((-1, -2))


def composition_scores(model) -> Dict[str, torch.Tensor]:
    """``{"Q"|"K"|"V": [L, H, L, H]}``: entry ``[l1, h1, l2, h2]`` is the composition score of earlier head
    ``l1:h1`` into later head ``l2:h2``; NaN where ``l1 >= l2`` (no composition possible)."""
    W_Q, W_K, W_V, W_O = _weights(model)
    L, H = W_Q.shape[:2]
    # W_OV(h1) = V1 O1: ||.||_F^2 = tr(V1^T V1 O1 O1^T)
    gV, gO_rows = _gram(W_V), W_O @ W_O.transpose(-1, -2)  # [L, H, dh, dh]
    ov_norm2 = (gV * gO_rows).sum((-1, -2))  # tr(A B) for symmetric A, B
    qk_norm2 = (_gram(W_Q) * _gram(W_K)).sum((-1, -2))
    # one side of M as (first factor F2 [d_model, dh], second factor S2 [dh, d_model]): M = F2 S2
    sides = {"Q": (W_Q, W_K.transpose(-1, -2)), "K": (W_K, W_Q.transpose(-1, -2)), "V": (W_V, W_O)}
    norms2 = {"Q": qk_norm2, "K": qk_norm2, "V": ov_norm2}
    out = {}
    for kind, (first, second) in sides.items():
        # ||V1 O1 F2 S2||^2 = tr(V1^T V1 (O1 F2) S2 S2^T (O1 F2)^T)
        middle = torch.einsum("aipd,bjde->aibjpe", W_O, first)  # [L, H, L, H, dh, dh]: O1 F2
        right = second @ second.transpose(-1, -2)  # [L, H, dh, dh]: S2 S2^T
        num2 = _factored_norm2(gV[:, :, None, None], middle, right[None, None])
        score = num2.clamp_min(0).sqrt() / (ov_norm2[:, :, None, None] * norms2[kind][None, None]).sqrt()
        mask = torch.arange(L)[:, None] >= torch.arange(L)[None, :]  # [l1, l2]
        score[mask[:, None, :, None].expand(L, H, L, H)] = float("nan")
        out[kind] = score.float()
    return out


def dense_composition_score(model, kind: str, earlier: str, later: str) -> float:
    """Eq. 12 for one pair of heads (``"l:h"`` names), from the dense ``[d_model, d_model]`` matrices."""
    if kind not in KINDS:
        raise ValueError(f"composition kind {kind!r}: choose from {KINDS}")
    W_Q, W_K, W_V, W_O = _weights(model)
    (l1, h1), (l2, h2) = (parse_head_name(name) for name in (earlier, later))
    ov1 = W_V[l1, h1] @ W_O[l1, h1]
    qk2 = W_Q[l2, h2] @ W_K[l2, h2].T
    M = {"Q": qk2, "K": qk2.T, "V": W_V[l2, h2] @ W_O[l2, h2]}[kind]
    return (torch.linalg.norm(ov1 @ M) / (torch.linalg.norm(ov1) * torch.linalg.norm(M))).item()


def composition_rows(model, step: int = 0) -> Iterable[dict]:
    """Long-format rows ``{"step", "kind", "earlier", "later", "score"}`` for every composing pair."""
    scores = composition_scores(model)
    L, H = scores["Q"].shape[:2]
    pairs = [(l1, h1, l2, h2) for l1, h1, l2, h2 in itertools.product(range(L), range(H), range(L), range(H)) if l1 < l2]
    for kind, s in scores.items():
        for l1, h1, l2, h2 in pairs:
            yield {"step": step, "kind": kind, "earlier": f"{l1}:{h1}", "later": f"{l2}:{h2}",
                   "score": float(s[l1, h1, l2, h2])}
