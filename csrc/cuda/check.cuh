// Argument checks shared by the CUDA ops; messages match rllc_fast/ops.py's fallback checks.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace rllc_fast {

inline void check_rng_state(const char* op, const at::Tensor& rng_state, const at::Device& device) {
  TORCH_CHECK_VALUE(rng_state.dim() == 1 && rng_state.size(0) == 2 && rng_state.scalar_type() == at::kLong,
                    op, ": rng_state must be int64 [2] = [seed, offset], got ", rng_state.scalar_type(), " ",
                    rng_state.sizes());
  TORCH_CHECK_VALUE(rng_state.device() == device, op, ": rng_state must be on device ", device, ", got ",
                    rng_state.device());
}

}  // namespace rllc_fast
