// An exact int8 x int8 -> int32 matmul for few activation rows on x86 CPUs, as XLA FFI custom calls
// (built, registered and fed packed weights by cpu_int8_dot.py).
//
//   jaxinfer_int8_dot: x [M, K] s8, w_packed [N/4, 4, K] s8, w_sums [N] s32 -> y [M, N] s32,
//       y = x @ w exactly
//   jaxinfer_w8a8_dot: x [M, K] f32, w_packed s8, w_sums s32, w_scale [N] f32, live [] s32 -> y [M, N] f32
//       (the first `live` rows, zeros after: cpu_row_count.h): W8A8 in one call,
//       x quantized per row (scale = max|x_row| / 127, or 1 / 127 for a zero row; q = x / scale
//       rounded half to even, clamped to [-127, 127], as activation_quant.quantize_per_token), the
//       exact int32 dot, then y = float(acc) * row scale * w_scale. One call instead of the five
//       small XLA operations that quantized the activations around each dot; they cost under 2 us
//       each in a profile, so this took a w8a8 SmolLM2 batch-1 decode only from 59 to 62 tokens/s.
//   jaxinfer_w8a8_add_norm, jaxinfer_w8a8_qkv_rope, jaxinfer_w8a8_swiglu: W8A8, then the pass over
//       its rows that cpu_row_passes.h describes, float32 results: a float32 engine's residual add
//       and next RMSNorm, split into heads and RoPE, or SwiGLU in the call of the matmul before them
//       (x, w_packed, w_sums, w_scale, the pass's operands, live)
//   w_packed[b, c, k] = w[k, 4 * b + c]: the weight output-major ([N, K], each output's K weights
//       contiguous), in blocks of 4 outputs, so XLA's own dot reads the same bytes as a free reshape
//   w_sums[n] = sum over k of w[k, n], made with the packed weight (cpu_int8_dot.pack); the VNNI loop
//       needs them (below), the AVX2 and AMX loops take them and ignore them
//
// The loop is in dot-product form: for a block of 4 outputs and up to kRowBlock activation rows, each
// 64 bytes of K is one zmm load per output and per row, and VNNI's vpdpbusd (64 byte products, summed
// in fours into 16 int32 lanes) accumulates each (row, output) pair in its own register; the 16 lanes
// are summed once at the end of K. The last partial 64 bytes of K are loaded masked (zeros beyond K).
// The block is walked output after output, each output's K bytes in order, so the block (4 x K
// contiguous bytes) streams in address order. Walked a K step at a time across its 4 outputs (4
// lines K bytes apart at once), it streamed at about 10 GB/s on one thread of the Zen 4 VM, and the
// 576 x 49152 head took 1.42-1.67 ms at 1 and 2 rows against 1.03-1.15 this way (2026-12-07, an ad
// hoc harness, A/B/A; the same at 4 and 8 rows); in a w4a8 engine's batch-1 step the head's call
// took 1.51-1.56 ms against 1.02-1.24 (benchmarks/profile_step.py, two alternating pairs).
// vpdpbusd multiplies unsigned by signed bytes, so x is offset by 128 into unsigned bytes, and 128 x
// the sums of each output's weights (w_sums) come off at the end. Those sums were once accumulated
// here, by the same instruction against ones: a second vpdpbusd per 64 weight bytes at one row and a
// second reduction per block. Made with the packed weight instead, a w8a8 engine's batch-1 decode ran
// 175.2 against 149.1 tokens/s (1.17x, faster in 4 of 4 rounds; batch 4 and 8 1.01x; Zen 5 VM,
// 2026-12-08, code and engine before and after in alternating processes, `jaxinfer bench latency`).
//
// The calling thread and tasks on XLA's intra-op thread pool take chunks of kBlocksPerItem output
// blocks from a shared counter, so a busy pool costs nothing but the calling thread's doing all of
// them. On the project's Xeon VMs one thread streams a weight from memory at about 12 GB/s and two at
// about 25 (the machine's copy bandwidth); on the earlier EPYC VMs one thread reached 14-18 GB/s and
// splitting did not pay.
//
// Built without AVX-512 VNNI (pallas_kernels.cpu_int8_dot picks the build for the CPU), the same
// output blocks run on AVX2: x is widened once per call to int16 (zero-padded to a multiple of 16),
// each 16 bytes of an output's weights are widened in registers, and vpmaddwd sums products in pairs
// into int32 lanes: exact for every int8 value, with no offset to take off.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cpu_amx.h"
#include "cpu_quantize.h"
#include "cpu_row_count.h"
#include "cpu_row_passes.h"
#include "cpu_thread_pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlockCols = 4;
// The first row block of each output block, which streams it from memory, prefetches the block this
// many blocks ahead (1, 2 and 4 measured within the machine's noise of each other). The VNNI loop
// prefetches into L2 (_MM_HINT_T1), not L1: on the Zen 4 VM, the two switched in place by round in
// one process (six rounds, 2026-12-07), a w8a8 engine's decode at batch 1 / 2 / 4 / 8 ran 134.1 /
// 231.6 / 472.1 / 629.1 tokens/s against 134.5 / 224.2 / 388.6 / 489.2 (1.00 / 1.03 / 1.22 / 1.29x,
// faster in 2 / 5 / 6 / 6 rounds), as the attention and AVX512-BF16 loops had gained from L2
// prefetches (a prefetch into L1 holds one of the core's few L1 miss buffers until its line comes).
// The W4A8 kernel's loop, switched the same way, was slower with them (0.93-0.97x at batch 1-16).
constexpr int64_t kPrefetchBlocks = 2;
// Output blocks per work item: 64 outputs, 36 KB of a K = 576 weight, few enough items to spread
// small weights over two threads, large enough to amortize taking one.
constexpr int64_t kBlocksPerItem = 16;

