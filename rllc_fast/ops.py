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

Argument checks (shapes, dtypes, devices, contiguity) are written once here (``check_*_args``, run by
the fake kernels and the fallbacks) and once in ``csrc/arg_checks.h`` for the CUDA ops, with the same
messages; tests/test_emulated_kernels.py compares the two.

``new_rng_state(device, generator=None)`` makes an ``rng_state`` whose seed comes from torch's
generator (so ``torch.manual_seed`` fixes the noise).
"""
from __future__ import annotations

import warnings

import torch

from .sgld import rmsprop_sgld_delta, sgld_delta

SCHEMAS = {
    "sgld_step": (
        "sgld_step(Tensor(a!) w, Tensor grad, Tensor w_star, Tensor lengths, Tensor? noise, "
        "Tensor? rng_state, float step_size, float nbeta, float localization, Tensor(b!)? square_avg=None, "
        "float rmsprop_alpha=0.99, float rmsprop_eps=0.1) -> Tensor"
    ),
    "rademacher": "rademacher(int num_probes, int n, Tensor rng_state) -> Tensor",
    "blocked_dot": "blocked_dot(Tensor v, Tensor hv, Tensor offsets) -> Tensor",
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


def backend() -> str:
    """Which implementation serves the ops: compiled CUDA kernels or the PyTorch fallback."""
    if CUDA_KERNELS:
        return "compiled extension: CUDA kernels on GPU, PyTorch fallback on CPU"
    if _EXTENSION:
        return "compiled extension without CUDA: PyTorch fallback on every device"
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


_DEVICES = ["cpu"] if CUDA_KERNELS else ["cpu", "cuda"]
torch.library.register_kernel("rllc_fast::sgld_step", _DEVICES, _sgld_step_fallback)
torch.library.register_kernel("rllc_fast::rademacher", _DEVICES, _rademacher_fallback)
torch.library.register_kernel("rllc_fast::blocked_dot", _DEVICES, _blocked_dot_fallback)


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

