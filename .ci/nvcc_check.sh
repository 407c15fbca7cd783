#!/usr/bin/env bash
# Compile-check every .cu file with the machine's nvcc against the installed torch's headers
# (works with the CPU wheel: no GPU and no CUDA build of torch needed). Usage: nvcc_check.sh [arch ...]
set -euo pipefail
cd "$(dirname "$0")/.."
archs=("${@:-sm_80 sm_90a}")
read -r -a archs <<< "${archs[*]}"
TORCH_DIR=$(python -c 'import torch, os; print(os.path.dirname(torch.__file__))')
PY_INC=$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
out=$(mktemp -d)
gencode=()
for a in "${archs[@]}"; do gencode+=(-gencode "arch=compute_${a#sm_},code=${a}"); done
status=0
for f in csrc/cuda/*.cu; do
  start=$(date +%s)
  if nvcc -c "$f" -o "$out/$(basename "$f").o" -std=c++20 -O3 -Xcompiler -fPIC --expt-relaxed-constexpr \
      -I"$TORCH_DIR/include" -I"$TORCH_DIR/include/torch/csrc/api/include" -I"$PY_INC" \
      -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -D_GLIBCXX_USE_CXX11_ABI=1 -DTORCH_API_INCLUDE_EXTENSION_H \
      -DTORCH_EXTENSION_NAME=_C "${gencode[@]}"; then
    echo "nvcc OK: $f for ${archs[*]} ($(( $(date +%s) - start )) s)"
  else
    echo "nvcc FAILED: $f"; status=1
  fi
done
rm -rf "$out"
exit $status