struct Problem {
  const uint8_t* x_offset;  // [M, K] x + 128 (VNNI path)
  const int8_t* x_tiles;    // x in AMX B-tile order (AMX path, see pack_x_tiles)
  const int16_t* x_wide;    // [M, K rounded up to 16] x as int16, zero-padded (AVX2 path)
  const int8_t* w;          // [N/4, 4, K]
  const int32_t* w_sums;    // [N]
  int32_t* y;               // [M, N]
  int64_t m, k, n;
};

#if defined(__AVX512VNNI__)

constexpr int kRowBlock = 4;

// [sum(a), sum(b), sum(c), sum(d)] of four vectors of 16 int32 lanes.
inline __m128i sum_lanes4(__m512i a, __m512i b, __m512i c, __m512i d) {
  auto halve = [](__m512i v) {
    return _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
  };
  // hadd works within each 128-bit half: after two rounds each half holds 4 partial sums of a..d.
  const __m256i abcd = _mm256_hadd_epi32(_mm256_hadd_epi32(halve(a), halve(b)), _mm256_hadd_epi32(halve(c), halve(d)));
  return _mm_add_epi32(_mm256_castsi256_si128(abcd), _mm256_extracti128_si256(abcd, 1));
}

// Rows r0..r0+R-1 of y, outputs 4b..4b+3. The first row block of each output block (kFirst), which
// streams it from memory, prefetches the block kPrefetchBlocks ahead.
template <int R, bool kFirst>
void block(const Problem& p, int64_t r0, int64_t b) {
  const int8_t* w = p.w + b * kBlockCols * p.k;
  const uint8_t* x = p.x_offset + r0 * p.k;
  const int64_t whole = p.k / 64 * 64;  // the last partial 64 bytes are loaded masked (zeros beyond K)
  const __mmask64 tail = _cvtu64_mask64(whole < p.k ? ~0ULL >> (64 - (p.k - whole)) : 0);
  // One output's K bytes in order into its R sums. Called once per
  // output with the sums as named locals, so that they stay in registers: indexed by a run-time
  // output they lived on the stack, stored after every vpdpbusd. Zen 4 VM, 2026-12-07, the two
  // loops switched in place by round in one process (six rounds, decode after 16-token prompts): a
  // w8a8 engine at batch 1 / 2 / 4 / 8 131.6 / 241.0 / 322.3 / 388.7 tokens/s against 119.6 / 197.4 /
  // 268.2 / 323.3 (1.10-1.22x, faster in every round); a w4a8 engine, whose head runs here, at batch
  // 4 1.16x (every round), at 1 and 8 within the noise (0.98 / 1.05x).
  auto walk = [&](int c, __m512i (&acc)[R]) {
    const int8_t* col = w + c * p.k;
    auto add = [&](__m512i weights, int64_t k, auto load) {
      for (int r = 0; r < R; ++r) acc[r] = _mm512_dpbusd_epi32(acc[r], load(x + r * p.k + k), weights);
    };
    for (int64_t k = 0; k < whole; k += 64) {
      if (kFirst)
        _mm_prefetch(reinterpret_cast<const char*>(col + kPrefetchBlocks * kBlockCols * p.k + k), _MM_HINT_T1);
      add(_mm512_loadu_si512(col + k), k, [](const void* a) { return _mm512_loadu_si512(a); });
    }
    if (whole < p.k)
      add(_mm512_maskz_loadu_epi8(tail, col + whole), whole,
          [tail](const void* a) { return _mm512_maskz_loadu_epi8(tail, a); });
  };
  __m512i acc0[R], acc1[R], acc2[R], acc3[R];
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = acc2[r] = acc3[r] = _mm512_setzero_si512();
  walk(0, acc0);
  walk(1, acc1);
  walk(2, acc2);
  walk(3, acc3);
  const __m128i offset_sums =
      _mm_slli_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.w_sums + b * kBlockCols)), 7);
  for (int r = 0; r < R; ++r) {
    const __m128i sums = _mm_sub_epi32(sum_lanes4(acc0[r], acc1[r], acc2[r], acc3[r]), offset_sums);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p.y + (r0 + r) * p.n + b * kBlockCols), sums);
  }
}

