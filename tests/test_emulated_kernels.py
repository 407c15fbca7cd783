"""The CUDA kernels, run on the CPU by emulation, against the PyTorch fallback and the Philox reference.

tests/emulator.py compiles the kernel sources that csrc/cuda/*.cu include (``*_kernel(s).cuh``, no
copy) as host C++ over tests/csrc/cuda_emulation.h: a std::thread per CUDA thread, barriers for
``__syncthreads``, a per-warp exchange for ``__shfl_down_sync``, std::atomic_ref for ``atomicAdd``,
c10's Half and BFloat16, threads run one at a time in a fixed order. Emulation checks the kernels'
logic (indexing, masks, reductions, the grid-stride loop, the Philox stream, the in-kernel offsets
check); it cannot check what only hardware shows (the device's float intrinsics: ``sincospif`` and
``logf`` here are the host's; memory ordering between concurrent blocks; speed).

The same comparisons, run on copies of the sources with one injected bug each, must fail: the
harness is shown to catch a wrong shuffle offset, a missing ``__syncthreads``, a mask on ``n``
instead of ``lengths[r]`` and a wrong Philox element. Finally the C++ argument checks that the CUDA
ops run (csrc/arg_checks.h) must say what the Python checks of rllc_fast/ops.py say, on every bad
input that can be made on the CPU. ``pytest -k emulat`` selects every test here.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from emulator import CSRC, Emulator, build_all, mutated_csrc
from philox_reference import philox_normal, philox_rademacher
from rllc_fast import ops

R, N = 4, 2503  # rows of more than 8 warps x 4 elements (every warp of a block has work); n % 4 != 0
LENGTHS = [N, 0, 1290, N + 7]  # full, empty (all padding), partial in mid-group, clamped to n
STEP = dict(step_size=1e-2, nbeta=30.0, localization=200.0)
RMSPROP = dict(rmsprop_alpha=0.9, rmsprop_eps=0.05)
TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6),  # float rounding of the same formula, different order
       torch.bfloat16: dict(rtol=2**-7, atol=1e-5),  # one storage ulp: the float result may round either way
       torch.float16: dict(rtol=2**-10, atol=1e-5)}
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


# Copies of csrc with one injected bug each: (file, text, replacement of its first occurrence).
MUTATIONS = {
    "wrong_shuffle_offset": ("cuda/sgld_step_kernel.cuh", "__shfl_down_sync(0xffffffffu, v, o)",
                             "__shfl_down_sync(0xffffffffu, v, o + 1)"),
    "missing_syncthreads": ("cuda/sgld_step_kernel.cuh", "  __syncthreads();\n", "\n"),
    "mask_on_n_not_lengths": ("cuda/sgld_step_kernel.cuh", "const int64_t len = lengths[r] < n ? lengths[r] : n;",
                              "const int64_t len = n;"),
    "wrong_philox_element": ("cuda/sgld_step_kernel.cuh", "philox_normal4(seed, offset, g)",
                             "philox_normal4(seed, offset, g - first)"),
    "blocked_dot_missing_syncthreads": ("cuda/hutchinson_kernels.cuh", "    __syncthreads();\n  }", "  }"),
    "barrier_that_cannot_complete": ("cuda/sgld_step_kernel.cuh", "  if (lane == 0) warp_sums[warp] = v;\n  __syncthreads();",
                                     "  if (lane == 0) {\n    warp_sums[warp] = v;\n    __syncthreads();\n  }"),
}


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """The emulation of csrc as it is (key "") and of each mutated copy, built in parallel (cached)."""
    root = tmp_path_factory.mktemp("mutants")
    trees = {"": CSRC, **{name: mutated_csrc(root / name, *m) for name, m in MUTATIONS.items()}}
    return {name: Emulator(lib) for name, lib in build_all(trees).items()}


@pytest.fixture(scope="module")
def emulated(builds):
    return builds[""]


def _inputs(dtype, seed=0, rows=R, n=N, lengths=LENGTHS):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, n, generator=g).to(dtype)
    grad = torch.randn(rows, n, generator=g).to(dtype)
    w_star = torch.randn(rows, n, generator=g).to(dtype)
    lengths = torch.tensor(lengths, dtype=torch.int64)
    pad = torch.arange(n) >= lengths[:, None]
    w[pad] = float("nan")  # padding keeps its bits, NaN included, and stays out of the distance
    w[1, :7] = -0.0
    avg = torch.rand(rows, n, generator=g)
    avg[pad] = -0.0
    return w, grad, w_star, lengths, avg


def _padding_untouched(before, after, lengths):
    bits = BITS.get(before.dtype, torch.int32)
    for r, k in enumerate(lengths.tolist()):
        k = max(0, min(k, before.shape[1]))
        assert torch.equal(before[r, k:].view(bits), after[r, k:].view(bits)), f"padding of row {r} changed"


def check_sgld_step(emu, dtype=torch.float32, *, rmsprop=False, philox=False, chunks=None, seed=0):
    """One emulated sgld_step against the CPU fallback given the same noise (the Philox reference's
    stream when the kernel draws it): w, square_avg, ||w - w*||^2 per replica, padding bit for bit."""
    w, grad, w_star, lengths, avg = _inputs(dtype, seed)
    rng = torch.tensor([2**62 + 12345 + seed, 7], dtype=torch.int64)
    noise = (torch.from_numpy(philox_normal(int(rng[0]), int(rng[1]), np.arange(w.numel()))).reshape(w.shape)
             if philox else torch.randn(w.shape, generator=torch.Generator().manual_seed(seed + 1)))
    kw = dict(STEP, **RMSPROP)
    want_w, want_avg = w.clone(), avg.clone() if rmsprop else None
    want_sq = ops.sgld_step(want_w, grad, w_star, lengths, noise=noise, square_avg=want_avg, **kw)
    got_w, got_avg = w.clone(), avg.clone() if rmsprop else None
    got_sq = emu.sgld_step(got_w, grad, w_star, lengths, noise=None if philox else noise,
                           rng_state=rng if philox else None, square_avg=got_avg, chunks=chunks, **kw)
    _padding_untouched(w, got_w, lengths)
    torch.testing.assert_close(got_w, want_w, equal_nan=True, **TOL[dtype])
    if rmsprop:
        _padding_untouched(avg, got_avg, lengths)
        torch.testing.assert_close(got_avg, want_avg, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_sq, want_sq, rtol=1e-5, atol=1e-5)
    assert bool((got_sq[lengths <= 0] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("philox", [False, True], ids=["given_noise", "philox_noise"])
@pytest.mark.parametrize("rmsprop", [False, True], ids=["sgld", "rmsprop"])
def test_emulated_sgld_step_equals_the_fallback(emulated, dtype, philox, rmsprop):
    check_sgld_step(emulated, dtype, rmsprop=rmsprop, philox=philox)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_sgld_step_grid_stride_passes(emulated, dtype):
    """One block per replica (the launcher's grid has 3): each thread takes three groups of four."""
    assert emulated.lib.sgld_chunks(N) == 3
    check_sgld_step(emulated, dtype, rmsprop=True, philox=True, chunks=1, seed=3)


def test_emulated_noise_is_the_four_words_per_call_philox_stream(emulated):
    """The kernel's xi for flat element r * n + j (w = w* = 0, zero gradient, step size 1 leaves w = xi)
    equals the reference stream, four normals per Philox call, element by element; n % 4 != 0, so
    calls straddle rows, and chunks=1 makes threads take several calls."""
    rows, n, seed, step = 3, 1027, 2**63 - 25, 11
    for chunks in (None, 1):
        w = torch.zeros(rows, n)
        zero = torch.zeros_like(w)
        emulated.sgld_step(w, zero, zero, torch.full((rows,), n), step_size=1.0, nbeta=1.0, localization=0.0,
                           rng_state=torch.tensor([seed, step]), chunks=chunks)
        want = torch.from_numpy(philox_normal(seed, step, np.arange(rows * n))).reshape(rows, n)
        torch.testing.assert_close(w, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("blocks", [None, 3])
def test_emulated_rademacher_is_the_philox_stream(emulated, blocks):
    probes, n, seed, step = 3, 1601, 99, 4
    v = emulated.rademacher(probes, n, torch.tensor([seed, step]), blocks=blocks)
    want = torch.from_numpy(philox_rademacher(seed, step, np.arange(probes * n))).reshape(probes, n)
    assert torch.equal(v, want)
    fallback = ops.rademacher(probes, n, torch.tensor([seed, step]))  # another stream; the same kind of draw
    assert fallback.shape == v.shape and fallback.dtype == v.dtype and set(v.unique().tolist()) == {-1.0, 1.0}


def check_blocked_dot(emu):
    g = torch.Generator().manual_seed(5)
    v, hv = torch.randn(3, 1100, generator=g), torch.randn(3, 1100, generator=g)
    offsets = torch.tensor([0, 10, 10, 700, 1100])  # an empty block and one of several passes of 256
    torch.testing.assert_close(emu.blocked_dot(v, hv, offsets), ops.blocked_dot(v, hv, offsets), rtol=1e-5, atol=1e-5)


def test_emulated_blocked_dot_equals_the_fallback(emulated):
    check_blocked_dot(emulated)


def test_emulated_blocked_dot_marks_bad_offsets_nan(emulated):
    """The CUDA op does not read offsets on the host (no sync): the kernel checks them, and a block whose
    offsets are bad comes out NaN, every block when an end is wrong; good blocks keep their value."""
    v, hv = torch.ones(2, 50), torch.ones(2, 50)
    falling = emulated.blocked_dot(v, hv, torch.tensor([0, 30, 20, 50]))
    assert torch.isnan(falling[:, 1]).all() and torch.equal(falling[:, [0, 2]], torch.tensor([[30.0, 30.0]] * 2))
    for bad in ([1, 20, 50], [0, 20, 49], [0, 20, 51], [0, -5, 50]):
        assert torch.isnan(emulated.blocked_dot(v, hv, torch.tensor(bad))).any(), bad
    for bad in ([1, 20, 50], [0, 20, 49]):
        assert torch.isnan(emulated.blocked_dot(v, hv, torch.tensor(bad))).all(), bad
    with pytest.raises(ValueError, match="offsets must rise from 0 to n = 50"):
        ops.blocked_dot(v, hv, torch.tensor([0, 30, 20, 50]))


def test_emulation_reports_a_barrier_that_cannot_complete(builds):
    """Lane 0 waiting at __syncthreads while its warp waits for it in __shfl_down_sync is undefined on a
    GPU (a hang, at best); the emulation stops with an error instead of hanging."""
    with pytest.raises(RuntimeError, match="deadlock"):
        check_sgld_step(builds["barrier_that_cannot_complete"])


# ---------------------------------------------------------------------------- injected bugs
CAUGHT_BY = {
    "wrong_shuffle_offset": dict(rmsprop=False, philox=False),  # ||w - w*||^2 wrong
    "missing_syncthreads": dict(rmsprop=False, philox=False),  # warp 0 sums stale warp sums
    "mask_on_n_not_lengths": dict(rmsprop=True, philox=False),  # padding and its RMSProp state change
    "wrong_philox_element": dict(rmsprop=False, philox=True),  # rows > 0 get row 0's noise
}


@pytest.mark.parametrize("name", list(CAUGHT_BY))
def test_emulated_comparison_catches_an_injected_bug(builds, name):
    with pytest.raises(AssertionError):
        check_sgld_step(builds[name], torch.float32, **CAUGHT_BY[name])


def test_emulated_blocked_dot_comparison_catches_a_missing_syncthreads(builds):
    with pytest.raises(AssertionError):
        check_blocked_dot(builds["blocked_dot_missing_syncthreads"])


# ---------------------------------------------------------------------------- argument checks
def _sgld_args():
    w = torch.zeros(3, 8)
    return dict(w=w, grad=torch.zeros_like(w), w_star=torch.zeros_like(w), lengths=torch.tensor([8, 2, 0]),
                noise=torch.zeros_like(w), rng_state=None, square_avg=None, rmsprop_alpha=0.99, rmsprop_eps=0.1)


def _strided(t):
    """``t``'s values in a non-contiguous tensor of the same shape."""
    return torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)[..., ::2].copy_(t)


BAD_SGLD = {
    "w 1-D": dict(w=torch.zeros(8)),
    "w 0-D": dict(w=torch.tensor(1.0)),
    "w 3-D": dict(w=torch.zeros(3, 8, 1)),
    "w float64": dict(w=torch.zeros(3, 8, dtype=torch.float64)),
    "w int32": dict(w=torch.zeros(3, 8, dtype=torch.int32)),
    "w strided": dict(w=_strided(torch.zeros(3, 8))),
    "w transposed": dict(w=torch.zeros(8, 3).t()),
    "grad shape": dict(grad=torch.zeros(3, 3)),
    "grad dtype": dict(grad=torch.zeros(3, 8, dtype=torch.bfloat16)),
    "grad device": dict(grad=torch.zeros(3, 8, device="meta")),
    "grad strided": dict(grad=_strided(torch.zeros(3, 8))),
    "w_star shape": dict(w_star=torch.zeros(8, 3)),
    "w_star dtype": dict(w_star=torch.zeros(3, 8, dtype=torch.float16)),
    "w_star device": dict(w_star=torch.zeros(3, 8, device="meta")),
    "w_star strided": dict(w_star=_strided(torch.zeros(3, 8))),
    "lengths short": dict(lengths=torch.tensor([8, 2])),
    "lengths 2-D": dict(lengths=torch.tensor([[8, 2, 0]])),
    "lengths 0-D": dict(lengths=torch.tensor(8)),
    "lengths int32": dict(lengths=torch.tensor([8, 2, 0], dtype=torch.int32)),
    "lengths device": dict(lengths=torch.tensor([8, 2, 0], device="meta")),
    "lengths strided": dict(lengths=torch.tensor([8, 0, 2, 0, 0, 0])[::2]),
    "noise shape": dict(noise=torch.zeros(3, 2)),
    "noise dtype": dict(noise=torch.zeros(3, 8, dtype=torch.float64)),
    "noise device": dict(noise=torch.zeros(3, 8, device="meta")),
    "noise strided": dict(noise=_strided(torch.zeros(3, 8))),
    "neither noise nor rng_state": dict(noise=None),
    "rng_state float": dict(noise=None, rng_state=torch.tensor([1.0, 2.0])),
    "rng_state 3 long": dict(noise=None, rng_state=torch.tensor([1, 2, 3])),
    "rng_state 2-D": dict(noise=None, rng_state=torch.tensor([[1, 2]])),
    "rng_state 0-D": dict(noise=None, rng_state=torch.tensor(1)),
    "rng_state strided": dict(noise=None, rng_state=torch.tensor([1, 0, 2, 0])[::2]),
    "rng_state device": dict(noise=None, rng_state=torch.tensor([1, 2], device="meta")),
    "rng_state bad next to noise": dict(rng_state=torch.tensor([1, 2, 3])),
    "square_avg shape": dict(square_avg=torch.zeros(3, 4)),
    "square_avg dtype": dict(square_avg=torch.zeros(3, 8, dtype=torch.bfloat16)),
    "square_avg device": dict(square_avg=torch.zeros(3, 8, device="meta")),
    "square_avg strided": dict(square_avg=_strided(torch.zeros(3, 8))),
    "rmsprop_alpha 1": dict(square_avg=torch.zeros(3, 8), rmsprop_alpha=1.0),
    "rmsprop_alpha negative": dict(square_avg=torch.zeros(3, 8), rmsprop_alpha=-0.25),
    "rmsprop_alpha nan": dict(square_avg=torch.zeros(3, 8), rmsprop_alpha=math.nan),
    "rmsprop_eps 0": dict(square_avg=torch.zeros(3, 8), rmsprop_eps=0.0),
    "rmsprop_eps tiny negative": dict(square_avg=torch.zeros(3, 8), rmsprop_eps=-1.5e-7),
}
GOOD_SGLD = {
    "given noise": {},
    "rng_state": dict(noise=None, rng_state=torch.tensor([1, 2])),
    "bf16 with rmsprop": dict(w=torch.zeros(3, 8, dtype=torch.bfloat16), grad=torch.zeros(3, 8, dtype=torch.bfloat16),
                              w_star=torch.zeros(3, 8, dtype=torch.bfloat16), square_avg=torch.zeros(3, 8)),
    "empty": dict(w=torch.zeros(0, 8), grad=torch.zeros(0, 8), w_star=torch.zeros(0, 8), noise=torch.zeros(0, 8),
                  lengths=torch.zeros(0, dtype=torch.int64)),
}


def _python_message(check, *args) -> str:
    try:
        check(*args)
    except ValueError as e:
        return str(e)
    return ""


@pytest.mark.parametrize("case", list(BAD_SGLD) + list(GOOD_SGLD))
def test_emulated_cpp_sgld_checks_say_what_the_python_checks_say(emulated, case):
    args = dict(_sgld_args(), **BAD_SGLD.get(case, GOOD_SGLD.get(case)))
    python = _python_message(ops.check_sgld_args, *args.values())
    assert emulated.check_sgld_args(*args.values()) == python
    assert (python != "") == (case in BAD_SGLD), python
    if case in BAD_SGLD:
        with pytest.raises(ValueError) as raised:  # the op on CPU raises exactly that message
            torch.ops.rllc_fast.sgld_step(*list(args.values())[:6], 1e-3, 30.0, 200.0, *list(args.values())[6:])
        assert str(raised.value) == python


BAD_HUTCHINSON = {
    "rademacher no probes": ("rademacher", (0, 5, torch.tensor([0, 0]))),
    "rademacher n 0": ("rademacher", (2, 0, torch.tensor([0, 0]))),
    "rademacher rng_state 3 long": ("rademacher", (2, 5, torch.tensor([0, 0, 0]))),
    "rademacher rng_state float": ("rademacher", (2, 5, torch.tensor([0.0, 0.0]))),
    "rademacher rng_state strided": ("rademacher", (2, 5, torch.tensor([1, 0, 2, 0])[::2])),
    "blocked_dot v 1-D": ("blocked_dot", (torch.ones(5), torch.ones(5), torch.tensor([0, 5]))),
    "blocked_dot hv shape": ("blocked_dot", (torch.ones(2, 5), torch.ones(2, 4), torch.tensor([0, 5]))),
    "blocked_dot v float64": ("blocked_dot", (torch.ones(2, 5).double(), torch.ones(2, 5), torch.tensor([0, 5]))),
    "blocked_dot hv float16": ("blocked_dot", (torch.ones(2, 5), torch.ones(2, 5).half(), torch.tensor([0, 5]))),
    "blocked_dot hv device": ("blocked_dot", (torch.ones(2, 5), torch.ones(2, 5, device="meta"), torch.tensor([0, 5]))),
    "blocked_dot offsets float": ("blocked_dot", (torch.ones(2, 5), torch.ones(2, 5), torch.tensor([0.0, 5.0]))),
    "blocked_dot offsets 1 long": ("blocked_dot", (torch.ones(2, 5), torch.ones(2, 5), torch.tensor([0]))),
    "blocked_dot offsets 0-D": ("blocked_dot", (torch.ones(2, 5), torch.ones(2, 5), torch.tensor(0))),
    "blocked_dot offsets device": ("blocked_dot", (torch.ones(2, 5), torch.ones(2, 5),
                                                   torch.tensor([0, 5], device="meta"))),
    "blocked_dot v strided": ("blocked_dot", (_strided(torch.ones(2, 5)), torch.ones(2, 5), torch.tensor([0, 5]))),
    "blocked_dot hv strided": ("blocked_dot", (torch.ones(2, 5), _strided(torch.ones(2, 5)), torch.tensor([0, 5]))),
    "blocked_dot offsets strided": ("blocked_dot", (torch.ones(2, 5), torch.ones(2, 5),
                                                    torch.tensor([0, 9, 5, 9])[::2])),
    "rademacher fine": ("rademacher", (2, 5, torch.tensor([0, 0]))),
    "blocked_dot fine": ("blocked_dot", (torch.ones(2, 5), torch.ones(2, 5), torch.tensor([0, 2, 5]))),
}


@pytest.mark.parametrize("case", list(BAD_HUTCHINSON))
def test_emulated_cpp_hutchinson_checks_say_what_the_python_checks_say(emulated, case):
    op, args = BAD_HUTCHINSON[case]
    python = _python_message(getattr(ops, f"check_{op}_args"), *args)
    assert getattr(emulated, f"check_{op}_args")(*args) == python
    assert (python != "") == (not case.endswith("fine")), python
    if python:
        with pytest.raises(ValueError) as raised:
            getattr(ops, op)(*args)
        assert str(raised.value) == python
