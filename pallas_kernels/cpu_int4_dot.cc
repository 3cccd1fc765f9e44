// W4A8 on x86 CPUs: group-wise asymmetric int4 weights times activations quantized to int8 per
// group, as XLA FFI custom calls (built, registered and fed packed weights by cpu_int4_dot.py).
// It is the arithmetic of llama.cpp's Q4_1 x Q8_1 dot, over the layout below.
//
//   jaxinfer_w4a8_dot: x [M, K] f32, codes [N/16, K/8, 16, 4] u8, scale [N/16, K/G, 16] f16,
//                      offset [N/16, K/G, 16] f16, live [] s32 -> y [M, N] f32
//   jaxinfer_w4a8_add_norm: x, codes, scale, offset, residual [M, N] f32, norm weight [N] f32 | bf16,
//                      live; attribute eps -> (residual + y [M, N] f32, its RMSNorm f32)
//   jaxinfer_w4a8_qkv_rope: x, codes, scale, offset, cos, sin [M, D / 2] f32, live; attributes
//                      kv_heads, q_per_kv -> q, k, v f32, q and k rotated
//   jaxinfer_w4a8_swiglu: x, codes, scale, offset, live -> silu(gate) * up [M, N / 2] f32
//   each computing the first `live` rows and writing zeros in the rest (cpu_row_count.h). The last
//   three take the product through a pass over its rows in the same call (cpu_row_passes.h): a
//   float32 engine's residual add and next RMSNorm after an output projection, its split into heads
//   and RoPE after the qkv projection, its SwiGLU after the gate_up projection, which XLA ran as
//   about 13 small operations a layer.
//   The weight stands for w[k, n] = q[k, n] * scale[g, n] + offset[g, n] (g = k / G, q in [0, 15]),
//   stored per block of 16 outputs b (n = 16 b + r) and K octet o (k = 8 o + j, j < 8):
//       codes[b, o, r, j] = q[8 o + j, n] | q[8 o + 4 + j, n] << 4     for j < 4
//       scale[b, g, r] = scale[g, n], offset likewise
//   so one block's codes, scales and offsets are each contiguous and stream in order.
//   Each row of x is quantized per group of G: a = max|x_group| / 127 (1 / 127 for a zero group),
//   x_q = x / a rounded half to even (|x_q| <= 127; activation_quant.quantize_per_token on the
//   group), and s = sum(x_group) in float. Then, with the integer dot d[g] = sum_k x_q[k] q[k, n]
//   over the group, computed exactly,
//       y[m, n] = sum_g a[m, g] * scale[g, n] * d[g] + s[m, g] * offset[g, n].
//
// The loop: one zmm load is one octet of K for 16 outputs (4 bytes a lane). Its low nibbles are K
// 0-3 of each output and its high nibbles K 4-7, so two vpdpbusd (unsigned codes times signed
// bytes, summed in fours) against the row's 4 activation bytes broadcast to every lane add one
// octet to 16 outputs' int32 sums, with no horizontal reduction anywhere. At the end of each group
// the sums become float and take the group's scales (two FMAs per row). Up to kRowBlock rows share
// each load of the codes; more rows walk the same block (16 x K/2 bytes, in L1) again.
// Output blocks are shared with XLA's intra-op thread pool (cpu_thread_pool.h).
//
// Built without AVX-512 VNNI (pallas_kernels.cpu_int4_dot picks the build for the CPU), the same
// walk runs on AVX2 as llama.cpp's AVX2 Q4_1 dot does: an octet is two ymm loads (outputs 0-7 and
// 8-15), and vpmaddubsw multiplies the unsigned codes by the signed activation bytes, summing pairs
// into int16 lanes. Two octets (8 products of at most 15 x 127 per lane, under 2^15) add up in int16
// before vpmaddwd against ones widens each output's sums to int32, exactly.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cpu_quantize.h"
#include "cpu_row_count.h"
#include "cpu_row_passes.h"
#include "cpu_thread_pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlockCols = 16;
constexpr int64_t kOctet = 8;
// The first row block of an output block, which streams its codes from memory, prefetches this many
// 64-byte lines ahead: the VNNI loop into L2, the AVX2 loop into L1. On the Zen 5 VM (2026-12-08, a
// w4a8 engine's decode with the two switched in place by round in one process, six rounds) the VNNI
// loop's prefetch 128 lines (8 KB, a little more than one block of K = 576) ahead into L2 ran batch
// 1 / 4 / 8 1.08 / 1.36 / 1.25x as fast as 8 lines ahead into L1 (faster in 5 / 6 / 6 rounds); 64
// lines ahead 1.02 / 1.10 / 1.15x; 256 and 512 lines 0.93-0.99x of 128. On the Zen 4 VM 8 lines into
// L2 had been slower than into L1 (0.93-0.97x); farther ahead was not measured there.
#if defined(__AVX512VNNI__)
constexpr int64_t kPrefetchLines = 128;
#else
constexpr int64_t kPrefetchLines = 8;
#endif
// Output blocks per work item: 64 outputs, enough items to spread a 576-output weight over two
// threads (9 items), few enough to amortize taking one.
constexpr int64_t kBlocksPerItem = 4;

