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

from .. import ops

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


def _token_cross_entropy(logits, tgt, out, minus_one, need_grad: bool, keep_logits: bool = False):
    """``ops.token_cross_entropy_rows`` (same arguments and result), by the compiled CPU kernel where it serves:
    2-D contiguous float32 logits that may be overwritten, on an AVX-512 CPU (``ops.cpu_kernels_serve``)."""
    if logits.dim() == 2 and not keep_logits and logits.is_contiguous() and ops.cpu_kernels_serve(logits):
        # the compiled CPU kernel: the same losses, each row in cache for its three passes
        out.copy_(ops.token_cross_entropy_(logits, tgt.reshape(-1).long().contiguous(), need_grad)[:, None])
        return logits if need_grad else None
    return ops.token_cross_entropy_rows(logits, tgt, out, minus_one, need_grad, keep_logits)


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
        if not kl:
            dlogits = _token_cross_entropy(logits, target_ids[start:end, None], row_loss[start:end, None],
                                           minus_one[: end - start] if need_grad else None, need_grad)
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


# --- the last layer's replicas in factored form (``HeadReplicas.final_logit_parts``) -----------------------------

FACTORED_DEVICES = ("cuda", "meta")
"""Device types where the last layer's replicas take the factored logits (``meta``: where the step-cost proxies
count CUDA's step, tests/meta_cost.py). Not the CPU: at the benchmarks' shapes
(d_model 64, d_head 8 and 16) the factored form measured 8-12% slower there for the last layer's heads (one
thread, 2026-11-30: the passes over ``[R, M, vocab]`` logits, not the products, set a CPU's pace). On a GPU it
removes about a quarter of the paper shape's per-step FLOPs (the last layer's per-replica unembedding at inner
size 2 d_head instead of d_model): a projection until measured there (benchmarks/gpu_session.py)."""


def low_rank_allowed(device) -> bool:
    """Whether the factored last-layer losses replace the plain ones here: a device type in ``FACTORED_DEVICES``,
    and float32 products only (no autocast, no TF32), because ``l(w*)`` is computed the plain way and the paired
    difference must not carry the two orders' rounding at reduced precision."""
    device = torch.device(device)
    if device.type not in FACTORED_DEVICES:
        return False
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return False
    return device.type != "cuda" or torch.get_float32_matmul_precision() == "highest"


def factored_block_rows(vocab: int, replicas: int, block_bytes: Optional[int] = None) -> int:
    """Positions per block of the factored losses, for all ``replicas`` at once: each holds two ``[replicas, rows,
    vocab]`` float32 temporaries (the logits, kept for the scale's gradient, and their exponential) and a third's
    worth for the shared product and the in-place passes (12 bytes a logit); ``BLOCK_ELEMENTS`` logits without
    ``block_bytes``."""
    if block_bytes is None:
        return max(1, BLOCK_ELEMENTS // (replicas * vocab))
    return max(1, int(block_bytes) // (replicas * (12 * vocab + 64)))


def _low_rank_rows(parts, targets: torch.Tensor, block_bytes, need_grad: bool):
    """``(row losses [R, M], d/dz [R, M, K], d/dM [R, K, V], d/dscale [R, M] or None)`` of the factored logits
    ``parts`` (``LowRankLogits``) against ``targets [M]``, in blocks of positions for all replicas at once; the
    gradients (None without ``need_grad``) are of the row losses' sum."""
    z, M = parts.z.detach(), parts.M.detach()
    scale = None if parts.scale is None else parts.scale.detach()
    R, rows_total, K = z.shape
    V = M.shape[2]
    Zc = torch.cat([z, parts.z_star], dim=2)                       # [R, M, 2K]
    Mc = torch.cat([M, parts.M_star], dim=1)                       # [R, 2K, V] (M_star holds -W_O* W)
    block = max(1, min(rows_total, factored_block_rows(V, R, block_bytes)))
    row_loss = torch.empty(R, rows_total, dtype=torch.float32, device=z.device)
    tgt_all = targets.view(1, -1, 1).expand(R, -1, 1)
    gz = gM = gs = minus_one = None
    if need_grad:
        gz, gM, Mt = torch.empty_like(z), torch.zeros_like(M), M.transpose(1, 2)
        minus_one = torch.full((R, block, 1), -1.0, dtype=torch.float32, device=z.device)
        if scale is not None:
            gs, neg_scale = torch.empty(R, rows_total, dtype=torch.float32, device=z.device), scale.neg()
    for start in range(0, rows_total, block):
        end = min(start + block, rows_total)
        logits = torch.baddbmm(parts.resid_post[start:end] @ parts.W, Zc[:, start:end], Mc)  # [R, rows, V], unscaled
        if scale is not None:
            logits.div_(scale[:, start:end, None])
        logits.add_(parts.bias)
        dlogits = _token_cross_entropy(logits, tgt_all[:, start:end], row_loss[:, start:end, None],
                                       None if minus_one is None else minus_one[:, : end - start], need_grad,
                                       keep_logits=gs is not None)  # the scale's gradient reads the logits
        if need_grad:
            if gs is not None:  # d loss / d scale = - sum_v dlogits (logits - bias) / scale
                torch.div(logits.sub_(parts.bias).mul_(dlogits).sum(2), neg_scale[:, start:end], out=gs[:, start:end])
                dlogits.div_(scale[:, start:end, None])                            # d loss / d (A + z M - z* M*)
            torch.bmm(dlogits, Mt, out=gz[:, start:end])
            gM.add_(torch.bmm(z[:, start:end].transpose(1, 2), dlogits))  # (FlopCounterMode counts bmm, not baddbmm_)
        del logits, dlogits
    return row_loss, gz, gM, gs


class _LowRankTokenLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, M, scale, parts, targets, block_bytes, need_grad: bool):
        row_loss, gz, gM, gs = _low_rank_rows(parts, targets, block_bytes, need_grad)
        ctx.save_for_backward(gz, gM, gs)
        ctx.rows = row_loss.shape[1]
        return row_loss.mean(1)

    @staticmethod
    def backward(ctx, grad_losses):
        gz, gM, gs = ctx.saved_tensors
        f = grad_losses / ctx.rows                                                  # [R]
        return (gz.mul_(f[:, None, None]), gM.mul_(f[:, None, None]), None if gs is None else gs.mul_(f[:, None]),
                None, None, None, None)


def low_rank_token_losses(parts, tokens: torch.Tensor, block_bytes: Optional[int] = None) -> torch.Tensor:
    """Eq. (1) per replica ``[R]`` from the factored last-layer logits ``parts`` (``LowRankLogits`` over the
    ``N (T - 1)`` predicted positions of ``tokens [N, T]``): the same losses as ``unembed_token_losses`` of the
    replicas' final features, with each replica's own product of inner size ``K`` instead of ``d_model``."""
    targets = tokens[:, 1:].reshape(-1)
    need = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (parts.z, parts.M, parts.scale))
    return _LowRankTokenLoss.apply(parts.z, parts.M, parts.scale, parts, targets, block_bytes, need)


@torch.no_grad()
def low_rank_position_losses(parts, tokens: torch.Tensor, block_bytes: Optional[int] = None) -> torch.Tensor:
    """Per-position next-token cross-entropy ``[R, N, T-1]`` from ``parts`` (as ``unembed_position_losses``)."""
    N, T = tokens.shape
    row_loss, _, _, _ = _low_rank_rows(parts, tokens[:, 1:].reshape(-1), block_bytes, need_grad=False)
    return row_loss.view(-1, N, T - 1)
