#!/usr/bin/env bash
# Everything issue 4 needs from a lent GPU, in one call of the device tool (its machine has torch with
# CUDA, nvcc, pytest and pytest-benchmark; transformer_lens is not needed here):
#   1. build rllc_fast._C with the CUDA kernels, in place (FORCE_CUDA=1, sm_90a for H100/H200);
#   2. the op tests on CPU and CUDA: CUDA vs the CPU fallback, Philox noise and probes per element
#      against tests/philox_reference.py, bit-for-bit reruns, CUDA-graph replay of a full step;
#   3. the ops benchmark (fused vs unfused, bandwidth as a fraction of the vendor peak).
# Results go to $OUT (the device tool brings them back): gpu-tests.log, gpu-tests.xml and
# ops-gpu.json, the benchmark JSON with device, date and commit added (copy it to
# benchmarks/results/ops-<device>-<date>-<commit>.json). Usage on the device machine:
#   COMMIT=<sha> bash benchmarks/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/rllc-gpu-out}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' | tee -a "$OUT/device.txt"

start=$(date +%s)
FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16} \
  $PY setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
$PY -c 'from rllc_fast import ops; print(ops.backend()); assert ops.CUDA_KERNELS' || exit 1

$PY -m pytest -q -rs -p no:cacheprovider tests/test_ops.py tests/test_philox.py \
  --junitxml="$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.log"
tests_rc=${PIPESTATUS[0]}

$PY -m pytest -q -p no:cacheprovider benchmarks/bench_ops.py --benchmark-json="$OUT/ops-gpu.json" \
  --benchmark-columns=min,median,rounds 2>&1 | tail -60
bench_rc=${PIPESTATUS[0]}

$PY - "$OUT/ops-gpu.json" "${COMMIT:-unknown}" "$tests_rc" <<'PYEOF'
import datetime, json, sys
import torch
path, commit, tests_rc = sys.argv[1], sys.argv[2], int(sys.argv[3])
data = json.load(open(path))
data.update(device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", date=datetime.date.today().isoformat(), commit=commit,
            torch=torch.__version__, gpu_tests_exit_code=tests_rc)
json.dump(data, open(path, "w"), indent=1)
for b in data["benchmarks"]:
    e = b["extra_info"]
    print(f'{b["name"]:70s} {b["stats"]["min"] * 1e3:9.3f} ms  '
          + (f'{e["achieved_GBps"]:7.1f} GB/s ({e["fraction_of_reference"]:.2f})' if "achieved_GBps" in e else ""))
PYEOF
echo "tests exit $tests_rc, benchmarks exit $bench_rc"
exit $(( tests_rc || bench_rc ))