template <bool kFirst>
void row_block(const Problem& p, int64_t r0, int64_t b) {
  jaxinfer::with_row_count<kRowBlock>(p.m - r0, [&](auto rows) { block<rows, kFirst>(p, r0, b); });
}

void all_rows(const Problem& p, int64_t b) {
  row_block<true>(p, 0, b);
  for (int64_t r0 = kRowBlock; r0 < p.m; r0 += kRowBlock) row_block<false>(p, r0, b);
}

void vnni_item(const Problem& p, int64_t item) {
  const int64_t blocks = p.n / kBlockCols;
  for (int64_t b = item * kBlocksPerItem; b < std::min(blocks, (item + 1) * kBlocksPerItem); ++b) all_rows(p, b);
}

// ---- AMX (Intel's tile matrix unit): tdpbssd multiplies signed bytes by signed bytes, a 16 x 64
// A tile by a 16 x 64 B tile (each B row holding 4 consecutive K bytes of up to 16 columns) into
// a 16 x 16 int32 C tile. Here A is 16 outputs' weights (rows of the output-major layout, read in
// place with stride K), B the activations' 64 K values rearranged per call (pack_x_tiles), and C
// the outputs x rows, so one item (64 outputs, kBlocksPerItem blocks) keeps four C tiles. Used
// when K and N are multiples of 64 and the OS grants the tile state; otherwise the VNNI loop.
constexpr int64_t kAmxRows = 16;  // activation rows per B tile
constexpr int64_t kAmxK = 64;     // K bytes per tile step

using jaxinfer::TileConfig;

// Below this many rows the VNNI loop was faster (8 and 30 layers of SmolLM2's weights: 1-4 rows
// 0.8-1.3 / 2.8-3.6 ms against AMX's 1.0-1.3 / 3.4-4.0; 6-8 rows 1.2-1.6 / 4.4-5.8 against 1.1-1.4 /
// 3.7-4.0).
constexpr int64_t kAmxMinRows = 5;

bool amx_serves(int64_t m, int64_t k, int64_t n) {
  return m >= kAmxMinRows && k % kAmxK == 0 && n % (kBlocksPerItem * kBlockCols) == 0 &&
         __builtin_cpu_supports("amx-int8") && jaxinfer::tile_state_granted();
}

