// Device code of the Hutchinson helpers (launched by hutchinson.cu; also compiled as host C++ by the
// CPU emulation in tests/csrc/emulated_kernels.cpp, so keep CUDA runtime and ATen headers out):
// counter-based Rademacher probes [P, n], and per-block dot products v . (H v) over contiguous
// column blocks (one trace estimate per component from one HVP batch).
#pragma once
#include <cstdint>
#include <limits>

#include "philox.cuh"

namespace rllc_fast {
namespace hutchinson {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;

inline int64_t rademacher_blocks(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return blocks < kMaxBlocks ? blocks : kMaxBlocks;
}

__global__ void rademacher_kernel(float* __restrict__ out, int64_t total, const int64_t* __restrict__ rng) {
  const int64_t seed = rng[0], offset = rng[1];
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    out[i] = philox_rademacher(seed, offset, i);
  }
}

// grid (blocks, probes): one CUDA block reduces one column block of one probe. The offsets are checked
// here, on the device, so the op needs no host sync: where offsets[0] != 0, offsets[blocks] != n, or
// this block's pair falls, the block's output is NaN (the CPU op raises instead).
__global__ void blocked_dot_kernel(const float* __restrict__ v, const float* __restrict__ hv,
                                   const int64_t* __restrict__ offsets, int64_t n, int64_t num_blocks,
                                   float* __restrict__ out) {
  const int64_t b = blockIdx.x, p = blockIdx.y;
  const int64_t begin = offsets[b], end = offsets[b + 1];
  if (offsets[0] != 0 || offsets[num_blocks] != n || begin < 0 || end < begin || end > n) {
    if (threadIdx.x == 0) out[p * num_blocks + b] = std::numeric_limits<float>::quiet_NaN();
    return;  // the whole block leaves: no thread reaches the barriers below
  }
  float acc = 0.0f;
  for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) acc += v[p * n + j] * hv[p * n + j];
  __shared__ float partial[kThreads];
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[p * num_blocks + b] = partial[0];
}

}  // namespace hutchinson
}  // namespace rllc_fast