struct Problem {
  const int8_t* x_q;      // [M, K]
  const float* x_scale;   // [M, K/G]
  const float* x_sum;     // [M, K/G]
  const uint8_t* codes;   // [N/16, K/8, 16, 4]
  const uint16_t* scale;  // [N/16, K/G, 16] f16 bits
  const uint16_t* offset;
  float* y;               // [M, N]
  int64_t m, k, n, group;
};

#if defined(__AVX512VNNI__)

constexpr int kRowBlock = 8;

inline __m512 load_f16x16(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

inline __m512i broadcast4(const int8_t* p) {
  int32_t quad;
  std::memcpy(&quad, p, sizeof(quad));
  return _mm512_set1_epi32(quad);
}

// Rows r0..r0+R-1 of y, outputs 16b..16b+15. Each row keeps A int32 sums per group, so that few
// rows still have independent vpdpbusd chains in flight (one chain ran at its latency, not at the
// load rate); they are added at the group's end.
template <int R, bool kFirst>
void block(const Problem& p, int64_t r0, int64_t b) {
  constexpr int A = R == 1 ? 4 : (R == 2 ? 2 : 1);
  const int64_t groups = p.k / p.group, octets_per_group = p.group / kOctet;
  const uint8_t* codes = p.codes + b * p.k * kBlockCols / 2;
  const uint16_t* scale = p.scale + b * groups * kBlockCols;
  const uint16_t* offset = p.offset + b * groups * kBlockCols;
  const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
  __m512 out[R];
  for (int r = 0; r < R; ++r) out[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i acc[R][A];
    for (int r = 0; r < R; ++r)
      for (int a = 0; a < A; ++a) acc[r][a] = _mm512_setzero_si512();
    // Octets in pairs (G is a multiple of 16): four products of codes and activations per row.
    for (int64_t o = g * octets_per_group; o < (g + 1) * octets_per_group; o += 2) {
      const uint8_t* line = codes + o * 64;
      if (kFirst) {
        _mm_prefetch(reinterpret_cast<const char*>(line + kPrefetchLines * 64), _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(line + (kPrefetchLines + 1) * 64), _MM_HINT_T1);
      }
      __m512i nibbles[4];
      for (int u = 0; u < 2; ++u) {
        const __m512i packed = _mm512_loadu_si512(line + u * 64);
        nibbles[2 * u] = _mm512_and_si512(packed, low_nibbles);
        nibbles[2 * u + 1] = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low_nibbles);
      }
      for (int r = 0; r < R; ++r) {
        const int8_t* x = p.x_q + (r0 + r) * p.k + o * kOctet;
        for (int t = 0; t < 4; ++t) acc[r][t % A] = _mm512_dpbusd_epi32(acc[r][t % A], nibbles[t], broadcast4(x + 4 * t));
      }
    }
    const __m512 group_scale = load_f16x16(scale + g * kBlockCols);
    const __m512 group_offset = load_f16x16(offset + g * kBlockCols);
    for (int r = 0; r < R; ++r) {
      __m512i sum = acc[r][0];
      for (int a = 1; a < A; ++a) sum = _mm512_add_epi32(sum, acc[r][a]);
      const int64_t at = (r0 + r) * groups + g;
      const __m512 step = _mm512_mul_ps(group_scale, _mm512_set1_ps(p.x_scale[at]));
      out[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), step, out[r]);
      out[r] = _mm512_fmadd_ps(group_offset, _mm512_set1_ps(p.x_sum[at]), out[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(p.y + (r0 + r) * p.n + b * kBlockCols, out[r]);
}

#else  // AVX2

constexpr int kRowBlock = 4;

inline __m256 load_f16x8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline __m256i broadcast4(const int8_t* p) {
  int32_t quad;
  std::memcpy(&quad, p, sizeof(quad));
  return _mm256_set1_epi32(quad);
}

// Rows r0..r0+R-1 of y, outputs 16b..16b+15, in two halves of 8 outputs (one ymm each).
template <int R, bool kFirst>
void block(const Problem& p, int64_t r0, int64_t b) {
  const int64_t groups = p.k / p.group, octets_per_group = p.group / kOctet;
  const uint8_t* codes = p.codes + b * p.k * kBlockCols / 2;
  const uint16_t* scale = p.scale + b * groups * kBlockCols;
  const uint16_t* offset = p.offset + b * groups * kBlockCols;
  const __m256i low_nibbles = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 out[R][2];
  for (int r = 0; r < R; ++r) out[r][0] = out[r][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256i acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    for (int64_t o = g * octets_per_group; o < (g + 1) * octets_per_group; o += 2) {
      const uint8_t* line = codes + o * 64;
      if (kFirst) {
        _mm_prefetch(reinterpret_cast<const char*>(line + kPrefetchLines * 64), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(line + (kPrefetchLines + 1) * 64), _MM_HINT_T0);
      }
      for (int h = 0; h < 2; ++h) {
        __m256i nibbles[4];  // octet o low, high, octet o + 1 low, high
        for (int u = 0; u < 2; ++u) {
          const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(line + u * 64 + h * 32));
          nibbles[2 * u] = _mm256_and_si256(packed, low_nibbles);
          nibbles[2 * u + 1] = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low_nibbles);
        }
        for (int r = 0; r < R; ++r) {
          const int8_t* x = p.x_q + (r0 + r) * p.k + o * kOctet;
          __m256i pairs = _mm256_maddubs_epi16(nibbles[0], broadcast4(x));
          for (int t = 1; t < 4; ++t) pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(nibbles[t], broadcast4(x + 4 * t)));
          acc[r][h] = _mm256_add_epi32(acc[r][h], _mm256_madd_epi16(pairs, ones));
        }
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 group_scale = load_f16x8(scale + g * kBlockCols + 8 * h);
      const __m256 group_offset = load_f16x8(offset + g * kBlockCols + 8 * h);
      for (int r = 0; r < R; ++r) {
        const int64_t at = (r0 + r) * groups + g;
        const __m256 step = _mm256_mul_ps(group_scale, _mm256_set1_ps(p.x_scale[at]));
        out[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][h]), step, out[r][h]);
        out[r][h] = _mm256_fmadd_ps(group_offset, _mm256_set1_ps(p.x_sum[at]), out[r][h]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2; ++h) _mm256_storeu_ps(p.y + (r0 + r) * p.n + b * kBlockCols + 8 * h, out[r][h]);
}

#endif

template <bool kFirst>
void row_block(const Problem& p, int64_t r0, int64_t b) {
  jaxinfer::with_row_count<kRowBlock>(p.m - r0, [&](auto rows) { block<rows, kFirst>(p, r0, b); });
}

void item(const Problem& p, int64_t item) {
  const int64_t blocks = p.n / kBlockCols;
  for (int64_t b = item * kBlocksPerItem; b < std::min(blocks, (item + 1) * kBlocksPerItem); ++b) {
    row_block<true>(p, 0, b);
    for (int64_t r0 = kRowBlock; r0 < p.m; r0 += kRowBlock) row_block<false>(p, r0, b);
  }
}

// A call's x and packed weight, checked by `weight_operands`.
struct Operands {
  const float* x;  // [rows, K]
  const uint8_t* codes;
  const uint16_t* scale;
  const uint16_t* offset;
  int64_t rows, k, n, group;
};

bool weight_operands(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::U8>& codes, ffi::Buffer<ffi::F16>& scale,
                     ffi::Buffer<ffi::F16>& offset, ffi::Buffer<ffi::S32>& live, Operands* out) {
  const auto xd = x.dimensions(), cd = codes.dimensions(), sd = scale.dimensions();
  const bool shapes_fit = xd.size() == 2 && cd.size() == 4 && sd.size() == 3 && cd[2] == kBlockCols &&
                          cd[3] == 4 && cd[1] * kOctet == xd[1] && sd[0] == cd[0] && sd[2] == kBlockCols &&
                          sd[1] > 0 && xd[1] % sd[1] == 0 && (xd[1] / sd[1]) % 16 == 0 &&
                          offset.element_count() == scale.element_count() && live.element_count() == 1;
  if (shapes_fit)
    *out = {x.typed_data(), codes.typed_data(), reinterpret_cast<const uint16_t*>(scale.typed_data()),
            reinterpret_cast<const uint16_t*>(offset.typed_data()), xd[0], xd[1], cd[0] * kBlockCols, xd[1] / sd[1]};
  return shapes_fit;
}

ffi::Error operand_error(const char* target) {
  return ffi::Error::InvalidArgument(std::string(target) +
                                     ": expected x [M, K] f32, codes [N/16, K/8, 16, 4] u8 and scale, offset "
                                     "[N/16, K/G, 16] f16 with G a multiple of 16, and a one-element s32 live-row "
                                     "count");
}

// y [m, N] = the first m rows of x times the weight (m >= 1).
void product(ffi::ThreadPool& pool, const Operands& w, int64_t m, float* y) {
  const int64_t groups = w.k / w.group;
  std::vector<int8_t> x_q(m * w.k);
  std::vector<float> x_scale(m * groups), x_sum(m * groups);
  for (int64_t i = 0; i < m * groups; ++i)
    x_scale[i] = jaxinfer::quantize_int8(w.x + i * w.group, w.group, x_q.data() + i * w.group, x_sum.data() + i);
  const Problem p{x_q.data(), x_scale.data(), x_sum.data(), w.codes, w.scale, w.offset, y, m, w.k, w.n, w.group};
  const int64_t items = (w.n / kBlockCols + kBlocksPerItem - 1) / kBlocksPerItem;
  jaxinfer::run_on_pool(pool, items, m, [p](int64_t i) { item(p, i); });
}

ffi::Error W4A8Dot(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> codes,
                   ffi::Buffer<ffi::F16> scale, ffi::Buffer<ffi::F16> offset, ffi::Buffer<ffi::S32> live,
                   ffi::ResultBuffer<ffi::F32> y) {
  Operands w;
  if (!weight_operands(x, codes, scale, offset, live, &w)) return operand_error("jaxinfer_w4a8_dot");
  const int64_t m = jaxinfer::live_rows(live, w.rows);
  jaxinfer::zero_rows_from(y->typed_data(), m, w.rows, w.n);
  if (m > 0) product(pool, w, m, y->typed_data());
  return ffi::Error::Success();
}

// (residual + x w, its RMSNorm times norm_weight), float32: an output projection, the residual add
// and the next norm in one call (cpu_row_passes.h).
ffi::Error W4A8AddNorm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> codes,
                       ffi::Buffer<ffi::F16> scale, ffi::Buffer<ffi::F16> offset, ffi::Buffer<ffi::F32> residual,
                       ffi::AnyBuffer norm_weight, ffi::Buffer<ffi::S32> live, float eps,
                       ffi::ResultBuffer<ffi::F32> residual_out, ffi::ResultBuffer<ffi::F32> normed) {
  Operands w;
  if (!weight_operands(x, codes, scale, offset, live, &w)) return operand_error("jaxinfer_w4a8_add_norm");
  const int64_t m = jaxinfer::live_rows(live, w.rows);
  return jaxinfer::add_norm_call("jaxinfer_w4a8_add_norm", pool, w.rows, w.n, m, residual, norm_weight, eps,
                                 residual_out->typed_data(), normed->typed_data(),
                                 [&](float* y) { product(pool, w, m, y); });
}

// (q, k, v) of x w_qkv, float32, q and k rotated (RoPE): the attention's inputs in one call
// (cpu_row_passes.h).
ffi::Error W4A8QkvRope(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> codes,
                       ffi::Buffer<ffi::F16> scale, ffi::Buffer<ffi::F16> offset, ffi::Buffer<ffi::F32> cos,
                       ffi::Buffer<ffi::F32> sin, ffi::Buffer<ffi::S32> live, int64_t kv_heads, int64_t q_per_kv,
                       ffi::ResultBuffer<ffi::F32> q, ffi::ResultBuffer<ffi::F32> k, ffi::ResultBuffer<ffi::F32> v) {
  Operands w;
  if (!weight_operands(x, codes, scale, offset, live, &w)) return operand_error("jaxinfer_w4a8_qkv_rope");
  const int64_t m = jaxinfer::live_rows(live, w.rows);
  return jaxinfer::qkv_rope_call("jaxinfer_w4a8_qkv_rope", pool, w.rows, w.n, m, cos, sin, kv_heads, q_per_kv,
                                 q->typed_data(), k->typed_data(), v->typed_data(),
                                 [&](float* y) { product(pool, w, m, y); });
}

// silu(gate) * up of x w_gate_up, float32: the MLP's first half in one call (cpu_row_passes.h).
ffi::Error W4A8Swiglu(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> codes,
                      ffi::Buffer<ffi::F16> scale, ffi::Buffer<ffi::F16> offset, ffi::Buffer<ffi::S32> live,
                      ffi::ResultBuffer<ffi::F32> act) {
  Operands w;
  if (!weight_operands(x, codes, scale, offset, live, &w)) return operand_error("jaxinfer_w4a8_swiglu");
  const int64_t m = jaxinfer::live_rows(live, w.rows);
  return jaxinfer::swiglu_call("jaxinfer_w4a8_swiglu", pool, w.rows, w.n, m, act->typed_data(),
                               [&](float* y) { product(pool, w, m, y); });
}

// Every call's first operands: x, then the packed weight (codes, scale, offset).
auto bind_weight() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::U8>>()
      .Arg<ffi::Buffer<ffi::F16>>()
      .Arg<ffi::Buffer<ffi::F16>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_w4a8_dot, W4A8Dot,
                              bind_weight()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_w4a8_add_norm, W4A8AddNorm,
                              jaxinfer::bind_add_norm<ffi::DataType::F32>(bind_weight()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_w4a8_qkv_rope, W4A8QkvRope,
                              jaxinfer::bind_qkv_rope<ffi::DataType::F32>(bind_weight()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_w4a8_swiglu, W4A8Swiglu,
                              jaxinfer::bind_swiglu<ffi::DataType::F32>(bind_weight()));