// x [M, K] int8 -> per group of 16 rows g, per K step s: [16 K quads][rows in group][4 bytes].
std::vector<int8_t> pack_x_tiles(const int8_t* x, int64_t m, int64_t k) {
  std::vector<int8_t> tiles(((m + kAmxRows - 1) / kAmxRows) * kAmxRows * k);
  int8_t* out = tiles.data();
  for (int64_t g = 0; g < m; g += kAmxRows) {
    const int64_t rows = std::min(kAmxRows, m - g);
    for (int64_t s = 0; s < k; s += kAmxK)
      for (int64_t quad = 0; quad < kAmxK / 4; ++quad)
        for (int64_t r = 0; r < rows; ++r, out += 4) std::memcpy(out, x + (g + r) * k + s + 4 * quad, 4);
  }
  return tiles;
}

void amx_item(const Problem& p, int64_t item) {
  const int64_t n0 = item * kBlocksPerItem * kBlockCols;
  const int8_t* x_group = p.x_tiles;
  int64_t loaded_rows = 0;  // ldtilecfg waits for the tile operations in flight: only when rows change
  for (int64_t g = 0; g < p.m; g += kAmxRows) {
    const int64_t rows = std::min(kAmxRows, p.m - g);
    if (rows != loaded_rows) {
      TileConfig config;
      for (int t = 0; t < 4; ++t) config.rows[t] = 16, config.colsb[t] = 4 * rows;  // C: 16 outputs x rows
      config.rows[4] = kAmxK / 4, config.colsb[4] = 4 * rows;                        // B: activations
      for (int t = 5; t < 8; ++t) config.rows[t] = 16, config.colsb[t] = kAmxK;      // A: weights
      _tile_loadconfig(&config);
      loaded_rows = rows;
    }
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const int8_t* w = p.w + n0 * p.k;
    for (int64_t s = 0; s < p.k; s += kAmxK, x_group += kAmxK * rows) {
      _tile_loadd(4, x_group, 4 * rows);
      _tile_loadd(5, w + s, p.k);
      _tile_dpbssd(0, 5, 4);
      _tile_loadd(6, w + 16 * p.k + s, p.k);
      _tile_dpbssd(1, 6, 4);
      _tile_loadd(7, w + 32 * p.k + s, p.k);
      _tile_dpbssd(2, 7, 4);
      _tile_loadd(5, w + 48 * p.k + s, p.k);
      _tile_dpbssd(3, 5, 4);
    }
    alignas(64) int32_t c[4][16][16];
    _tile_stored(0, c[0], 64);
    _tile_stored(1, c[1], 64);
    _tile_stored(2, c[2], 64);
    _tile_stored(3, c[3], 64);
    for (int64_t r = 0; r < rows; ++r)
      for (int t = 0; t < 4; ++t)
        for (int o = 0; o < 16; ++o) p.y[(g + r) * p.n + n0 + 16 * t + o] = c[t][o][r];
  }
  _tile_release();
}

// y = x @ w for int8 x ([M, K]) and packed w, by AMX where it serves, else the VNNI loop.
void dot(ffi::ThreadPool& pool, const int8_t* x, const int8_t* w, const int32_t* w_sums, int32_t* y, int64_t m,
         int64_t k, int64_t n) {
  const int64_t items = (n / kBlockCols + kBlocksPerItem - 1) / kBlocksPerItem;
  if (amx_serves(m, k, n)) {
    const std::vector<int8_t> x_tiles = pack_x_tiles(x, m, k);
    const Problem p{nullptr, x_tiles.data(), nullptr, w, w_sums, y, m, k, n};
    jaxinfer::run_on_pool(pool, items, m, [p](int64_t item) { amx_item(p, item); });
    return;
  }
  std::vector<uint8_t> x_offset(m * k);
  for (int64_t i = 0; i < m * k; ++i) x_offset[i] = static_cast<uint8_t>(x[i] + 128);
  const Problem p{x_offset.data(), nullptr, nullptr, w, w_sums, y, m, k, n};
  jaxinfer::run_on_pool(pool, items, m, [p](int64_t item) { vnni_item(p, item); });
}

