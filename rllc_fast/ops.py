"""Custom ops ``torch.ops.rllc_fast.*``: fused CUDA kernels where built, pure PyTorch on CPU.

Ops (schemas are defined in ``csrc/ops.cpp``; ``SCHEMAS`` below is the same text, used when the
compiled extension is absent, and a test keeps the two identical):

- ``sgld_step(w, grad, w_star, lengths, noise, rng_state, step_size, nbeta, localization,
  square_avg=None, rmsprop_alpha=0.99, rmsprop_eps=0.1) -> sq_dist``
  updates every replica of a packed ``[R, n]`` buffer in place,
  ``w[r, j] <- w - eps/2 (nbeta g + gamma (w - w*)) + sqrt(eps) xi`` for ``j < lengths[r]``
  (elements ``j >= lengths[r]`` are padding and untouched bit for bit), in float32 whatever the
  storage type; ``xi`` is ``noise`` when given, else drawn from ``rng_state = [seed, offset]``
  (int64, on the data's device: on CUDA the Philox4x32-10 normal stream of ``csrc/cuda/philox.cuh``,
  element ``e = r * n + j`` being value ``e % 4`` of the call with counter (offset, ``e // 4``) and
  key seed (four normals per call, Box-Muller on both word pairs), so the draw does not depend on
  the launch grid; on CPU a torch generator seeded from both). With ``square_avg`` (float32
  ``[R, n]``, updated in place) the step is RMSProp-preconditioned as
  ``rllc_fast.sgld.rmsprop_sgld_delta`` writes it: ``a <- alpha a + (1 - alpha) g^2``,
  ``P = 1 / (sqrt(a) + rmsprop_eps)``, drift times ``P`` and noise times ``sqrt(P)``. Returns
  ``||w_r - w*_r||^2`` after the update, ``[R]`` float32.
- ``rademacher(num_probes, n, rng_state) -> [P, n]`` float32 of +-1, counter-based from
  ``rng_state = [seed, offset]`` (reproducible; Philox bit 0 of entry ``p * n + j`` on CUDA, a
  torch generator on CPU, so the two streams differ).
- ``blocked_dot(v, hv, offsets) -> [P, B]`` float32: ``sum_{j in block b} v[p, j] * hv[p, j]``
  with block ``b`` the columns ``offsets[b]:offsets[b+1]`` (per-block Hutchinson terms). Offsets
  that do not rise from 0 to ``n`` raise on CPU; on CUDA they are checked by the kernel, without a
  host sync, and the blocks they make bad come out NaN.

- ``causal_attention(q, k, v, scale) -> (out, lse)``: causal softmax attention of ``q, k, v [B, H, T, D]``
  (float32, stride 1 along ``D``, ``T <= 128``, ``D`` in 8, 16, 32, 64): ``out [B, H, T, D]`` (dense, in
  the order of ``q``'s strides, so ``q = x.transpose(1, 2)`` gives ``out.transpose(1, 2)`` contiguous; contiguous
  when that order would not put ``D`` innermost) and the row
  log-sum-exp of the scaled scores ``lse [B, H, T]``; ``causal_attention_backward(grad_out, q, k, v, out,
  lse, scale) -> (dq, dk, dv)``. A compiled CPU kernel (``csrc/cpu/causal_attention.cpp``, for the short
  sequences and small heads where torch's CPU flash attention is slow); elsewhere the PyTorch fallback
  below (materialized scores), the reference the kernel is tested against. ``causal_attention`` (the
  Python function) is the differentiable entry point.
- ``token_cross_entropy_(logits, targets, need_grad) -> losses [rows]``: per row of ``logits [rows, V]``
  (float32, contiguous), ``log sum_j exp(logits_j) - logits[target]`` against ``targets [rows]`` (int64 token
  ids in ``[0, V)``, checked); with ``need_grad`` the logits are overwritten by ``softmax - onehot(target)``
  (the loss's gradient), else left as they are. A compiled CPU kernel (``csrc/cpu/token_cross_entropy.cpp``);
  elsewhere the PyTorch fallback below.

Argument checks (shapes, dtypes, devices, contiguity) are written once here (``check_*_args``, run by
the fake kernels and the fallbacks) and once in ``csrc/arg_checks.h`` for the compiled ops, with the same
messages; tests/test_emulated_kernels.py (CUDA ops) and tests/test_cpu_kernels.py (CPU kernels) compare the
two.

``new_rng_state(device, generator=None)`` makes an ``rng_state`` whose seed comes from torch's
generator (so ``torch.manual_seed`` fixes the noise).
"""
from __future__ import annotations

