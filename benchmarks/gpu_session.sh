#!/usr/bin/env bash
# The GPU session of issue 20: every check and measurement of rllc_fast that needs a GPU, in one call of
# at most 9 minutes on an H200, build included. The steps, their time limits (they add up to 510 s) and
# what each writes are in benchmarks/gpu_session.py; results go to $OUT (at most 5 files: session.json,
# session.log, tests.xml, ops-bench.json, engine.json).
#
# On the GPU machine (it lacks transformer_lens, tslearn and devinterp: first run benchmarks/gpu_wheels.sh
# on the CPU machine, carry .whl/; the session installs it with pip --no-index --no-deps --target):
#   COMMIT=<sha> bash benchmarks/gpu_session.sh
# CPU dry run of every step at tiny shapes (no build, no compute-sanitizer; tests/test_gpu_session_dry_run.py):
#   RLLC_GPU_DRY_RUN=1 OUT=/tmp/rllc-dry bash benchmarks/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/rllc-gpu-out}
mkdir -p "$OUT"
# typeguard's and zarr's pytest plugins break pytest's start-up there; NVML-based CUDA checks keep the
# driver process (which forks the steps) from initialising CUDA.
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 PYTHONUNBUFFERED=1 PYTORCH_NVML_BASED_CUDA_CHECK=1
limit=570  # the driver stops itself at 540 s; this backstop (TERM, then KILL 10 s later) fits the tool's 600 s
[ "${RLLC_GPU_DRY_RUN:-0}" = 1 ] && limit=2400  # the dry run's limits are 4x (a loaded CPU)
timeout --kill-after=10 "$limit" "${PY:-python3}" benchmarks/gpu_session.py run --out "$OUT"
