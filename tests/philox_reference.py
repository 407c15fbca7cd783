"""Philox4x32-10 and the draws of ``csrc/cuda/philox.cuh``, in numpy: the test oracle for the
CUDA noise (the CPU fallback draws from torch generators instead, so its stream differs).

``philox_normal(seed, offset, elements)`` is the ``xi`` the CUDA ``sgld_step`` uses for flat
element ``r * n + j`` of an ``[R, n]`` buffer (four elements per Philox call: ``philox_normal4``);
``philox_rademacher`` the CUDA ``rademacher`` probe entry ``p * n + j`` (one call per entry, bit 0
of its first word). Checked against the Random123 known-answer vectors in tests/test_philox.py.
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


NORMALS_PER_CALL = 4


def philox_normal4(seed: int, offset: int, groups):
    """The four normals of each Philox call (counter element word ``group``): Box-Muller on words
    (x, y) and on (z, w), with u1 and u2 in float32 as the kernel computes them; ``[len(groups), 4]``."""
    words = philox_bits(seed, offset, groups)
    scale = np.float32(2.3283064365386963e-10)
    out = []
    for a, b in ((words[0], words[1]), (words[2], words[3])):
        u1 = (a.astype(np.float32) + np.float32(1.0)) * scale  # (0, 1]
        u2 = b.astype(np.float32) * scale
        radius = np.sqrt(-2.0 * np.log(u1.astype(np.float64)))
        angle = 2 * np.pi * u2.astype(np.float64)
        out += [radius * np.cos(angle), radius * np.sin(angle)]
    return np.stack(out, axis=-1).astype(np.float32)


def philox_normal(seed: int, offset: int, elements) -> np.ndarray:
    """Element e of the normal stream: value ``e % 4`` of the call for group ``e // 4``."""
    e = np.asarray(elements, dtype=np.uint64)
    values = philox_normal4(seed, offset, e // np.uint64(NORMALS_PER_CALL))
    return np.take_along_axis(values, (e % np.uint64(NORMALS_PER_CALL)).astype(np.int64)[..., None], axis=-1)[..., 0]


def philox_rademacher(seed: int, offset: int, elements) -> np.ndarray:
    x = philox_bits(seed, offset, elements)[0]
    return np.where(x & np.uint64(1), np.float32(1.0), np.float32(-1.0))
