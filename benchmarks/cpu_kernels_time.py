"""The CPU kernels against torch's own passes, at the benchmarks' shapes (milliseconds, best of 5 x 20 calls).

- causal attention (``rllc_fast.ops.causal_attention``) against ``scaled_dot_product_attention`` (torch's CPU
  flash attention), forward alone and forward + backward, ``[B, H, T, D]`` contiguous;
- the next-token cross-entropy with its gradient (``ops.token_cross_entropy_``) against the PyTorch form it
  replaces (``ops._token_cross_entropy_fallback``), per block of logits (the copy that refills the block is
  timed on both sides).

    PYTHONPATH=$PWD python benchmarks/cpu_kernels_time.py
"""
import time

import torch
import torch.nn.functional as F

from rllc_fast import ops


def best_ms(fn, n=20, reps=5):
    fn()
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n * 1e3)
    return best


def attention(shape):
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    g, scale = torch.randn(shape), shape[-1] ** -0.5
    with torch.no_grad():
        flash = best_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale))
        kernel = best_ms(lambda: ops.causal_attention(q, k, v, scale))
    flash_bw = best_ms(lambda: torch.autograd.grad(
        F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale), (q, k, v), g))
    kernel_bw = best_ms(lambda: torch.autograd.grad(ops.causal_attention(q, k, v, scale), (q, k, v), g))
    print(f"attention {list(shape)}: forward flash {flash:.2f}, kernel {kernel:.2f} ms ({flash / kernel:.1f}x); "
          f"forward+backward flash {flash_bw:.2f}, kernel {kernel_bw:.2f} ms ({flash_bw / kernel_bw:.1f}x)")


def cross_entropy(rows, vocab):
    base, targets = torch.randn(rows, vocab) * 3, torch.randint(0, vocab, (rows,))
    block = base.clone()
    torch_ms = best_ms(lambda: ops._token_cross_entropy_fallback(block.copy_(base), targets, True))
    kernel_ms = best_ms(lambda: ops.token_cross_entropy_(block.copy_(base), targets, True))
    print(f"cross-entropy [{rows}, {vocab}] with gradient: torch {torch_ms:.2f}, kernel {kernel_ms:.2f} ms "
          f"({torch_ms / kernel_ms:.1f}x)")


if __name__ == "__main__":
    if not ops.CPU_KERNELS:
        raise SystemExit("the extension was built without its CPU kernels: " + ops.backend())
    print(f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    for shape in [(128, 4, 63, 16), (8, 16, 63, 16), (1024, 8, 32, 8), (256, 8, 31, 8)]:
        attention(shape)
    for rows, vocab in [(4096, 256), (209, 5000)]:
        cross_entropy(rows, vocab)
