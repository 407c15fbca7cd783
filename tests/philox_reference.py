"""Philox4x32-10 and the draws of ``csrc/cuda/philox.cuh``, in numpy: the test oracle for the
CUDA noise (the CPU fallback draws from torch generators instead, so its stream differs).

``philox_normal(seed, offset, elements)`` is the ``xi`` the CUDA ``sgld_step`` uses for flat
element ``r * n + j`` of an ``[R, n]`` buffer; ``philox_rademacher`` the CUDA ``rademacher`` probe
entry ``p * n + j``. Checked against the Random123 known-answer vectors in tests/test_philox.py.
"""
import numpy as np

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_LO = np.uint64(0xFFFFFFFF)
_32 = np.uint64(32)


def philox4x32_10(ctr, key):
    """``ctr``: 4 arrays (or ints) of uint32 words, ``key``: 2 ints; returns 4 uint64 arrays < 2^32."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in ctr)
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    for _ in range(10):
        p0, p1 = _M0 * c0, _M1 * c2
        c0, c1, c2, c3 = (p1 >> _32) ^ c1 ^ k0, p1 & _LO, (p0 >> _32) ^ c3 ^ k1, p0 & _LO
        k0, k1 = (k0 + _W0) & _LO, (k1 + _W1) & _LO
    return c0, c1, c2, c3


def philox_bits(seed: int, offset: int, elements):
    """The four words for counter (offset lo, offset hi, element lo, element hi), key = seed."""
    e = np.asarray(elements, dtype=np.uint64)
    s, o = np.uint64(seed % 2**64), np.uint64(offset % 2**64)
    ctr = (np.full_like(e, o & _LO), np.full_like(e, o >> _32), e & _LO, e >> _32)
    return philox4x32_10(ctr, (s & _LO, s >> _32))


def philox_normal(seed: int, offset: int, elements) -> np.ndarray:
    """Box-Muller on the first two words, in float32 as the kernel computes u1 and u2."""
    x, y, _, _ = philox_bits(seed, offset, elements)
    scale = np.float32(2.3283064365386963e-10)
    u1 = (x.astype(np.float32) + np.float32(1.0)) * scale
    u2 = y.astype(np.float32) * scale
    return (np.sqrt(-2.0 * np.log(u1.astype(np.float64))) * np.cos(2 * np.pi * u2.astype(np.float64))).astype(np.float32)


def philox_rademacher(seed: int, offset: int, elements) -> np.ndarray:
    x = philox_bits(seed, offset, elements)[0]
    return np.where(x & np.uint64(1), np.float32(1.0), np.float32(-1.0))
