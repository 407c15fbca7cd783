"""Build of rllc_fast's extension ``rllc_fast._C``.

- CPU part (``csrc/ops.cpp``: the op schemas; ``csrc/cpu/*.cpp``: CPU kernels) is built everywhere
  (with OpenMP on Linux, torch's own runtime, so the CPU kernels use torch's threads).
- CUDA kernels (``csrc/cuda/*.cu``) are built where torch has CUDA and nvcc is found.

Environment switches:
  FORCE_CUDA=1          build the CUDA kernels even without a visible GPU (needs a CUDA build of torch)
  FORCE_ONLY_CPU=1      never build CUDA kernels
  RLLC_NO_EXTENSION=1   build nothing: the package then runs on its pure-PyTorch fallback
  TORCH_CUDA_ARCH_LIST  CUDA archs, e.g. "8.0;9.0a" (read by torch's build helpers)
  MAX_JOBS              parallel compile jobs (read by ninja through torch's build helpers)
Install without build isolation so the installed torch is used: pip install --no-build-isolation -e .
"""
import glob
import os
import sys

from setuptools import setup


def _flag(name: str) -> bool:
    return os.getenv(name, "0") not in ("", "0", "false", "False")


def extensions():
    if _flag("RLLC_NO_EXTENSION"):
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    with_cuda = (torch.cuda.is_available() and CUDA_HOME is not None) or _flag("FORCE_CUDA")
    if _flag("FORCE_ONLY_CPU"):
        with_cuda = False
    if with_cuda and torch.version.cuda is None:
        raise RuntimeError("FORCE_CUDA=1 needs a CUDA build of torch (this torch is CPU-only)")
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    args = {"cxx": ["-O3", "-std=c++20", "-Wno-psabi"] + openmp}
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        args["nvcc"] = ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]
        ext = CUDAExtension("rllc_fast._C", sources, extra_compile_args=args, extra_link_args=openmp)
    else:
        ext = CppExtension("rllc_fast._C", sources, extra_compile_args=args, extra_link_args=openmp)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
