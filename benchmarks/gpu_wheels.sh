#!/usr/bin/env bash
# Downloads the wheels the GPU machine lacks (Python 3.12, manylinux x86-64) into .whl/ (git-ignored),
# for benchmarks/gpu_session.sh to install there with `pip install --no-index --no-deps --target`.
# The GPU machine (torch 2.11 + CUDA 13.0, Python 3.12) has torch, transformers, numpy, pandas,
# matplotlib, xarray, scikit-learn, numba, statsmodels, pyarrow, pytest and pytest-benchmark, but
# not transformer_lens, tslearn or devinterp, nor these of their dependencies (pinned: --no-deps
# fetches none by itself; one version of each, or the install stops):
#   transformer_lens 3.9: datasets, dill, multiprocess, fancy_einsum, better-abc, typeguard, beartype
#   devinterp 2.0.1:      pydantic, pydantic-core, annotated-types, typing-inspection, and zarr 3.1.x
#                         (3.4 breaks devinterp 2.0.1's imports) with numcodecs, donfig, crc32c,
#                         google-crc32c, msgspec
# Run from anywhere on a machine that reaches the package index:  bash benchmarks/gpu_wheels.sh
# It prints the total size; the device tool carries at most 64 MiB of working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-.whl}
mkdir -p "$DEST"
WHEELS=(
  transformer_lens==3.9.0 devinterp==2.0.1 tslearn==0.10.0
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fancy_einsum==0.0.3 better-abc==0.0.3
  typeguard==4.6.1 beartype==0.23.1
  pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
  zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 crc32c==2.9.post0 google-crc32c==1.9.0 msgspec==0.20.0
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DEST" "${WHEELS[@]}"
ls -1 "$DEST"
echo "total: $(du -cb "$DEST"/*.whl | tail -1 | cut -f1) bytes in $(ls "$DEST"/*.whl | wc -l) wheels"