import functools
import warnings

import torch
from torch.utils.flop_counter import register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

from .sgld import rmsprop_sgld_delta, sgld_delta

SCHEMAS = {
    "sgld_step": (
        "sgld_step(Tensor(a!) w, Tensor grad, Tensor w_star, Tensor lengths, Tensor? noise, "
        "Tensor? rng_state, float step_size, float nbeta, float localization, Tensor(b!)? square_avg=None, "
        "float rmsprop_alpha=0.99, float rmsprop_eps=0.1) -> Tensor"
    ),
    "rademacher": "rademacher(int num_probes, int n, Tensor rng_state) -> Tensor",
    "blocked_dot": "blocked_dot(Tensor v, Tensor hv, Tensor offsets) -> Tensor",
    "causal_attention": "causal_attention(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)",
    "causal_attention_backward": (
        "causal_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "float scale) -> (Tensor, Tensor, Tensor)"
    ),
    "token_cross_entropy_": "token_cross_entropy_(Tensor(a!) logits, Tensor targets, bool need_grad) -> Tensor",
}
SEEDED = ("sgld_step", "rademacher")

try:  # the compiled extension defines the schemas (and CUDA kernels where built with CUDA)
    from . import _C  # noqa: F401

    _EXTENSION = True
except ImportError:
    _EXTENSION = False
    _LIBRARY = torch.library.Library("rllc_fast", "DEF")  # kept alive: it owns the schemas
    for _name, _schema in SCHEMAS.items():
        _tags = (torch.Tag.nondeterministic_seeded,) if _name in SEEDED else ()
        _LIBRARY.define(_schema, tags=_tags)


# Whether compiled CUDA kernels were registered, read before the fallback is registered below.
CUDA_KERNELS = torch._C._dispatch_has_kernel_for_dispatch_key("rllc_fast::sgld_step", "CUDA")
# Whether the compiled CPU kernels were registered (an extension built from older sources has not).
CPU_KERNELS = _EXTENSION and all(torch._C._dispatch_has_kernel_for_dispatch_key(f"rllc_fast::{name}", "CPU")
                                 for name in ("causal_attention", "causal_attention_backward", "token_cross_entropy_"))


def backend() -> str:
    """Which implementation serves the ops: compiled CUDA kernels, the compiled CPU kernels (attention and
    token cross-entropy), or the PyTorch fallback."""
    cpu = "" if CPU_KERNELS else " (no CPU kernels: rebuild the extension)"
    if CUDA_KERNELS:
        return "compiled extension: CUDA kernels on GPU, PyTorch fallback on CPU but its two kernels" + cpu
    if _EXTENSION:
        return "compiled extension without CUDA: PyTorch fallback on every device but the two CPU kernels" + cpu
    return "PyTorch fallback on every device (extension not built)"


class FallbackOnCudaWarning(UserWarning):
    """The PyTorch fallback served an op on a CUDA device: the extension was built without CUDA kernels."""


_warned_fallback_on_cuda = False  # this module's own state: the warning is given once per process


def warn_fallback_on(device: torch.device, op: str) -> None:
    """Warn once per process when the PyTorch fallback serves ``op`` on a CUDA ``device`` (no compiled CUDA
    kernels): it draws the random numbers on the CPU and copies them over, every call."""
    global _warned_fallback_on_cuda
    if device.type != "cuda" or _warned_fallback_on_cuda:
        return
    _warned_fallback_on_cuda = True
    warnings.warn(f"rllc_fast.ops.{op} on {device} runs the PyTorch fallback ({backend()}): its noise and "
                  "probes are drawn on the CPU and copied to the GPU on every call, which is slow; rebuild the "
                  "extension with CUDA kernels (FORCE_CUDA=1 pip install --no-build-isolation -e .)",
                  FallbackOnCudaWarning, stacklevel=3)


