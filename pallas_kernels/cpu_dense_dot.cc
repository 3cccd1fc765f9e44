// A matmul of activation rows by a float32 or bfloat16 weight on x86 CPUs (AVX-512; AMX or
// AVX512-BF16 for bfloat16), as an XLA FFI custom call (built and registered by cpu_dense_dot.py).
//
//   jaxinfer_dense_dot: x [M, K] f32 | bf16, w [K, N] f32 | bf16 (row-major, N % 16 == 0),
//                       x in w's dtype, live [] s32 -> y [M, N] f32
//   (every bfloat16 w may also come as its AMX panels [N / 32, K / 32, 2, 16, 16, 2], `Bf16Weight`)
//   jaxinfer_dense_swiglu: x [M, K] bf16, w_gate_up [K, N] bf16, live -> act [M, N / 2] bf16
//   jaxinfer_dense_add_norm: x [M, K] bf16, w [K, N] bf16, residual [M, N] f32, norm weight [N]
//                            f32 | bf16, live; attribute eps -> (residual + y [M, N] f32, its RMSNorm bf16)
//   jaxinfer_dense_qkv_rope: x [M, K] bf16, w_qkv [K, N] bf16, cos, sin [M, D / 2] f32, live; attributes
//                            kv_heads, q_per_kv -> q, k, v bf16, q and k rotated
//
// Every call computes the first `live` rows and writes zeros in the rest (cpu_row_count.h): an engine
// step passes its real tokens' count, so its shape bucket's padding rows cost no matmul work.
//
// Four loops, all summing in float32, and a SwiGLU, a residual add and RMSNorm, or the qkv split and
// RoPE after the product:
//
// FMA (float32; bfloat16 at one row, or where neither bfloat16 loop below serves): a few-row matmul
// reads every weight once and does M multiply-adds with it, so it runs at the rate the weight
// streams from memory. The weight is cut into rectangles of whole rows (K slabs) by column tiles; a
// rectangle whose tile is the full width is one contiguous run of memory, so a slab streams in
// address order. Each rectangle's rows are walked eight at a time, in order, adding x[m, k..k+7]
// times them (bfloat16 made float32 in registers: its bits are a float32's top half, and one load
// of two columns per 32-bit lane gives both by a shift and a mask, `ColumnGroup`) into the
// rectangle's partial sums (in L1/L2: M x tile floats), for up to kFmaRows activation rows at a
// time, in blocks of four rows whose sums of a 2 x lane column group stay in registers over the
// eight weight rows (`row_block`); slabs of the same tile write separate partial sums, added at the
// end. Its multiply-adds grow with M: at 16-32 rows it was compute-bound. One activation row (batch-1
// decode) reads each rectangle as kRuns runs of rows at once instead, for the prefetchers'
// sake (`rectangle_in_runs`).
//
// AMX (bfloat16 from kAmxMinRows rows, K % 32 == 0, N % 32 == 0, or any rows of a weight passed as
// its panels; and the OS grants the tile state):
// tdpbf16ps multiplies a 16 x 32 bfloat16 A tile by a 32 x 16 B tile held as 16 rows of (k, k + 1)
// pairs into a 16 x 16 float32 C tile. A is 16 activation rows read in place; B comes from the
// weight's [K, N] rows by interleaving each pair of rows (one zero-extend, shift and or per 16
// columns), done once per item into panels of 32 columns over all of K, which every group of 32
// activation rows then reuses; C is stored straight into y. At a prefill step's 256 rows the loop
// is bound by its tile loads, not the multiplies: on one core of the Xeon VM (single-thread
// harnesses, interleaved rounds, 2026-12-05) tdpbf16ps alone ran 2.3-2.6 TFLOP/s, the 2 x 2 tile
// loop fed from L1 0.5-1.2 (with the VM's phase; double-buffered operand tiles and other load
// orders gained nothing), and an item with its packing 0.4-0.6. A weight passed prepacked as its
// panels (what a one-device bfloat16 engine stores on an AMX CPU, jaxinfer.model.panel_weight)
// skips the packing: its items are column tiles over all of K, read in address order, at any row
// count, since a tile operation on a one-row A tile costs no more than streaming its B tile. The
// packing had cost most at decode's row counts, where its strided reads of the weight rows (2 KB
// runs, 6-98 KB apart) stream slower than the panels: per matmul 1.3-2.3x faster at 8-16 rows,
// 1.05-1.4x at 64 and 1.1-1.4x at 256, and at 1-4 rows about the FMA loop's speed (0.9-1.3x;
// benchmarks/bench_dense_dot.py, 2026-12-06). (Packing the next panel between the current panel's
// tile operations had been 16-23% faster with warm weights but no faster with cold ones.)
//
// SwiGLU (jaxinfer_dense_swiglu, bfloat16, AVX-512 builds): the MLP's gate_up matmul and its
// silu(gate) * up in one call. The weight interleaves gate_i and up_i by column, so every 32
// columns of the product are 16 (gate, up) pairs; each AMX item takes them from its part of the
// product while that is in L2 (other loops: one pass after the product), with gate and up rounded
// to bfloat16 first, as the unfused path's bfloat16 product is. It replaces XLA's fusion over the
// product, which read it back from memory: on the Xeon VM a 512-token prefill step's matmuls and
// SwiGLU took 64.6 / 71.7 ms against 81.8 / 78.3 (traced, alternating; a third pair, 110.9 against
// 88.3, ran as the VM slowed down; whole steps were faster in 4 of 6 pairs), and the offline
// benchmark's workload ran at 396.2 / 440.3 against 361.4 / 362.7 output tokens/s
// (benchmarks/profile_offline.py, two alternating pairs, 2026-12-05).
//
// Residual add and RMSNorm (jaxinfer_dense_add_norm, both builds; this and the next pass are
// cpu_row_passes.h's, which the quantized kernels share): a layer's output projection (o or down), the
// residual add and the next norm in one call. The product, by whichever loop serves,
// rounded to bfloat16 as the unfused path's `linear` returns it, is added to the float32 residual
// stream, and each row of the sum normed, in one pass over rows shared with the thread pool. It
// replaces four XLA operations over the rows (convert-add, the sum of squares, rsqrt, multiply-
// convert), eight a layer. On the Xeon VM, traced engine steps (benchmarks/profile_step.py,
// alternating, 2026-12-05): the dense kernels and those operations took 1.71x the SwiGLU's time in
// a batch-64 decode step against 1.81x unfused (four pairs; about 2% of the step), 0.97x against
// 1.01x in a 256-token prefill step, and the same at batch 1.
//
// qkv split and RoPE (jaxinfer_dense_qkv_rope, both builds): the qkv projection, its split into
// heads (grouped by kv head, jaxinfer.model.llama) and the rotation of q and k, in the same pass over
// rows after the product, from cos and sin the step computes once. It replaces the XLA operations
// between the product and the attention's inputs (the product's conversion, the halves' slices and
// concatenations, the rotations, v's copy). With both passes a traced 256-token step of SmolLM2 runs
// 385 operations where it ran 837.
// On the Xeon VM, traced engine steps (benchmarks/profile_step.py, four alternating pairs,
// 2026-12-05): the dense kernels and those operations took 1.15x the SwiGLU's time in a 256-token
// prefill step against 1.26x unfused (about 4% of the step; whole steps faster in 3 of the 4 pairs),
// and 1.83x against 1.88x in a batch-64 decode step (about 1%).
//
// AVX512-BF16 (bfloat16 from kDpMinRows rows up to the MAX_DP_ROWS that cpu_dense_dot.py routes
// here, on CPUs with vdpbf16ps but no AMX, as AMD's Zen 4 and later; K even): vdpbf16ps adds, per
// float32 lane, the products of one (k, k + 1) pair, so it does twice the multiply-adds of an FMA
// per instruction and needs no widening. Items and the walk are the FMA loop's (rectangles, weight
// rows in address order, partial sums per rectangle), in passes of kDpPairs pairs of weight rows for
// up to kDpRows activation rows (more rows walk the rectangle again): the pairs are interleaved in
// registers (one vpermt2w per 16 columns), the activation pairs broadcast once per pass.
//
// GEMM (bfloat16 beyond kFmaRows rows in the AVX2 build, which has neither loop above): a prefill
// step's matmul does M multiply-adds per weight value, so it is bound by the multiply-add rate, and
// XLA's bfloat16 dot reached about half of it on Zen 2 (80-107 GFLOP/s of a 214 peak on two cores).
// The activations are packed once as float32 blocks of kGemmRows rows; each work item packs
// panels of kGemmCols weight columns as float32 (even and odd columns apart, as in the FMA loop)
// over up to kGemmMaxDepth K values, and multiplies every row block by each panel in a tile of
// 6 x 16 sums held in twelve registers: per K value two weight loads and six broadcasts feed twelve
// multiply-adds, so the loads keep pace with both FMA pipes. At 16-64 rows (decode batches) it runs
// at 60-100 GFLOP/s, well under the 137 of a 256-row prefill, part of it packing the weight (a
// column strip of short pieces, about 7 GB/s). Items that copied chunks of 128 whole-tile weight
// rows (prefetched a chunk ahead) and read them as bfloat16, with row blocks balanced to 5-6 rows,
// ran 1.2x faster on one core at 32 rows but no faster on two, and a batch-32 engine step was
// unchanged (2026-12-05, two alternating pairs).
//
// Work items (rectangles, AMX column panels, or runs of GEMM panels) are shared with XLA's intra-op
// thread pool (cpu_thread_pool.h).
//
// Built without AVX-512 (pallas_kernels.cpu_dense_dot picks the build for the CPU), the FMA loop
// runs on 8-lane AVX2 registers (VecF below) and the GEMM loop takes bfloat16 beyond kFmaRows rows.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#include "cpu_amx.h"
#include "cpu_exp.h"
#include "cpu_row_count.h"
#include "cpu_row_passes.h"
#include "cpu_thread_pool.h"
#include "cpu_vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace jaxinfer::vec;

