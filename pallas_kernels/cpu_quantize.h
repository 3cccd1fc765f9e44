// Symmetric int8 quantization of activations for the CPU kernels' .cc files (pallas_kernels.cpu_ffi
// hashes this header with each of them).
//
// quantize_int8(x, n, q, sum) quantizes n floats as activation_quant.quantize_per_token quantizes a
// row: scale = max|x| / 127 (1 / 127 when all are zero), q = x / scale rounded half to even and
// clamped to [-127, 127]. It returns the scale and, when `sum` is given, stores sum(x) there.
// Vectorized (AVX-512, or AVX2 where the kernel is built without it): a scalar loop's nearbyint
// calls cost about as much as an int8 dot of 8-32 rows.

#ifndef JAXINFER_CPU_QUANTIZE_H_
#define JAXINFER_CPU_QUANTIZE_H_

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace jaxinfer {

// The vector parts, per instruction set: over x[0 .. n) with n a multiple of kQuantLanes, the
// largest |x| and the sum; and q = x / scale rounded half to even, clamped to [-127, 127].
#if defined(__AVX512F__)
constexpr int64_t kQuantLanes = 16;

inline void peak_and_sum(const float* x, int64_t n, float* absmax, float* sum) {
  __m512 peak = _mm512_setzero_ps(), total = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    peak = _mm512_max_ps(peak, _mm512_abs_ps(v));
    total = _mm512_add_ps(total, v);
  }
  *absmax = _mm512_reduce_max_ps(peak), *sum = _mm512_reduce_add_ps(total);
}

inline void quantize_lanes(const float* x, int64_t n, float scale, int8_t* q) {
  const __m512 divisor = _mm512_set1_ps(scale), high = _mm512_set1_ps(127.0f), low = _mm512_set1_ps(-127.0f);
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 rounded = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(x + i), divisor),
                                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i value = _mm512_cvtps_epi32(_mm512_min_ps(high, _mm512_max_ps(low, rounded)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtepi32_epi8(value));
  }
}

#else  // AVX2
constexpr int64_t kQuantLanes = 8;

inline void peak_and_sum(const float* x, int64_t n, float* absmax, float* sum) {
  const __m256 sign_bit = _mm256_set1_ps(-0.0f);
  __m256 peak = _mm256_setzero_ps(), total = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    peak = _mm256_max_ps(peak, _mm256_andnot_ps(sign_bit, v));
    total = _mm256_add_ps(total, v);
  }
  alignas(32) float peaks[8], totals[8];
  _mm256_store_ps(peaks, peak);
  _mm256_store_ps(totals, total);
  *absmax = 0.0f, *sum = 0.0f;
  for (int lane = 0; lane < 8; ++lane) *absmax = std::max(*absmax, peaks[lane]), *sum += totals[lane];
}

inline void quantize_lanes(const float* x, int64_t n, float scale, int8_t* q) {
  const __m256 divisor = _mm256_set1_ps(scale), high = _mm256_set1_ps(127.0f), low = _mm256_set1_ps(-127.0f);
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 rounded = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + i), divisor),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i value = _mm256_cvtps_epi32(_mm256_min_ps(high, _mm256_max_ps(low, rounded)));
    // The 128-bit packs keep the order: eight int16, then eight bytes.
    const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(value), _mm256_extracti128_si256(value, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + i), _mm_packs_epi16(words, words));
  }
}
#endif

inline float quantize_int8(const float* x, int64_t n, int8_t* q, float* sum = nullptr) {
  const int64_t vectored = n / kQuantLanes * kQuantLanes;
  float absmax, x_sum;
  peak_and_sum(x, vectored, &absmax, &x_sum);
  for (int64_t j = vectored; j < n; ++j) absmax = std::max(absmax, std::fabs(x[j])), x_sum += x[j];
  if (sum != nullptr) *sum = x_sum;
  const float scale = (absmax > 0.0f ? absmax : 1.0f) / 127.0f;
  quantize_lanes(x, vectored, scale, q);
  for (int64_t i = vectored; i < n; ++i)
    q[i] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, std::nearbyint(x[i] / scale))));
  return scale;
}

}  // namespace jaxinfer

#endif  // JAXINFER_CPU_QUANTIZE_H_
