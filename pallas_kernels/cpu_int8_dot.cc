// An exact int8 x int8 -> int32 matmul for few activation rows on x86 CPUs, as XLA FFI custom calls
// (built, registered and fed packed weights by cpu_int8_dot.py).
//
//   jaxinfer_int8_dot: x [M, K] s8, w_packed [N/32, K/4, 32, 4] s8 -> y [M, N] s32,  y = x @ w exactly
//   jaxinfer_w8a8_dot: x [M, K] f32, w_packed s8, w_scale [N] f32 -> y [M, N] f32: W8A8 in one call,
//       x quantized per row (scale = max|x_row| / 127, or 1 / 127 for a zero row; q = x / scale
//       rounded half to even, clamped to [-127, 127], as activation_quant.quantize_per_token), the
//       exact int32 dot, then y = float(acc) * row scale * w_scale. One call instead of the five
//       small XLA operations that quantized the activations around each dot; they cost under 2 us
//       each in a profile, so this took a w8a8 SmolLM2 batch-1 decode only from 59 to 62 tokens/s.
//   w_packed[t, k4, c, i] = w[4 * k4 + i, 32 * t + c]
//
// The packed layout is what VNNI's dot-product instruction reads (vpdpbusd: 4 byte products along K
// summed into each int32 lane), with each 32-column tile contiguous in memory, so the kernel streams
// the weight sequentially with no shuffles: per 4 rows of K and 32 columns, four 32-byte loads and
// four vpdpbusd per activation row. vpdpbusd multiplies unsigned by signed bytes, so x is offset by
// 128 into unsigned bytes, and 128 x the column sums of w (accumulated by the same instruction
// against ones) come off at the end.
//
// A tile's accumulators stay in registers for up to kRowBlock rows at a time. The calling thread and
// tasks on XLA's intra-op thread pool take chunks of kTilesPerItem tiles from a shared counter, so
// a busy pool costs nothing but the calling thread's doing all of them. On the project's Xeon VMs
// one thread streams a weight from memory at about 12 GB/s and two at about 25 (the machine's copy
// bandwidth); on the earlier EPYC VMs one thread reached 14-18 GB/s and splitting did not pay.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTileCols = 32;
constexpr int kRowBlock = 4;
// Software prefetch this far ahead in a tile: the weight streams from memory, and on the Xeon VMs a
// 120-call chain of SmolLM2's w8a8 weights (106 MB) took a median 5.8 ms with it against 7.2 without
// (four interleaved runs each; the machine's noise spans 3.6-7.4 ms).
constexpr int64_t kPrefetchBytes = 4096;
// Tiles per work item: 8 x 32 columns, 147 KB of a K = 576 weight, few enough items to spread
// small weights over two threads, large enough to amortize taking one.
constexpr int64_t kTilesPerItem = 8;

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
    _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetchBytes), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetchBytes + 64), _MM_HINT_T0);
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

// Runs tile(t) for every tile t < tiles on the calling thread and the pool's threads.
template <typename TileFn>
void all_tiles(ffi::ThreadPool& pool, int64_t tiles, TileFn tile_fn) {
  const int64_t items = (tiles + kTilesPerItem - 1) / kTilesPerItem;
  // Shared with the pool's tasks, which may start after this call has returned: they then find no
  // item left and touch nothing but this state.
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> active{0};
  };
  auto state = std::make_shared<State>();
  auto drain = [state, tiles, items, tile_fn]() {
    for (int64_t item; (item = state->next.fetch_add(1)) < items;)
      for (int64_t t = item * kTilesPerItem; t < std::min(tiles, (item + 1) * kTilesPerItem); ++t) tile_fn(t);
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), items - 1);
  for (int64_t h = 0; h < helpers; ++h) {
    pool.Schedule([state, drain]() {
      state->active.fetch_add(1);
      drain();
      state->active.fetch_sub(1);
    });
  }
  drain();
  // Every item has been taken; wait for the helpers still finishing theirs.
  while (state->active.load() > 0) _mm_pause();
}

bool packed_for(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> wd) {
  return xd.size() == 2 && wd.size() == 4 && wd[2] == kTileCols && wd[3] == 4 && xd[1] == 4 * wd[1];
}

ffi::Error Int8Dot(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S8> w,
                   ffi::ResultBuffer<ffi::S32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (!packed_for(xd, wd))
    return ffi::Error::InvalidArgument(
        "jaxinfer_int8_dot: expected x [M, K] and w packed [N/32, K/4, 32, 4], both int8");
  const int64_t m = xd[0], k = xd[1], tiles = wd[0];
  std::vector<uint8_t> x_offset(m * k);
  for (int64_t i = 0; i < m * k; ++i) x_offset[i] = static_cast<uint8_t>(x.typed_data()[i] + 128);
  const Problem p{x_offset.data(), w.typed_data(), y->typed_data(), m, k, tiles * kTileCols};
  all_tiles(pool, tiles, [p](int64_t t) { all_rows(p, t); });
  return ffi::Error::Success();
}

ffi::Error W8A8Dot(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                   ffi::Buffer<ffi::F32> w_scale, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (!packed_for(xd, wd) || w_scale.element_count() != wd[0] * kTileCols)
    return ffi::Error::InvalidArgument(
        "jaxinfer_w8a8_dot: expected x [M, K] f32, w packed [N/32, K/4, 32, 4] int8 and w_scale [N] f32");
  const int64_t m = xd[0], k = xd[1], tiles = wd[0], n = tiles * kTileCols;
  const float* xs = x.typed_data();
  std::vector<uint8_t> x_offset(m * k);
  std::vector<float> row_scale(m);
  for (int64_t r = 0; r < m; ++r) {
    float absmax = 0.0f;
    for (int64_t i = 0; i < k; ++i) absmax = std::max(absmax, std::fabs(xs[r * k + i]));
    const float scale = (absmax > 0.0f ? absmax : 1.0f) / 127.0f;
    row_scale[r] = scale;
    for (int64_t i = 0; i < k; ++i) {
      const float q = std::min(127.0f, std::max(-127.0f, std::nearbyint(xs[r * k + i] / scale)));
      x_offset[r * k + i] = static_cast<uint8_t>(static_cast<int32_t>(q) + 128);
    }
  }
  std::vector<int32_t> acc(m * n);
  const Problem p{x_offset.data(), w.typed_data(), acc.data(), m, k, n};
  all_tiles(pool, tiles, [p](int64_t t) { all_rows(p, t); });
  const float* ws = w_scale.typed_data();
  float* out = y->typed_data();
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c = 0; c < n; ++c) out[r * n + c] = static_cast<float>(acc[r * n + c]) * row_scale[r] * ws[c];
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_int8_dot, Int8Dot,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_w8a8_dot, W8A8Dot,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
