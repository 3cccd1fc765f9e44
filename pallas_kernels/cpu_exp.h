// exp(x) for x <= 0, vectorized, for the CPU kernels' .cc files (pallas_kernels.cpu_ffi hashes this
// header with each of them): attention's softmax (logits minus their maximum) and the SwiGLU's
// sigmoid (exp(-|gate|)).
//
// exp_nonpositive(x) for 8 floats (AVX2) or, in AVX-512 builds, 16: to about 2 ulp, x = n ln2 + r
// with |r| <= ln2 / 2, exp(r) by Cephes' expf polynomial, 2^n through the exponent bits. libm's
// scalar expf was most of the attention kernel's time at long contexts.
// sigmoid(x) likewise: 1 / (1 + e) for x >= 0 and e / (1 + e) below, e = exp(-|x|), which keeps
// the small values of very negative x (x * (1 + tanh(x / 2)) / 2 lost them to cancellation).

#ifndef JAXINFER_CPU_EXP_H_
#define JAXINFER_CPU_EXP_H_

#include <immintrin.h>

namespace jaxinfer {

// Below this exp(x) is under float's normal range.
constexpr float kExpFloor = -87.0f;
constexpr float kLog2E = 1.44269504088896341f;
// ln 2 in two parts, so that x - n ln 2 keeps its low bits.
constexpr float kLn2High = 0.693359375f, kLn2Low = -2.12194440e-4f;
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(kExpFloor));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2High), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Low), r);
  __m256 poly = _mm256_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(kExpPoly[i]));
  const __m256 exp_r = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(poly, r), r, r), _mm256_set1_ps(1.0f));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(exp_r, _mm256_castsi256_ps(two_n));
}

#if defined(__AVX512F__)
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(kExpFloor));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2High), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Low), r);
  __m512 poly = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(kExpPoly[i]));
  const __m512 exp_r = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(poly, r), r, r), _mm512_set1_ps(1.0f));
  const __m512i two_n = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(exp_r, _mm512_castsi512_ps(two_n));
}
#endif

inline __m256 sigmoid(__m256 x) {
  const __m256 e = exp_nonpositive(_mm256_min_ps(x, _mm256_sub_ps(_mm256_setzero_ps(), x)));
  const __m256 positive = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
  return _mm256_blendv_ps(positive, _mm256_mul_ps(positive, e), _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ));
}

#if defined(__AVX512F__)
inline __m512 sigmoid(__m512 x) {
  const __m512 e = exp_nonpositive(_mm512_min_ps(x, _mm512_sub_ps(_mm512_setzero_ps(), x)));
  const __m512 positive = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
  return _mm512_mask_mul_ps(positive, _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), positive, e);
}
#endif

}  // namespace jaxinfer

#endif  // JAXINFER_CPU_EXP_H_
