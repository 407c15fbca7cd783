"""Losses ``l_n(w)`` for LLC estimation, each ``loss_fn(model, batch) -> scalar tensor`` (nats).

- ``next_token_loss``: eq. (1) of the paper, mean next-token cross-entropy over the batch's
  ``N`` contexts and ``K-1`` predicted positions.
- ``KLToReference(reference)``: eq. (11), mean over contexts and positions of
  ``KL(M(S_<=k) || f_w(S_<=k))`` for a reference model ``M``.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

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


def vocab_size(model: nn.Module):
    """The model's vocabulary size (TransformerLens ``cfg.d_vocab`` or Hugging Face ``config.vocab_size``), or None."""
    v = getattr(getattr(model, "cfg", None), "d_vocab", None)
    if not isinstance(v, int):
        v = getattr(getattr(model, "config", None), "vocab_size", None)
    return v if isinstance(v, int) else None


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
    d_vocab = vocab_size(model)
    n_ctx = getattr(cfg, "n_ctx", None)
    if tokens.numel():
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or (isinstance(d_vocab, int) and hi >= d_vocab):
            allowed = f"lie in [0, {d_vocab}) for this model" if isinstance(d_vocab, int) else "be >= 0"
            raise ValueError(f"{what}: token ids must {allowed}; found {lo}..{hi}")
    if isinstance(n_ctx, int) and tokens.shape[1] > n_ctx:
        raise ValueError(
            f"{what}: contexts have {tokens.shape[1]} tokens but the model's n_ctx is {n_ctx}; "
            "cut the contexts to at most n_ctx tokens"
        )
    return tokens


def token_losses(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Eq. (1) per replica: ``logits [R, N, T, vocab]`` of R model copies on ``tokens [N, T]`` -> ``[R]``.

    Mean cross-entropy of predicting ``tokens[:, 1:]`` from their prefixes (nats), in float32.
    """
    R, N, T, V = logits.shape
    targets = tokens[:, 1:].reshape(1, -1).expand(R, -1).reshape(-1)
    ce = F.cross_entropy(logits[:, :, :-1].reshape(-1, V).float(), targets, reduction="none")
    return ce.view(R, -1).mean(1)


def kl_losses(ref_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Eq. (11) per replica: ``ref_logp [N, T-1, vocab]`` (reference log-probs), ``logits [R, N, T, vocab]`` -> ``[R]``.

    Mean over contexts and the first ``T-1`` positions of ``KL(softmax(ref) || softmax(logits))``.
    """
    logp = F.log_softmax(logits[:, :, :-1].float(), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    return kl.flatten(1).mean(1)


@runtime_checkable
class FeatureLoss(Protocol):
    """What the structured path needs of a loss (``NextTokenLoss``, ``KLToReference``): besides
    ``loss_fn(model, batch) -> scalar``, ``prepare(tokens)`` (per-batch data shared by all replicas, e.g. the
    reference's log-probs) and ``feature_losses(x, W_U, b_U, tokens, prepared, block_bytes=None) -> [R]``,
    the replicas' losses from their final features ``x [R, N, T-1, d_model]``. A ``loss_fn`` without them takes
    the generic path."""

    def __call__(self, model: nn.Module, batch) -> torch.Tensor: ...

    def prepare(self, tokens: torch.Tensor): ...

    def feature_losses(self, x: torch.Tensor, W_U, b_U, tokens: torch.Tensor, prepared,
                       block_bytes=None) -> torch.Tensor: ...


def position_losses(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-position next-token cross-entropy (nats, float32) ``[N, T-1]`` of ``logits [N, T, vocab]`` on
    ``tokens [N, T]``: the terms whose mean is eq. (1)."""
    N, T, V = logits.shape
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), tokens[:, 1:].reshape(-1), reduction="none")
    return ce.view(N, T - 1)


class NextTokenLoss:
    """Eq. (1) as a ``loss_fn(model, tokens)``; the batched engine's structured path also calls
    ``prepare``/``feature_losses`` to score many model copies from their final features, and observables
    (``rllc_fast.observables``) call ``per_token``."""

    def __call__(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        return token_losses(model_logits(model, tokens)[None], tokens)[0]

    def per_token(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """``[N, T-1]`` next-token cross-entropy at each predicted position (nats, float32)."""
        return position_losses(model_logits(model, tokens), tokens)

    def prepare(self, tokens: torch.Tensor):
        return None

    def feature_losses(self, x: torch.Tensor, W_U, b_U, tokens: torch.Tensor, prepared,
                       block_bytes=None) -> torch.Tensor:
        """``[R]`` losses from final features ``x [R, N, T-1, d]`` with unembedding ``W_U, b_U``
        (``block_bytes``: see ``rllc_fast.engine.unembed_loss``)."""
        from .engine.unembed_loss import unembed_token_losses

        return unembed_token_losses(x, W_U, b_U, tokens, block_bytes)

    def __repr__(self) -> str:
        return "next_token_loss"


next_token_loss = NextTokenLoss()


class KLToReference:
    """Eq. (11) as a ``loss_fn(model, tokens)``: KL from ``reference``'s next-token distribution to the model's."""

    def __init__(self, reference: nn.Module):
        self.reference = reference

    @torch.no_grad()
    def prepare(self, tokens: torch.Tensor) -> torch.Tensor:
        """The reference's log-probs ``[N, T-1, vocab]`` on ``tokens`` (computed once per batch)."""
        return F.log_softmax(model_logits(self.reference, tokens)[:, :-1].float(), dim=-1)

    def feature_losses(self, x: torch.Tensor, W_U, b_U, tokens: torch.Tensor, prepared,
                       block_bytes=None) -> torch.Tensor:
        """``[R]`` losses from final features ``x [R, N, T-1, d]`` with unembedding ``W_U, b_U``
        (``block_bytes``: see ``rllc_fast.engine.unembed_loss``)."""
        from .engine.unembed_loss import unembed_kl_losses

        return unembed_kl_losses(x, W_U, b_U, prepared, block_bytes)

    def __call__(self, model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        return kl_losses(self.prepare(tokens), model_logits(model, tokens)[None])[0]