// N must be a multiple of this in both builds (two AVX2 registers, one AVX-512 register).
constexpr int64_t kColumnMultiple = 16;
// Column tiles of at most this many columns (16 KB of a float32 row): the full width of every SmolLM2 layer
// weight, a twelfth of its LM head.
constexpr int64_t kMaxTileCols = 4096;
// At least this many K rows per slab, and about this many work items per call.
constexpr int64_t kMinSlabRows = 32;
constexpr int64_t kTargetItems = 8;
// Output columns per AMX panel: two 16-column B tiles.
constexpr int64_t kPanelCols = 32;

// A bfloat16 weight as a call passes it: w [K, N] as checkpoints store it, or prepacked as AMX
// panels [N / 32, K / 32, 2, 16, 16, 2] (cpu_dense_dot.py `pack_panels`), where panel j holds
// columns 32 j .. 32 j + 31 over all of K as `pack_rectangle` lays a rectangle out. k = n = 0 when
// the dimensions are neither.
struct Bf16Weight {
  const uint16_t* data;
  int64_t k = 0, n = 0;
  bool panels = false;
};

template <typename Dims>
Bf16Weight bf16_weight(const void* data, const Dims& d) {
  const auto* w = static_cast<const uint16_t*>(data);
  if (d.size() == 2) return {w, d[0], d[1], false};
  if (d.size() == 6 && d[2] == 2 && d[3] == 16 && d[4] == 16 && d[5] == 2)
    return {w, d[1] * jaxinfer::kBf16TileK, d[0] * kPanelCols, true};
  return {w};
}

// w [K, N] from its panels, for the calls that AMX cannot take (the OS refused the tile state, or an
// AVX2 build): slow, but exact.
void unpack_panels(const Bf16Weight& w, uint16_t* out) {
  const int64_t steps = w.k / jaxinfer::kBf16TileK;
  for (int64_t j = 0; j < w.n / kPanelCols; ++j)
    for (int64_t s = 0; s < steps; ++s)
      for (int64_t h = 0; h < 2; ++h)
        for (int64_t i = 0; i < 16; ++i)
          for (int64_t c = 0; c < 16; ++c)
            for (int64_t e = 0; e < 2; ++e)
              out[(s * jaxinfer::kBf16TileK + 2 * i + e) * w.n + j * kPanelCols + h * 16 + c] =
                  w.data[((((j * steps + s) * 2 + h) * 16 + i) * 16 + c) * 2 + e];
}

// Activation rows per pass of the FMA loop (one partial-sum row each); larger M runs in row chunks.
constexpr int kFmaRows = 8;
// Weight rows walked together: the partial sums are loaded and stored once per eight rows, and the
// eight rows ahead are prefetched (both measured faster than four rows and no prefetch at 2-8
// activation rows; at one row within noise), where `rows_ahead_pay` says so.
constexpr int kRowsPerPass = 8;
// Bytes over which the L1 data cache's set index runs once (64 sets of 64-byte lines in the 8-way
// 32 KB and 12-way 48 KB L1s of the x86 CPUs this runs on): addresses this far apart share a set.
constexpr int64_t kL1SetSpan = 4096;

// Whether the FMA loop prefetches the next pass's weight rows (at each column group, the eight
// rows after the eight it reads). Those 16 lines lie row_bytes apart; rows a multiple of 4 KB apart
// (the LM head's 98 KB rows, any 2048-column bfloat16 weight's) all fall in one L1 set (8 ways on
// Zen, 12 on recent Xeons), where they evict each other and the rows being read. Zen 3 VM,
// 2026-12-06: SmolLM2's 576 x 49152 bfloat16 head at 2 / 4 / 8 rows, jitted calls on both cores
// (three alternating rounds), took 1.9-2.1 / 2.3-4.1 / 4.4-5.2 ms without the prefetches against
// 2.5-3.0 / 3.1-3.6 / 5.3-6.4 with them; a single-thread harness of the loop 3.1 / 3.9 / 7.6-7.8
// against 5.4-5.6 / 7.6-7.7 / 11.2-11.3 (narrower column tiles did not change that). Rows that
// spread over two sets or more keep them: dropping them for the 3072-column weight too (6 KB
// rows: two sets) made traced batch-8 engine steps' dense matmuls slower (18.0-20.0 against
// 15.6-18.8 ms, three alternating pairs), and the 960- and 576-column weights ran 1.1-1.4x
// faster with them (harness).
bool rows_ahead_pay(int64_t row_bytes) { return std::gcd(row_bytes, kL1SetSpan) < kL1SetSpan; }

// How the FMA loop reads weights into VecF (cpu_vec.h): kLane of them from memory as float32
// (bfloat16 bits are a float32's top half), or two columns per 32-bit lane.
#if defined(__AVX512F__)
inline VecF load_weights(const float* w) { return _mm512_loadu_ps(w); }
inline VecF load_weights(const uint16_t* w) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline VecI load_bits(const uint16_t* w) { return _mm512_loadu_si512(w); }
inline VecF low_halves(VecI v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
inline VecF high_halves(VecI v) { return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(-65536))); }
// (even, odd) -> the 2 x kLane values in order.
inline void interleave(VecF even, VecF odd, float* out) {
  alignas(64) static constexpr int32_t kLow[16] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
  alignas(64) static constexpr int32_t kHigh[16] = {8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  _mm512_storeu_ps(out, _mm512_permutex2var_ps(even, _mm512_load_si512(kLow), odd));
  _mm512_storeu_ps(out + 16, _mm512_permutex2var_ps(even, _mm512_load_si512(kHigh), odd));
}
#else  // AVX2
inline VecF load_weights(const float* w) { return _mm256_loadu_ps(w); }
inline VecF load_weights(const uint16_t* w) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
inline VecI load_bits(const uint16_t* w) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)); }
inline VecF low_halves(VecI v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
inline VecF high_halves(VecI v) { return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(-65536))); }
inline void interleave(VecF even, VecF odd, float* out) {
  const __m256 a = _mm256_unpacklo_ps(even, odd), b = _mm256_unpackhi_ps(even, odd);
  _mm256_storeu_ps(out, _mm256_permute2f128_ps(a, b, 0x20));
  _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(a, b, 0x31));
}
#endif