# ---------------------------------------------------------------------------- argument checks
# The one Python statement of each op's shape/dtype/device checks, run by the fake (meta) kernels and
# by the fallbacks. The CUDA ops run csrc/arg_checks.h, which makes the same checks in the same order
# with the same messages (tests/test_emulated_kernels.py compares the two on every bad input).
def _check(cond, message) -> None:
    """Raise ValueError(message()) unless ``cond``; a symbolic condition (fake tensors with dynamic
    shapes) goes to ``torch._check_value``."""
    if cond is True:
        return
    if cond is False:
        raise ValueError(message())
    torch._check_value(cond, message)


def _shape(t) -> str:
    return str([int(s) for s in t.shape])


def _dtype(t) -> str:
    return str(t.dtype).split(".")[-1]


def _contiguous(op: str, name: str) -> str:
    return f"{op}: {name} must be contiguous (pass {name}.contiguous())"


def check_rng_state(op: str, rng_state) -> None:
    """``rng_state`` is int64 ``[2] = [seed, offset]`` and contiguous."""
    _check(rng_state.dim() == 1 and rng_state.shape[0] == 2 and rng_state.dtype == torch.int64,
           lambda: f"{op}: rng_state must be int64 [2] = [seed, offset], got {_dtype(rng_state)} {_shape(rng_state)}")
    _check(rng_state.is_contiguous(), lambda: _contiguous(op, "rng_state"))


def check_sgld_args(w, grad, w_star, lengths, noise, rng_state, square_avg, rmsprop_alpha, rmsprop_eps) -> None:
    """The shape/dtype/device checks of ``sgld_step`` (csrc/arg_checks.h makes the same on CUDA)."""
    op = "sgld_step"
    _check(w.dim() == 2, lambda: f"{op}: w must be 2-D [replicas, n], got shape {_shape(w)}")
    _check(w.dtype in (torch.float32, torch.bfloat16, torch.float16),
           lambda: f"{op}: w must be float32, bfloat16 or float16, got {_dtype(w)}")
    _check(w.is_contiguous(),
           lambda: f"{op}: w must be contiguous (it is updated in place: keep the replicas in one contiguous buffer)")
    for name, t in (("grad", grad), ("w_star", w_star)):
        _check(t.shape == w.shape, lambda: f"{op}: {name} must have w's shape {_shape(w)}, got {_shape(t)}")
        _check(t.dtype == w.dtype, lambda: f"{op}: {name} must have w's dtype {_dtype(w)}, got {_dtype(t)}")
        _check(t.device == w.device, lambda: f"{op}: {name} must be on w's device {w.device}, got {t.device}")
        _check(t.is_contiguous(), lambda: _contiguous(op, name))
    _check(lengths.dim() == 1 and lengths.shape[0] == w.shape[0],
           lambda: f"{op}: lengths must be [replicas] = [{w.shape[0]}], got shape {_shape(lengths)}")
    _check(lengths.dtype == torch.int64, lambda: f"{op}: lengths must be int64, got {_dtype(lengths)}")
    _check(lengths.device == w.device, lambda: f"{op}: lengths must be on w's device {w.device}, got {lengths.device}")
    _check(lengths.is_contiguous(), lambda: _contiguous(op, "lengths"))
    if noise is not None:
        _check(noise.shape == w.shape, lambda: f"{op}: noise must have w's shape {_shape(w)}, got {_shape(noise)}")
        _check(noise.dtype == torch.float32, lambda: f"{op}: noise must be float32, got {_dtype(noise)}")
        _check(noise.device == w.device, lambda: f"{op}: noise must be on w's device {w.device}, got {noise.device}")
        _check(noise.is_contiguous(), lambda: _contiguous(op, "noise"))
    else:
        _check(rng_state is not None, lambda: f"{op}: pass noise or rng_state ([seed, offset] int64)")
    if rng_state is not None:
        check_rng_state(op, rng_state)
        _check(rng_state.device == w.device,
               lambda: f"{op}: rng_state must be on w's device {w.device}, got {rng_state.device}")
    if square_avg is not None:
        _check(square_avg.shape == w.shape,
               lambda: f"{op}: square_avg must have w's shape {_shape(w)}, got {_shape(square_avg)}")
        _check(square_avg.dtype == torch.float32, lambda: f"{op}: square_avg must be float32, got {_dtype(square_avg)}")
        _check(square_avg.device == w.device,
               lambda: f"{op}: square_avg must be on w's device {w.device}, got {square_avg.device}")
        _check(square_avg.is_contiguous(), lambda: _contiguous(op, "square_avg"))
        _check(0 <= rmsprop_alpha < 1, lambda: f"{op}: rmsprop_alpha must be in [0, 1), got {rmsprop_alpha:.6g}")
        _check(rmsprop_eps > 0, lambda: f"{op}: rmsprop_eps must be > 0, got {rmsprop_eps:.6g}")


