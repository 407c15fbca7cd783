"""Custom ops ``torch.ops.rllc_fast.*``: fused CUDA kernels where built, pure PyTorch on CPU.

Ops (schemas are defined in ``csrc/ops.cpp``; ``SCHEMAS`` below is the same text, used when the
compiled extension is absent, and a test keeps the two identical):

- ``sgld_step(w, grad, w_star, lengths, noise, rng_state, step_size, nbeta, localization,
  square_avg=None, rmsprop_alpha=0.99, rmsprop_eps=0.1) -> sq_dist``
  updates every replica of a packed ``[R, n]`` buffer in place,
  ``w[r, j] <- w - eps/2 (nbeta g + gamma (w - w*)) + sqrt(eps) xi`` for ``j < lengths[r]``
  (elements ``j >= lengths[r]`` are padding and untouched bit for bit), in float32 whatever the
  storage type; ``xi`` is ``noise`` when given, else drawn from ``rng_state = [seed, offset]``
  (int64, on the data's device: on CUDA Philox4x32-10 with counter (offset, flat element index
  ``r * n + j``) and key seed, so the draw does not depend on the launch grid; on CPU a torch
  generator seeded from both). With ``square_avg`` (float32 ``[R, n]``, updated in place) the step is
  RMSProp-preconditioned as ``rllc_fast.sgld.rmsprop_sgld_delta`` writes it:
  ``a <- alpha a + (1 - alpha) g^2``, ``P = 1 / (sqrt(a) + rmsprop_eps)``, drift times ``P`` and
  noise times ``sqrt(P)``. Returns ``||w_r - w*_r||^2`` after the update, ``[R]`` float32.
- ``rademacher(num_probes, n, rng_state) -> [P, n]`` float32 of +-1, counter-based from
  ``rng_state = [seed, offset]`` (reproducible; Philox bit 0 of entry ``p * n + j`` on CUDA, a
  torch generator on CPU, so the two streams differ).
- ``blocked_dot(v, hv, offsets) -> [P, B]`` float32: ``sum_{j in block b} v[p, j] * hv[p, j]``
  with block ``b`` the columns ``offsets[b]:offsets[b+1]`` (per-block Hutchinson terms).

``new_rng_state(device, generator=None)`` makes an ``rng_state`` whose seed comes from torch's
generator (so ``torch.manual_seed`` fixes the noise).
"""
from __future__ import annotations

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


# ---------------------------------------------------------------------------- argument checks
def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def check_sgld_args(w, grad, w_star, lengths, noise, rng_state, square_avg, rmsprop_alpha, rmsprop_eps) -> None:
    """The checks ``csrc`` makes with TORCH_CHECK, with the same messages."""
    _check(w.dim() == 2, f"sgld_step: w must be 2-D [replicas, n], got shape {tuple(w.shape)}")
    _check(w.dtype in (torch.float32, torch.bfloat16, torch.float16),
           f"sgld_step: w must be float32, bfloat16 or float16, got {w.dtype}")
    _check(w.is_contiguous(), "sgld_step: w must be contiguous")
    for name, t in (("grad", grad), ("w_star", w_star)):
        _check(t.shape == w.shape, f"sgld_step: {name} must have w's shape {tuple(w.shape)}, got {tuple(t.shape)}")
        _check(t.dtype == w.dtype, f"sgld_step: {name} must have w's dtype {w.dtype}, got {t.dtype}")
        _check(t.device == w.device, f"sgld_step: {name} must be on w's device {w.device}, got {t.device}")
    _check(lengths.dim() == 1 and lengths.shape[0] == w.shape[0],
           f"sgld_step: lengths must be [replicas] = [{w.shape[0]}], got shape {tuple(lengths.shape)}")
    _check(lengths.dtype == torch.int64, f"sgld_step: lengths must be int64, got {lengths.dtype}")
    _check(lengths.device == w.device, f"sgld_step: lengths must be on w's device {w.device}")
    if noise is not None:
        _check(noise.shape == w.shape, f"sgld_step: noise must have w's shape {tuple(w.shape)}, got {tuple(noise.shape)}")
        _check(noise.dtype == torch.float32, f"sgld_step: noise must be float32, got {noise.dtype}")
        _check(noise.device == w.device, f"sgld_step: noise must be on w's device {w.device}")
    else:
        _check(rng_state is not None, "sgld_step: pass noise or rng_state ([seed, offset] int64)")
    if rng_state is not None:
        _check_rng_state("sgld_step", rng_state, w.device)
    if square_avg is not None:
        _check(square_avg.shape == w.shape,
               f"sgld_step: square_avg must have w's shape {tuple(w.shape)}, got {tuple(square_avg.shape)}")
        _check(square_avg.dtype == torch.float32, f"sgld_step: square_avg must be float32, got {square_avg.dtype}")
        _check(square_avg.device == w.device, f"sgld_step: square_avg must be on w's device {w.device}")
        _check(square_avg.is_contiguous(), "sgld_step: square_avg must be contiguous")
        _check(0 <= rmsprop_alpha < 1, f"sgld_step: rmsprop_alpha must be in [0, 1), got {rmsprop_alpha}")
        _check(rmsprop_eps > 0, f"sgld_step: rmsprop_eps must be > 0, got {rmsprop_eps}")


