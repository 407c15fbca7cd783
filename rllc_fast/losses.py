"""Losses ``l_n(w)`` for LLC estimation, each ``loss_fn(model, batch) -> scalar tensor`` (nats).

- ``next_token_loss``: eq. (1) of the paper, mean next-token cross-entropy over the batch's
  ``N`` contexts and ``K-1`` predicted positions.
- ``kl_to_reference_loss``: eq. (11), mean over contexts and positions of
  ``KL(M(S_<=k) || f_w(S_<=k))`` for a reference model ``M``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def model_logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Logits ``[N, T, vocab]`` of a TransformerLens, Hugging Face or plain module on ``tokens [N, T]``."""
    out = model(tokens)
    logits = getattr(out, "logits", out)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != tokens.shape:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(
            f"the model's output on tokens of shape {tuple(tokens.shape)} is {shape}, not logits "
            "[N, T, vocab]; pass loss_fn(model, batch) for models that are not next-token predictors"
        )
    return logits


def check_tokens(tokens, model: nn.Module | None = None, what: str = "data") -> torch.Tensor:
    """Validate a token batch ``[N, T]``: integer dtype, T >= 2, ids within the model's vocabulary."""
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(
            f"{what}: the default next-token loss needs token tensors [N, T], got a "
            f"{type(tokens).__name__}; pass loss_fn(model, batch) for other data"
        )
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.is_complex():
        raise TypeError(
            f"{what}: tokens must be an integer tensor, got {tokens.dtype}; pass loss_fn(model, batch) "
            "for non-token data (e.g. regression)"
        )
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(
            f"{what}: tokens must have shape [N, T] with T >= 2 (got {tuple(tokens.shape)})"
        )
    cfg = getattr(model, "cfg", None)
    d_vocab = getattr(cfg, "d_vocab", None)
    n_ctx = getattr(cfg, "n_ctx", None)
    if isinstance(d_vocab, int) and tokens.numel() and (tokens.max() >= d_vocab or tokens.min() < 0):
        raise ValueError(
            f"{what}: token ids must lie in [0, {d_vocab}) for this model; found "
            f"{int(tokens.min())}..{int(tokens.max())}"
        )
    if isinstance(n_ctx, int) and tokens.shape[1] > n_ctx:
        raise ValueError(
            f"{what}: contexts have {tokens.shape[1]} tokens but the model's n_ctx is {n_ctx}; "
            "cut the contexts to at most n_ctx tokens"
        )
    return tokens


def next_token_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Eq. (1): mean cross-entropy of predicting ``tokens[:, 1:]`` from their prefixes (nats)."""
    logits = model_logits(model, tokens)
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1)
    )


def kl_from_logits(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over contexts and the first ``T-1`` positions of ``KL(softmax(ref) || softmax(logits))``."""
    ref_logp = F.log_softmax(ref_logits[:, :-1].float(), dim=-1)
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    return kl.mean()


def kl_to_reference_loss(reference: nn.Module):
    """Eq. (11) as a ``loss_fn``: KL from ``reference``'s next-token distribution to the model's."""

    def loss_fn(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            ref_logits = model_logits(reference, tokens)
        return kl_from_logits(ref_logits, model_logits(model, tokens))

    return loss_fn