template <typename X, typename W>
struct Problem {
  const X* x;      // [M, K]
  const W* w;      // [K, N]
  float* partial;  // [slabs, M, N], rows ldp apart
  int64_t m, k, n, tile_cols, tiles, slab_rows, ldp;
};

// Rows r0 .. r0 + rows - 1 of one rectangle (K rows k0 .. k1 - 1, columns n0 .. n1 - 1): their
// activations xs and their partial sums out, zeroed.
template <typename X>
struct Rectangle {
  int64_t k0, k1, n0, n1;
  const X* xs;  // [rows, K], row stride K
  float* out;   // [rows, N], row stride N
};

template <typename X, typename W>
Rectangle<X> zeroed_rectangle(const Problem<X, W>& p, int64_t slab, int64_t tile, int64_t r0, int rows) {
  const int64_t k0 = slab * p.slab_rows, n0 = tile * p.tile_cols;
  const Rectangle<X> rect{k0, std::min(p.k, k0 + p.slab_rows), n0, std::min(p.n, n0 + p.tile_cols), p.x + r0 * p.k,
                          p.partial + (slab * p.m + r0) * p.ldp};
  for (int r = 0; r < rows; ++r) std::fill(rect.out + r * p.ldp + rect.n0, rect.out + r * p.ldp + rect.n1, 0.0f);
  return rect;
}

// How the FMA loop reads a weight's columns: in groups of kGroupCols = 2 x kLane columns, loaded as
// Bits and used as two float32 vectors. A float32 group is two loads. A bfloat16 group is one load, each
// 32-bit lane holding the pair (column 2 i, column 2 i + 1): shifting it left by 16 gives the even
// columns as float32 and masking off the low half the odd ones, so a column costs no widening
// instruction (vpmovzxwd took as long as the multiply-adds on Zen 2). Such a group's partial sums
// are kept as (even columns, odd columns) and put in order at the end (`fma_dot`).
constexpr int64_t kGroupCols = 2 * kLane;

template <typename W>
struct ColumnGroup;

template <>
struct ColumnGroup<float> {
  struct Bits {
    VecF low, high;
  };
  static Bits load(const float* w) { return {load_f32(w), load_f32(w + kLane)}; }
  static VecF vector(const Bits& bits, int v) { return v == 0 ? bits.low : bits.high; }
};

template <>
struct ColumnGroup<uint16_t> {
  using Bits = VecI;
  static Bits load(const uint16_t* w) { return load_bits(w); }
  static VecF vector(Bits bits, int v) { return v == 0 ? low_halves(bits) : high_halves(bits); }
};

// Activation rows per block of `row_block`: their 2 x R partial sums, the group's two weight vectors
// and a broadcast fit in the 16 AVX2 registers.
constexpr int kBlockRows = 4;