#else  // AVX2

// Rows per pass: R x 4 int32 sums, the 4 widened weight registers and a row of x fit in 16 ymm at 2.
constexpr int kRowBlock = 2;
constexpr int64_t kWideK = 16;  // K values per step: 16 bytes of weights widened into one ymm

// [sum(a), sum(b), sum(c), sum(d)] of four vectors of 8 int32 lanes.
inline __m128i sum_lanes4(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i abcd = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
  return _mm_add_epi32(_mm256_castsi256_si128(abcd), _mm256_extracti128_si256(abcd, 1));
}

// 16 weights from k on as int16; the last partial step reads only the `end - k` bytes there are
// (the padding it widens meets x's zero padding).
inline __m256i widen_k(const int8_t* p, int64_t k, int64_t end) {
  if (k + kWideK <= end) return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  alignas(16) int8_t tail[kWideK] = {};
  std::memcpy(tail, p, end - k);
  return _mm256_cvtepi8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(tail)));
}

// Walked K step by K step across the block's 4 outputs: output after output, each output's chain of
// dependent vpmaddwd adds (36 at K = 576) ran this build 1.8x slower (forced on the Zen 4 VM).
template <int R>
void wide_block(const Problem& p, int64_t r0, int64_t b, int64_t k_padded, bool first) {
  __m256i acc[R][kBlockCols];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kBlockCols; ++c) acc[r][c] = _mm256_setzero_si256();
  const int8_t* w = p.w + b * kBlockCols * p.k;
  const int16_t* x = p.x_wide + r0 * k_padded;
  for (int64_t k = 0; k < p.k; k += kWideK) {
    // Once per 128 bytes of the block (two 64-byte lines), the same share of the block
    // kPrefetchBlocks ahead: a prefetch per column and step, four to a line, held a standalone
    // copy of this loop to 6.9 GB/s on Zen 2, against 16 this way (two threads; a plain read
    // reaches 17).
    if (first && k % (2 * kWideK) == 0)
      for (int line = 0; line < 2; ++line)
        _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetchBlocks * kBlockCols * p.k + kBlockCols * k + 64 * line),
                     _MM_HINT_T0);
    __m256i cols[kBlockCols];
    for (int c = 0; c < kBlockCols; ++c) cols[c] = widen_k(w + c * p.k + k, k, p.k);
    for (int r = 0; r < R; ++r) {
      const __m256i xr = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + r * k_padded + k));
      for (int c = 0; c < kBlockCols; ++c) acc[r][c] = _mm256_add_epi32(acc[r][c], _mm256_madd_epi16(xr, cols[c]));
    }
  }
  for (int r = 0; r < R; ++r)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p.y + (r0 + r) * p.n + b * kBlockCols),
                     sum_lanes4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
}

void wide_item(const Problem& p, int64_t item, int64_t k_padded) {
  const int64_t blocks = p.n / kBlockCols;
  for (int64_t b = item * kBlocksPerItem; b < std::min(blocks, (item + 1) * kBlocksPerItem); ++b)
    for (int64_t r0 = 0; r0 < p.m; r0 += kRowBlock)
      jaxinfer::with_row_count<kRowBlock>(p.m - r0, [&](auto rows) { wide_block<rows>(p, r0, b, k_padded, r0 == 0); });
}

// y = x @ w for int8 x ([M, K]) and packed w (exact in int16 products: no sums to take off).
void dot(ffi::ThreadPool& pool, const int8_t* x, const int8_t* w, const int32_t* w_sums, int32_t* y, int64_t m,
         int64_t k, int64_t n) {
  const int64_t items = (n / kBlockCols + kBlocksPerItem - 1) / kBlocksPerItem;
  const int64_t k_padded = (k + kWideK - 1) / kWideK * kWideK;
  std::vector<int16_t> x_wide(m * k_padded, 0);
  for (int64_t r = 0; r < m; ++r) std::copy(x + r * k, x + (r + 1) * k, x_wide.begin() + r * k_padded);
  const Problem p{nullptr, nullptr, x_wide.data(), w, w_sums, y, m, k, n};
  jaxinfer::run_on_pool(pool, items, m, [p, k_padded](int64_t item) { wide_item(p, item, k_padded); });
}

