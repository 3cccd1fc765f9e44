// An exact int8 x int8 -> int32 matmul for few activation rows on x86 CPUs, as an XLA FFI custom call
// (built, registered and fed packed weights by cpu_int8_dot.py).
//
//   jaxinfer_int8_dot: x [M, K] s8, w_packed [N/32, K/4, 32, 4] s8 -> y [M, N] s32,  y = x @ w exactly
//   w_packed[t, k4, c, i] = w[4 * k4 + i, 32 * t + c]
//
// The packed layout is what VNNI's dot-product instruction reads (vpdpbusd: 4 byte products along K
// summed into each int32 lane), with each 32-column tile contiguous in memory, so the kernel streams
// the weight sequentially with no shuffles: per 4 rows of K and 32 columns, four 32-byte loads and
// four vpdpbusd per activation row. vpdpbusd multiplies unsigned by signed bytes, so x is offset by
// 128 into unsigned bytes, and 128 x the column sums of w (accumulated by the same instruction
// against ones) come off at the end.
//
// A tile's accumulators stay in registers for up to kRowBlock rows at a time. One thread: it streams
// the weight at 14-18 GB/s on the project's 2-core VM, and splitting the tiles with XLA's intra-op
// thread pool was slower at every row count measured (1-32), the second core being busy with the
// rest of the step or other work.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTileCols = 32;
constexpr int kRowBlock = 4;

struct Problem {
  const uint8_t* x_offset;  // [M, K] x + 128
  const int8_t* w;          // [N/32, K/4, 32, 4]
  int32_t* y;               // [M, N]
  int64_t m, k, n;
};

// Rows r0..r0+R-1 of y, the 32 columns of tile t.
template <int R>
void tile(const Problem& p, int64_t r0, int64_t t) {
  __m256i acc[R][4], col_sum[4];
  for (int j = 0; j < 4; ++j) {
    col_sum[j] = _mm256_setzero_si256();
    for (int r = 0; r < R; ++r) acc[r][j] = _mm256_setzero_si256();
  }
  const __m256i ones = _mm256_set1_epi8(1);
  const int8_t* w = p.w + t * p.k * kTileCols;
  for (int64_t kk = 0; kk < p.k; kk += 4, w += 4 * kTileCols) {
    __m256i cols[4];  // cols[j]: columns 8j..8j+7, 4 rows each
    for (int j = 0; j < 4; ++j) cols[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * j));
    for (int j = 0; j < 4; ++j) col_sum[j] = _mm256_dpbusd_epi32(col_sum[j], ones, cols[j]);
    for (int r = 0; r < R; ++r) {
      int32_t four;
      std::memcpy(&four, p.x_offset + (r0 + r) * p.k + kk, sizeof(four));
      const __m256i x4 = _mm256_set1_epi32(four);
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_dpbusd_epi32(acc[r][j], x4, cols[j]);
    }
  }
  for (int j = 0; j < 4; ++j) col_sum[j] = _mm256_slli_epi32(col_sum[j], 7);
  for (int r = 0; r < R; ++r) {
    int32_t* out = p.y + (r0 + r) * p.n + t * kTileCols;
    for (int j = 0; j < 4; ++j)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 8 * j), _mm256_sub_epi32(acc[r][j], col_sum[j]));
  }
}

void all_rows(const Problem& p, int64_t t) {
  for (int64_t r0 = 0; r0 < p.m; r0 += kRowBlock) {
    switch (std::min<int64_t>(kRowBlock, p.m - r0)) {
      case 1: tile<1>(p, r0, t); break;
      case 2: tile<2>(p, r0, t); break;
      case 3: tile<3>(p, r0, t); break;
      default: tile<4>(p, r0, t); break;
    }
  }
}

ffi::Error Int8Dot(ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S8> w, ffi::ResultBuffer<ffi::S32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 4 || wd[2] != kTileCols || wd[3] != 4 || xd[1] != 4 * wd[1])
    return ffi::Error::InvalidArgument(
        "jaxinfer_int8_dot: expected x [M, K] and w packed [N/32, K/4, 32, 4], both int8");
  const int64_t m = xd[0], k = xd[1], tiles = wd[0];
  std::vector<uint8_t> x_offset(m * k);
  for (int64_t i = 0; i < m * k; ++i) x_offset[i] = static_cast<uint8_t>(x.typed_data()[i] + 128);
  const Problem p{x_offset.data(), w.typed_data(), y->typed_data(), m, k, tiles * kTileCols};
  for (int64_t t = 0; t < tiles; ++t) all_rows(p, t);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_int8_dot, Int8Dot,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
