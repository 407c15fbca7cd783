"""The SGLD update and its noise: the one definition both engines and the op fallback use.

For the weights ``v`` of a component (everything else fixed at ``w*``):

    v <- v - eps/2 * (nbeta * grad l(v) + gamma * (v - v*)) + sqrt(eps) * xi,   xi ~ N(0, 1)

eps = ``step_size``, gamma = ``localization``. Arithmetic is float32 whatever the storage type.
"""
from __future__ import annotations

import hashlib
import math

import torch


def sgld_delta(
    v: torch.Tensor,
    grad: torch.Tensor,
    v_star: torch.Tensor,
    noise: torch.Tensor,
    step_size: float,
    nbeta: float,
    localization: float,
) -> torch.Tensor:
    """The SGLD increment (a new float32 tensor of ``v``'s shape) for weights ``v``.

    ``-eps/2 * (nbeta * grad + gamma * (v - v*)) + sqrt(eps) * noise``, computed in place on one
    temporary (fewer memory passes than the literal expression; same value up to rounding).
    """
    delta = torch.sub(v.float(), v_star.float())
    delta.mul_(localization).add_(grad.float(), alpha=nbeta)
    delta.mul_(-0.5 * step_size).add_(noise.float(), alpha=math.sqrt(step_size))
    return delta


def rmsprop_sgld_delta(
    v: torch.Tensor,
    grad: torch.Tensor,
    v_star: torch.Tensor,
    noise: torch.Tensor,
    square_avg: torch.Tensor,
    step_size: float,
    nbeta: float,
    localization: float,
    alpha: float,
    eps: float,
) -> torch.Tensor:
    """The RMSProp-preconditioned SGLD increment (devinterp's ``rmsprop_sgld``); updates ``square_avg``.

        a <- alpha * a + (1 - alpha) * grad^2;   P = 1 / (sqrt(a) + eps)
        delta = -eps_step/2 * P * (nbeta * grad + gamma * (v - v*)) + sqrt(eps_step * P) * noise

    All tensors share one shape (any: one component, or ``[R, n]`` replica rows); float32 arithmetic.
    """
    g = grad.float()
    square_avg.mul_(alpha).addcmul_(g, g, value=1 - alpha)
    precond = square_avg.sqrt().add_(eps).reciprocal_()
    delta = torch.sub(v.float(), v_star.float())
    delta.mul_(localization).add_(g, alpha=nbeta).mul_(precond).mul_(-0.5 * step_size)
    delta.addcmul_(precond.mul_(step_size).sqrt_(), noise.float())
    return delta


def replica_seed(seed: int, component: str, chain: int) -> int:
    """A 63-bit seed for the noise of chain ``chain`` of component ``component``.

    Derived from the names, not positions, so adding a component leaves the others' noise as it was.
    """
    digest = hashlib.sha256(f"{seed}|{component}|{chain}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def replica_generator(seed: int, component: str, chain: int, device: torch.device) -> torch.Generator:
    """The generator of one replica's noise: step ``t`` draws ``randn(numel)`` from it."""
    return torch.Generator(device=device).manual_seed(replica_seed(seed, component, chain))