def check_rademacher_args(num_probes, n, rng_state) -> None:
    """The checks of ``rademacher`` (csrc/arg_checks.h makes the same on CUDA)."""
    _check(num_probes >= 1 and n >= 1, lambda: f"rademacher: num_probes and n must be >= 1, got {num_probes}, {n}")
    check_rng_state("rademacher", rng_state)


def check_blocked_dot_args(v, hv, offsets) -> None:
    """The shape/dtype/device checks of ``blocked_dot`` (csrc/arg_checks.h makes the same on CUDA).
    The values of ``offsets`` are checked by the op itself (``check_offsets`` on CPU; NaN blocks on CUDA)."""
    op = "blocked_dot"
    _check(v.dim() == 2, lambda: f"{op}: v must be 2-D [probes, n], got shape {_shape(v)}")
    _check(hv.shape == v.shape, lambda: f"{op}: hv must have v's shape {_shape(v)}, got {_shape(hv)}")
    _check(v.dtype == torch.float32, lambda: f"{op}: v must be float32, got {_dtype(v)}")
    _check(hv.dtype == torch.float32, lambda: f"{op}: hv must be float32, got {_dtype(hv)}")
    _check(hv.device == v.device, lambda: f"{op}: hv must be on v's device {v.device}, got {hv.device}")
    _check(offsets.dim() == 1 and offsets.shape[0] >= 2 and offsets.dtype == torch.int64,
           lambda: f"{op}: offsets must be int64 [blocks + 1] with blocks >= 1, got {_dtype(offsets)} {_shape(offsets)}")
    _check(offsets.device == v.device, lambda: f"{op}: offsets must be on v's device {v.device}, got {offsets.device}")
    for name, t in (("v", v), ("hv", hv), ("offsets", offsets)):
        _check(t.is_contiguous(), lambda: _contiguous(op, name))


ATTENTION_MAX_T = 128
ATTENTION_HEAD_SIZES = (8, 16, 32, 64)


def _check_attention_tensor(op: str, name: str, t, q) -> None:
    _check(t.shape == q.shape, lambda: f"{op}: {name} must have q's shape {_shape(q)}, got {_shape(t)}")
    _check(t.dtype == torch.float32, lambda: f"{op}: {name} must be float32, got {_dtype(t)}")
    _check(t.device == q.device, lambda: f"{op}: {name} must be on q's device {q.device}, got {t.device}")
    _check(t.dim() == 0 or t.shape[-1] <= 1 or t.stride(-1) == 1,
           lambda: f"{op}: {name} must have stride 1 along its last dimension (pass {name}.contiguous())")


