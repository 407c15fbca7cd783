// Fused masked multi-replica SGLD step:
//   w[r, j] <- w - eps/2 (nbeta g + gamma (w - w*)) + sqrt(eps) xi     for j < lengths[r]
// in float32 whatever the storage type, with xi from `noise` or Philox(seed, offset, element),
// and ||w_r - w*_r||^2 accumulated per replica. One launch for all replicas: grid (chunks, R).
// With square_avg (float32), RMSProp-preconditioned as rllc_fast.sgld.rmsprop_sgld_delta:
//   a <- alpha a + (1 - alpha) g^2;  P = 1 / (sqrt(a) + rms_eps);  drift *= P;  noise *= sqrt(P).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "check.cuh"
#include "philox.cuh"

namespace rllc_fast {
namespace {

constexpr int kThreads = 256;

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
  float acc = 0.0f;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; j < len;
       j += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t idx = r * n + j;
    const float v = static_cast<float>(w[idx]);
    const float v0 = static_cast<float>(w_star[idx]);
    const float xi = noise != nullptr ? noise[idx] : philox_normal(seed, offset, idx);
    const float g = static_cast<float>(grad[idx]);
    float drift = gamma * (v - v0) + nbeta * g;
    float noise_scale = sqrt_eps;
    if (square_avg != nullptr) {
      const float a = alpha * square_avg[idx] + (1.0f - alpha) * g * g;
      square_avg[idx] = a;
      const float precond = 1.0f / (sqrtf(a) + rms_eps);
      drift *= precond;
      noise_scale = sqrtf(eps * precond);
    }
    const scalar_t stored = static_cast<scalar_t>(v - half_eps * drift + noise_scale * xi);
    w[idx] = stored;
    const float d = static_cast<float>(stored) - v0;
    acc += d * d;
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) atomicAdd(sq_dist + r, acc);
}

at::Tensor sgld_step_cuda(at::Tensor w, const at::Tensor& grad, const at::Tensor& w_star,
                          const at::Tensor& lengths, const std::optional<at::Tensor>& noise,
                          const std::optional<at::Tensor>& rng_state, double step_size, double nbeta,
                          double localization, const std::optional<at::Tensor>& square_avg, double rmsprop_alpha,
                          double rmsprop_eps) {
  TORCH_CHECK_VALUE(w.dim() == 2, "sgld_step: w must be 2-D [replicas, n], got shape ", w.sizes());
  TORCH_CHECK_VALUE(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16 ||
                        w.scalar_type() == at::kHalf,
                    "sgld_step: w must be float32, bfloat16 or float16, got ", w.scalar_type());
  TORCH_CHECK_VALUE(w.is_contiguous(), "sgld_step: w must be contiguous");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"grad", grad}, {"w_star", w_star}}) {
    TORCH_CHECK_VALUE(t.sizes() == w.sizes(), "sgld_step: ", name, " must have w's shape ", w.sizes(), ", got ", t.sizes());
    TORCH_CHECK_VALUE(t.scalar_type() == w.scalar_type(), "sgld_step: ", name, " must have w's dtype ", w.scalar_type(), ", got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.device() == w.device(), "sgld_step: ", name, " must be on w's device ", w.device(), ", got ", t.device());
    TORCH_CHECK_VALUE(t.is_contiguous(), "sgld_step: ", name, " must be contiguous");
  }
  TORCH_CHECK_VALUE(lengths.dim() == 1 && lengths.size(0) == w.size(0),
                    "sgld_step: lengths must be [replicas] = [", w.size(0), "], got shape ", lengths.sizes());
  TORCH_CHECK_VALUE(lengths.scalar_type() == at::kLong, "sgld_step: lengths must be int64, got ", lengths.scalar_type());
  TORCH_CHECK_VALUE(lengths.device() == w.device(), "sgld_step: lengths must be on w's device ", w.device());
  if (noise.has_value()) {
    TORCH_CHECK_VALUE(noise->sizes() == w.sizes(), "sgld_step: noise must have w's shape ", w.sizes(), ", got ", noise->sizes());
    TORCH_CHECK_VALUE(noise->scalar_type() == at::kFloat, "sgld_step: noise must be float32, got ", noise->scalar_type());
    TORCH_CHECK_VALUE(noise->device() == w.device(), "sgld_step: noise must be on w's device ", w.device());
    TORCH_CHECK_VALUE(noise->is_contiguous(), "sgld_step: noise must be contiguous");
  } else {
    TORCH_CHECK_VALUE(rng_state.has_value(), "sgld_step: pass noise or rng_state ([seed, offset] int64)");
  }
  if (rng_state.has_value()) check_rng_state("sgld_step", *rng_state, w.device());
  if (square_avg.has_value()) {
    TORCH_CHECK_VALUE(square_avg->sizes() == w.sizes(), "sgld_step: square_avg must have w's shape ", w.sizes(), ", got ", square_avg->sizes());
    TORCH_CHECK_VALUE(square_avg->scalar_type() == at::kFloat, "sgld_step: square_avg must be float32, got ", square_avg->scalar_type());
    TORCH_CHECK_VALUE(square_avg->device() == w.device(), "sgld_step: square_avg must be on w's device ", w.device());
    TORCH_CHECK_VALUE(square_avg->is_contiguous(), "sgld_step: square_avg must be contiguous");
    TORCH_CHECK_VALUE(0.0 <= rmsprop_alpha && rmsprop_alpha < 1.0, "sgld_step: rmsprop_alpha must be in [0, 1), got ", rmsprop_alpha);
    TORCH_CHECK_VALUE(rmsprop_eps > 0.0, "sgld_step: rmsprop_eps must be > 0, got ", rmsprop_eps);
  }

  const c10::cuda::CUDAGuard guard(w.device());
  const int64_t replicas = w.size(0), n = w.size(1);
  at::Tensor sq_dist = at::zeros({replicas}, w.options().dtype(at::kFloat));
  if (replicas == 0 || n == 0) return sq_dist;
  TORCH_CHECK_VALUE(replicas <= 65535, "sgld_step: at most 65535 replicas per call, got ", replicas);
  const int64_t chunks = std::min<int64_t>((n + kThreads - 1) / kThreads, 1024);
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(replicas));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const float* noise_ptr = noise.has_value() ? noise->data_ptr<float>() : nullptr;
  const int64_t* rng_ptr = (!noise.has_value() && rng_state.has_value()) ? rng_state->data_ptr<int64_t>() : nullptr;
  float* avg_ptr = square_avg.has_value() ? square_avg->data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "sgld_step_cuda", [&] {
    sgld_step_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        w.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), w_star.data_ptr<scalar_t>(),
        lengths.data_ptr<int64_t>(), noise_ptr, rng_ptr, avg_ptr, n, static_cast<float>(step_size),
        static_cast<float>(nbeta), static_cast<float>(localization), static_cast<float>(rmsprop_alpha),
        static_cast<float>(rmsprop_eps), sq_dist.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return sq_dist;
}

}  // namespace

TORCH_LIBRARY_IMPL(rllc_fast, CUDA, m) { m.impl("sgld_step", &sgld_step_cuda); }

}  // namespace rllc_fast
