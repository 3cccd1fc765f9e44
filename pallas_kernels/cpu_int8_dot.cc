// An exact int8 x int8 -> int32 matmul for few activation rows on x86 CPUs, as an XLA FFI custom call
// (built and registered by cpu_int8_dot.py).
//
//   jaxinfer_int8_dot: x [M, K] s8, w [K, N] s8 -> y [M, N] s32,  y = x @ w exactly
//
// XLA:CPU's int8 dot does not stream a weight at memory speed for one to a few rows, and it has
// no fused dequantize-and-dot, so quantized decode steps ran no faster than float32 ones. This
// kernel reads each weight byte once, straight from the [K, N] layout the rest of the project
// uses: per step of four weight rows it interleaves 32 columns x 4 rows of bytes (8 shuffles) and
// feeds them to VNNI's dot-product instruction (vpdpbusd: 4 byte products summed into an int32
// lane), which multiplies unsigned by signed bytes. So x is offset by 128 into unsigned bytes, and
// 128 x the column sums of w (accumulated by the same instruction against ones) come off at the end.
//
// Work is cut into tiles of 32 output columns x all rows; a tile walks down all K rows with its
// accumulators in registers, up to kRowBlock rows at a time. The calling thread and tasks on XLA's
// intra-op thread pool take tiles from a shared counter, so a pool that is busy or absent costs
// speed, never correctness.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTileCols = 32;
constexpr int kRowBlock = 4;
// Tiles per work item: 64 columns, one cache line of each weight row, so two threads never read
// the same line.
constexpr int64_t kTilesPerItem = 2;

struct Problem {
  const uint8_t* x_offset;  // [M, K] x + 128
  const int8_t* x;          // [M, K]
  const int8_t* w;          // [K, N]
  int32_t* y;               // [M, N]
  int64_t m, k, n;
};

// Rows k..k+3 of columns c0..c0+31 as four vectors of 8 columns x 4 consecutive rows (the byte
// order vpdpbusd multiplies in). The byte unpacks work within 128-bit lanes, so vector j holds
// columns 4j..4j+3 in its low lane and 16+4j..16+4j+3 in its high lane (`store_columns` undoes it).
inline void load_interleaved(const int8_t* w, int64_t n, __m256i v[4]) {
  const __m256i r0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m256i r1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + n));
  const __m256i r2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 2 * n));
  const __m256i r3 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 3 * n));
  const __m256i r01_lo = _mm256_unpacklo_epi8(r0, r1), r01_hi = _mm256_unpackhi_epi8(r0, r1);
  const __m256i r23_lo = _mm256_unpacklo_epi8(r2, r3), r23_hi = _mm256_unpackhi_epi8(r2, r3);
  v[0] = _mm256_unpacklo_epi16(r01_lo, r23_lo);
  v[1] = _mm256_unpackhi_epi16(r01_lo, r23_lo);
  v[2] = _mm256_unpacklo_epi16(r01_hi, r23_hi);
  v[3] = _mm256_unpackhi_epi16(r01_hi, r23_hi);
}

// Writes the 32 columns of four vectors laid out as `load_interleaved` leaves them.
inline void store_columns(int32_t* out, const __m256i v[4]) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permute2x128_si256(v[0], v[1], 0x20));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 8), _mm256_permute2x128_si256(v[2], v[3], 0x20));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16), _mm256_permute2x128_si256(v[0], v[1], 0x31));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 24), _mm256_permute2x128_si256(v[2], v[3], 0x31));
}

