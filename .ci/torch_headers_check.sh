#!/usr/bin/env bash
# Compile-check the extension against other torch releases' headers (not run in CI; needs PyPI):
#   bash .ci/torch_headers_check.sh 2.4.0 2.8.0 ...
# For each version: download that torch wheel (no dependencies; about 0.8-0.9 GB each, the CUDA build, whose
# headers include ATen/cuda), unpack torch/include only, then compile csrc/ops.cpp with g++ and every
# csrc/cuda/*.cu with nvcc (sm_90a) against them. Prints one OK/FAILED line per file and version.
set -uo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
PY_INC=$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
status=0
for version in "$@"; do
  work=$(mktemp -d)
  pip download -q "torch==$version" --no-deps --only-binary=:all: -d "$work" || { echo "torch $version: download FAILED"; status=1; continue; }
  python - "$work" <<'PYEOF'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/torch-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    z.extractall(sys.argv[1], [n for n in z.namelist() if n.startswith("torch/include/")])
PYEOF
  inc="$work/torch/include"
  # wheels before 2.7 were built with the pre-C++11 ABI
  abi=$(python -c "import sys; v = tuple(map(int, sys.argv[1].split('.')[:2])); print(1 if v >= (2, 7) else 0)" "$version")
  flags=(-std=c++20 -I"$inc" -I"$inc/torch/csrc/api/include" -I"$PY_INC" -D_GLIBCXX_USE_CXX11_ABI=$abi
         -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C)
  if g++ -c csrc/ops.cpp -o "$work/ops.o" -O1 -fPIC "${flags[@]}"; then echo "torch $version: g++ csrc/ops.cpp OK"
  else echo "torch $version: g++ csrc/ops.cpp FAILED"; status=1; fi
  for f in csrc/cuda/*.cu; do
    if "$NVCC" -c "$f" -o "$work/$(basename "$f").o" -O3 -Xcompiler -fPIC --expt-relaxed-constexpr \
        -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -gencode arch=compute_90a,code=sm_90a "${flags[@]}"; then
      echo "torch $version: nvcc $f OK"
    else echo "torch $version: nvcc $f FAILED"; status=1; fi
  done
  rm -rf "$work"
done
exit $status