// Adds U weight rows from w0 (one column group; consecutive rows w_step apart) times R activation
// rows x (row stride k; the activation of weight row u at x[u * x_step]) into the group's partial
// sums o (row stride n). The rows' sums stay in registers over the U weight rows, and the
// multiply-adds of one weight row for all R rows come together: with one row's U multiply-adds
// chained back to back, each waiting on the last, too few were in flight and 4-8 rows ran at a
// quarter of the multiply-add rate.
template <int R, int U, typename W>
void row_block(const W* w0, int64_t w_step, const float* x, int64_t x_step, int64_t k, float* o, int64_t n) {
  using Group = ColumnGroup<W>;
  VecF acc[R][2];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 2; ++v) acc[r][v] = load_f32(o + r * n + v * kLane);
  for (int u = 0; u < U; ++u) {
    const typename Group::Bits bits = Group::load(w0 + u * w_step);
    const VecF w[2] = {Group::vector(bits, 0), Group::vector(bits, 1)};
    for (int r = 0; r < R; ++r) {
      const VecF xb = broadcast(x[r * k + u * x_step]);
      for (int v = 0; v < 2; ++v) acc[r][v] = fmadd(w[v], xb, acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 2; ++v) store_f32(o + r * n + v * kLane, acc[r][v]);
}

// Adds U weight rows from k (columns n0 .. n1 - 1; whole groups up to grouped_end) times activation
// rows xs [R, K] into out [R, N], prefetching the next U rows if asked. Columns past the last whole
// group (N an odd multiple of kLane) are summed one vector at a time, in order.
template <int R, int U, typename W>
void weight_rows(const Problem<float, W>& p, const float* xs, float* out, int64_t k, int64_t n0, int64_t grouped_end,
                 int64_t n1, bool prefetch) {
  const W* w0 = p.w + k * p.n;
  for (int64_t n = n0; n < grouped_end; n += kGroupCols) {
    if (prefetch)
      for (int u = 0; u < U; ++u) _mm_prefetch(reinterpret_cast<const char*>(w0 + (U + u) * p.n + n), _MM_HINT_T0);
    row_block<std::min(R, kBlockRows), U>(w0 + n, p.n, xs + k, 1, p.k, out + n, p.ldp);
    if constexpr (R > kBlockRows)
      row_block<R - kBlockRows, U>(w0 + n, p.n, xs + kBlockRows * p.k + k, 1, p.k, out + kBlockRows * p.ldp + n, p.ldp);
  }
  for (int64_t n = grouped_end; n < n1; n += kLane)
    for (int r = 0; r < R; ++r) {
      float* o = out + r * p.ldp + n;
      VecF acc = load_f32(o);
      for (int u = 0; u < U; ++u) acc = fmadd(load_weights(w0 + u * p.n + n), broadcast(xs[r * p.k + k + u]), acc);
      store_f32(o, acc);
    }
}

// Rows r0 .. r0 + R - 1 of one rectangle's partial sums, kRowsPerPass weight rows at a time.
template <int R, typename W>
void rectangle(const Problem<float, W>& p, int64_t slab, int64_t tile, int64_t r0) {
  const auto [k0, k1, n0, n1, xs, out] = zeroed_rectangle(p, slab, tile, r0, R);
  const int64_t grouped_end = n0 + (n1 - n0) / kGroupCols * kGroupCols;
  const bool prefetch = rows_ahead_pay(p.n * int64_t{sizeof(W)});
  int64_t k = k0;
  for (; k + kRowsPerPass <= k1; k += kRowsPerPass)
    weight_rows<R, kRowsPerPass>(p, xs, out, k, n0, grouped_end, n1, prefetch && k + 2 * kRowsPerPass <= k1);
  for (; k < k1; ++k) weight_rows<R, 1>(p, xs, out, k, n0, grouped_end, n1, false);
}

// One activation row walks a rectangle's K rows as kRuns runs of consecutive rows, all at once:
// per column group, one weight row from each run adds into the group's sums. Each run is read in
// address order, so a thread streams kRuns sequential runs of memory at a time, which the
// hardware prefetchers serve faster than one run or the FMA loop's eight-row passes (8 x 1-6 KB,
// read a column group at a time: too short a run per row for the prefetchers). On the Zen 2 VM a
// simulated batch-1 step's weights streamed at 25-27 GB/s read as 4 runs per thread against 20-22 in
// eight-row passes; the kernel at one row went from 8-14 to 11-20 GB/s on the layer weights and
// from 16-19 to 22-23 on the LM head (`benchmarks/bench_dense_dot.py --rows 1`; 4 runs did as well
// on the layers, 21.6-22.2 on the head), and a bfloat16 engine's batch-1 decode from 51.8-68.2 to
// 67.2-85.7 tokens/s (1.23-1.36x in 8 alternating pairs). At 2-4 rows the multiply-adds per weight
// double and quadruple, and runs gained nothing at 2 and lost at 4, so more rows keep the eight-row
// passes.
constexpr int kRuns = 8;

template <typename W>
void rectangle_in_runs(const Problem<float, W>& p, int64_t slab, int64_t tile, int64_t r0) {
  const auto [k0, k1, n0, n1, xs, out] = zeroed_rectangle(p, slab, tile, r0, 1);
  const int64_t grouped_end = n0 + (n1 - n0) / kGroupCols * kGroupCols;
  const int64_t run_rows = (k1 - k0) / kRuns;
  for (int64_t t = 0; t < run_rows; ++t) {
    const W* w0 = p.w + (k0 + t) * p.n;
    for (int64_t n = n0; n < grouped_end; n += kGroupCols)
      row_block<1, kRuns>(w0 + n, run_rows * p.n, xs + k0 + t, run_rows, p.k, out + n, p.ldp);
    for (int s = 0; s < kRuns; ++s) weight_rows<1, 1>(p, xs, out, k0 + s * run_rows + t, grouped_end, grouped_end, n1, false);
  }
  // The rows past the last whole run, one at a time.
  for (int64_t k = k0 + kRuns * run_rows; k < k1; ++k) weight_rows<1, 1>(p, xs, out, k, n0, grouped_end, n1, false);
}

// A matmul's work items: K slabs (slab_rows rows each, the last shorter) by column tiles.
struct Rectangles {
  int64_t tile_cols, tiles, slab_rows, slabs;
};

// Column tiles of at most max_cols, and as many slabs of a multiple of row_multiple rows (at least
// kMinSlabRows, at most max_slabs) as make about kTargetItems items.
Rectangles rectangles(int64_t k, int64_t n, int64_t max_cols, int64_t row_multiple, int64_t max_slabs) {
  const int64_t tile_cols = std::min(n, max_cols), tiles = (n + tile_cols - 1) / tile_cols;
  const int64_t slabs = std::min({std::max<int64_t>(1, k / kMinSlabRows), (kTargetItems + tiles - 1) / tiles, max_slabs});
  const int64_t units = (k + row_multiple - 1) / row_multiple;
  const int64_t slab_rows = (units + slabs - 1) / slabs * row_multiple;
  return {tile_cols, tiles, slab_rows, (k + slab_rows - 1) / slab_rows};
}

// out [M, N] = the sum of the slabs' partial sums partial [slabs, M, N] (rows ldp apart).
void sum_partials(const float* partial, int64_t slabs, int64_t m, int64_t n, int64_t ldp, float* out) {
  for (int64_t r = 0; r < m; ++r)
    for (int64_t i = 0; i < n; i += kLane) {
      VecF sum = load_f32(partial + r * ldp + i);
      for (int64_t s = 1; s < slabs; ++s) sum = add(sum, load_f32(partial + (s * m + r) * ldp + i));
      store_f32(out + r * n + i, sum);
    }
}

// The row stride of partial sums N wide: N, or a line more where rows N floats apart would all
// fall in one L1 set (as the 3072-column gate_up weight's do), where an item's rows of partial sums
// evict each other and the weight rows being read. Zen 3 VM, 2026-12-06: the FMA loop at 8 rows
// over a 72 x 3072 slab on one thread, 56 against 52 GFLOP/s (medians of 7); the dense kernel's
// time in traced batch-8 decode steps of the bfloat16 engine (`benchmarks/profile_step.py
// engines/bf16 --batch 8 --context 100`), five alternating pairs: 0.83-0.97x (16.1-20.3 against
// 17.4-21.3 ms a step); at batch 1 and 4 within the runs' noise.
int64_t partial_row_stride(int64_t n) { return n * int64_t{sizeof(float)} % kL1SetSpan == 0 ? n + kColumnMultiple : n; }

// x [M, K] times w [K, N] into out by rectangles (K slabs of a multiple of row_multiple rows by
// column tiles) as work items on the pool: each item walks its rectangle for chunks of up to kChunk
// activation rows, `walk(p, slab, tile, r0, rows)` with rows a compile-time count; the slabs'
// partial sums are added at the end.
template <int kChunk, typename X, typename W, typename Walk>
void rectangles_dot(ffi::ThreadPool& pool, const X* x, const W* w, float* out, int64_t m, int64_t k, int64_t n,
                    int64_t row_multiple, Walk walk) {
  const Rectangles r = rectangles(k, n, kMaxTileCols, row_multiple, k);
  const int64_t ldp = r.slabs > 1 ? partial_row_stride(n) : n;  // one slab sums straight into out
  std::vector<float> partial_sums(r.slabs > 1 ? r.slabs * m * ldp : 0);
  const Problem<X, W> p{x, w, r.slabs > 1 ? partial_sums.data() : out, m, k, n, r.tile_cols, r.tiles, r.slab_rows,
                        ldp};
  jaxinfer::run_on_pool(pool, r.slabs * r.tiles, m, [p, walk](int64_t i) {
    for (int64_t r0 = 0; r0 < p.m; r0 += kChunk)
      jaxinfer::with_row_count<kChunk>(p.m - r0, [&](auto rows) { walk(p, i / p.tiles, i % p.tiles, r0, rows); });
  });
  if (r.slabs > 1) sum_partials(p.partial, r.slabs, m, n, ldp, out);
}

template <typename W>
void fma_dot(ffi::ThreadPool& pool, const float* x, const W* w, float* out, int64_t m, int64_t k, int64_t n) {
  rectangles_dot<kFmaRows>(pool, x, w, out, m, k, n, 1, [](const auto& p, int64_t slab, int64_t tile, int64_t r0, auto rows) {
    if constexpr (rows == 1)
      rectangle_in_runs(p, slab, tile, r0);
    else
      rectangle<rows>(p, slab, tile, r0);
  });
  if constexpr (std::is_same_v<W, uint16_t>)
    for (int64_t r = 0; r < m; ++r)
      for (int64_t g = 0; g + kGroupCols <= n; g += kGroupCols) {
        float* o = out + r * n + g;
        interleave(load_f32(o), load_f32(o + kLane), o);
      }
}

#if defined(__AVX512F__)
// ---- AMX (see the top of this file).
// Rectangles of at most this many columns: each weight row is read in runs of 2 KB (runs of one
// panel's 64 bytes, 6-98 KB apart, thrashed the TLB), and a packed rectangle of a slab stays in L2.
constexpr int64_t kAmxMaxTileCols = 1024;
// Up to this many activation rows the items are K slabs by column tiles, as in the FMA loop (whole
// rows stream in address order, partial sums per slab: a batch-8 step read its weights at 11 GB/s
// with items of 256 columns over all of K); beyond, partial sums per slab would outgrow the caches,
// so items are column tiles over all of K, their multiply-adds outweighing the streaming.
constexpr int64_t kAmxMaxSlabbedRows = 32;
// Rows are prefetched this many (k, k + 1) pairs ahead of packing.
constexpr int64_t kPrefetchPairs = 8;
// From this many rows AMX beats the FMA loop where it counts, on weights streaming from memory: in
// a bfloat16 SmolLM2 engine's decode steps the FMA loop gave 163-173 tokens/s at batch 4 against
// AMX's 121, and AMX 226-233 at batch 8 against the FMA loop's 200-215. Single warm-cache calls at
// 4 rows had favoured AMX, which is where the earlier threshold of 4 came from: batch-3 and batch-4
// steps then cost twice a batch-2 step. (All of the model's weights in one jitted call: 13.5 ms at
// 4 rows in the FMA loop against 24.4 on AMX; 20.6 against 25.4 at 8.)
constexpr int64_t kAmxMinRows = 8;

using jaxinfer::TileConfig;
using jaxinfer::kBf16TileElems;
using jaxinfer::kBf16TileK;

bool amx_runs() { return __builtin_cpu_supports("amx-bf16") && jaxinfer::tile_state_granted(); }

// Prepacked panels serve any rows: the tile operations cost no more than streaming the panels (a
// 16-row A tile holding one row multiplies as fast as a full one).
bool amx_serves(int64_t m, const Bf16Weight& w) {
  return (w.panels || (m >= kAmxMinRows && w.k % kBf16TileK == 0 && w.n % kPanelCols == 0)) && amx_runs();
}

struct AmxProblem {
  const uint16_t* x;  // [M, K] bf16
  const uint16_t* w;  // [K, N] bf16, or its panels
  bool panels;
  float* partial;     // [slabs, M, N]
  int64_t m, k, n;
  Rectangles r;
  uint16_t* act = nullptr;  // [M, N / 2] bf16: with it each item also takes its columns' SwiGLU (one slab)
};

// 16 (gate, up) pairs of a product's columns (the gate_up weight interleaves gate_i and up_i) ->
// 16 bfloat16 silu(gate) * up, gate and up first rounded to bfloat16 as the unfused path's product
// is, then silu(g) = g * sigmoid(g), sigmoid from exp(-|g|) (which cannot overflow), in float32.
inline __m512 bf16_rounded(__m512 x) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x)), 16));
}
inline void swiglu_pairs(const float* pairs, uint16_t* act) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  const __m512 a = _mm512_loadu_ps(pairs), b = _mm512_loadu_ps(pairs + 16);
  const __m512 gate = bf16_rounded(_mm512_permutex2var_ps(a, even, b));
  const __m512 up = bf16_rounded(_mm512_permutex2var_ps(a, odd, b));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(act),
                      (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_mul_ps(gate, jaxinfer::sigmoid(gate)), up)));
}