// Rows r0..r0+R-1 of y, columns c0..c0+31.
template <int R>
void tile(const Problem& p, int64_t r0, int64_t c0) {
  __m256i acc[R][4], col_sum[4];
  for (int j = 0; j < 4; ++j) {
    col_sum[j] = _mm256_setzero_si256();
    for (int r = 0; r < R; ++r) acc[r][j] = _mm256_setzero_si256();
  }
  const __m256i ones = _mm256_set1_epi8(1);
  const int64_t k4 = p.k / 4 * 4;
  for (int64_t kk = 0; kk < k4; kk += 4) {
    __m256i w[4];
    load_interleaved(p.w + kk * p.n + c0, p.n, w);
    for (int j = 0; j < 4; ++j) col_sum[j] = _mm256_dpbusd_epi32(col_sum[j], ones, w[j]);
    for (int r = 0; r < R; ++r) {
      int32_t four;
      std::memcpy(&four, p.x_offset + (r0 + r) * p.k + kk, sizeof(four));
      const __m256i x4 = _mm256_set1_epi32(four);
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_dpbusd_epi32(acc[r][j], x4, w[j]);
    }
  }
  for (int j = 0; j < 4; ++j) col_sum[j] = _mm256_slli_epi32(col_sum[j], 7);
  for (int r = 0; r < R; ++r) {
    int32_t* out = p.y + (r0 + r) * p.n + c0;
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_sub_epi32(acc[r][j], col_sum[j]);
    store_columns(out, acc[r]);
    // The last K % 4 rows, one product at a time.
    for (int64_t kk = k4; kk < p.k; ++kk)
      for (int64_t c = 0; c < kTileCols; ++c) out[c] += int32_t(p.x[(r0 + r) * p.k + kk]) * p.w[kk * p.n + c0 + c];
  }
}

void column_tile(const Problem& p, int64_t c0) {
  for (int64_t r0 = 0; r0 < p.m; r0 += kRowBlock) {
    switch (std::min<int64_t>(kRowBlock, p.m - r0)) {
      case 1: tile<1>(p, r0, c0); break;
      case 2: tile<2>(p, r0, c0); break;
      case 3: tile<3>(p, r0, c0); break;
      default: tile<4>(p, r0, c0); break;
    }
  }
}

// Columns past the last whole tile.
void tail_columns(const Problem& p, int64_t c_begin) {
  for (int64_t r = 0; r < p.m; ++r)
    for (int64_t c = c_begin; c < p.n; ++c) {
      int32_t sum = 0;
      for (int64_t kk = 0; kk < p.k; ++kk) sum += int32_t(p.x[r * p.k + kk]) * p.w[kk * p.n + c];
      p.y[r * p.n + c] = sum;
    }
}

ffi::Error Int8Dot(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S8> w,
                   ffi::ResultBuffer<ffi::S32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0])
    return ffi::Error::InvalidArgument("jaxinfer_int8_dot: expected x [M, K] and w [K, N] int8");
  const int64_t m = xd[0], k = xd[1], n = wd[1];
  std::vector<uint8_t> x_offset(m * k);
  for (int64_t i = 0; i < m * k; ++i) x_offset[i] = static_cast<uint8_t>(x.typed_data()[i] + 128);
  const Problem p{x_offset.data(), x.typed_data(), w.typed_data(), y->typed_data(), m, k, n};

  const int64_t tiles = n / kTileCols;
  const int64_t items = (tiles + kTilesPerItem - 1) / kTilesPerItem;
  const int64_t work = items + (n % kTileCols ? 1 : 0);
  // Shared with the pool's tasks, which may start after this call has returned: they then find no
  // work left and touch nothing but this state.
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> active{0};
  };
  auto state = std::make_shared<State>();
  auto drain = [state, p, tiles, items, work]() {
    for (int64_t item; (item = state->next.fetch_add(1)) < work;) {
      if (item < items) {
        for (int64_t t = item * kTilesPerItem; t < std::min(tiles, (item + 1) * kTilesPerItem); ++t)
          column_tile(p, t * kTileCols);
      } else {
        tail_columns(p, tiles * kTileCols);
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), work - 1);
  for (int64_t t = 0; t < helpers; ++t) {
    pool.Schedule([state, drain]() {
      state->active.fetch_add(1);
      drain();
      state->active.fetch_sub(1);
    });
  }
  drain();
  // Every tile has been taken; wait for the helpers still finishing theirs.
  while (state->active.load() > 0) {
    _mm_pause();
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_int8_dot, Int8Dot,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
