"""Behavioural head scores from attention patterns (TransformerLens models), as used to label head types.

- previous-token score: mean attention from position i to i-1 (i >= 1) on given contexts;
- induction score: on sequences ``[R, R]`` of repeated random tokens (R of length L), mean attention
  from position i of the second copy to position i - L + 1 (the token after the earlier occurrence
  of the current token). Both lie in [0, 1]; a score >= 0.3-0.5 marks the head type.
"""
from __future__ import annotations

from typing import Optional

import torch


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
