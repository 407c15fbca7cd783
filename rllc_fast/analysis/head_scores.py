"""Behavioural head scores from attention patterns (TransformerLens models), as used to label head types
(Olsson et al. 2022). Every score is a mean attention probability, in [0, 1], per ``[layer, head]``.

- previous-token score: mean attention from position i to i-1 (i >= 1) on given contexts;
- current-token score: mean attention from position i to itself;
- induction score: on sequences ``[R, R]`` of repeated random tokens (R of length L), mean attention
  from position i of the second copy to position i - L + 1 (the token after the earlier occurrence
  of the current token);
- prefix-matching score: the same idea on any contexts: the attention from position i to every
  earlier position j whose preceding token ``tokens[j-1]`` equals ``tokens[i]``, summed, averaged over
  the positions i that have such a j (on ``[R, R]`` with distinct tokens it equals the induction score).

``classify_heads`` turns the scores into labels; in-context-learning scores (ICL) live in ``icl``.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch
from ..components import head_name

#: Head labels of ``classify_heads``, in the order they are tried.
HEAD_TYPES = ("induction", "previous-token", "current-token", "multigram")


def scores_by_head(matrix) -> Dict[str, float]:
    """``{"l:h": score}`` (layer, then head order) from a ``[layers][heads]`` score matrix (nested lists or a
    tensor)."""
    rows = matrix.tolist() if hasattr(matrix, "tolist") else matrix
    return {head_name(l, h): float(v) for l, row in enumerate(rows) for h, v in enumerate(row)}


def attention_patterns(model, tokens: torch.Tensor) -> torch.Tensor:
    """``[layers, N, heads, T, T]`` attention probabilities of a TransformerLens model on ``tokens [N, T]``."""
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    return torch.stack([cache[n] for n in names])


def previous_token_scores(model, tokens: torch.Tensor) -> torch.Tensor:
    """``[layers, heads]`` mean attention to the previous position, over ``tokens [N, T]``."""
    pattern = attention_patterns(model, tokens)
    return pattern.diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=(1, 3))


def current_token_scores(model, tokens: torch.Tensor) -> torch.Tensor:
    """``[layers, heads]`` mean attention of each position to itself, over ``tokens [N, T]``."""
    pattern = attention_patterns(model, tokens)
    return pattern.diagonal(offset=0, dim1=-2, dim2=-1).mean(dim=(1, 3))


def prefix_matching_scores(model, tokens: torch.Tensor) -> torch.Tensor:
    """``[layers, heads]`` prefix-matching scores on ``tokens [N, T]`` (see the module doc); 0 where no
    position has an earlier occurrence of its token."""
    pattern = attention_patterns(model, tokens)  # [L, N, H, T(query), T(key)]
    T = tokens.shape[1]
    # target[n, i, j]: key j (1 <= j <= i) follows an earlier copy of the query's token
    same = tokens[:, :, None] == tokens[:, None, :]  # [N, i, j-1]
    target = torch.zeros(tokens.shape[0], T, T, dtype=torch.bool)
    target[:, :, 1:] = same[:, :, :-1]
    target &= torch.ones(T, T, dtype=torch.bool).tril()
    has = target.any(-1)  # [N, T] query positions that can prefix-match
    if not has.any():
        return torch.zeros(pattern.shape[0], pattern.shape[2])
    mass = (pattern * target[None, :, None].to(pattern.dtype)).sum(-1)  # [L, N, H, T]
    keep = has[None, :, None].to(pattern.dtype)
    return (mass * keep).sum(dim=(1, 3)) / keep.sum(dim=(1, 3))


def repeated_random_tokens(num: int, length: int, vocab: int, seed: int = 0, low: int = 0) -> torch.Tensor:
    """``[num, 2*length]``: random ids in ``[low, vocab)`` repeated once."""
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(low, vocab, (num, length), generator=g)
    return torch.cat([first, first], dim=1)


def induction_scores(model, length: int = 24, num: int = 32, seed: int = 0, low: int = 0,
                     vocab: Optional[int] = None) -> torch.Tensor:
    """``[layers, heads]`` induction scores on ``num`` repeated random sequences of ``length`` tokens
    (ids in ``[low, vocab)``; default the whole vocabulary)."""
    vocab = model.cfg.d_vocab if vocab is None else vocab
    if 2 * length > model.cfg.n_ctx:
        raise ValueError(f"length {length}: the repeated sequence (2*length) exceeds the model's n_ctx {model.cfg.n_ctx}")
    pattern = attention_patterns(model, repeated_random_tokens(num, length, vocab, seed, low))
    return pattern.diagonal(offset=-(length - 1), dim1=-2, dim2=-1)[..., 1:].mean(dim=(1, 3))


def repeated_token_losses(model, length: int = 24, num: int = 32, seed: int = 0, low: int = 0,
                          vocab: Optional[int] = None) -> tuple:
    """``(first, repeat)``: mean next-token loss (nats) on the first copy and on the second copy of ``num``
    repeated random sequences ``[R, R]`` (R of ``length`` ids in ``[low, vocab)``). The first copy is
    unpredictable (about ln(vocab - low)); a much lower ``repeat`` loss is in-context learning (induction)."""
    vocab = model.cfg.d_vocab if vocab is None else vocab
    if 2 * length > model.cfg.n_ctx:
        raise ValueError(f"length {length}: the repeated sequence (2*length) exceeds the model's n_ctx {model.cfg.n_ctx}")
    tokens = repeated_random_tokens(num, length, vocab, seed, low)
    with torch.no_grad():
        logp = model(tokens).log_softmax(-1)[:, :-1]
    nll = -logp.gather(-1, tokens[:, 1:, None])[..., 0]  # [num, 2L-1]: loss of predicting token t+1
    # predictions of tokens 1..L-1 (first copy) and L+1..2L-1 (second copy, after its first token)
    return nll[:, : length - 1].mean().item(), nll[:, length:].mean().item()


def score_heads(model, tokens: torch.Tensor, length: int = 24, num: int = 32, seed: int = 0, low: int = 0,
                vocab: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Every attention score of the module doc as ``{"previous_token", "current_token", "induction",
    "prefix_matching": [layers, heads]}``: the first two on ``tokens [N, T]`` (data from the distribution
    of interest), the last two on ``num`` repeated random sequences of ``length`` ids in ``[low, vocab)``."""
    vocab = model.cfg.d_vocab if vocab is None else vocab
    repeated = repeated_random_tokens(num, length, vocab, seed, low)
    return {
        "previous_token": previous_token_scores(model, tokens),
        "current_token": current_token_scores(model, tokens),
        "induction": induction_scores(model, length, num, seed, low, vocab),
        "prefix_matching": prefix_matching_scores(model, repeated),
    }


