"""Per-replica next-token losses straight from the final residual stream, without whole logits.

For ``R`` replicas, the unembedding ``logits = x @ W_U + b_U`` over ``M`` predicted positions each
(``x [R*M, d_model]``) and its loss are computed in row blocks small enough to stay in cache. The
forward pass also forms ``d loss / d x`` block by block (``(softmax - target) @ W_U^T``), so the
``[R*M, vocab]`` logits, their log-softmax and its gradient never exist whole: two matrix products
per row and ``O(R*M*d_model)`` memory instead of ``O(R*M*vocab)``. ``W_U`` and ``b_U`` get no
gradient (they are at ``w*``).

The losses are the ones of ``rllc_fast.losses.token_losses`` / ``kl_losses`` (the reference they are
tested against); this is only a faster evaluation order.
"""
from __future__ import annotations

from typing import Optional

import torch

BLOCK_ELEMENTS = 1 << 20  # logits per row block (4 MiB of float32)


class _UnembedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_U, b_U, target_ids, target_logp, R: int):
        M = x.shape[0] // R
        V = W_U.shape[1]
        block = max(64, BLOCK_ELEMENTS // V)  # at least 64 rows: keeps the products efficient for big vocabularies
        W = W_U.float()
        b = b_U.float() if b_U is not None else None
        row_loss = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
        grad_x = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        n_ref = target_logp.shape[0] if target_logp is not None else 0
        for start in range(0, x.shape[0], block):
            end = min(start + block, x.shape[0])
            xb = x[start:end].float()
            logits = torch.addmm(b, xb, W) if b is not None else xb @ W            # [rows, V]
            lse = torch.logsumexp(logits, dim=1, keepdim=True)
            if target_ids is not None:
                tgt = target_ids[start:end, None]
                row_loss[start:end] = (lse - logits.gather(1, tgt)).squeeze(1)
                dlogits = logits.sub_(lse).exp_()                                  # softmax
                dlogits.scatter_add_(1, tgt, torch.full_like(tgt, -1.0, dtype=dlogits.dtype))
            else:  # KL(p_ref || softmax(logits)); reference rows repeat for every replica
                idx = torch.arange(start, end, device=x.device) % n_ref
                ref_logp = target_logp[idx]
                ref_p = ref_logp.exp()
                logq = logits.sub_(lse)
                row_loss[start:end] = (ref_p * (ref_logp - logq)).sum(1)
                dlogits = logq.exp_().sub_(ref_p)
            grad_x[start:end] = dlogits @ W.t()
        ctx.save_for_backward(grad_x)
        ctx.R, ctx.M, ctx.dtype = R, M, x.dtype
        return row_loss.view(R, M).mean(1)

    @staticmethod
    def backward(ctx, grad_losses):
        (grad_x,) = ctx.saved_tensors
        R, M = ctx.R, ctx.M
        scale = (grad_losses.float() / M).view(R, 1, 1)
        gx = (grad_x.view(R, M, -1) * scale).view(R * M, -1).to(ctx.dtype)
        return gx, None, None, None, None, None


def unembed_token_losses(x: torch.Tensor, W_U: torch.Tensor, b_U: Optional[torch.Tensor],
                         tokens: torch.Tensor) -> torch.Tensor:
    """Eq. (1) per replica from features ``x [R, N, T-1, d_model]`` (final residual after the last norm)
    and ``tokens [N, T]``: mean cross-entropy of ``x @ W_U + b_U`` against ``tokens[:, 1:]`` -> ``[R]``."""
    R, N, P, d = x.shape
    targets = tokens[:, 1:].reshape(1, -1).expand(R, -1).reshape(-1)
    return _UnembedLoss.apply(x.reshape(R * N * P, d), W_U, b_U, targets, None, R)


def unembed_kl_losses(x: torch.Tensor, W_U: torch.Tensor, b_U: Optional[torch.Tensor],
                      ref_logp: torch.Tensor) -> torch.Tensor:
    """Eq. (11) per replica from features ``x [R, N, T-1, d_model]`` and reference log-probs
    ``ref_logp [N, T-1, vocab]``: mean ``KL(ref || softmax(x @ W_U + b_U))`` -> ``[R]``."""
    R, N, P, d = x.shape
    return _UnembedLoss.apply(x.reshape(R * N * P, d), W_U, b_U, None, ref_logp.reshape(N * P, -1).float(), R)
