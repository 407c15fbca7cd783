"""Per-replica next-token losses straight from the final residual stream, without whole logits.

For ``R`` replicas, the unembedding ``logits = x @ W_U + b_U`` over ``M`` predicted positions each
(``x [R*M, d_model]``) and its loss are computed in row blocks. The forward pass also forms
``d loss / d x`` block by block (``(softmax - target) @ W_U^T``), so the ``[R*M, vocab]`` logits,
their log-softmax and its gradient never exist whole: two matrix products per row and
``O(R*M*d_model)`` memory plus one block of logits instead of ``O(R*M*vocab)``. ``W_U`` and ``b_U``
get no gradient (they are at ``w*``).

Block size: by default ``BLOCK_ELEMENTS`` logits (a CPU cache's worth, the fastest measured on the
CPU); with ``block_bytes`` (the engine passes a share of ``max_memory`` on GPUs or when a budget is
given) as many rows as fit in that many bytes of block temporaries (``block_row_bytes``), so a budget
of a few GB runs the unembedding in a few large products (few kernel launches). Logits and their
softmax are float32 even when the products run in bfloat16 (``torch.autocast``).

The losses are the ones of ``rllc_fast.losses.token_losses`` / ``kl_losses`` (the reference they are
tested against); this is only a faster evaluation order.
"""
from __future__ import annotations

from typing import Optional

import torch

BLOCK_ELEMENTS = 1 << 20  # logits per row block by default (4 MiB of float32): sized for a CPU cache
MIN_BLOCK_ROWS = 64       # at least 64 rows: keeps the products efficient for big vocabularies


def block_row_bytes(vocab: int, kl: bool = False) -> int:
    """Bytes of block temporaries per row (upper bound): the float32 logits reused in place for the
    softmax/gradient, a bfloat16 product under autocast, and for the KL loss the reference log-probs,
    their exponential and two pointwise temporaries (``[rows, vocab]`` float32 each)."""
    return vocab * (4 + 2 + (16 if kl else 0)) + 64