#endif  // __AVX512VNNI__

// x [M, K] against a packed weight [N/4, 4, K] and its sums [N].
bool packed_for(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> wd, ffi::Buffer<ffi::S32>& w_sums) {
  return xd.size() == 2 && wd.size() == 3 && wd[1] == kBlockCols && xd[1] == wd[2] &&
         w_sums.element_count() == wd[0] * kBlockCols;
}

ffi::Error Int8Dot(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S8> w,
                   ffi::Buffer<ffi::S32> w_sums, ffi::ResultBuffer<ffi::S32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (!packed_for(xd, wd, w_sums))
    return ffi::Error::InvalidArgument(
        "jaxinfer_int8_dot: expected x [M, K] and w packed [N/4, 4, K], both int8, and w's sums [N] s32");
  dot(pool, x.typed_data(), w.typed_data(), w_sums.typed_data(), y->typed_data(), xd[0], xd[1], wd[0] * kBlockCols);
  return ffi::Error::Success();
}

// A W8A8 call's x and packed weight, checked by `w8a8_operands`.
struct W8A8Operands {
  const float* x;        // [rows, K]
  const int8_t* w;          // packed [N/4, 4, K]
  const int32_t* w_sums;    // [N]
  const float* w_scale;     // [N]
  int64_t rows, k, n;
};

bool w8a8_operands(ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::S8>& w, ffi::Buffer<ffi::S32>& w_sums,
                   ffi::Buffer<ffi::F32>& w_scale, ffi::Buffer<ffi::S32>& live, W8A8Operands* out) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  const bool fit =
      packed_for(xd, wd, w_sums) && w_scale.element_count() == wd[0] * kBlockCols && live.element_count() == 1;
  if (fit)
    *out = {x.typed_data(), w.typed_data(), w_sums.typed_data(), w_scale.typed_data(),
            xd[0], xd[1], wd[0] * kBlockCols};
  return fit;
}

ffi::Error w8a8_operand_error(const char* target) {
  return ffi::Error::InvalidArgument(std::string(target) +
                                     ": expected x [M, K] f32, w packed [N/4, 4, K] int8, w's sums [N] s32, "
                                     "w_scale [N] f32 and a one-element s32 live-row count");
}

// y [m, N] = the first m rows of x quantized per row, times the weight, rescaled (m >= 1).
void w8a8_product(ffi::ThreadPool& pool, const W8A8Operands& p, int64_t m, float* y) {
  std::vector<int8_t> x_q(m * p.k);
  std::vector<float> row_scale(m);
  for (int64_t r = 0; r < m; ++r) row_scale[r] = jaxinfer::quantize_int8(p.x + r * p.k, p.k, x_q.data() + r * p.k);
  std::vector<int32_t> acc(m * p.n);
  dot(pool, x_q.data(), p.w, p.w_sums, acc.data(), m, p.k, p.n);
  for (int64_t r = 0; r < m; ++r)  // vectorized by the compiler
    for (int64_t c = 0; c < p.n; ++c) y[r * p.n + c] = static_cast<float>(acc[r * p.n + c]) * row_scale[r] * p.w_scale[c];
}

ffi::Error W8A8Dot(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                   ffi::Buffer<ffi::S32> w_sums, ffi::Buffer<ffi::F32> w_scale, ffi::Buffer<ffi::S32> live,
                   ffi::ResultBuffer<ffi::F32> y) {
  W8A8Operands p;
  if (!w8a8_operands(x, w, w_sums, w_scale, live, &p)) return w8a8_operand_error("jaxinfer_w8a8_dot");
  const int64_t m = jaxinfer::live_rows(live, p.rows);
  jaxinfer::zero_rows_from(y->typed_data(), m, p.rows, p.n);
  if (m > 0) w8a8_product(pool, p, m, y->typed_data());
  return ffi::Error::Success();
}

