// A matmul of few float32 activation rows by a float32 or bfloat16 weight on x86 CPUs (AVX-512), as
// an XLA FFI custom call (built and registered by cpu_dense_dot.py).
//
//   jaxinfer_dense_dot: x [M, K] f32, w [K, N] f32 | bf16 (row-major, N % 16 == 0) -> y [M, N] f32
//
// A few-row matmul reads every weight once and does M multiply-adds with it, so it runs at the
// rate the weight streams from memory. The weight is cut into rectangles of whole rows (K slabs)
// by column tiles; a rectangle whose tile is the full width is one contiguous run of memory, so a
// slab streams in address order. Each rectangle's rows are walked eight at a time, in order, adding
// x[m, k..k+7] times them (bfloat16 widened to float32 in registers: its bits are a float32's top
// half) into the rectangle's partial sums (in L1/L2: M x tile floats); slabs of
// the same tile write separate partial sums, added at the end. Work items (rectangles) are shared
// with XLA's intra-op thread pool (cpu_thread_pool.h).

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_row_count.h"
#include "cpu_thread_pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLane = 16;
// Column tiles of at most this many columns (16 KB of a float32 row): the full width of every SmolLM2 layer
// weight, a twelfth of its LM head.
constexpr int64_t kMaxTileCols = 4096;
// At least this many K rows per slab, and about this many work items per call.
constexpr int64_t kMinSlabRows = 32;
constexpr int64_t kTargetItems = 8;
constexpr int kMaxRows = 8;
// Weight rows walked together: the partial sums are loaded and stored once per eight rows, and the
// eight rows ahead are prefetched (both measured faster than four rows and no prefetch at 2-8
// activation rows; at one row within noise).
constexpr int kRowsPerPass = 8;

// Sixteen weights from memory as float32 lanes.
__m512 load16(const float* w) { return _mm512_loadu_ps(w); }
__m512 load16(const uint16_t* w) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

template <typename W>
struct Problem {
  const float* x;  // [M, K]
  const W* w;      // [K, N]
  float* partial;  // [slabs, M, N]
  int64_t m, k, n, tile_cols, tiles, slab_rows;
};

template <int R, typename W>
void rectangle(const Problem<W>& p, int64_t slab, int64_t tile) {
  const int64_t k0 = slab * p.slab_rows, k1 = std::min(p.k, k0 + p.slab_rows);
  const int64_t n0 = tile * p.tile_cols, n1 = std::min(p.n, n0 + p.tile_cols);
  float* out = p.partial + slab * p.m * p.n;
  for (int r = 0; r < R; ++r) std::fill(out + r * p.n + n0, out + r * p.n + n1, 0.0f);
  int64_t k = k0;
  for (; k + kRowsPerPass <= k1; k += kRowsPerPass) {
    const W* w0 = p.w + k * p.n;
    const bool prefetch = k + 2 * kRowsPerPass <= k1;
    for (int64_t n = n0; n < n1; n += kLane) {
      __m512 w[kRowsPerPass];
      for (int u = 0; u < kRowsPerPass; ++u) w[u] = load16(w0 + u * p.n + n);
      if (prefetch)
        for (int u = 0; u < kRowsPerPass; ++u)
          _mm_prefetch(reinterpret_cast<const char*>(w0 + (kRowsPerPass + u) * p.n + n), _MM_HINT_T0);
      for (int r = 0; r < R; ++r) {
        const float* x = p.x + r * p.k + k;
        float* o = out + r * p.n + n;
        __m512 acc = _mm512_loadu_ps(o);
        for (int u = 0; u < kRowsPerPass; ++u) acc = _mm512_fmadd_ps(w[u], _mm512_set1_ps(x[u]), acc);
        _mm512_storeu_ps(o, acc);
      }
    }
  }
  for (; k < k1; ++k) {
    const W* w0 = p.w + k * p.n;
    for (int r = 0; r < R; ++r) {
      const __m512 xk = _mm512_set1_ps(p.x[r * p.k + k]);
      float* o = out + r * p.n;
      for (int64_t n = n0; n < n1; n += kLane)
        _mm512_storeu_ps(o + n, _mm512_fmadd_ps(load16(w0 + n), xk, _mm512_loadu_ps(o + n)));
    }
  }
}

template <typename W>
void item(const Problem<W>& p, int64_t i) {
  const int64_t slab = i / p.tiles, tile = i % p.tiles;
  jaxinfer::with_row_count<kMaxRows>(p.m, [&](auto rows) { rectangle<rows>(p, slab, tile); });
}

template <typename W>
void dense_dot(ffi::ThreadPool& pool, const float* x, const W* w, float* out, int64_t m, int64_t k, int64_t n) {
  const int64_t tile_cols = std::min(n, kMaxTileCols), tiles = (n + tile_cols - 1) / tile_cols;
  const int64_t max_slabs = std::max<int64_t>(1, k / kMinSlabRows);
  const int64_t slabs = std::min(max_slabs, (kTargetItems + tiles - 1) / tiles);
  const int64_t slab_rows = (k + slabs - 1) / slabs;
  std::vector<float> partial_sums(slabs > 1 ? slabs * m * n : 0);
  const Problem<W> p{x, w, slabs > 1 ? partial_sums.data() : out, m, k, n, tile_cols, tiles, slab_rows};
  jaxinfer::run_on_pool(pool, slabs * tiles, [p](int64_t i) { item(p, i); });
  if (slabs > 1)
    for (int64_t i = 0; i < m * n; i += kLane) {
      __m512 sum = _mm512_loadu_ps(p.partial + i);
      for (int64_t s = 1; s < slabs; ++s) sum = _mm512_add_ps(sum, _mm512_loadu_ps(p.partial + s * m * n + i));
      _mm512_storeu_ps(out + i, sum);
    }
}

ffi::Error DenseDot(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  const bool bf16 = w.element_type() == ffi::DataType::BF16;
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0] || wd[1] % kLane != 0 || xd[0] < 1 || xd[0] > kMaxRows ||
      !(bf16 || w.element_type() == ffi::DataType::F32))
    return ffi::Error::InvalidArgument("jaxinfer_dense_dot: expected x [M, K] f32 with 1 <= M <= 8 and w [K, N] f32 "
                                       "or bf16 with N a multiple of 16");
  const int64_t m = xd[0], k = xd[1], n = wd[1];
  if (bf16)
    dense_dot(pool, x.typed_data(), static_cast<const uint16_t*>(w.untyped_data()), y->typed_data(), m, k, n);
  else
    dense_dot(pool, x.typed_data(), static_cast<const float*>(w.untyped_data()), y->typed_data(), m, k, n);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_dense_dot, DenseDot,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
