// Host build of csrc/cuda/philox.cuh for tests/test_philox.py. Reads lines of
// "raw ctr0 ctr1 ctr2 ctr3 key0 key1" (raw Philox4x32-10), "draw seed offset element" or
// "normal4 seed offset group", and prints the four output words in hex; or the four words of the
// call with counter element word `element`, element `element`'s normal draw (%.9g) and Rademacher
// draw; or the four normals (%.9g) of the call for `group`.
#include <cinttypes>
#include <cstdio>
#include <cstring>

#include "../../csrc/cuda/philox.cuh"

int main() {
  char kind[16];
  while (std::scanf("%15s", kind) == 1) {
    if (std::strcmp(kind, "raw") == 0) {
      uint32_t c[4], k[2];
      if (std::scanf("%" SCNx32 " %" SCNx32 " %" SCNx32 " %" SCNx32 " %" SCNx32 " %" SCNx32, &c[0], &c[1], &c[2],
                     &c[3], &k[0], &k[1]) != 6) return 2;
      const rllc_fast::Philox4 r = rllc_fast::philox4x32_10({c[0], c[1], c[2], c[3]}, k[0], k[1]);
      std::printf("%08" PRIx32 " %08" PRIx32 " %08" PRIx32 " %08" PRIx32 "\n", r.x, r.y, r.z, r.w);
    } else if (std::strcmp(kind, "draw") == 0) {
      int64_t seed, offset, element;
      if (std::scanf("%" SCNd64 " %" SCNd64 " %" SCNd64, &seed, &offset, &element) != 3) return 2;
      const rllc_fast::Philox4 r = rllc_fast::philox_bits(seed, offset, element);
      std::printf("%08" PRIx32 " %08" PRIx32 " %08" PRIx32 " %08" PRIx32 " %.9g %.0f\n", r.x, r.y, r.z, r.w,
                  rllc_fast::philox_normal(seed, offset, element), rllc_fast::philox_rademacher(seed, offset, element));
    } else if (std::strcmp(kind, "normal4") == 0) {
      int64_t seed, offset, group;
      if (std::scanf("%" SCNd64 " %" SCNd64 " %" SCNd64, &seed, &offset, &group) != 3) return 2;
      const rllc_fast::Normal4 z = rllc_fast::philox_normal4(seed, offset, group);
      std::printf("%.9g %.9g %.9g %.9g\n", z.v[0], z.v[1], z.v[2], z.v[3]);
    } else {
      return 2;
    }
  }
  return 0;
}