def block_rows(vocab: int, block_bytes: Optional[int] = None, kl: bool = False) -> int:
    """Rows per block: ``BLOCK_ELEMENTS // vocab`` when ``block_bytes`` is None, else what fits in it."""
    if block_bytes is None:
        return max(MIN_BLOCK_ROWS, BLOCK_ELEMENTS // vocab)
    return max(MIN_BLOCK_ROWS, int(block_bytes) // block_row_bytes(vocab, kl))


def _row_losses(x, W_U, b_U, target_ids, target_logp, block_bytes, need_grad: bool):
    """``(row losses [rows] float32, d loss_row / d x [rows, d] float32 or None)`` of ``x [rows, d]``, block by
    block; token loss against ``target_ids [rows]``, or KL to ``target_logp`` (whose rows repeat over ``x``'s).
    ``need_grad`` False: the losses only, no softmax or ``d loss / d x``."""
    rows_total = x.shape[0]
    V = W_U.shape[1]
    kl = target_ids is None
    block = min(rows_total, block_rows(V, block_bytes, kl))
    W = W_U.float()
    Wt = W.t()
    b = b_U.float() if b_U is not None else None
    row_loss = torch.empty(rows_total, dtype=torch.float32, device=x.device)
    grad_x = torch.empty(x.shape, dtype=torch.float32, device=x.device) if need_grad else None
    n_ref = target_logp.shape[0] if kl else 0
    autocast = x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type)
    minus_one = None if kl else torch.full((block, 1), -1.0, dtype=torch.float32, device=x.device)
    for start in range(0, rows_total, block):
        end = min(start + block, rows_total)
        xb = x[start:end].float()
        logits = (torch.addmm(b, xb, W) if b is not None else xb @ W).float()   # [rows, V]
        if not kl:  # one exp pass over the block: loss = log(sum exp(l - max)) + max - l[target]
            tgt = target_ids[start:end, None]
            picked = logits.gather(1, tgt)
            top = logits.amax(dim=1, keepdim=True)
            dlogits = logits.sub_(top).exp_()                                  # exp(l - max)
            total = dlogits.sum(dim=1, keepdim=True)
            torch.sub(total.log().add_(top), picked, out=row_loss[start:end, None])
            if need_grad:
                dlogits.div_(total)                                            # softmax
                dlogits.scatter_add_(1, tgt, minus_one[: end - start])
        else:  # KL(p_ref || softmax(logits)); reference rows repeat for every replica
            lse = torch.logsumexp(logits, dim=1, keepdim=True)
            if end - start == rows_total or (start % n_ref == 0 and end - start == n_ref):
                ref_logp = target_logp.repeat(rows_total // n_ref, 1) if end - start > n_ref else target_logp
            else:
                ref_logp = target_logp[torch.arange(start, end, device=x.device) % n_ref]
            ref_p = ref_logp.exp()
            logq = logits.sub_(lse)
            row_loss[start:end] = (ref_p * (ref_logp - logq)).sum(1)
            dlogits = logq.exp_().sub_(ref_p) if need_grad else None
        if need_grad and autocast:  # out= products are not autocast: the product runs in bfloat16, then a copy
            grad_x[start:end] = dlogits @ Wt
        elif need_grad:
            torch.mm(dlogits, Wt, out=grad_x[start:end])
        del logits, dlogits  # one block's temporaries alive at a time (the budget counts one)
    return row_loss, grad_x


class _UnembedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_U, b_U, target_ids, target_logp, R: int, block_bytes, need_grad: bool):
        """``need_grad`` False (no gradient will be asked for): the losses only, no softmax or ``d loss / d x``."""
        M = x.shape[0] // R
        row_loss, grad_x = _row_losses(x, W_U, b_U, target_ids, target_logp, block_bytes, need_grad)
        ctx.save_for_backward(grad_x)
        ctx.R, ctx.M, ctx.dtype = R, M, x.dtype
        return row_loss.view(R, M).mean(1)

    @staticmethod
    def backward(ctx, grad_losses):
        (grad_x,) = ctx.saved_tensors
        R, M = ctx.R, ctx.M
        scale = (grad_losses.float() / M).view(R, 1, 1)
        gx = (grad_x.view(R, M, -1) * scale).view(R * M, -1).to(ctx.dtype)
        return gx, None, None, None, None, None, None, None


def unembed_token_losses(x: torch.Tensor, W_U: torch.Tensor, b_U: Optional[torch.Tensor],
                         tokens: torch.Tensor, block_bytes: Optional[int] = None) -> torch.Tensor:
    """Eq. (1) per replica from features ``x [R, N, T-1, d_model]`` (final residual after the last norm)
    and ``tokens [N, T]``: mean cross-entropy of ``x @ W_U + b_U`` against ``tokens[:, 1:]`` -> ``[R]``.
    ``block_bytes``: memory for the row blocks' temporaries (None: ``BLOCK_ELEMENTS`` logits a block)."""
    R, N, P, d = x.shape
    targets = tokens[:, 1:].reshape(1, -1).expand(R, -1).reshape(-1)
    return _UnembedLoss.apply(x.reshape(R * N * P, d), W_U, b_U, targets, None, R, block_bytes, _needs_grad(x))


def unembed_kl_losses(x: torch.Tensor, W_U: torch.Tensor, b_U: Optional[torch.Tensor],
                      ref_logp: torch.Tensor, block_bytes: Optional[int] = None) -> torch.Tensor:
    """Eq. (11) per replica from features ``x [R, N, T-1, d_model]`` and reference log-probs
    ``ref_logp [N, T-1, vocab]``: mean ``KL(ref || softmax(x @ W_U + b_U))`` -> ``[R]``.
    ``block_bytes`` as in ``unembed_token_losses``."""
    R, N, P, d = x.shape
    return _UnembedLoss.apply(x.reshape(R * N * P, d), W_U, b_U, None, ref_logp.reshape(N * P, -1).float(), R,
                              block_bytes, _needs_grad(x))


def _needs_grad(x: torch.Tensor) -> bool:
    """Whether autograd will ask for ``d loss / d x`` (when not, the blocks skip the softmax and its product)."""
    return torch.is_grad_enabled() and x.requires_grad


@torch.no_grad()
def unembed_position_losses(x: torch.Tensor, W_U: torch.Tensor, b_U: Optional[torch.Tensor],
                            tokens: torch.Tensor, block_bytes: Optional[int] = None) -> torch.Tensor:
    """Per-position next-token cross-entropy (nats, float32) ``[R, N, T-1]`` from features
    ``x [R, N, T-1, d_model]`` and ``tokens [N, T]``, without gradient; the rows whose mean is
    ``unembed_token_losses``."""
    R, N, P, d = x.shape
    targets = tokens[:, 1:].reshape(1, -1).expand(R, -1).reshape(-1)
    row_loss, _ = _row_losses(x.reshape(R * N * P, d), W_U, b_U, targets, None, block_bytes, need_grad=False)
    return row_loss.view(R, N, P)
