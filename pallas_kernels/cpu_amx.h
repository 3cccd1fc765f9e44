// What the CPU kernels' AMX loops share (included by their .cc files; pallas_kernels.cpu_ffi hashes
// this header with each of them):
//
// TileConfig          the 64-byte tile configuration _tile_loadconfig takes (palette 1): per tile
//                     register t, rows[t] rows of colsb[t] bytes
// kBf16TileK, kBf16TileElems  a full bfloat16 tile: 32 values along K per 64-byte row (16 pairs),
//                             512 values in its 16 rows
// tile_state_granted()  whether Linux grants the process the AMX tile state (arch_prctl
//                       ARCH_REQ_XCOMP_PERM; asked once per process). Callers check the instructions
//                       themselves: __builtin_cpu_supports("amx-int8") or ("amx-bf16").
// interleave_pairs(even, odd)  16 bfloat16 values of each of two rows k and k + 1 as 16 (k, k + 1)
//                              pairs, one per 32-bit lane (AVX-512 builds)
// store_pairs(even, odd, dst)  the same from memory to dst: one row of a bfloat16 B tile

#ifndef JAXINFER_CPU_AMX_H_
#define JAXINFER_CPU_AMX_H_

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

namespace jaxinfer {

constexpr int64_t kBf16TileK = 32;
constexpr int64_t kBf16TileElems = 512;

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

inline bool tile_state_granted() {
  static const bool granted = [] {
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;  // arch_prctl: request AMX tile data
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return granted;
}

#if defined(__AVX512F__)
// Each 32-bit lane takes even's value as its low half and odd's as its high half: one zero-extend,
// shift and or per 16 columns.
inline __m512i interleave_pairs(__m256i even, __m256i odd) {
  return _mm512_or_si512(_mm512_cvtepu16_epi32(even), _mm512_slli_epi32(_mm512_cvtepu16_epi32(odd), 16));
}

inline void store_pairs(const uint16_t* even, const uint16_t* odd, uint16_t* dst) {
  _mm512_storeu_si512(dst, interleave_pairs(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(even)),
                                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(odd))));
}
#endif

}  // namespace jaxinfer

#endif  // JAXINFER_CPU_AMX_H_
