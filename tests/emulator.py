"""Build and call the CPU emulation of the CUDA kernels (tests/csrc/emulated_kernels.cpp).

``build(csrc)`` compiles the kernels of ``csrc/cuda/*.cuh`` (the files the ``.cu`` launchers
include), the shared argument checks ``csrc/arg_checks.h`` and the emulation shim into a shared
library with the machine's C++ compiler (C++20, no torch library linked: c10's Half and BFloat16
are header-only) and loads it with ctypes. Builds are cached in ``build/emulator/`` (git-ignored)
under a hash of every source text, the compiler and the flags, so a mutated copy of ``csrc``
(``mutated_csrc``) gets its own build and an unchanged tree is compiled once.

``Emulator`` runs a kernel over torch CPU tensors with the grid the ``.cu`` launcher would choose
or a smaller one (``chunks``: a thread then takes several groups of elements, as on a large row).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
SHIM = ROOT / "tests" / "csrc"
CACHE = ROOT / "build" / "emulator"
# hidden visibility: a mutant library loaded next to the main one shares none of its symbols
FLAGS = ["-std=c++20", "-O2", "-fPIC", "-shared", "-pthread", "-fvisibility=hidden",
         "-Wall", "-Werror", "-Wno-unknown-pragmas", "-Wno-sign-compare"]
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (set CXX, or install g++): needed to build the kernel emulation")
    return cxx


def _sources(csrc: Path) -> list[Path]:
    return sorted([SHIM / "cuda_emulation.h", SHIM / "emulated_kernels.cpp", *csrc.glob("*.h"), *csrc.glob("cuda/*.cuh")])


def _library(csrc: Path) -> Path:
    """Where the build of the sources under ``csrc`` is cached (named by a hash of every input)."""
    digest = hashlib.sha256()
    for part in [_compiler(), torch.__version__, *FLAGS]:
        digest.update(part.encode() + b"\0")
    for path in _sources(csrc):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return CACHE / f"emulated_kernels-{digest.hexdigest()[:16]}.so"


def _compile(csrc: Path, lib: Path) -> None:
    if lib.exists():
        return
    CACHE.mkdir(parents=True, exist_ok=True)
    torch_include = Path(torch.__file__).parent / "include"
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        out = Path(tmp) / lib.name
        cmd = [_compiler(), *FLAGS, f"-I{csrc}", f"-I{SHIM}", f"-I{torch_include}", str(SHIM / "emulated_kernels.cpp"),
               "-o", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building the kernel emulation failed:\n{' '.join(cmd)}\n{done.stderr}")
        os.replace(out, lib)  # atomic: a concurrent run sees the whole file or none


def build(csrc: Path = CSRC) -> ctypes.CDLL:
    """The emulation library for the kernel sources under ``csrc`` (built once per source text)."""
    return build_all({"": csrc})[""]


def build_all(trees: dict[str, Path]) -> dict[str, ctypes.CDLL]:
    """``build`` for several source trees, the missing builds compiled in parallel (one per core)."""
    libs = {name: _library(csrc) for name, csrc in trees.items()}
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        for job in [pool.submit(_compile, trees[name], lib) for name, lib in libs.items()]:
            job.result()
    return {name: _declare(ctypes.CDLL(str(lib))) for name, lib in libs.items()}


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, f32, f64, s = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_double, ctypes.c_char_p
    lib.sgld_chunks.argtypes, lib.sgld_chunks.restype = [i64], i64
    lib.rademacher_blocks.argtypes, lib.rademacher_blocks.restype = [i64], i64
    lib.run_sgld_step.argtypes = [ctypes.c_int, p, p, p, p, p, p, p, i64, i64, f32, f32, f32, f32, f32, p, i64]
    lib.run_rademacher.argtypes = [p, i64, p, i64]
    lib.run_blocked_dot.argtypes = [p, p, p, i64, i64, i64, p]
    lib.check_sgld_args.argtypes = [s, s, s, s, s, s, s, f64, f64]
    lib.check_rademacher_args.argtypes = [i64, i64, s]
    lib.check_blocked_dot_args.argtypes = [s, s, s]
    for f in (lib.run_sgld_step, lib.run_rademacher, lib.run_blocked_dot, lib.check_sgld_args,
              lib.check_rademacher_args, lib.check_blocked_dot_args):
        f.restype = s
    return lib


def mutated_csrc(dest: Path, file: str, old: str, new: str) -> Path:
    """A copy of ``csrc`` under ``dest`` with the first ``old`` in ``csrc/<file>`` replaced by ``new``."""
    copy = dest / "csrc"
    shutil.copytree(CSRC, copy)
    text = (copy / file).read_text()
    assert old in text, f"{old!r} is not in csrc/{file}: update the mutation to the current source"
    (copy / file).write_text(text.replace(old, new, 1))
    return copy


def _ptr(t: torch.Tensor | None):
    if t is None:
        return None
    assert t.device.type == "cpu" and t.is_contiguous()
    return ctypes.c_void_p(t.data_ptr())


def _raise(message: bytes) -> None:
    if message:
        raise RuntimeError("emulated launch failed: " + message.decode())


def describe(t: torch.Tensor | None) -> bytes:
    """The tensor description the C side's checks read (see parse_info)."""
    if t is None:
        return b"none"
    dtype = str(t.dtype).split(".")[-1]
    sizes = ",".join(str(s) for s in t.shape)
    unit_last = t.dim() == 0 or t.shape[-1] <= 1 or t.stride(-1) == 1
    return f"{dtype}|{t.device}|{int(t.is_contiguous())}|{sizes}|{int(unit_last)}".encode()