def _check_rng_state(op: str, rng_state, device) -> None:
    _check(rng_state.shape == (2,) and rng_state.dtype == torch.int64,
           f"{op}: rng_state must be int64 [2] = [seed, offset], got {rng_state.dtype} {tuple(rng_state.shape)}")
    _check(rng_state.device == device, f"{op}: rng_state must be on device {device}, got {rng_state.device}")


def check_blocked_dot_args(v, hv, offsets) -> None:
    _check(v.dim() == 2, f"blocked_dot: v must be 2-D [probes, n], got shape {tuple(v.shape)}")
    _check(hv.shape == v.shape, f"blocked_dot: hv must have v's shape {tuple(v.shape)}, got {tuple(hv.shape)}")
    _check(v.dtype == torch.float32 and hv.dtype == torch.float32, "blocked_dot: v and hv must be float32")
    _check(hv.device == v.device and offsets.device == v.device, "blocked_dot: v, hv and offsets must share a device")
    _check(offsets.dim() == 1 and offsets.numel() >= 2 and offsets.dtype == torch.int64,
           "blocked_dot: offsets must be int64 [blocks + 1]")


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
    _check(num_probes >= 1 and n >= 1, f"rademacher: num_probes and n must be >= 1, got {num_probes}, {n}")
    _check_rng_state("rademacher", rng_state, rng_state.device)
    bits = torch.randint(0, 2, (num_probes, n), generator=_cpu_generator(rng_state.cpu()))
    return (bits * 2 - 1).float().to(rng_state.device)


def _blocked_dot_fallback(v, hv, offsets):
    check_blocked_dot_args(v, hv, offsets)
    _check(int(offsets[0]) == 0 and int(offsets[-1]) == v.shape[1] and bool((offsets[1:] >= offsets[:-1]).all()),
           f"blocked_dot: offsets must rise from 0 to n = {v.shape[1]}")
    sizes = (offsets[1:] - offsets[:-1]).tolist()
    # one reduction per block over a split of the product (measured ~6x faster on CPU than index_add_)
    return torch.stack([part.sum(dim=1) for part in torch.split(v * hv, sizes, dim=1)], dim=1)


_DEVICES = ["cpu"] if CUDA_KERNELS else ["cpu", "cuda"]
torch.library.register_kernel("rllc_fast::sgld_step", _DEVICES, _sgld_step_fallback)
torch.library.register_kernel("rllc_fast::rademacher", _DEVICES, _rademacher_fallback)
torch.library.register_kernel("rllc_fast::blocked_dot", _DEVICES, _blocked_dot_fallback)


@torch.library.register_fake("rllc_fast::sgld_step")
def _(w, grad, w_star, lengths, noise, rng_state, step_size, nbeta, localization, square_avg=None,
      rmsprop_alpha=0.99, rmsprop_eps=0.1):
    return w.new_empty((w.shape[0],), dtype=torch.float32)


@torch.library.register_fake("rllc_fast::rademacher")
def _(num_probes, n, rng_state):
    return rng_state.new_empty((num_probes, n), dtype=torch.float32)


@torch.library.register_fake("rllc_fast::blocked_dot")
def _(v, hv, offsets):
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

