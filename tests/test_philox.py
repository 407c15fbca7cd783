"""The Philox stream of the CUDA kernels, checked on the CPU.

``csrc/cuda/philox.cuh`` is compiled as host C++ (tests/csrc/philox_host.cpp) and must reproduce
the Random123 known-answer vectors and the numpy reference (tests/philox_reference.py), which the
CUDA tests in test_ops.py then compare the kernels' noise and probes against.
"""
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from philox_reference import philox4x32_10, philox_bits, philox_normal, philox_normal4, philox_rademacher

# Random123 kat_vectors, "philox4x32 10" lines: counter words, key words, expected output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
# (seed, offset, element): small, 63-bit seeds as replica_seed makes, steps, elements past 2^32.
DRAWS = [(0, 0, 0), (1234, 0, 1), (1234, 7, 1), (2**63 - 1, 199, 123_456_789), (42, 2**33 + 5, 2**32 + 17),
         (987654321987, 3, 2**40 + 3)] + [(5, t, e) for t in range(3) for e in range(0, 4000, 97)]


@pytest.fixture(scope="module")
def host_philox(tmp_path_factory):
    """Runs the host build of philox.cuh on lines of input; returns its output lines."""
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.fail("no C++ compiler (c++/g++) on PATH: needed to build tests/csrc/philox_host.cpp")
    exe = tmp_path_factory.mktemp("philox") / "philox_host"
    src = Path(__file__).parent / "csrc" / "philox_host.cpp"
    subprocess.run([compiler, "-std=c++17", "-O2", "-Wall", "-Werror", str(src), "-o", str(exe)], check=True)

    def run(lines):
        out = subprocess.run([str(exe)], input="\n".join(lines) + "\n", capture_output=True, text=True, check=True)
        return out.stdout.splitlines()

    return run


def test_reference_reproduces_the_known_answers():
    for ctr, key, want in KAT:
        assert tuple(int(x) for x in philox4x32_10(ctr, key)) == want


def test_header_reproduces_the_known_answers(host_philox):
    lines = host_philox(["raw " + " ".join(f"{x:x}" for x in ctr + key) for ctr, key, _ in KAT])
    assert [tuple(int(x, 16) for x in line.split()) for line in lines] == [want for _, _, want in KAT]


def test_header_draws_equal_the_reference(host_philox):
    lines = host_philox([f"draw {s} {o} {e}" for s, o, e in DRAWS])
    assert len(lines) == len(DRAWS)
    for (s, o, e), line in zip(DRAWS, lines):
        words = line.split()
        assert [int(x, 16) for x in words[:4]] == [int(w[0]) for w in philox_bits(s, o, [e])]
        assert math.isclose(float(words[4]), float(philox_normal(s, o, [e])[0]), rel_tol=1e-5, abs_tol=1e-6)
        assert float(words[5]) == float(philox_rademacher(s, o, [e])[0])


def test_header_uses_all_four_words_of_each_call(host_philox):
    """philox_normal4 gives four normals per call (Box-Muller on (x, y) and on (z, w)), equal to the
    reference's; element e of the stream is value e % 4 of group e // 4."""
    groups = [(0, 0, 0), (1234, 7, 1), (2**63 - 1, 199, 2**30 + 3), (42, 2**33 + 5, 2**40 + 17)]
    lines = host_philox([f"normal4 {s} {o} {g}" for s, o, g in groups])
    for (s, o, g), line in zip(groups, lines):
        got = [float(x) for x in line.split()]
        want = philox_normal4(s, o, [g])[0].tolist()
        assert len(got) == 4 and all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6) for a, b in zip(got, want))
        draws = host_philox([f"draw {s} {o} {4 * g + k}" for k in range(4)])  # the header's element-wise draw
        assert [float(d.split()[4]) for d in draws] == got
    stream = philox_normal(9, 2, range(8))
    assert stream.tolist() == philox_normal4(9, 2, [0, 1]).reshape(-1).tolist()


def test_reference_normal_and_rademacher_statistics():
    n = 400_000
    xi = philox_normal(2024, 3, np.arange(n)).astype(np.float64)
    assert abs(xi.mean()) < 5 / math.sqrt(n)
    assert abs(xi.var() - 1) < 0.01
    assert abs((xi**4).mean() / xi.var() ** 2 - 3) < 0.05
    assert abs(np.mean(xi[1:] * xi[:-1])) < 5 / math.sqrt(n)  # neighbouring elements
    other = philox_normal(2024, 4, np.arange(n)).astype(np.float64)  # the next step
    assert abs(np.corrcoef(xi, other)[0, 1]) < 5 / math.sqrt(n)
    v = philox_rademacher(7, 0, np.arange(n))
    assert set(np.unique(v)) == {-1.0, 1.0} and abs(v.mean()) < 5 / math.sqrt(n)