class Emulator:
    """The emulated kernels over CPU tensors (each call is one launch, like the ``.cu`` op's)."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib

    def sgld_step(self, w, grad, w_star, lengths, *, step_size, nbeta, localization, noise=None, rng_state=None,
                  square_avg=None, rmsprop_alpha=0.99, rmsprop_eps=0.1, chunks=None):
        """``sgld_step_kernel`` in place on ``w`` (and ``square_avg``); returns ``sq_dist`` ``[R]``.
        ``chunks`` blocks per replica (default: what sgld_step.cu launches)."""
        replicas, n = w.shape
        sq = torch.zeros(replicas, dtype=torch.float32)
        chunks = self.lib.sgld_chunks(n) if chunks is None else chunks
        rng = None if noise is not None else rng_state
        _raise(self.lib.run_sgld_step(DTYPES[w.dtype], _ptr(w), _ptr(grad), _ptr(w_star), _ptr(lengths), _ptr(noise),
                                      _ptr(rng), _ptr(square_avg), replicas, n, step_size, nbeta, localization,
                                      rmsprop_alpha, rmsprop_eps, _ptr(sq), chunks))
        return sq

    def rademacher(self, num_probes, n, rng_state, blocks=None):
        out = torch.empty(num_probes, n)
        blocks = self.lib.rademacher_blocks(out.numel()) if blocks is None else blocks
        _raise(self.lib.run_rademacher(_ptr(out), out.numel(), _ptr(rng_state), blocks))
        return out

    def blocked_dot(self, v, hv, offsets):
        out = torch.empty(v.shape[0], offsets.numel() - 1)
        _raise(self.lib.run_blocked_dot(_ptr(v), _ptr(hv), _ptr(offsets), v.shape[0], v.shape[1],
                                        offsets.numel() - 1, _ptr(out)))
        return out

    def check_sgld_args(self, w, grad, w_star, lengths, noise, rng_state, square_avg, rmsprop_alpha, rmsprop_eps):
        """The C++ checks' message ("" when the arguments pass)."""
        return self.lib.check_sgld_args(describe(w), describe(grad), describe(w_star), describe(lengths),
                                        describe(noise), describe(rng_state), describe(square_avg),
                                        rmsprop_alpha, rmsprop_eps).decode()

    def check_rademacher_args(self, num_probes, n, rng_state):
        return self.lib.check_rademacher_args(num_probes, n, describe(rng_state)).decode()

    def check_blocked_dot_args(self, v, hv, offsets):
        return self.lib.check_blocked_dot_args(describe(v), describe(hv), describe(offsets)).decode()