def _check_attention_qkv(op: str, q, k, v) -> None:
    _check(q.dim() == 4, lambda: f"{op}: q must be 4-D [batch, heads, T, D], got shape {_shape(q)}")
    _check(q.shape[2] <= ATTENTION_MAX_T,
           lambda: f"{op}: T must be at most {ATTENTION_MAX_T} positions, got {int(q.shape[2])}")
    _check(q.shape[3] in ATTENTION_HEAD_SIZES, lambda: f"{op}: D must be 8, 16, 32 or 64, got {int(q.shape[3])}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_attention_tensor(op, name, t, q)


def check_causal_attention_args(q, k, v) -> None:
    """The checks of ``causal_attention`` (csrc/arg_checks.h makes the same for the CPU kernel)."""
    _check_attention_qkv("causal_attention", q, k, v)


def check_causal_attention_backward_args(grad_out, q, k, v, out, lse) -> None:
    """The checks of ``causal_attention_backward`` (csrc/arg_checks.h makes the same for the CPU kernel)."""
    op = "causal_attention_backward"
    _check_attention_qkv(op, q, k, v)
    _check_attention_tensor(op, "out", out, q)
    _check_attention_tensor(op, "grad_out", grad_out, q)
    rows = str([int(x) for x in q.shape[:-1]])
    _check(lse.shape == q.shape[:-1], lambda: f"{op}: lse must be [batch, heads, T] = {rows}, got {_shape(lse)}")
    _check(lse.dtype == torch.float32, lambda: f"{op}: lse must be float32, got {_dtype(lse)}")
    _check(lse.device == q.device, lambda: f"{op}: lse must be on q's device {q.device}, got {lse.device}")
    _check(lse.is_contiguous(), lambda: _contiguous(op, "lse"))


def check_token_cross_entropy_args(logits, targets) -> None:
    """The checks of ``token_cross_entropy_`` (csrc/arg_checks.h makes the same for the CPU kernel); the target
    values are checked by the op (``token_targets_message``)."""
    op = "token_cross_entropy_"
    _check(logits.dim() == 2 and logits.shape[1] >= 1,
           lambda: f"{op}: logits must be 2-D [rows, vocabulary] with a vocabulary >= 1, got shape {_shape(logits)}")
    _check(logits.dtype == torch.float32, lambda: f"{op}: logits must be float32, got {_dtype(logits)}")
    _check(logits.is_contiguous(), lambda: _contiguous(op, "logits"))
    _check(targets.dim() == 1 and targets.shape[0] == logits.shape[0],
           lambda: f"{op}: targets must be [rows] = [{int(logits.shape[0])}], got shape {_shape(targets)}")
    _check(targets.dtype == torch.int64, lambda: f"{op}: targets must be int64, got {_dtype(targets)}")
    _check(targets.device == logits.device,
           lambda: f"{op}: targets must be on logits' device {logits.device}, got {targets.device}")
    _check(targets.is_contiguous(), lambda: _contiguous(op, "targets"))


def token_targets_message(vocab: int) -> str:
    return f"token_cross_entropy_: targets must be token ids in [0, {vocab})"


def check_offsets(offsets, n: int) -> None:
    """``offsets`` rise from 0 to ``n`` (reads the values: a host sync on CUDA, so the CUDA op does not
    call it; its kernel writes NaN for the blocks of bad offsets instead)."""
    _check(int(offsets[0]) == 0 and int(offsets[-1]) == n and bool((offsets[1:] >= offsets[:-1]).all()),
           lambda: f"blocked_dot: offsets must rise from 0 to n = {n}, got {offsets.tolist()}")


# ---------------------------------------------------------------------------- fallbacks
def _cpu_generator(rng_state: torch.Tensor) -> torch.Generator:
    seed, offset = (int(x) for x in rng_state.tolist())
    return torch.Generator().manual_seed((seed * 0x9E3779B97F4A7C15 + offset) % (1 << 63))


# Elements per tile of the CPU fallback (2^17 measured fastest of 2^15 and 2^17 on the 2-core CPU,
# several times faster than whole-buffer expressions: elementwise passes stay in cache;
# benchmarks/bench_ops.py). A tile spans whole replicas when they are small.
TILE_ELEMENTS = 1 << 17


# The kernels repeat the schema's defaults: the dispatcher leaves out trailing arguments equal to them.
def _sgld_step_fallback(w, grad, w_star, lengths, noise, rng_state, step_size, nbeta, localization,
                        square_avg=None, rmsprop_alpha=0.99, rmsprop_eps=0.1):
    check_sgld_args(w, grad, w_star, lengths, noise, rng_state, square_avg, rmsprop_alpha, rmsprop_eps)
    warn_fallback_on(w.device, "sgld_step")
    if noise is None:
        noise = torch.randn(w.shape, generator=_cpu_generator(rng_state.cpu())).to(w.device)
    replicas, n = w.shape
    masked = bool((lengths < n).any())
    sq_dist = torch.zeros(replicas, dtype=torch.float32, device=w.device)
    rows = max(1, TILE_ELEMENTS // max(n, 1))
    cols = min(n, TILE_ELEMENTS) if n else 0
    for r0 in range(0, replicas, rows):
        r1 = min(r0 + rows, replicas)
        for c0 in range(0, n, cols):
            c1 = min(c0 + cols, n)
            tile = (slice(r0, r1), slice(c0, c1))
            v = w[tile]
            if masked:
                keep = torch.arange(c0, c1, device=w.device) < lengths[r0:r1, None]
            if square_avg is None:
                delta = sgld_delta(v, grad[tile], w_star[tile], noise[tile], step_size, nbeta, localization)
            else:  # the running mean of padding keeps its bits too
                avg = square_avg[tile].clone() if masked else square_avg[tile]
                delta = rmsprop_sgld_delta(v, grad[tile], w_star[tile], noise[tile], avg, step_size, nbeta,
                                           localization, rmsprop_alpha, rmsprop_eps)
                if masked:
                    square_avg[tile].copy_(torch.where(keep, avg, square_avg[tile]))
            if masked:  # padding keeps its bits (even -0.0 and NaN): select, never add zero
                v.copy_(torch.where(keep, (v.float() + delta).to(w.dtype), v))
            elif w.dtype == torch.float32:
                v.add_(delta)
            else:
                v.copy_(v.float().add_(delta))
            diff = torch.sub(v.float(), w_star[tile].float())
            if masked:  # padding may hold anything, NaN included: it must not reach the sum
                diff.masked_fill_(~keep, 0.0)
            sq_dist[r0:r1] += diff.pow_(2).sum(dim=1)
    return sq_dist


def _rademacher_fallback(num_probes, n, rng_state):
    check_rademacher_args(num_probes, n, rng_state)
    warn_fallback_on(rng_state.device, "rademacher")
    bits = torch.randint(0, 2, (num_probes, n), generator=_cpu_generator(rng_state.cpu()))
    return (bits * 2 - 1).float().to(rng_state.device)


def _blocked_dot_fallback(v, hv, offsets):
    check_blocked_dot_args(v, hv, offsets)
    warn_fallback_on(v.device, "blocked_dot")
    check_offsets(offsets, v.shape[1])
    sizes = (offsets[1:] - offsets[:-1]).tolist()
    # one reduction per block over a split of the product (measured ~6x faster on CPU than index_add_)
    return torch.stack([part.sum(dim=1) for part in torch.split(v * hv, sizes, dim=1)], dim=1)


def _causal_probabilities(q, k, lse_or_none, scale):
    """``(probabilities [B, H, T, T], lse [B, H, T])`` of the causal scaled scores ``scale q k^T``."""
    T = q.shape[2]
    scores = (q @ k.transpose(-1, -2)).mul_(scale)
    scores.masked_fill_(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1) if lse_or_none is None else lse_or_none
    return scores.sub_(lse[..., None]).exp_(), lse


def _attention_output_like(t):
    """An output like ``t`` as the CPU kernel allocates it: dense in the order of ``t``'s strides, unless that
    order would not put the last dimension innermost (then contiguous)."""
    out = torch.empty_like(t)
    return out if out.stride(-1) == 1 else torch.empty_like(t, memory_format=torch.contiguous_format)


def _causal_attention_fallback(q, k, v, scale):
    check_causal_attention_args(q, k, v)
    p, lse = _causal_probabilities(q, k, None, scale)
    return _attention_output_like(q).copy_(p @ v), lse


def _causal_attention_backward_fallback(grad_out, q, k, v, out, lse, scale):
    check_causal_attention_backward_args(grad_out, q, k, v, out, lse)
    p, _ = _causal_probabilities(q, k, lse, scale)
    dv = p.transpose(-1, -2) @ grad_out
    delta = (grad_out * out).sum(-1, keepdim=True)                   # sum_j P_ij dP_ij
    ds = (grad_out @ v.transpose(-1, -2)).sub_(delta).mul_(p).mul_(scale)
    return tuple(_attention_output_like(t).copy_(d) for t, d in ((q, ds @ k), (k, ds.transpose(-1, -2) @ q), (v, dv)))


def token_cross_entropy_rows(logits, tgt, out, minus_one, need_grad: bool, keep_logits: bool = False):
    """The PyTorch form of the next-token cross-entropy (``token_cross_entropy_``'s fallback, and the engine's
    blocks where the CPU kernel does not serve): per row of ``logits [..., V]`` against ``tgt [..., 1]``, into
    ``out [..., 1]``, in one exp pass (``log(sum exp(l - max)) + max - l[target]``); with ``need_grad`` returns
    ``softmax - onehot`` ``[..., V]`` (``minus_one``: ``-1`` shaped as ``tgt``), else None. The logits are
    overwritten unless ``keep_logits``."""
    picked = logits.gather(-1, tgt)
    top = logits.amax(dim=-1, keepdim=True)
    e = (torch.sub(logits, top) if keep_logits else logits.sub_(top)).exp_()   # exp(l - max)
    total = e.sum(dim=-1, keepdim=True)
    torch.sub(total.log().add_(top), picked, out=out)
    if not need_grad:
        return None
    e.div_(total)                                                                # softmax
    return e.scatter_add_(-1, tgt, minus_one)


def _token_cross_entropy_fallback(logits, targets, need_grad):
    check_token_cross_entropy_args(logits, targets)
    V = logits.shape[1]
    _check(bool(((targets >= 0) & (targets < V)).all()), lambda: token_targets_message(V))  # reads: a sync on CUDA
    tgt = targets[:, None]
    losses = logits.new_empty(tgt.shape)
    token_cross_entropy_rows(logits, tgt, losses, torch.full(tgt.shape, -1.0, device=logits.device), need_grad,
                             keep_logits=not need_grad)  # without need_grad the logits are left as they are
    return losses[:, 0]


_DEVICES = ["cpu"] if CUDA_KERNELS else ["cpu", "cuda"]
torch.library.register_kernel("rllc_fast::sgld_step", _DEVICES, _sgld_step_fallback)
torch.library.register_kernel("rllc_fast::rademacher", _DEVICES, _rademacher_fallback)
torch.library.register_kernel("rllc_fast::blocked_dot", _DEVICES, _blocked_dot_fallback)
_CPU_KERNEL_DEVICES = ["cuda"] if CPU_KERNELS else ["cpu", "cuda"]  # ops with compiled CPU kernels
torch.library.register_kernel("rllc_fast::causal_attention", _CPU_KERNEL_DEVICES, _causal_attention_fallback)
torch.library.register_kernel("rllc_fast::causal_attention_backward", _CPU_KERNEL_DEVICES,
                              _causal_attention_backward_fallback)
torch.library.register_kernel("rllc_fast::token_cross_entropy_", _CPU_KERNEL_DEVICES, _token_cross_entropy_fallback)


# The fake kernels (shapes only, for torch.compile / FakeTensor) make the same argument checks.
@torch.library.register_fake("rllc_fast::sgld_step")
def _(w, grad, w_star, lengths, noise, rng_state, step_size, nbeta, localization, square_avg=None,
      rmsprop_alpha=0.99, rmsprop_eps=0.1):
    check_sgld_args(w, grad, w_star, lengths, noise, rng_state, square_avg, rmsprop_alpha, rmsprop_eps)
    return w.new_empty((w.shape[0],), dtype=torch.float32)


@torch.library.register_fake("rllc_fast::rademacher")
def _(num_probes, n, rng_state):
    check_rademacher_args(num_probes, n, rng_state)
    return rng_state.new_empty((num_probes, n), dtype=torch.float32)


@torch.library.register_fake("rllc_fast::blocked_dot")
def _(v, hv, offsets):
    check_blocked_dot_args(v, hv, offsets)
    return v.new_empty((v.shape[0], offsets.shape[0] - 1), dtype=torch.float32)


@torch.library.register_fake("rllc_fast::causal_attention")
def _(q, k, v, scale):
    check_causal_attention_args(q, k, v)
    return _attention_output_like(q), q.new_empty(q.shape[:-1])


@torch.library.register_fake("rllc_fast::causal_attention_backward")
def _(grad_out, q, k, v, out, lse, scale):
    check_causal_attention_backward_args(grad_out, q, k, v, out, lse)
    return tuple(_attention_output_like(t) for t in (q, k, v))


@torch.library.register_fake("rllc_fast::token_cross_entropy_")
def _(logits, targets, need_grad):
    check_token_cross_entropy_args(logits, targets)
    return logits.new_empty(logits.shape[:1])


# FlopCounterMode counts the attention ops as it counts SDPA (the two products, the causal half included), so a
# step's FLOP count does not depend on which of the two served (tests/test_cost_model.py compares it to the model).
@register_flop_formula(torch.ops.rllc_fast.causal_attention)
def _(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(q_shape, k_shape, v_shape)


@register_flop_formula(torch.ops.rllc_fast.causal_attention_backward)
def _(grad_out_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out_shape, q_shape, k_shape, v_shape)


# ---------------------------------------------------------------------------- Python entry points
def sgld_step(w, grad, w_star, lengths, *, step_size, nbeta, localization, noise=None, rng_state=None,
              square_avg=None, rmsprop_alpha=0.99, rmsprop_eps=0.1):
    """One masked multi-replica SGLD step in place (RMSProp-preconditioned when ``square_avg`` is
    given, which it updates in place); returns ``||w - w*||^2`` per replica ``[R]``."""
    return torch.ops.rllc_fast.sgld_step(
        w, grad, w_star, lengths, noise, rng_state, float(step_size), float(nbeta), float(localization),
        square_avg, float(rmsprop_alpha), float(rmsprop_eps),
    )


def new_rng_state(device="cpu", generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh ``rng_state = [seed, 0]`` (int64 on ``device``) for ``sgld_step``/``rademacher``.

    The seed is drawn from ``generator`` (a CPU ``torch.Generator``), else from torch's global
    generator, so ``torch.manual_seed`` makes the ops' noise reproducible. Advance ``rng_state[1]``
    (the step) between calls to get new noise; it can stay on the device (CUDA graphs).
    """
    seed = torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64, generator=generator)
    return torch.cat([seed, torch.zeros(1, dtype=torch.int64)]).to(device)


def rademacher(num_probes: int, n: int, rng_state: torch.Tensor) -> torch.Tensor:
    """``[num_probes, n]`` float32 Rademacher (+-1) probes from ``rng_state = [seed, offset]``."""
    return torch.ops.rllc_fast.rademacher(num_probes, n, rng_state)


def blocked_dot(v: torch.Tensor, hv: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``[P, B]``: per probe and block ``offsets[b]:offsets[b+1]``, the dot product of v and hv."""
    return torch.ops.rllc_fast.blocked_dot(v, hv, offsets)



class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale: float):
        out, lse = torch.ops.rllc_fast.causal_attention(q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        if grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
        dq, dk, dv = torch.ops.rllc_fast.causal_attention_backward(grad_out, q, k, v, out, lse, ctx.scale)
        return dq, dk, dv, None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal softmax attention ``softmax(scale q k^T + causal mask) v`` of ``q, k, v [B, H, T, D]`` (float32,
    ``T <= ATTENTION_MAX_T``, ``D`` in ``ATTENTION_HEAD_SIZES``) -> ``[B, H, T, D]``, differentiable in ``q, k,
    v`` (once). Any strides (an input without stride 1 along ``D`` is copied)."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return _CausalAttention.apply(q, k, v, float(scale))


def token_cross_entropy_(logits: torch.Tensor, targets: torch.Tensor, need_grad: bool) -> torch.Tensor:
    """Next-token losses ``[rows]`` of ``logits [rows, V]`` against ``targets [rows]``; with ``need_grad`` the
    logits are overwritten by ``softmax - onehot`` (the gradient of each row's loss)."""
    return torch.ops.rllc_fast.token_cross_entropy_(logits, targets, bool(need_grad))


CPU_KERNEL_CAPABILITIES = ("AVX512",)
"""``torch.backends.cpu.get_cpu_capability()`` values on which the engine uses the compiled CPU kernels: x86
with AVX-512 (their x86-64-v4 build, 3-6x faster than torch's passes at the benchmarks' shapes,
``benchmarks/cpu_kernels_time.py``). Their
AVX2 and baseline builds compute the same numbers but measured 2-8x slower than torch's (the 16-lane vectors
split into halves, 2026-11-30), so on those CPUs the engine keeps torch's SDPA and cross-entropy passes."""


def cpu_kernels_serve(t: torch.Tensor) -> bool:
    """Whether the engine should hand float32 CPU tensor ``t`` to the compiled CPU kernels (built, and an x86
    CPU with AVX-512); the callers add each op's own shape limits."""
    return (CPU_KERNELS and t.device.type == "cpu" and t.dtype == torch.float32
            and _cpu_capability() in CPU_KERNEL_CAPABILITIES)


@functools.cache
def _cpu_capability() -> str:
    """The CPU's vector capability as torch reports it (read once)."""
    return torch.backends.cpu.get_cpu_capability()
