// The float32 vector the CPU kernels' .cc files write their element-wise passes in
// (pallas_kernels.cpu_ffi hashes this header with each of them): VecF holds kLane floats, 16 in a
// build with AVX-512 and 8 in an AVX2 build, with the few operations the passes use, and bfloat16
// rounded as XLA's convert rounds it.

#ifndef JAXINFER_CPU_VEC_H_
#define JAXINFER_CPU_VEC_H_

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace jaxinfer::vec {

#if defined(__AVX512F__)
constexpr int64_t kLane = 16;
using VecF = __m512;
using VecI = __m512i;
inline VecF load_f32(const float* p) { return _mm512_loadu_ps(p); }
inline void store_f32(float* p, VecF v) { _mm512_storeu_ps(p, v); }
inline VecF broadcast(float v) { return _mm512_set1_ps(v); }
inline VecF fmadd(VecF a, VecF b, VecF c) { return _mm512_fmadd_ps(a, b, c); }
inline VecF add(VecF a, VecF b) { return _mm512_add_ps(a, b); }
inline VecF mul(VecF a, VecF b) { return _mm512_mul_ps(a, b); }
inline VecF sub(VecF a, VecF b) { return _mm512_sub_ps(a, b); }
inline float lane_sum(VecF v) { return _mm512_reduce_add_ps(v); }
// v rounded to the nearest bfloat16 (ties to even) as XLA's convert does, NaN kept a quiet NaN: the
// bfloat16 bits in each lane's top half, the low half zero (so also the rounded float32). In integer
// operations, since this build also runs on AVX-512 CPUs without AVX512-BF16; the dense kernel's
// SwiGLU, which runs only on AMX CPUs, rounds with their one-instruction vcvtneps2bf16.
inline VecI bf16_bits(VecF v) {
  const __m512i bits = _mm512_castps_si512(v), top = _mm512_set1_epi32(-65536);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_and_si512(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), top);
  const __m512i quiet = _mm512_and_si512(_mm512_or_si512(bits, _mm512_set1_epi32(0x400000)), top);
  return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), rounded, quiet);
}
inline VecF bits_as_f32(VecI v) { return _mm512_castsi512_ps(v); }
inline void store_bf16(uint16_t* p, VecI bits) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
}
// The 2 x kLane floats at p as their even and odd elements.
inline void deinterleave(const float* p, VecF* even, VecF* odd) {
  const __m512i even_index = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512 a = _mm512_loadu_ps(p), b = _mm512_loadu_ps(p + 16);
  *even = _mm512_permutex2var_ps(a, even_index, b);
  *odd = _mm512_permutex2var_ps(a, _mm512_add_epi32(even_index, _mm512_set1_epi32(1)), b);
}
#else  // AVX2
constexpr int64_t kLane = 8;
using VecF = __m256;
using VecI = __m256i;
inline VecF load_f32(const float* p) { return _mm256_loadu_ps(p); }
inline void store_f32(float* p, VecF v) { _mm256_storeu_ps(p, v); }
inline VecF broadcast(float v) { return _mm256_set1_ps(v); }
inline VecF fmadd(VecF a, VecF b, VecF c) { return _mm256_fmadd_ps(a, b, c); }
inline VecF add(VecF a, VecF b) { return _mm256_add_ps(a, b); }
inline VecF mul(VecF a, VecF b) { return _mm256_mul_ps(a, b); }
inline VecF sub(VecF a, VecF b) { return _mm256_sub_ps(a, b); }
inline float lane_sum(VecF v) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  sum = _mm_hadd_ps(sum, sum);
  return _mm_cvtss_f32(_mm_hadd_ps(sum, sum));
}
inline VecI bf16_bits(VecF v) {
  const __m256i bits = _mm256_castps_si256(v), top = _mm256_set1_epi32(-65536);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_and_si256(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), top);
  const __m256i quiet = _mm256_and_si256(_mm256_or_si256(bits, _mm256_set1_epi32(0x400000)), top);
  return _mm256_blendv_epi8(rounded, quiet, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}
inline VecF bits_as_f32(VecI v) { return _mm256_castsi256_ps(v); }
inline void store_bf16(uint16_t* p, VecI bits) {
  const __m256i high = _mm256_srli_epi32(bits, 16);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(high), _mm256_extracti128_si256(high, 1)));
}
inline void deinterleave(const float* p, VecF* even, VecF* odd) {
  const __m256 a = _mm256_loadu_ps(p), b = _mm256_loadu_ps(p + 8);
  // Within each 128-bit half: (a0 a2 b0 b2 | a4 a6 b4 b6); the 64-bit swap puts them in order.
  *even = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88)), 0xD8));
  *odd = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0xDD)), 0xD8));
}
#endif

// A bfloat16 value (its bits) as float32: the float's top half.
inline float bf16_to_f32(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}

}  // namespace jaxinfer::vec

#endif  // JAXINFER_CPU_VEC_H_
