// The CUDA kernels of csrc/cuda/*_kernel(s).cuh compiled as host C++ over the emulation of
// cuda_emulation.h, and the argument checks of csrc/arg_checks.h, behind a C interface for ctypes
// (tests/emulator.py builds and loads this file; the include path selects the csrc tree, so a mutated
// copy of the sources builds the same way). Each run_* launches one kernel over raw pointers with the
// grid the caller chooses and returns "" or the launch's error.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <sstream>
#include <string>
#include <vector>

#include "cuda_emulation.h"
// the kernels, as the .cu files include them
#include "arg_checks.h"
#include "cuda/hutchinson_kernels.cuh"
#include "cuda/sgld_step_kernel.cuh"

namespace {

thread_local std::string last_message;

const char* result(std::string message) {
  last_message = std::move(message);
  return last_message.c_str();
}

template <typename F>
const char* guarded(F&& f) {
  try {
    f();
    return result("");
  } catch (const std::exception& e) {
    return result(e.what());
  }
}

// "none", or "dtype|device|contiguous (0/1)|size,size,...|unit last stride (0/1)" -> TensorInfo
rllc_fast::TensorInfo parse_info(const char* text) {
  rllc_fast::TensorInfo t;
  const std::string s(text);
  if (s == "none") return t;
  std::vector<std::string> fields;
  std::stringstream in(s);
  for (std::string f; std::getline(in, f, '|');) fields.push_back(f);
  if (s.back() == '|') fields.emplace_back();
  if (fields.size() != 5) throw std::invalid_argument("bad tensor description: " + s);
  t.defined = true;
  t.dtype = fields[0];
  t.device = fields[1];
  t.contiguous = fields[2] == "1";
  t.unit_last_stride = fields[4] == "1";
  std::stringstream sizes(fields[3]);
  for (std::string d; std::getline(sizes, d, ',');) t.sizes.push_back(std::stoll(d));
  return t;
}

template <typename scalar_t>
void sgld(void* w, const void* grad, const void* w_star, const int64_t* lengths, const float* noise,
          const int64_t* rng, float* square_avg, int64_t replicas, int64_t n, float eps, float nbeta, float gamma,
          float alpha, float rms_eps, float* sq_dist, int64_t chunks) {
  using namespace rllc_fast::sgld;
  rllc_emu::launch(uint3{static_cast<unsigned>(chunks), static_cast<unsigned>(replicas), 1}, kThreads, [&] {
    sgld_step_kernel<scalar_t>(static_cast<scalar_t*>(w), static_cast<const scalar_t*>(grad),
                               static_cast<const scalar_t*>(w_star), lengths, noise, rng, square_avg, n, eps, nbeta,
                               gamma, alpha, rms_eps, sq_dist);
  });
}

}  // namespace

#define EXPORT __attribute__((visibility("default")))

extern "C" {

// The grid sgld_step.cu launches for rows of n elements (blocks per replica).
EXPORT int64_t sgld_chunks(int64_t n) { return rllc_fast::sgld::chunks_for(n); }

EXPORT int64_t rademacher_blocks(int64_t total) { return rllc_fast::hutchinson::rademacher_blocks(total); }

// dtype: 0 float32, 1 bfloat16, 2 float16 (the storage of w, grad, w_star). Grid (chunks, replicas).
EXPORT const char* run_sgld_step(int dtype, void* w, const void* grad, const void* w_star, const int64_t* lengths,
                          const float* noise, const int64_t* rng, float* square_avg, int64_t replicas, int64_t n,
                          float eps, float nbeta, float gamma, float alpha, float rms_eps, float* sq_dist,
                          int64_t chunks) {
  return guarded([&] {
    switch (dtype) {
      case 0: return sgld<float>(w, grad, w_star, lengths, noise, rng, square_avg, replicas, n, eps, nbeta, gamma,
                                 alpha, rms_eps, sq_dist, chunks);
      case 1: return sgld<c10::BFloat16>(w, grad, w_star, lengths, noise, rng, square_avg, replicas, n, eps, nbeta,
                                         gamma, alpha, rms_eps, sq_dist, chunks);
      case 2: return sgld<c10::Half>(w, grad, w_star, lengths, noise, rng, square_avg, replicas, n, eps, nbeta,
                                     gamma, alpha, rms_eps, sq_dist, chunks);
      default: throw std::invalid_argument("dtype must be 0, 1 or 2");
    }
  });
}

EXPORT const char* run_rademacher(float* out, int64_t total, const int64_t* rng, int64_t blocks) {
  return guarded([&] {
    using namespace rllc_fast::hutchinson;
    rllc_emu::launch(uint3{static_cast<unsigned>(blocks), 1, 1}, kThreads, [&] { rademacher_kernel(out, total, rng); });
  });
}

// Grid (num_blocks, probes), as hutchinson.cu launches it.
EXPORT const char* run_blocked_dot(const float* v, const float* hv, const int64_t* offsets, int64_t probes, int64_t n,
                            int64_t num_blocks, float* out) {
  return guarded([&] {
    using namespace rllc_fast::hutchinson;
    rllc_emu::launch(uint3{static_cast<unsigned>(num_blocks), static_cast<unsigned>(probes), 1}, kThreads,
                     [&] { blocked_dot_kernel(v, hv, offsets, n, num_blocks, out); });
  });
}

EXPORT const char* check_sgld_args(const char* w, const char* grad, const char* w_star, const char* lengths,
                            const char* noise, const char* rng_state, const char* square_avg, double alpha,
                            double eps) {
  return result(rllc_fast::check_sgld_args(parse_info(w), parse_info(grad), parse_info(w_star),
                                           parse_info(lengths), parse_info(noise), parse_info(rng_state),
                                           parse_info(square_avg), alpha, eps));
}

EXPORT const char* check_rademacher_args(int64_t num_probes, int64_t n, const char* rng_state) {
  return result(rllc_fast::check_rademacher_args(num_probes, n, parse_info(rng_state)));
}

EXPORT const char* check_blocked_dot_args(const char* v, const char* hv, const char* offsets) {
  return result(rllc_fast::check_blocked_dot_args(parse_info(v), parse_info(hv), parse_info(offsets)));
}

}  // extern "C"
