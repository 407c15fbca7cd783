// 16-lane float vectors for the CPU kernels (GCC/Clang generic vectors: AVX-512 registers where the
// function is compiled for x86-64-v4, two AVX2 registers for x86-64-v3, SSE otherwise) and an exp for
// non-positive arguments that vectorizes. Every helper is always inlined, so it takes the target of the
// RLLC_CLONES entry function that calls it.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// One copy of the entry function per x86-64 level, picked when the library loads (GCC's target_clones).
#define RLLC_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RLLC_CLONES
#endif
#define RLLC_INLINE static inline __attribute__((always_inline))

namespace rllc_fast::vec {

constexpr int W = 16;  // lanes
typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));

RLLC_INLINE vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
RLLC_INLINE void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
RLLC_INLINE vf splat(float x) { return (vf){} + x; }

template <class V> RLLC_INLINE float lane_sum(V v) {  // any float vector, lane by lane
  float s = 0.f;
  for (int l = 0; l < (int)(sizeof(V) / 4); ++l) s += v[l];
  return s;
}

typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));

// Lane sum and max of a 16-lane vector, by halves (three vector steps, then four lanes), not lane by lane.
RLLC_INLINE vf4 fold_sum(vf v) {
  vf8 a, b;
  std::memcpy(&a, &v, 32);
  std::memcpy(&b, reinterpret_cast<const char*>(&v) + 32, 32);
  a += b;
  vf4 c, d;
  std::memcpy(&c, &a, 16);
  std::memcpy(&d, reinterpret_cast<const char*>(&a) + 16, 16);
  return c + d;
}
RLLC_INLINE float hsum(vf v) {
  const vf4 c = fold_sum(v);
  return (c[0] + c[1]) + (c[2] + c[3]);
}
RLLC_INLINE float hmax(vf v) {
  vf8 a, b;
  std::memcpy(&a, &v, 32);
  std::memcpy(&b, reinterpret_cast<const char*>(&v) + 32, 32);
  a = a > b ? a : b;
  vf4 c, d;
  std::memcpy(&c, &a, 16);
  std::memcpy(&d, reinterpret_cast<const char*>(&a) + 16, 16);
  c = c > d ? c : d;
  const float m0 = c[0] > c[1] ? c[0] : c[1], m1 = c[2] > c[3] ? c[2] : c[3];
  return m0 > m1 ? m0 : m1;
}

// exp(x) for x <= 0 as 2^n p(r), n = round(x / ln 2), |r| <= ln 2 / 2, with Cephes' expf polynomial
// (relative error about 1e-7); x < -87, -inf included, is taken as -87 (about 1.6e-38, not 0: callers that
// need an exact 0, such as masked attention scores, select it). NaN stays NaN.
RLLC_INLINE vf exp_nonpositive(vf x) {
  x = x < -87.f ? splat(-87.f) : x;
  const vf magic = splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  vf t = x * 1.44269504088896341f + magic;
  vf n = t - magic;
  vi ni = (vi)t - (vi)magic;
  vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  return p * (vf)((ni + 127) << 23);
}

}  // namespace rllc_fast::vec
