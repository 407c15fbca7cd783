// Device code of the fused masked multi-replica SGLD step (launched by sgld_step.cu; also compiled as
// host C++ by the CPU emulation in tests/csrc/emulated_kernels.cpp, so keep CUDA runtime and ATen
// headers out of this file):
//   w[r, j] <- w - eps/2 (nbeta g + gamma (w - w*)) + sqrt(eps) xi     for j < lengths[r]
// in float32 whatever the storage type, with xi from `noise` or the Philox normal stream (element
// r * n + j), and ||w_r - w*_r||^2 accumulated per replica. Grid (chunks, R), kThreads per block.
// With square_avg (float32), RMSProp-preconditioned as rllc_fast.sgld.rmsprop_sgld_delta:
//   a <- alpha a + (1 - alpha) g^2;  P = 1 / (sqrt(a) + rms_eps);  drift *= P;  noise *= sqrt(P).
#pragma once
#include <cstdint>

#include "philox.cuh"

namespace rllc_fast {
namespace sgld {

constexpr int kThreads = 256;
constexpr int64_t kMaxChunks = 1024;

// Blocks per replica: a thread takes a group of kNormalsPerCall consecutive elements (one Philox call)
// and strides over the row's groups; past kMaxChunks blocks each thread takes several groups.
inline int64_t chunks_for(int64_t n) {
  const int64_t groups = n / kNormalsPerCall + 2;  // a row of n elements meets at most this many groups
  const int64_t chunks = (groups + kThreads - 1) / kThreads;
  return chunks < kMaxChunks ? chunks : kMaxChunks;
}

// Sum over the block's kThreads threads; the result is valid in thread 0.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[kThreads / 32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : 0.0f;
  if (warp == 0) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) sgld_step_kernel(
    scalar_t* __restrict__ w, const scalar_t* __restrict__ grad, const scalar_t* __restrict__ w_star,
    const int64_t* __restrict__ lengths, const float* __restrict__ noise, const int64_t* __restrict__ rng,
    float* __restrict__ square_avg, int64_t n, float eps, float nbeta, float gamma, float alpha, float rms_eps,
    float* __restrict__ sq_dist) {
  const float half_eps = 0.5f * eps, sqrt_eps = sqrtf(eps);
  const int64_t r = blockIdx.y;
  const int64_t len = lengths[r] < n ? lengths[r] : n;
  const int64_t seed = rng != nullptr ? rng[0] : 0, offset = rng != nullptr ? rng[1] : 0;
  const int64_t row = r * n;
  // the groups of kNormalsPerCall flat elements that meet row r's first len elements: [first, last)
  const int64_t first = row / kNormalsPerCall;
  const int64_t last = len > 0 ? (row + len - 1) / kNormalsPerCall + 1 : first;
  float acc = 0.0f;
  for (int64_t g = first + static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; g < last;
       g += static_cast<int64_t>(gridDim.x) * kThreads) {
    Normal4 xi{};
    if (noise == nullptr) xi = philox_normal4(seed, offset, g);
#pragma unroll
    for (int k = 0; k < kNormalsPerCall; ++k) {
      const int64_t idx = g * kNormalsPerCall + k, j = idx - row;
      if (j < 0 || j >= len) continue;  // another row's element, or padding
      const float v = static_cast<float>(w[idx]);
      const float v0 = static_cast<float>(w_star[idx]);
      const float x = noise != nullptr ? noise[idx] : xi.v[k];
      const float gr = static_cast<float>(grad[idx]);
      float drift = gamma * (v - v0) + nbeta * gr;
      float noise_scale = sqrt_eps;
      if (square_avg != nullptr) {
        const float a = alpha * square_avg[idx] + (1.0f - alpha) * gr * gr;
        square_avg[idx] = a;
        const float precond = 1.0f / (sqrtf(a) + rms_eps);
        drift *= precond;
        noise_scale = sqrtf(eps * precond);
      }
      const scalar_t stored = static_cast<scalar_t>(v - half_eps * drift + noise_scale * x);
      w[idx] = stored;
      const float d = static_cast<float>(stored) - v0;
      acc += d * d;
    }
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) atomicAdd(sq_dist + r, acc);
}

}  // namespace sgld
}  // namespace rllc_fast
