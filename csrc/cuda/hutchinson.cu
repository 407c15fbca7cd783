// Host side of the Hutchinson helpers: argument checks (csrc/arg_checks.h, the same as the CPU ops')
// and the launches of the kernels in hutchinson_kernels.cuh (which the CPU emulation in the tests
// compiles too). No host sync: blocked_dot's offsets are checked by the kernel (bad ones give NaN).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "hutchinson_kernels.cuh"
#include "../tensor_info.h"

namespace rllc_fast {
namespace {

at::Tensor rademacher_cuda(int64_t num_probes, int64_t n, const at::Tensor& rng_state) {
  raise_value_error(check_rademacher_args(num_probes, n, tensor_info(rng_state)));
  const c10::cuda::CUDAGuard guard(rng_state.device());
  at::Tensor out = at::empty({num_probes, n}, rng_state.options().dtype(at::kFloat));
  const int64_t total = num_probes * n;
  hutchinson::rademacher_kernel<<<static_cast<unsigned>(hutchinson::rademacher_blocks(total)), hutchinson::kThreads, 0,
                                  c10::cuda::getCurrentCUDAStream()>>>(out.data_ptr<float>(), total,
                                                                       rng_state.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor blocked_dot_cuda(const at::Tensor& v, const at::Tensor& hv, const at::Tensor& offsets) {
  raise_value_error(check_blocked_dot_args(tensor_info(v), tensor_info(hv), tensor_info(offsets)));
  const c10::cuda::CUDAGuard guard(v.device());
  const int64_t probes = v.size(0), n = v.size(1), num_blocks = offsets.numel() - 1;
  at::Tensor out = at::empty({probes, num_blocks}, v.options());
  if (probes == 0) return out;
  if (probes > 65535)  // gridDim.y's limit
    raise_value_error("blocked_dot: at most 65535 probes per call on CUDA, got " + std::to_string(probes));
  const dim3 grid(static_cast<unsigned>(num_blocks), static_cast<unsigned>(probes));
  hutchinson::blocked_dot_kernel<<<grid, hutchinson::kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
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