// (residual + x w, its RMSNorm times norm_weight), float32: an output projection, the residual add
// and the next norm in one call (cpu_row_passes.h).
ffi::Error W8A8AddNorm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                       ffi::Buffer<ffi::S32> w_sums, ffi::Buffer<ffi::F32> w_scale, ffi::Buffer<ffi::F32> residual,
                       ffi::AnyBuffer norm_weight,
                       ffi::Buffer<ffi::S32> live, float eps, ffi::ResultBuffer<ffi::F32> residual_out,
                       ffi::ResultBuffer<ffi::F32> normed) {
  W8A8Operands p;
  if (!w8a8_operands(x, w, w_sums, w_scale, live, &p)) return w8a8_operand_error("jaxinfer_w8a8_add_norm");
  const int64_t m = jaxinfer::live_rows(live, p.rows);
  return jaxinfer::add_norm_call("jaxinfer_w8a8_add_norm", pool, p.rows, p.n, m, residual, norm_weight, eps,
                                 residual_out->typed_data(), normed->typed_data(),
                                 [&](float* y) { w8a8_product(pool, p, m, y); });
}

// (q, k, v) of x w_qkv, float32, q and k rotated (RoPE): the attention's inputs in one call
// (cpu_row_passes.h).
ffi::Error W8A8QkvRope(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                       ffi::Buffer<ffi::S32> w_sums, ffi::Buffer<ffi::F32> w_scale, ffi::Buffer<ffi::F32> cos,
                       ffi::Buffer<ffi::F32> sin,
                       ffi::Buffer<ffi::S32> live, int64_t kv_heads, int64_t q_per_kv, ffi::ResultBuffer<ffi::F32> q,
                       ffi::ResultBuffer<ffi::F32> k, ffi::ResultBuffer<ffi::F32> v) {
  W8A8Operands p;
  if (!w8a8_operands(x, w, w_sums, w_scale, live, &p)) return w8a8_operand_error("jaxinfer_w8a8_qkv_rope");
  const int64_t m = jaxinfer::live_rows(live, p.rows);
  return jaxinfer::qkv_rope_call("jaxinfer_w8a8_qkv_rope", pool, p.rows, p.n, m, cos, sin, kv_heads, q_per_kv,
                                 q->typed_data(), k->typed_data(), v->typed_data(),
                                 [&](float* y) { w8a8_product(pool, p, m, y); });
}

// silu(gate) * up of x w_gate_up, float32: the MLP's first half in one call (cpu_row_passes.h).
ffi::Error W8A8Swiglu(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                      ffi::Buffer<ffi::S32> w_sums, ffi::Buffer<ffi::F32> w_scale, ffi::Buffer<ffi::S32> live,
                      ffi::ResultBuffer<ffi::F32> act) {
  W8A8Operands p;
  if (!w8a8_operands(x, w, w_sums, w_scale, live, &p)) return w8a8_operand_error("jaxinfer_w8a8_swiglu");
  const int64_t m = jaxinfer::live_rows(live, p.rows);
  return jaxinfer::swiglu_call("jaxinfer_w8a8_swiglu", pool, p.rows, p.n, m, act->typed_data(),
                               [&](float* y) { w8a8_product(pool, p, m, y); });
}

// A W8A8 call's first operands: x, then the packed weight, its sums and its scales.
auto bind_w8a8_weight() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S8>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::F32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_int8_dot, Int8Dot,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_w8a8_dot, W8A8Dot,
                              bind_w8a8_weight()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_w8a8_add_norm, W8A8AddNorm,
                              jaxinfer::bind_add_norm<ffi::DataType::F32>(bind_w8a8_weight()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_w8a8_qkv_rope, W8A8QkvRope,
                              jaxinfer::bind_qkv_rope<ffi::DataType::F32>(bind_w8a8_weight()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_w8a8_swiglu, W8A8Swiglu,
                              jaxinfer::bind_swiglu<ffi::DataType::F32>(bind_w8a8_weight()));
