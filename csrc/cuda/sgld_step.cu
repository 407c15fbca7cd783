// Host side of the fused masked multi-replica SGLD step: argument checks (csrc/arg_checks.h, the same
// as the CPU op's) and the launch of sgld_step_kernel (sgld_step_kernel.cuh, which the CPU emulation
// in the tests compiles too).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "sgld_step_kernel.cuh"
#include "../tensor_info.h"

namespace rllc_fast {
namespace {

at::Tensor sgld_step_cuda(at::Tensor w, const at::Tensor& grad, const at::Tensor& w_star,
                          const at::Tensor& lengths, const std::optional<at::Tensor>& noise,
                          const std::optional<at::Tensor>& rng_state, double step_size, double nbeta,
                          double localization, const std::optional<at::Tensor>& square_avg, double rmsprop_alpha,
                          double rmsprop_eps) {
  // every check reads metadata only, dims before sizes, before anything touches the data
  raise_value_error(check_sgld_args(tensor_info(w), tensor_info(grad), tensor_info(w_star), tensor_info(lengths),
                                    tensor_info(noise), tensor_info(rng_state), tensor_info(square_avg),
                                    rmsprop_alpha, rmsprop_eps));
  const c10::cuda::CUDAGuard guard(w.device());
  const int64_t replicas = w.size(0), n = w.size(1);
  at::Tensor sq_dist = at::zeros({replicas}, w.options().dtype(at::kFloat));
  if (replicas == 0 || n == 0) return sq_dist;
  if (replicas > 65535)  // gridDim.y's limit
    raise_value_error("sgld_step: at most 65535 replicas per call on CUDA, got " + std::to_string(replicas));
  const dim3 grid(static_cast<unsigned>(sgld::chunks_for(n)), static_cast<unsigned>(replicas));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const float* noise_ptr = noise.has_value() ? noise->data_ptr<float>() : nullptr;
  const int64_t* rng_ptr = (!noise.has_value() && rng_state.has_value()) ? rng_state->data_ptr<int64_t>() : nullptr;
  float* avg_ptr = square_avg.has_value() ? square_avg->data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "sgld_step_cuda", [&] {
    sgld::sgld_step_kernel<scalar_t><<<grid, sgld::kThreads, 0, stream>>>(
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