// Columns c0 / 2 .. c1 / 2 - 1 of act [M, N / 2] = swiglu_pairs over columns c0 .. c1 - 1 of y [M, N]
// (c0, c1 multiples of 32).
void swiglu_columns(const float* y, int64_t m, int64_t n, int64_t c0, int64_t c1, uint16_t* act) {
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c = c0; c < c1; c += kPanelCols) swiglu_pairs(y + r * n + c, act + r * (n / 2) + c / 2);
}

// Rows k0 .. k1 - 1, columns n0 .. n0 + cols - 1 of w as B tiles: panel j (columns n0 + 32 j ..)
// holds, for K step s of the slab and half h (16 columns), the tile at
// panels[j * (k1 - k0) * 32 + (2 s + h) * 512], whose row i is (w[k0 + 32 s + 2 i, col],
// w[k0 + 32 s + 2 i + 1, col]) per column.
void pack_rectangle(const AmxProblem& p, int64_t k0, int64_t k1, int64_t n0, int64_t cols, uint16_t* panels) {
  const int64_t panel_elems = (k1 - k0) * kPanelCols;
  for (int64_t pair = 0; pair < (k1 - k0) / 2; ++pair) {
    const uint16_t* even = p.w + (k0 + 2 * pair) * p.n + n0;
    const uint16_t* odd = even + p.n;
    if (k0 + 2 * (pair + kPrefetchPairs) + 1 < k1)
      for (int64_t c = 0; c < cols; c += 32) {
        _mm_prefetch(reinterpret_cast<const char*>(even + 2 * kPrefetchPairs * p.n + c), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(odd + 2 * kPrefetchPairs * p.n + c), _MM_HINT_T0);
      }
    uint16_t* row = panels + (pair / 16) * 2 * kBf16TileElems + (pair % 16) * 32;
    for (int64_t c = 0; c < cols; c += 16)
      jaxinfer::store_pairs(even + c, odd + c, row + (c / kPanelCols) * panel_elems + ((c / 16) % 2) * kBf16TileElems);
  }
}