def classify_heads(scores: Mapping[str, torch.Tensor], previous_token: float = 0.5, induction: float = 0.3,
                   current_token: float = 0.5) -> Dict[str, str]:
    """``{"l:h": label}`` from ``score_heads``-style ``scores`` (``[layers, heads]`` each; needs
    ``previous_token``, ``induction``; ``current_token`` optional), tried in the order of ``HEAD_TYPES``:

    - ``induction``: induction score >= ``induction`` in a layer after the first (a layer-0 head cannot
      compose with an earlier head, so it cannot induct);
    - ``previous-token``: previous-token score >= ``previous_token``;
    - ``current-token``: current-token score >= ``current_token``;
    - ``multigram``: every other head (the paper's default type)."""
    for name, value in (("previous_token", previous_token), ("induction", induction), ("current_token", current_token)):
        if not 0 <= value <= 1:
            raise ValueError(f"classify_heads: threshold {name}={value} must be in [0, 1] (scores are attention)")
    missing = [k for k in ("previous_token", "induction") if k not in scores]
    if missing:
        raise ValueError(f"classify_heads: scores lack {missing}; compute them with score_heads(model, tokens)")
    prev = torch.as_tensor(scores["previous_token"])
    ind = torch.as_tensor(scores["induction"])
    cur = torch.as_tensor(scores["current_token"]) if "current_token" in scores else torch.zeros_like(prev)
    if not (prev.shape == ind.shape == cur.shape) or prev.dim() != 2:
        raise ValueError(f"classify_heads: scores must all be [layers, heads]; got {prev.shape}, {ind.shape}, {cur.shape}")
    labels = {}
    for l in range(prev.shape[0]):
        for h in range(prev.shape[1]):
            if l > 0 and ind[l, h] >= induction:
                label = "induction"
            elif prev[l, h] >= previous_token:
                label = "previous-token"
            elif cur[l, h] >= current_token:
                label = "current-token"
            else:
                label = "multigram"
            labels[head_name(l, h)] = label
    return labels
