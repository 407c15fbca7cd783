// Header-only Philox4x32-10 (Salmon et al. 2011) and the normal/Rademacher draws built on it.
// Counter = (offset lo, offset hi, index lo, index hi), key = seed, with index = element / 4 for the
// normal stream (four normals per call) and index = element for the Rademacher stream: a draw
// depends only on (seed, offset, element index), never on the launch grid.
// Also compiles as plain host C++ (tests/csrc/philox_host.cpp checks it against the Random123
// known-answer vectors and tests/philox_reference.py; the CPU emulation of the kernels,
// tests/test_emulated_kernels.py, runs it inside the kernels).
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define RLLC_HD __host__ __device__ __forceinline__
#define RLLC_UNROLL _Pragma("unroll")
#else
#define RLLC_UNROLL
#include <cmath>
#define RLLC_HD inline
#endif

namespace rllc_fast {

struct Philox4 { uint32_t x, y, z, w; };

RLLC_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(product >> 32);
  return static_cast<uint32_t>(product);
}

RLLC_HD Philox4 philox4x32_10(Philox4 ctr, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  RLLC_UNROLL
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(kM0, ctr.x, &hi0);
    const uint32_t lo1 = mulhilo32(kM1, ctr.z, &hi1);
    ctr = Philox4{hi1 ^ ctr.y ^ k0, lo1, hi0 ^ ctr.w ^ k1, lo0};
    k0 += kW0;
    k1 += kW1;
  }
  return ctr;
}

RLLC_HD Philox4 philox_bits(int64_t seed, int64_t offset, int64_t element) {
  const uint64_t s = static_cast<uint64_t>(seed), o = static_cast<uint64_t>(offset);
  const uint64_t e = static_cast<uint64_t>(element);
  return philox4x32_10(Philox4{static_cast<uint32_t>(o), static_cast<uint32_t>(o >> 32),
                               static_cast<uint32_t>(e), static_cast<uint32_t>(e >> 32)},
                       static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32));
}

// Normal draws: each Philox call gives four N(0, 1) values, Box-Muller on words (x, y) and on (z, w).
// Element e of the stream is value e % 4 of the call with counter element word e / 4, so one call
// serves four consecutive elements (the kernels draw a group of four per call).
constexpr int kNormalsPerCall = 4;

struct Normal4 { float v[kNormalsPerCall]; };

// Two N(0, 1) values from two 32-bit words: u1 in (0, 1], u2 in [0, 1), radius sqrt(-2 log u1).
RLLC_HD void box_muller(uint32_t a, uint32_t b, float* z0, float* z1) {
  const float u1 = (static_cast<float>(a) + 1.0f) * 2.3283064365386963e-10f;
  const float u2 = static_cast<float>(b) * 2.3283064365386963e-10f;
#ifdef __CUDA_ARCH__
  const float radius = sqrtf(-2.0f * logf(u1));
  float s, c;
  sincospif(2.0f * u2, &s, &c);
#else
  const float radius = std::sqrt(-2.0f * std::log(u1));
  const float c = static_cast<float>(std::cos(6.283185307179586 * u2));
  const float s = static_cast<float>(std::sin(6.283185307179586 * u2));
#endif
  *z0 = radius * c;
  *z1 = radius * s;
}

// The four normals of stream elements 4 * group .. 4 * group + 3.
RLLC_HD Normal4 philox_normal4(int64_t seed, int64_t offset, int64_t group) {
  const Philox4 r = philox_bits(seed, offset, group);
  Normal4 out;
  box_muller(r.x, r.y, &out.v[0], &out.v[1]);
  box_muller(r.z, r.w, &out.v[2], &out.v[3]);
  return out;
}

// Element `element` (>= 0) of the normal stream.
RLLC_HD float philox_normal(int64_t seed, int64_t offset, int64_t element) {
  return philox_normal4(seed, offset, element / kNormalsPerCall).v[element % kNormalsPerCall];
}

// Rademacher entry `element`: bit 0 of the first word of the call with counter element word `element`.
RLLC_HD float philox_rademacher(int64_t seed, int64_t offset, int64_t element) {
  return (philox_bits(seed, offset, element).x & 1u) ? 1.0f : -1.0f;
}

}  // namespace rllc_fast