// One panel's 32 output columns over K rows k0 .. k1 - 1 for all activation rows, in groups of 32
// rows, into out [M, N]: C tiles 0-1 (rows 0-15 of the group) and 2-3 (rows 16-31), A tiles 4-5, B
// tiles 6-7. `loaded` is the group shape whose tile configuration is loaded (rows0 * 32 + rows1, or
// -1 for none): ldtilecfg waits for the tile operations in flight, and loading it for every group of
// every panel held the product of 256 rows by 12 panels (576 x 384) at 97 us against 83 on the Xeon
// VM (a standalone loop, one thread, three interleaved rounds), so it is loaded only when a group's
// shape changes.
void amx_panel(const AmxProblem& p, const uint16_t* panel, int64_t k0, int64_t k1, int64_t n0, float* out,
               int& loaded) {
  const int64_t x_stride = p.k * 2, y_stride = p.n * 4;
  for (int64_t g = 0; g < p.m; g += 32) {
    const int rows0 = static_cast<int>(std::min<int64_t>(16, p.m - g));
    const int rows1 = static_cast<int>(std::clamp<int64_t>(p.m - g - 16, 0, 16));
    if (loaded != rows0 * 32 + rows1) {
      TileConfig config;
      for (int t : {0, 1, 4}) config.rows[t] = rows0, config.colsb[t] = 64;
      for (int t : {6, 7}) config.rows[t] = 16, config.colsb[t] = 64;
      if (rows1)
        for (int t : {2, 3, 5}) config.rows[t] = rows1, config.colsb[t] = 64;
      _tile_loadconfig(&config);
      loaded = rows0 * 32 + rows1;
    }
    _tile_zero(0);
    _tile_zero(1);
    if (rows1) {
      _tile_zero(2);
      _tile_zero(3);
    }
    const uint16_t* a = p.x + g * p.k + k0;
    for (int64_t s = 0; s < k1 - k0; s += kBf16TileK) {
      const uint16_t* b = panel + (s / kBf16TileK) * 2 * kBf16TileElems;
      _tile_loadd(6, b, 64);
      _tile_loadd(7, b + kBf16TileElems, 64);
      _tile_loadd(4, a + s, x_stride);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      if (rows1) {
        _tile_loadd(5, a + 16 * p.k + s, x_stride);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
    float* y = out + g * p.n + n0;
    _tile_stored(0, y, y_stride);
    _tile_stored(1, y + 16, y_stride);
    if (rows1) {
      _tile_stored(2, y + 16 * p.n, y_stride);
      _tile_stored(3, y + 16 * p.n + 16, y_stride);
    }
  }
}

void amx_item(const AmxProblem& p, int64_t i) {
  const int64_t slab = i / p.r.tiles, tile = i % p.r.tiles;
  const int64_t k0 = slab * p.r.slab_rows, k1 = std::min(p.k, k0 + p.r.slab_rows);
  const int64_t n0 = tile * p.r.tile_cols, cols = std::min(p.n, n0 + p.r.tile_cols) - n0;
  thread_local std::vector<uint16_t> packed;
  const uint16_t* panels = p.w + n0 * p.k;  // prepacked: this tile's panels over all of K
  if (!p.panels) {
    packed.resize((k1 - k0) * cols);
    pack_rectangle(p, k0, k1, n0, cols, packed.data());
    panels = packed.data();
  }
  int loaded = -1;
  for (int64_t j = 0; j < cols / kPanelCols; ++j)
    amx_panel(p, panels + j * (k1 - k0) * kPanelCols, k0, k1, n0 + j * kPanelCols, p.partial + slab * p.m * p.n,
              loaded);
  _tile_release();
  // The item's part of the product is still in L2: its SwiGLU from there. Taken per 32-row group
  // straight from the tile stores (through L1) it was slower: a 512-token prefill step's 137 / 161 /
  // 141 against 123 / 151 / 136 ms unfused (Xeon VM, 2026-12-05), the vector work then waiting on
  // the tile stores and the tiles on it.
  if (p.act) swiglu_columns(p.partial, p.m, p.n, n0, n0 + cols, p.act);
}

// out = x w; with `act` also its SwiGLU into act: per item (amx_item), or over out once the K
// slabs' partial sums are added.
void amx_dot(ffi::ThreadPool& pool, const uint16_t* x, const Bf16Weight& w, float* out, int64_t m,
             uint16_t* act = nullptr) {
  const int64_t k = w.k, n = w.n;
  // Prepacked panels stream in address order over all of K whatever the rows.
  const bool slabbed = !w.panels && m <= kAmxMaxSlabbedRows;
  const int64_t tile_cols = slabbed ? kAmxMaxTileCols
                                    : std::min(kAmxMaxTileCols, (n / kPanelCols + kTargetItems - 1) / kTargetItems * kPanelCols);
  const Rectangles r = rectangles(k, n, tile_cols, kBf16TileK, slabbed ? k : 1);
  std::vector<float> partial_sums(r.slabs > 1 ? r.slabs * m * n : 0);
  const AmxProblem p{x, w.data, w.panels, r.slabs > 1 ? partial_sums.data() : out, m, k, n, r,
                     r.slabs == 1 ? act : nullptr};
  jaxinfer::run_on_pool(pool, r.slabs * r.tiles, m, [p](int64_t i) { amx_item(p, i); });
  if (r.slabs > 1) sum_partials(p.partial, r.slabs, m, n, n, out);
  if (act && !p.act) swiglu_columns(out, m, n, 0, n, act);
}

// ---- AVX512-BF16 (see the top of this file).
// Activation rows per pass. Up to 4 rows their pairs stay in 16 registers; beyond, the compiler
// reloads them from the stack, which costs less than a second pass over the rectangle. Zen 4 VM,
// a bfloat16 engine's decode in one process, the loops alternating by round (six rounds,
// 2026-12-07): 8 rows a pass against 4 took batch 6 / 8 to 401.4 / 496.7 tokens/s from 373.0 /
// 442.6 (1.08 / 1.12x, faster in 6 / 5 of the rounds). Dropped there: 2 pairs a pass at 5-8 rows
// (all pairs in registers) 0.97 / 0.91x, 8 pairs 1.07 / 1.02x, 1024-column tiles 0.95x at batch 8.
constexpr int kDpRows = 8;
constexpr int kDpPairs = 4;  // (k, k + 1) pairs per pass: 8 weight rows, as the FMA loop's kRowsPerPass
// One row stays in the FMA loop, which reads the weight as it is (cpu_dense_dot.py says which rows
// come here at all).
constexpr int64_t kDpMinRows = 2;

// Not on CPUs with AMX: their few-row steps stay in the FMA loop, where they were measured (this
// loop was measured on Zen 4 only).
bool dp_serves(int64_t m, int64_t k) {
  return m >= kDpMinRows && k % 2 == 0 && __builtin_cpu_supports("avx512bf16") &&
         !(__builtin_cpu_supports("amx-bf16") && jaxinfer::tile_state_granted());
}

// vpermt2w indices: (a[j], b[j]) for j = 0 .. 15 (kPairsLow) or j = 16 .. 31 (kPairsHigh), where
// index i < 32 picks a[i] and 32 + i picks b[i].
alignas(64) constexpr uint16_t kPairsLow[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
alignas(64) constexpr uint16_t kPairsHigh[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                 24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};

// Adds P pairs of weight rows from k (columns n0 .. n1 - 1) times activation rows xs [R, K] into
// out [R, N], 32 columns at a time (a last 16 alone), prefetching the next P pairs if asked.
template <int R, int P>
void dp_pass(const Problem<uint16_t, uint16_t>& p, const uint16_t* xs, int64_t k, int64_t n0, int64_t n1, bool prefetch,
             float* out) {
  const __m512i low = _mm512_load_si512(kPairsLow), high = _mm512_load_si512(kPairsHigh);
  __m512bh x[R][P];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < P; ++j) {
      int32_t pair;
      std::memcpy(&pair, xs + r * p.k + k + 2 * j, sizeof(pair));
      x[r][j] = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
    }
  const uint16_t* w0 = p.w + k * p.n;
  auto multiply_add = [&](int64_t n, int halves, auto load) {
    __m512bh w[P][2];
    for (int j = 0; j < P; ++j) {
      const __m512i a = load(w0 + 2 * j * p.n + n), b = load(w0 + (2 * j + 1) * p.n + n);
      w[j][0] = reinterpret_cast<__m512bh>(_mm512_permutex2var_epi16(a, low, b));
      if (halves == 2) w[j][1] = reinterpret_cast<__m512bh>(_mm512_permutex2var_epi16(a, high, b));
    }
    for (int r = 0; r < R; ++r)
      for (int h = 0; h < halves; ++h) {
        float* o = out + r * p.ldp + n + 16 * h;
        __m512 acc = _mm512_loadu_ps(o);
        for (int j = 0; j < P; ++j) acc = _mm512_dpbf16_ps(acc, x[r][j], w[j][h]);
        _mm512_storeu_ps(o, acc);
      }
  };
  int64_t n = n0;
  for (; n + 32 <= n1; n += 32) {
    // Into L2 (T1): a prefetch into L1 holds one of its few miss buffers until the line comes. On the
    // Zen 4 VM traced bfloat16 engine steps at batch 2 / 8 took 10.5-10.8 / 18.8-19.5 ms against
    // 12.2-12.9 / 21.4-23.2 with T0, and the head alone at 2 and 4 rows 1.9-2.2 against 2.2-3.2 ms
    // (two alternating pairs each, 2026-12-07).
    if (prefetch)
      for (int u = 0; u < 2 * P; ++u)
        _mm_prefetch(reinterpret_cast<const char*>(w0 + (2 * P + u) * p.n + n), _MM_HINT_T1);
    multiply_add(n, 2, [](const uint16_t* w) { return _mm512_loadu_si512(w); });
  }
  if (n < n1)
    multiply_add(n, 1, [](const uint16_t* w) {
      return _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
    });
}

// Rows r0 .. r0 + R - 1 of one rectangle's partial sums, as `rectangle` in the FMA loop.
template <int R>
void dp_rectangle(const Problem<uint16_t, uint16_t>& p, int64_t slab, int64_t tile, int64_t r0) {
  const auto [k0, k1, n0, n1, xs, out] = zeroed_rectangle(p, slab, tile, r0, R);
  int64_t k = k0;
  for (; k + 2 * kDpPairs <= k1; k += 2 * kDpPairs)
    dp_pass<R, kDpPairs>(p, xs, k, n0, n1, k + 4 * kDpPairs <= k1, out);
  for (; k < k1; k += 2) dp_pass<R, 1>(p, xs, k, n0, n1, false, out);
}

void dp_dot(ffi::ThreadPool& pool, const uint16_t* x, const uint16_t* w, float* out, int64_t m, int64_t k, int64_t n) {
  rectangles_dot<kDpRows>(pool, x, w, out, m, k, n, 2 * kDpPairs,
                          [](const auto& p, int64_t slab, int64_t tile, int64_t r0, auto rows) {
                            dp_rectangle<rows>(p, slab, tile, r0);
                          });
}

#endif  // __AVX512F__

#if !defined(__AVX512F__)
// ---- GEMM loop (bfloat16 beyond kFmaRows rows in the AVX2 build; see the top of this file).
constexpr int kGemmRows = 6;                // activation rows per tile: 12 sums, 2 weights, 1 broadcast
constexpr int64_t kGemmCols = kGroupCols;   // columns per tile and per packed weight panel
// K values per pass over the panels: every K of the default model's weights in one pass (fewer
// passes over the sums measured faster up to K = 1536: 256 was 10-20% slower), and an item's
// kGemmPanelsPerItem panels of this depth (384 KB) still sit in L2.
constexpr int64_t kGemmMaxDepth = 1536;
// Work items are runs of this many panels (fewer for narrow weights, so both cores get work).
constexpr int64_t kGemmPanelsPerItem = 4;

// Rows kGemmRows * b .. of x [M, K] as float32 in the tile order: out[kk * kGemmRows + r] =
// x[kGemmRows * b + r, kk] (zeros past M).
void pack_row_block(const uint16_t* x, int64_t m, int64_t k, int64_t b, float* out) {
  for (int r = 0; r < kGemmRows; ++r) {
    const int64_t row = kGemmRows * b + r;
    for (int64_t kk = 0; kk < k; ++kk) out[kk * kGemmRows + r] = row < m ? bf16_to_f32(x[row * k + kk]) : 0.0f;
  }
}

// Weight rows ahead of the one being packed that `pack_panels` asks for.
constexpr int64_t kPackPrefetchRows = 8;

// Rows k0 .. k0 + depth - 1 of w [K, N], columns n0 .. n0 + panels * kGemmCols - 1, as float32
// panels of kGemmCols columns: panel p holds panel[(p * depth + kk) * kGemmCols + c] =
// w[k0 + kk, n0 + p * kGemmCols + c], the even and odd columns of each group apart (`ColumnGroup`),
// so the tile's sums come out as (even, odd) and `interleave` orders them. The weight is read a
// row at a time across all the panels: packed one panel after another, each 32-byte piece of a
// row came from a line (and, for the head's 98 KB rows, a page) of its own, and the head took
// 21.8 ms at 16 rows against 14.0-15.7 this way (136 against 112-123 at 256). The row
// kPackPrefetchRows ahead is asked for as each row is packed (consecutive rows' pieces lie 1-98 KB
// apart); it pays at decode's row counts, where an item's packing weighs most (Zen 3 VM, 2026-12-06,
// benchmarks/bench_dense_dot.py, two alternating pairs, each matmul against XLA's float32 dot in the
// same run: 0.85 against 0.96 of its time at 16 rows, 0.74 against 0.85 at 32, 0.93 against 1.05 at
// 64; the offline benchmark's workload 157.7 / 158.2 against 151.3 / 150.4 output tokens/s, its
// batch-64 decode steps 188.1 / 191.3 against 204.0 / 212.0 ms).
void pack_panels(const uint16_t* w, int64_t n, int64_t k0, int64_t depth, int64_t n0, int64_t panels, float* out) {
  using Group = ColumnGroup<uint16_t>;
  for (int64_t kk = 0; kk < depth; ++kk) {
    if (kk + kPackPrefetchRows < depth) {
      const char* ahead = reinterpret_cast<const char*>(w + (k0 + kk + kPackPrefetchRows) * n + n0);
      for (int64_t byte = 0; byte < panels * kGemmCols * int64_t{sizeof(uint16_t)}; byte += 64)
        _mm_prefetch(ahead + byte, _MM_HINT_T0);
    }
    for (int64_t p = 0; p < panels; ++p) {
      const Group::Bits bits = Group::load(w + (k0 + kk) * n + n0 + p * kGemmCols);
      float* panel_row = out + (p * depth + kk) * kGemmCols;
      store_f32(panel_row, Group::vector(bits, 0));
      store_f32(panel_row + kLane, Group::vector(bits, 1));
    }
  }
}

// out[r, 0 .. kGemmCols) (+)= the sum over kk < depth of rows[kk * kGemmRows + r] *
// panel[kk * kGemmCols ..], for r < live rows. The twelve sums are named rather than an array: GCC
// kept an array of them in memory across the runtime K loop, at half the speed.
void gemm_tile(const float* rows, const float* panel, int64_t depth, int live, float* out, int64_t n, bool accumulate) {
  VecF s00 = broadcast(0.0f), s01 = s00, s10 = s00, s11 = s00, s20 = s00, s21 = s00, s30 = s00, s31 = s00, s40 = s00,
       s41 = s00, s50 = s00, s51 = s00;
  for (int64_t kk = 0; kk < depth; ++kk, rows += kGemmRows, panel += kGemmCols) {
    const VecF even = load_f32(panel), odd = load_f32(panel + kLane);
    VecF x = broadcast(rows[0]);
    s00 = fmadd(x, even, s00), s01 = fmadd(x, odd, s01);
    x = broadcast(rows[1]);
    s10 = fmadd(x, even, s10), s11 = fmadd(x, odd, s11);
    x = broadcast(rows[2]);
    s20 = fmadd(x, even, s20), s21 = fmadd(x, odd, s21);
    x = broadcast(rows[3]);
    s30 = fmadd(x, even, s30), s31 = fmadd(x, odd, s31);
    x = broadcast(rows[4]);
    s40 = fmadd(x, even, s40), s41 = fmadd(x, odd, s41);
    x = broadcast(rows[5]);
    s50 = fmadd(x, even, s50), s51 = fmadd(x, odd, s51);
  }
  const VecF sums[kGemmRows][2] = {{s00, s01}, {s10, s11}, {s20, s21}, {s30, s31}, {s40, s41}, {s50, s51}};
  for (int r = 0; r < live; ++r) {
    float* o = out + r * n;
    alignas(64) float ordered[kGemmCols];
    interleave(sums[r][0], sums[r][1], ordered);
    for (int v = 0; v < 2; ++v) {
      VecF sum = load_f32(ordered + v * kLane);
      if (accumulate) sum = add(sum, load_f32(o + v * kLane));
      store_f32(o + v * kLane, sum);
    }
  }
}

// x [M, K] times w [K, N] by tiles of kGemmRows x kGemmCols: x is packed once as float32 row blocks;
// each work item packs its panels of the weight (float32, kGemmMaxDepth K values at a time) and
// multiplies every row block by each, writing the sums straight into out.
void gemm_dot(ffi::ThreadPool& pool, const uint16_t* x, const uint16_t* w, float* out, int64_t m, int64_t k, int64_t n) {
  const int64_t blocks = (m + kGemmRows - 1) / kGemmRows;
  std::vector<float> packed_rows(blocks * k * kGemmRows);
  jaxinfer::run_on_pool(pool, blocks, m, [&](int64_t b) { pack_row_block(x, m, k, b, packed_rows.data() + b * k * kGemmRows); });
  const int64_t panels = n / kGemmCols, passes = (k + kGemmMaxDepth - 1) / kGemmMaxDepth;
  const int64_t pass_depth = (k + passes - 1) / passes;
  const int64_t panels_per_item = std::clamp<int64_t>(panels / (2 * kTargetItems), 1, kGemmPanelsPerItem);
  const int64_t items = (panels + panels_per_item - 1) / panels_per_item;
  jaxinfer::run_on_pool(pool, items, m, [&](int64_t item) {
    thread_local std::vector<float> packed;
    packed.resize(panels_per_item * pass_depth * kGemmCols);
    const int64_t first = item * panels_per_item, count = std::min(panels, first + panels_per_item) - first;
    for (int64_t k0 = 0; k0 < k; k0 += pass_depth) {
      const int64_t depth = std::min(pass_depth, k - k0);
      pack_panels(w, n, k0, depth, first * kGemmCols, count, packed.data());
      for (int64_t p = 0; p < count; ++p)
        for (int64_t b = 0; b < blocks; ++b)
          gemm_tile(packed_rows.data() + b * k * kGemmRows + k0 * kGemmRows, packed.data() + p * depth * kGemmCols, depth,
                    static_cast<int>(std::min<int64_t>(kGemmRows, m - b * kGemmRows)),
                    out + b * kGemmRows * n + (first + p) * kGemmCols, n, k0 > 0);
    }
  });
}
#endif  // !__AVX512F__

// y = x w for bfloat16 x and w, by the first loop that serves; with `act` (AVX-512 builds) also the
// SwiGLU of y's (gate, up) column pairs into act [M, N / 2], inside the AMX loop's items where that
// loop runs, else in a pass over y.
void bf16_dot(ffi::ThreadPool& pool, const uint16_t* x16, const Bf16Weight& w, float* out, int64_t m,
              uint16_t* act = nullptr) {
#if defined(__AVX512F__)
  if (amx_serves(m, w)) return amx_dot(pool, x16, w, out, m, act);
#endif
  if (w.panels) {
    thread_local std::vector<uint16_t> plain;
    plain.resize(w.k * w.n);
    unpack_panels(w, plain.data());
    return bf16_dot(pool, x16, {plain.data(), w.k, w.n, false}, out, m, act);
  }
  const uint16_t* w16 = w.data;
  const int64_t k = w.k, n = w.n;
  // The FMA loop takes float32 rows.
  auto fma_rows = [&] {
    std::vector<float> x32(m * k);
    for (int64_t i = 0; i < m * k; ++i) x32[i] = bf16_to_f32(x16[i]);
    fma_dot(pool, x32.data(), w16, out, m, k, n);
  };
#if defined(__AVX512F__)
  if (dp_serves(m, k))
    dp_dot(pool, x16, w16, out, m, k, n);
  else
    fma_rows();
  if (act) swiglu_columns(out, m, n, 0, n, act);
#else
  if (m > kFmaRows)
    gemm_dot(pool, x16, w16, out, m, k, n);
  else
    fma_rows();
#endif
}

ffi::Error DenseDot(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Buffer<ffi::S32> live,
                    ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto dtype = w.element_type();
  const bool bf16 = dtype == ffi::DataType::BF16;
  const Bf16Weight weight = bf16_weight(w.untyped_data(), w.dimensions());
  if (xd.size() != 2 || weight.n == 0 || (weight.panels && !bf16) || xd[1] != weight.k || live.element_count() != 1 ||
      weight.n % kColumnMultiple != 0 || xd[0] < 1 || x.element_type() != dtype ||
      !(dtype == ffi::DataType::F32 || bf16))
    return ffi::Error::InvalidArgument("jaxinfer_dense_dot: expected x [M, K] and w [K, N], both f32 or both bf16, "
                                       "with N a multiple of 16 (or bf16 w as its panels [N / 32, K / 32, 2, 16, "
                                       "16, 2]), and a one-element s32 live-row count");
  const int64_t m = jaxinfer::live_rows(live, xd[0]);
  float* out = y->typed_data();
  jaxinfer::zero_rows_from(out, m, xd[0], weight.n);
  if (m == 0) return ffi::Error::Success();
  if (bf16)
    bf16_dot(pool, static_cast<const uint16_t*>(x.untyped_data()), weight, out, m);
  else
    fma_dot(pool, static_cast<const float*>(x.untyped_data()), static_cast<const float*>(w.untyped_data()), out, m,
            weight.k, weight.n);
  return ffi::Error::Success();
}

// silu(gate) * up of x w_gate_up, whose columns interleave gate_i and up_i (jaxinfer.model.llama),
// as bfloat16 [M, N / 2]: the MLP's first half in one call (see the top of this file).
ffi::Error DenseSwiglu(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                       ffi::Buffer<ffi::S32> live, ffi::ResultBuffer<ffi::BF16> act) {
#if defined(__AVX512F__)
  const auto xd = x.dimensions();
  const Bf16Weight weight = bf16_weight(w.untyped_data(), w.dimensions());
  if (xd.size() != 2 || weight.n == 0 || xd[1] != weight.k || weight.n % kPanelCols != 0 || xd[0] < 1 ||
      live.element_count() != 1)
    return ffi::Error::InvalidArgument("jaxinfer_dense_swiglu: expected x [M, K] and w [K, N] (or its panels), both "
                                       "bf16, with N a multiple of 32, and a one-element s32 live-row count");
  const int64_t m = jaxinfer::live_rows(live, xd[0]);
  uint16_t* out = reinterpret_cast<uint16_t*>(act->typed_data());
  jaxinfer::zero_rows_from(out, m, xd[0], weight.n / 2);
  if (m > 0) bf16_dot(pool, reinterpret_cast<const uint16_t*>(x.typed_data()), weight, jaxinfer::product_buffer(m * weight.n), m, out);
  return ffi::Error::Success();
#else
  return ffi::Error::InvalidArgument("jaxinfer_dense_swiglu: this build has no AVX-512 (use the unfused path)");
#endif
}

// ---- The passes over the product's rows (cpu_row_passes.h; see the top of this file).

// (residual + x w, its RMSNorm times norm_weight): the product of any of the loops above, rounded
// to bfloat16 as the unfused path's `linear` returns it, then one pass over it by rows.
ffi::Error DenseAddNorm(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                        ffi::Buffer<ffi::F32> residual, ffi::AnyBuffer norm_weight, ffi::Buffer<ffi::S32> live,
                        float eps, ffi::ResultBuffer<ffi::F32> residual_out, ffi::ResultBuffer<ffi::BF16> normed) {
  const auto xd = x.dimensions();
  const Bf16Weight weight = bf16_weight(w.untyped_data(), w.dimensions());
  if (xd.size() != 2 || weight.n == 0 || xd[1] != weight.k || xd[0] < 1 || weight.n % kColumnMultiple != 0 ||
      live.element_count() != 1)
    return ffi::Error::InvalidArgument("jaxinfer_dense_add_norm: expected bf16 x [M, K] and w [K, N] (or its "
                                       "panels) with N a multiple of 16, and a one-element s32 live-row count");
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(x.typed_data());
  const int64_t m = jaxinfer::live_rows(live, xd[0]);
  return jaxinfer::add_norm_call("jaxinfer_dense_add_norm", pool, xd[0], weight.n, m, residual, norm_weight, eps,
                                 residual_out->typed_data(), reinterpret_cast<uint16_t*>(normed->typed_data()),
                                 [&](float* y) { bf16_dot(pool, xs, weight, y, m); });
}

// (q, k, v) of x w_qkv, q and k rotated (RoPE): the attention's inputs in one call.
ffi::Error DenseQkvRope(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                        ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin, ffi::Buffer<ffi::S32> live,
                        int64_t kv_heads, int64_t q_per_kv, ffi::ResultBuffer<ffi::BF16> q,
                        ffi::ResultBuffer<ffi::BF16> k, ffi::ResultBuffer<ffi::BF16> v) {
  const auto xd = x.dimensions();
  const Bf16Weight weight = bf16_weight(w.untyped_data(), w.dimensions());
  if (xd.size() != 2 || weight.n == 0 || xd[1] != weight.k || xd[0] < 1 || live.element_count() != 1)
    return ffi::Error::InvalidArgument("jaxinfer_dense_qkv_rope: expected bf16 x [M, K] and w [K, N] (or its "
                                       "panels), and a one-element s32 live-row count");
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(x.typed_data());
  auto bits = [](ffi::ResultBuffer<ffi::BF16>& out) { return reinterpret_cast<uint16_t*>(out->typed_data()); };
  const int64_t m = jaxinfer::live_rows(live, xd[0]);
  return jaxinfer::qkv_rope_call("jaxinfer_dense_qkv_rope", pool, xd[0], weight.n, m, cos, sin, kv_heads, q_per_kv,
                                 bits(q), bits(k), bits(v), [&](float* y) { bf16_dot(pool, xs, weight, y, m); });
}

// The fused calls' first operands: bfloat16 x and w.
auto bind_bf16_operands() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::BF16>>().Arg<ffi::Buffer<ffi::BF16>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_dense_dot, DenseDot,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_dense_swiglu, DenseSwiglu,
                              jaxinfer::bind_swiglu<ffi::DataType::BF16>(bind_bf16_operands()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_dense_add_norm, DenseAddNorm,
                              jaxinfer::bind_add_norm<ffi::DataType::BF16>(bind_bf16_operands()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_dense_qkv_rope, DenseQkvRope,
                              jaxinfer::bind_qkv_rope<ffi::DataType::BF16>(bind_bf16_operands()));
