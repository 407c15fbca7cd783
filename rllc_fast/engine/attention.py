"""Causal attention for the structured path: the compiled CPU kernel where it applies, else torch's SDPA.

``causal(q, k, v, scale)`` takes ``q, k, v [B, H, T, D]`` and returns ``softmax(scale q k^T + causal mask) v``
``[B, H, T, D]``. For float32 CPU tensors the compiled kernels serve (``ops.cpu_kernels_serve``: built, x86
with AVX-512), sequences of at most ``ops.ATTENTION_MAX_T`` positions, head sizes in
``ops.ATTENTION_HEAD_SIZES`` and no autocast, it runs ``rllc_fast.ops.causal_attention``
(``csrc/cpu/causal_attention.cpp``): measured 3-6x faster than torch's CPU flash attention, forward and
backward, at the benchmarks' shapes (``benchmarks/cpu_kernels_time.py``, docs/benchmarks.md). Everything else (GPUs, the meta device, bf16, long
sequences, an extension built without the kernel) takes ``torch.nn.functional.scaled_dot_product_attention``.
Both compute the same function; their results differ by float rounding (tests/test_cpu_kernels.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops


def kernel_applies(q: torch.Tensor) -> bool:
    """Whether ``causal`` runs the compiled CPU kernel for queries ``q [B, H, T, D]``."""
    return (ops.cpu_kernels_serve(q) and q.dim() == 4 and q.shape[2] <= ops.ATTENTION_MAX_T
            and q.shape[3] in ops.ATTENTION_HEAD_SIZES and not torch.is_autocast_enabled("cpu"))


def causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of ``q, k, v [B, H, T, D]`` with score scale ``scale`` -> ``[B, H, T, D]``."""
    if kernel_applies(q):
        return ops.causal_attention(q, k, v, scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
