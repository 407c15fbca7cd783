// Hutchinson helpers: counter-based Rademacher probes [P, n], and per-block dot products
// v . (H v) over contiguous column blocks (one trace estimate per component from one HVP batch).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "check.cuh"
#include "philox.cuh"

namespace rllc_fast {
namespace {

constexpr int kThreads = 256;

__global__ void rademacher_kernel(float* __restrict__ out, int64_t total, const int64_t* __restrict__ rng) {
  const int64_t seed = rng[0], offset = rng[1];
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    out[i] = philox_rademacher(seed, offset, i);
  }
}

// grid (blocks, probes): one CUDA block reduces one column block of one probe.
__global__ void blocked_dot_kernel(const float* __restrict__ v, const float* __restrict__ hv,
                                   const int64_t* __restrict__ offsets, int64_t n, int64_t num_blocks,
                                   float* __restrict__ out) {
  const int64_t b = blockIdx.x, p = blockIdx.y;
  // clamped to [0, n]: offsets are validated on the host except under CUDA-graph capture
  const int64_t begin = min(max(offsets[b], int64_t{0}), n), end = min(max(offsets[b + 1], begin), n);
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

at::Tensor rademacher_cuda(int64_t num_probes, int64_t n, const at::Tensor& rng_state) {
  TORCH_CHECK_VALUE(num_probes >= 1 && n >= 1, "rademacher: num_probes and n must be >= 1, got ", num_probes, ", ", n);
  check_rng_state("rademacher", rng_state, rng_state.device());
  const c10::cuda::CUDAGuard guard(rng_state.device());
  at::Tensor out = at::empty({num_probes, n}, rng_state.options().dtype(at::kFloat));
  const int64_t total = num_probes * n;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, 65535);
  rademacher_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      out.data_ptr<float>(), total, rng_state.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor blocked_dot_cuda(const at::Tensor& v, const at::Tensor& hv, const at::Tensor& offsets) {
  TORCH_CHECK_VALUE(v.dim() == 2, "blocked_dot: v must be 2-D [probes, n], got shape ", v.sizes());
  TORCH_CHECK_VALUE(hv.sizes() == v.sizes(), "blocked_dot: hv must have v's shape ", v.sizes(), ", got ", hv.sizes());
  TORCH_CHECK_VALUE(v.scalar_type() == at::kFloat && hv.scalar_type() == at::kFloat, "blocked_dot: v and hv must be float32");
  TORCH_CHECK_VALUE(hv.device() == v.device() && offsets.device() == v.device(), "blocked_dot: v, hv and offsets must share a device");
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.numel() >= 2 && offsets.scalar_type() == at::kLong,
                    "blocked_dot: offsets must be int64 [blocks + 1]");
  TORCH_CHECK_VALUE(v.is_contiguous() && hv.is_contiguous() && offsets.is_contiguous(), "blocked_dot: inputs must be contiguous");
  const c10::cuda::CUDAGuard guard(v.device());
  const int64_t probes = v.size(0), n = v.size(1), num_blocks = offsets.numel() - 1;
  // The host check below syncs, which CUDA-graph capture forbids. cudaStreamIsCapturing is plain CUDA runtime
  // (c10::cuda::isStreamCapturingMayInitCtx is missing from torch 2.11's headers, which broke the build there).
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(), &capture));
  if (capture == cudaStreamCaptureStatusNone) {
    const at::Tensor host = offsets.cpu();
    const int64_t* o = host.data_ptr<int64_t>();
    bool rising = o[0] == 0 && o[num_blocks] == n;
    for (int64_t b = 0; rising && b < num_blocks; ++b) rising = o[b + 1] >= o[b];
    TORCH_CHECK_VALUE(rising, "blocked_dot: offsets must rise from 0 to n = ", n);
  }
  at::Tensor out = at::empty({probes, num_blocks}, v.options());
  if (probes == 0) return out;
  TORCH_CHECK_VALUE(probes <= 65535, "blocked_dot: at most 65535 probes per call, got ", probes);
  const dim3 grid(static_cast<unsigned>(num_blocks), static_cast<unsigned>(probes));
  blocked_dot_kernel<<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      v.data_ptr<float>(), hv.data_ptr<float>(), offsets.data_ptr<int64_t>(), n, num_blocks, out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rllc_fast, CUDA, m) {
  m.impl("rademacher", &rademacher_cuda);
  m.impl("blocked_dot", &blocked_dot_cuda);
}

}  // namespace rllc_fast
