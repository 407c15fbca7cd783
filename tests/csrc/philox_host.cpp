// Host build of csrc/cuda/philox.cuh for tests/test_philox.py. Reads lines of
// "ctr0 ctr1 ctr2 ctr3 key0 key1" (raw Philox4x32-10) or "draw seed offset element", and prints
// the four output words in hex, or the four words, the normal draw (%.9g) and the Rademacher draw.
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
    } else {
      return 2;
    }
  }
  return 0;
}
