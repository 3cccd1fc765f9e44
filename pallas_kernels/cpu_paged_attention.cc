// Paged attention of a ragged batch on x86 CPUs, as an XLA FFI custom call (built, registered and
// called by cpu_paged_attention.py).
//
//   jaxinfer_paged_attention(
//       q [T, H, D] f32 (already multiplied by sm_scale),
//       k, v [num_blocks, block_size, KVH, D] f32 | bf16 | s8 | f8e4m3fn,
//       k_scale, v_scale [num_blocks, block_size, KVH] f32 for s8/f8e4m3fn storage, [0] otherwise,
//       block_tables [S, B] s32, seq_lens [S] s32, query_start_loc [S + 1] s32;
//       attribute soft_cap f32 (0: none))
//   -> out [T, H, D] f32: token i of sequence s's chunk of q_len tokens sits at position
//      seq_len - q_len + i and attends to positions 0..that one of its blocks (causal); rows of
//      tokens outside every chunk (batch padding) are zero.
//
// Query head h reads kv head h / (H / KVH). Two loops, one per kind of chunk, share the work items:
//
// Decodes (1-token chunks) make one pass over the sequence's context with an online softmax, in
// chunks of kDecodeChunk positions from two runs of the context read side by side. For each kv head,
// the query heads of its GQA group take the chunk's K rows together (up to 3 or 4 heads a pass, as
// registers allow): each K value is loaded and converted once per pass, bfloat16 without shuffles
// (odd and even features apart, q reordered to match), and the logits of 4 positions x the pass's
// heads are summed in registers and across lanes at once. A head's running sums are rescaled when
// the chunk raises its peak, and the V rows then add the chunk's exponentials into the pass's sums,
// again all its heads at once. The next chunk's rows are prefetched one kv head at a time. Each K
// and V element is read once, against the XLA path's gathers of whole chunks, loop bookkeeping and
// partial-softmax merges, which cost ~100 us per layer even at short contexts. Against the loop
// before (rows converted to float into a scratch buffer, then each query head over them on its own,
// 8 positions' horizontal sums at a time), SmolLM2's bfloat16 decodes on the Xeon VM at 400
// positions took 1.30-1.50 / 7.9 / 50.9-56.2 ms for 30 layers at batch 1 / 8 / 64 against
// 1.71-1.74 / 12.0-14.5 / 66.3-70.7 (benchmarks/bench_paged_attention.py --batches 1,8,64
// --contexts 400 --kv-dtype bfloat16 --layers 30, two alternating runs, 2026-12-05), and in a batch-64
// engine step at 400 positions 57.8-61.4 against 81.1-84.3 ms (benchmarks/profile_step.py engines/bf16
// --batch 64 --context 400). The AVX-512 build runs the loop in 16-float registers where D is a
// multiple of 32, no faster than 8-float ones at D = 64 (the loop is not bound by its FMAs).
// Taking a bfloat16 pool's logits on AMX tiles instead (each block's 16-position groups read in
// place as A tiles, q as bfloat16 high and low parts) was slower: 77-83 against 62-69 ms at batch
// 64 and 400 positions for 30 layers, about the same at batch 8 (two alternating runs, Xeon VM,
// 2026-12-05); the loop then mostly waits on its prefetches, reading K/V at 7-11 GB/s where two
// cores stream 23.5.
// Decodes are the work items: from kMinPositionsToSplit positions in all, chunks of them are shared
// with other threads (cpu_thread_pool.h; these measurements predate its own team of threads). In a
// microbenchmark (benchmarks/bench_paged_attention.py, warm cache) sharing did not pay below 2048
// positions, since waking a pool thread costs about as much as a short call; inside a decode step,
// where the K/V rows come from memory and the pool wakes for the next matmul anyway, it does from a
// few hundred: a w4a8 SmolLM2 engine at 128-token prompts on the Xeon VM went from 22.6 to 17.2 ms
// a step at batch 8 and from 11.3-11.8 to 8.0-9.7 at batch 2 with the threshold at 2048 -> 128-512.
// A lone decode (batch 1) is split into kLoneDecodeParts items by positions, each with its own
// softmax peak and sum, merged afterwards: each thread reads half the rows (split by query heads
// before, both threads read the middle kv head).
//
// Prefill chunks (2+ tokens) are cut into tiles of kTileTokens tokens, and every (tile, kv head) is
// one work item: its R = kTileTokens x group query rows (token-major, zero past the chunk's end) are
// transposed once into Q^T [D, R], and the item walks the context up to its last token, converting
// K/V rows kChunkPositions at a time into float. Both products are the same register-blocked outer
// product (`outer_block`): logits S [positions, R] += K[p, d] * Q^T[d, :], then a causal softmax down
// each column of S (vectorized across rows; its normalization deferred to the end), then O^T [D, R] +=
// V[p, d] * S[p, :]. Every K/V row an item reads is converted once and used by all R rows, which is
// what XLA's version (gathers of 128-position chunks, an online softmax whose state it copies every
// step) does not manage at these sizes: SmolLM2's 128-token prefill spent 32 ms of 110 in attention.
// Built with AVX-512 (cpu_paged_attention.py picks the build for the CPU), outer_block takes 8 rows
// of A against one 16-lane register: on the Xeon VM a first chunk of 128 / 256 / 512 tokens (SmolLM2's
// heads, bf16 pool) took 0.34 / 0.90 / 2.38 ms against the AVX2 build's 0.48 / 1.15 / 3.28
// (benchmarks/bench_paged_attention.py, one run each, 2026-12-05); at 1024 both took about 13 ms.
//
// On CPUs with AMX-BF16, prefill tiles over a bfloat16 pool (block_size % 16 == 0, D % 32 == 0) take
// both products on AMX tiles instead (`amx_logits`, `amx_values`), the softmax between them as above:
// S^T [16 positions, 16 rows] tiles from K rows read in place from the pool (16 positions of a block
// are rows at a fixed stride) times Q^T held as bfloat16 (f, f + 1) pairs; then P, the softmax's
// weights transposed to [R, positions] and rounded to bfloat16, times V as (position, position + 1)
// pairs, into O [R, D]. Rounding q and P to bfloat16 costs float32's precision (the results agree
// with float32 attention to about 2^-8 of their scale; K and V are bfloat16 already, and q of a
// bfloat16 model too). On the Xeon VM a first chunk of 128 / 256 / 512 / 1024 / 2048 tokens took
// 0.35-0.41 / 0.71-0.86 / 2.0-2.2 / 6.4-6.7 / 21.8-24.5 ms against the FMA loop's 0.49-0.50 /
// 1.17-1.51 / 3.4-3.6 / 11.1-12.1 / 33.2-38.5 (two alternating pairs, 2026-12-05): what is left is
// mostly the softmax's passes and the transposes, not the products.
//
// On CPUs with AVX512-BF16 but no AMX (AMD's Zen 4), prefill tiles over a bfloat16 pool (block_size
// % 8 == 0) take both products with vdpbf16ps instead (`dp_logits`, `dp_values`): outer_block's
// multiply-add becomes one vdpbf16ps per (k, k + 1) pair, twice an FMA's work. Logits: 8 positions'
// K rows read in place from the pool, a (feature, feature + 1) pair of each broadcast, against Q^T
// held as bfloat16 pairs [D / 2, R, 2]. Values: the softmax's weights rounded to bfloat16 pairs of
// positions [positions / 2, R, 2], against V rows of two positions interleaved [pairs, D, 2] a
// chunk at a time. Rounding q and P as on AMX (the same tolerance). On the Zen 4 VM a first chunk of
// 256 / 512 / 1024 / 2048 tokens took 0.59 / 1.77-2.09 / 5.77-5.78 / 20.4-20.5 ms against the FMA
// loop's 0.68-0.69 / 2.21-2.27 / 8.8-9.2 / 30.4-32.8 (benchmarks/bench_paged_attention.py
// --prefill-lens 256,512,1024,2048 --kv-dtype bfloat16, two alternating pairs, 2026-12-07), and a
// bfloat16 engine's 256-token prefill step spent 22.0 / 26.1 ms in attention against 31.6 / 41.8
// (benchmarks/profile_step.py engines/bf16 --prompt-len 512, two alternating pairs). At 1024 tokens
// the products took about 70% of the kernel's perf samples and the softmax's passes about 26%.
// The softmax's passes (`softmax_columns`) then ran position by position across 8-lane registers,
// each register's running peak and sum stored back to memory at every position. They now walk a
// strip of rows down all the positions with its peak and sum in one register, 16 lanes wide in the
// AVX-512 build: on the Zen 4 VM a first chunk of 512 / 1024 / 2048 tokens took 1.84-1.93 /
// 5.7-9.0 / 20.1-22.4 ms against 2.41-2.60 / 7.0-9.1 / 25.8-28.5 (the same command, three
// alternating pairs in a slow phase of the VM, 2026-12-07). Strips of 2-4 registers side by side,
// walking the positions in order, were no faster.
//
// Only positions below seq_len are read, so whatever unused slots hold (NaN included) never
// reaches the result; a block id outside the pool, a context longer than the block table or a chunk
// longer than its context is refused with an error rather than read.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_amx.h"
#include "cpu_exp.h"
#include "cpu_thread_pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 8;  // floats per AVX2 register; the Python side requires D % (2 * kLanes) == 0
// A call whose decodes read fewer positions than this stays on the calling thread; more are split
// into about kItemsWhenSplit items shared with other threads (see the top of this file). A
// prefill tile counts as its tokens x its context positions. Finer items balance the threads
// better: in a batch-64 engine step at 400 positions on the Xeon VM, 32 items took attention from
// 53.8 / 57.7 to 45.9 / 51.0 ms a step against 8 (two alternating pairs, 2026-12-05; 64 was about
// the same as 32).
constexpr int64_t kMinPositionsToSplit = 256;
constexpr int64_t kItemsWhenSplit = 32;
constexpr int64_t kLoneDecodeParts = 2;
// Decodes take this many positions at a time, from kDecodeStreams runs of the context side by side.
// With the loop before (see the top of this file), on the Zen 2 VM (30 layers' K/V, 1000 positions,
// batch 8) chunks of 16 were 25% slower, and 4 or 8 streams 5-35% slower than 2; with this one, on
// the Xeon VM, chunks of 64 and 4 streams were within 7% of these.
constexpr int64_t kDecodeChunk = 32;
constexpr int64_t kDecodeStreams = 2;
// Prefill items: query tokens per tile (R = kTileTokens x group rows, whole pairs of registers), and
// K/V positions converted to float at a time (64 positions x D floats stay in L1).
constexpr int64_t kTileTokens = 16;
constexpr int64_t kChunkPositions = 64;
// outer_block's shape: kBlockRows of A (positions or features) x kBlockLanes rows (two AVX2
// registers, or one AVX-512 register beside twice the rows of A).
#if defined(__AVX512F__)
constexpr int64_t kBlockRows = 8;
#else
constexpr int64_t kBlockRows = 4;
#endif
constexpr int64_t kBlockLanes = 2 * kLanes;

// n rounded up to whole outer_block row blocks.
constexpr int64_t whole_blocks(int64_t n) { return (n + kBlockRows - 1) / kBlockRows * kBlockRows; }

float bf16_to_float(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}

// float8_e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities, S.1111.111 is NaN.
struct Fp8Table {
  float value[256];
  Fp8Table() {
    for (int bits = 0; bits < 256; ++bits) {
      const int exponent = (bits >> 3) & 0xF, mantissa = bits & 0x7;
      float magnitude = exponent == 0 ? std::ldexp(mantissa / 8.0f, -6)
                                      : std::ldexp(1.0f + mantissa / 8.0f, exponent - 7);
      if (exponent == 0xF && mantissa == 0x7) magnitude = NAN;
      value[bits] = (bits & 0x80) ? -magnitude : magnitude;
    }
  }
};
const Fp8Table kFp8;

// Storage element -> float (before the row's scale).
template <typename T>
float to_float(T x);
template <>
float to_float<float>(float x) { return x; }
template <>
float to_float<uint16_t>(uint16_t x) { return bf16_to_float(x); }
template <>
float to_float<int8_t>(int8_t x) { return static_cast<float>(x); }
template <>
float to_float<uint8_t>(uint8_t x) { return kFp8.value[x]; }

// Row `index` of a pool ([rows, D] storage with optional per-row scales) as float: f32 rows are
// returned in place, others converted into `scratch`.
template <typename T>
const float* pool_row(const T* pool, const float* scales, int64_t index, int64_t d, float* scratch) {
  const T* row = pool + index * d;
  if constexpr (std::is_same_v<T, float>) {
    return row;
  } else if constexpr (std::is_same_v<T, uint16_t>) {
    // bfloat16 (never scaled): its bits are a float's top half.
    for (int64_t i = 0; i < d; i += kLanes) {
      const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + i)));
      _mm256_storeu_ps(scratch + i, _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)));
    }
    return scratch;
  } else {
    const float scale = scales ? scales[index] : 1.0f;
    for (int64_t i = 0; i < d; ++i) scratch[i] = to_float(row[i]) * scale;
    return scratch;
  }
}

void axpy(float a, const float* x, float* y, int64_t d) {
  const __m256 scale = _mm256_set1_ps(a);
  for (int64_t i = 0; i < d; i += kLanes)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(scale, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
}

using jaxinfer::exp_nonpositive;

// row[i] = exp(row[i] - peak) in place (peak: the row's largest value); returns their sum.
float exp_in_place(float* row, int64_t len, float peak) {
  const __m256 peaks = _mm256_set1_ps(peak);
  __m256 sums = _mm256_setzero_ps();
  int64_t pos = 0;
  for (; pos + kLanes <= len; pos += kLanes) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(row + pos), peaks));
    _mm256_storeu_ps(row + pos, e);
    sums = _mm256_add_ps(sums, e);
  }
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(sums), _mm256_extractf128_ps(sums, 1));
  half = _mm_add_ps(half, _mm_movehl_ps(half, half));
  float total = _mm_cvtss_f32(_mm_add_ss(half, _mm_movehdup_ps(half)));
  for (; pos < len; ++pos) total += row[pos] = std::exp(row[pos] - peak);
  return total;
}

struct Problem {
  const float* q;  // [T, H, D]
  const float *k_scale, *v_scale;  // [pool rows] or null
  const int32_t *block_tables, *seq_lens, *query_start_loc;
  float* out;  // [T, H, D]
  int64_t num_tokens, num_seqs, table_width, num_blocks, block_size, num_heads, num_kv_heads, head_dim;
  float soft_cap;
};

struct Decode {
  int64_t seq, token, len;
};

// kTileTokens (or fewer, at a chunk's end) consecutive tokens of one sequence's chunk: tokens
// start..start+count-1 at positions first_pos..first_pos+count-1, attending to the first_pos + count
// positions up to the last of them.
struct PrefillTile {
  int64_t seq, start, count, first_pos;
  int64_t kv_len() const { return first_pos + count; }
};

struct Work {
  std::vector<Decode> decodes;
  std::vector<PrefillTile> tiles;  // longest context first, so that the pool's threads finish together
};

// The batch's decodes and prefill tiles, after checking that each chunk lies inside q and its context,
// and that each context fits its block table and reads only blocks inside the pool.
ffi::ErrorOr<Work> work_of(const Problem& p) {
  Work work;
  for (int64_t s = 0; s < p.num_seqs; ++s) {
    const int64_t start = p.query_start_loc[s], q_len = p.query_start_loc[s + 1] - start, len = p.seq_lens[s];
    if (q_len == 0) continue;
    if (start < 0 || q_len < 0 || start + q_len > p.num_tokens || q_len > len)
      return ffi::Error::InvalidArgument("jaxinfer_paged_attention: a chunk lies outside q or is longer than its "
                                         "context (query_start_loc must be nondecreasing up to T, q_len <= seq_len)");
    if (len > p.table_width * p.block_size)
      return ffi::Error::InvalidArgument("jaxinfer_paged_attention: a context is longer than its block table");
    const int32_t* table = p.block_tables + s * p.table_width;
    for (int64_t i = 0; i < (len + p.block_size - 1) / p.block_size; ++i)
      if (table[i] < 0 || table[i] >= p.num_blocks)
        return ffi::Error::InvalidArgument("jaxinfer_paged_attention: a block id lies outside the pool");
    if (q_len == 1) {
      work.decodes.push_back({s, start, len});
      continue;
    }
    for (int64_t i = 0; i < q_len; i += kTileTokens)
      work.tiles.push_back({s, start + i, std::min(kTileTokens, q_len - i), len - q_len + i});
  }
  std::stable_sort(work.tiles.begin(), work.tiles.end(),
                   [](const PrefillTile& a, const PrefillTile& b) { return a.kv_len() > b.kv_len(); });
  return work;
}

// The pool slot of position `pos` of a sequence with this block table; its kv heads' rows are
// slot * KVH .. slot * KVH + KVH - 1.
inline int64_t pool_slot(const Problem& p, const int32_t* table, int64_t pos) {
  return table[pos / p.block_size] * p.block_size + pos % p.block_size;
}

// Asks for the rows (rows[i] + h) * D of a pool, i < n: one kv head's rows of the next chunk of
// a decode. A context's blocks lie anywhere in the pool, so the hardware prefetcher cannot run
// ahead into the next one; the decode loop asks for a few rows between each group of logits, which
// spreads the requests over the current chunk's arithmetic. Without it, 64 decodes of 400 positions
// over 30 layers' pools took 1.37x as long on one core of the Xeon VM (a standalone harness of this
// loop, 2026-12-05). Asked for all at once per kv head (128 lines in one burst), the requests
// stalled the loop until the line fill buffers drained, so that the arithmetic and the reads added
// up rather than overlapped; spread over the groups of logits they took 32 decodes of 300
// positions over 30 layers' pools from 122-125 to 104-109 ns a position on one core (a standalone
// harness; the same rows from L2 take 54), and 64 decodes over 30 layers from 46.7-54.1 to
// 42.8-43.5 ms (benchmarks/bench_paged_attention.py --batches 64 --contexts 300 --kv-dtype bfloat16
// --layers 30, two alternating pairs), 40.7 / 45.7 to 38.7 / 41.0 ms of a batch-64 engine step
// (benchmarks/profile_step.py engines/bf16 --batch 64 --context 300, ABBA), Xeon VM, 2026-12-06.
// The rows go to L2 (T1), not L1: a prefetch into L1 holds one of the core's few L1 miss buffers
// until its line comes, which capped each core near 5-6 GB/s of K/V from memory on the Zen 4 VM.
// There, with T1, 30 layers' decodes read 19-20 against 10-11.5 GB/s at batch 8 / 64 (512 / 300
// positions) and 15-22 against 10-12 at batch 1 over 2048 (an ad hoc harness, two alternating
// rounds; the same from cache), a batch-64 engine step's attention took 24.3 / 25.0 against 45.1 /
// 45.3 ms (the step 104 / 111 against 136 / 127; two alternating pairs), and the offline benchmark
// ran at 318.0 against 285.6 output tokens/s (2026-12-07; T2 measured about as T1). Not measured
// on the Xeon or the Zen 2/3 VMs.
template <typename T>
void prefetch_rows(const T* pool, const int64_t* rows, int64_t n, int64_t h, int64_t d) {
  const int64_t bytes = d * static_cast<int64_t>(sizeof(T));
  for (int64_t i = 0; i < n; ++i) {
    const char* row = reinterpret_cast<const char*>(pool + (rows[i] + h) * d);
    for (int64_t line = 0; line < bytes; line += 64) _mm_prefetch(row + line, _MM_HINT_T1);
  }
}

// The decode loop is written once over a register width: Ymm (8 floats, every build) and, in the
// AVX-512 build, Zmm (16 floats, where D is a multiple of 32). Each gives its loads, its
// arithmetic, and how many query heads of a GQA group share one pass over the K/V rows (their
// accumulators fill the registers: 4 K rows x kHeads heads of logit sums, and 2 parities of
// positions x kHeads heads x 2 registers of value sums).
//
// load_features(row, a, b) takes a group of 2 x kWidth consecutive values of a K/V row (before its
// scale) into two registers, in the order `arranged_feature` gives: bfloat16 values split into odd
// and even features (a mask and a shift of one load, no shuffles), the other storage types into
// their two halves. A decode takes q in that order and puts its sums back in feature order at the end.
struct Ymm {
  using Floats = __m256;
  static constexpr int kWidth = 8, kHeads = 3;
  static Floats zero() { return _mm256_setzero_ps(); }
  static Floats load(const float* x) { return _mm256_loadu_ps(x); }
  static void store(float* x, Floats v) { _mm256_storeu_ps(x, v); }
  static Floats broadcast(const float* x) { return _mm256_broadcast_ss(x); }
  static Floats fmadd(Floats a, Floats b, Floats c) { return _mm256_fmadd_ps(a, b, c); }
  static Floats add(Floats a, Floats b) { return _mm256_add_ps(a, b); }
  static Floats set1(float x) { return _mm256_set1_ps(x); }
  static Floats max(Floats a, Floats b) { return _mm256_max_ps(a, b); }
  static Floats exp_below(Floats x, Floats peak) { return exp_nonpositive(_mm256_sub_ps(x, peak)); }
  // x in the lanes whose last visible position is pos or later, otherwise elsewhere.
  static Floats where_visible(float pos, Floats last, Floats x, Floats otherwise) {
    return _mm256_blendv_ps(otherwise, x, _mm256_cmp_ps(_mm256_set1_ps(pos), last, _CMP_LE_OQ));
  }
  static __m256 halves_added(Floats v) { return v; }
  static void load_features(const float* row, Floats& a, Floats& b) {
    a = load(row);
    b = load(row + kWidth);
  }
  static void load_features(const uint16_t* row, Floats& a, Floats& b) {
    const __m256i pairs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
    a = _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u))));
    b = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
  }
  static void load_features(const int8_t* row, Floats& a, Floats& b) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row));
    a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
    b = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(bytes, 8)));
  }
  static void load_features(const uint8_t* row, Floats& a, Floats& b) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row));
    a = _mm256_i32gather_ps(kFp8.value, _mm256_cvtepu8_epi32(bytes), 4);
    b = _mm256_i32gather_ps(kFp8.value, _mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8)), 4);
  }
};

#if defined(__AVX512F__)
struct Zmm {
  using Floats = __m512;
  static constexpr int kWidth = 16, kHeads = 4;
  static Floats zero() { return _mm512_setzero_ps(); }
  static Floats load(const float* x) { return _mm512_loadu_ps(x); }
  static void store(float* x, Floats v) { _mm512_storeu_ps(x, v); }
  static Floats broadcast(const float* x) { return _mm512_set1_ps(*x); }
  static Floats fmadd(Floats a, Floats b, Floats c) { return _mm512_fmadd_ps(a, b, c); }
  static Floats add(Floats a, Floats b) { return _mm512_add_ps(a, b); }
  static Floats set1(float x) { return _mm512_set1_ps(x); }
  static Floats max(Floats a, Floats b) { return _mm512_max_ps(a, b); }
  static Floats exp_below(Floats x, Floats peak) { return exp_nonpositive(_mm512_sub_ps(x, peak)); }
  static Floats where_visible(float pos, Floats last, Floats x, Floats otherwise) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(_mm512_set1_ps(pos), last, _CMP_LE_OQ), otherwise, x);
  }
  static __m256 halves_added(Floats v) {
    return _mm256_add_ps(_mm512_castps512_ps256(v),
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  }
  static void load_features(const float* row, Floats& a, Floats& b) {
    a = load(row);
    b = load(row + kWidth);
  }
  static void load_features(const uint16_t* row, Floats& a, Floats& b) {
    const __m512i pairs = _mm512_loadu_si512(row);
    a = _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u))));
    b = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
  }
  static void load_features(const int8_t* row, Floats& a, Floats& b) {
    a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row))));
    b = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + kWidth))));
  }
  static void load_features(const uint8_t* row, Floats& a, Floats& b) {
    const __m128i low = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row));
    const __m128i high = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + kWidth));
    a = _mm512_i32gather_ps(_mm512_cvtepu8_epi32(low), kFp8.value, 4);
    b = _mm512_i32gather_ps(_mm512_cvtepu8_epi32(high), kFp8.value, 4);
  }
};
using WidestFloats = Zmm;
#else
using WidestFloats = Ymm;
#endif
static_assert(kTileTokens % WidestFloats::kWidth == 0, "a prefill tile's rows fill whole registers");

// The feature that slot t (< 2 x kWidth) of a group holds in `load_features`' order.
template <class L, typename T>
constexpr int64_t arranged_feature(int64_t t) {
  if constexpr (std::is_same_v<T, uint16_t>) return t < L::kWidth ? 2 * t + 1 : 2 * (t - L::kWidth);
  return t;
}

// The sums of each of four vectors' lanes (lane i: v[i]'s sum).
template <class L>
inline __m128 lane_sums(const typename L::Floats v[4]) {
  const __m256 v0 = L::halves_added(v[0]), v1 = L::halves_added(v[1]);
  const __m256 v2 = L::halves_added(v[2]), v3 = L::halves_added(v[3]);
  // After two rounds lanes 0-3 hold v[0..3]'s first halves' sums, lanes 4-7 their second halves'.
  const __m256 sums = _mm256_hadd_ps(_mm256_hadd_ps(v0, v1), _mm256_hadd_ps(v2, v3));
  return _mm_add_ps(_mm256_castps256_ps128(sums), _mm256_extractf128_ps(sums, 1));
}

// logits[g * kDecodeChunk + i] = q_g . rows[i] for kHeads heads (q [kHeads, d] in `load_features`'
// order) and 4 rows (their storage values, unscaled).
template <class L, int kHeads, typename T>
inline void group_logits(const float* q, const T* const rows[4], int64_t d, float* logits) {
  typename L::Floats acc[kHeads][4];
  for (int g = 0; g < kHeads; ++g)
    for (int i = 0; i < 4; ++i) acc[g][i] = L::zero();
  for (int64_t f = 0; f < d; f += 2 * L::kWidth)
    for (int i = 0; i < 4; ++i) {
      typename L::Floats a, b;
      L::load_features(rows[i] + f, a, b);
      for (int g = 0; g < kHeads; ++g) {
        acc[g][i] = L::fmadd(L::load(q + g * d + f), a, acc[g][i]);
        acc[g][i] = L::fmadd(L::load(q + g * d + f + L::kWidth), b, acc[g][i]);
      }
    }
  for (int g = 0; g < kHeads; ++g) _mm_storeu_ps(logits + g * kDecodeChunk, lane_sums<L>(acc[g]));
}

// out[g * d + f ..] (one group of features from f, `load_features`' order) += the sum over i < n of
// weights[g * kDecodeChunk + i] * rows[i][f ..], for kHeads heads. Even and odd positions add into
// separate registers: one chain of dependent FMAs per register would wait on the FMA's latency.
template <class L, int kHeads, typename T>
inline void group_values(const float* weights, const T* const* rows, int64_t n, int64_t f, int64_t d, float* out) {
  using Floats = typename L::Floats;
  Floats even[kHeads][2], odd[kHeads][2];
  for (int g = 0; g < kHeads; ++g) {
    even[g][0] = L::load(out + g * d + f);
    even[g][1] = L::load(out + g * d + f + L::kWidth);
    odd[g][0] = odd[g][1] = L::zero();
  }
  auto add_row = [&](Floats(&acc)[kHeads][2], int64_t i) {
    Floats a, b;
    L::load_features(rows[i] + f, a, b);
    for (int g = 0; g < kHeads; ++g) {
      const Floats weight = L::broadcast(weights + g * kDecodeChunk + i);
      acc[g][0] = L::fmadd(weight, a, acc[g][0]);
      acc[g][1] = L::fmadd(weight, b, acc[g][1]);
    }
  };
  int64_t i = 0;
  for (; i + 1 < n; i += 2) {
    add_row(even, i);
    add_row(odd, i + 1);
  }
  if (i < n) add_row(even, i);
  for (int g = 0; g < kHeads; ++g) {
    L::store(out + g * d + f, L::add(even[g][0], odd[g][0]));
    L::store(out + g * d + f + L::kWidth, L::add(even[g][1], odd[g][1]));
  }
}

// One pass of `heads` (<= L::kHeads) query heads of a GQA group (q, out [heads, d], `load_features`'
// order): their logits [heads, kDecodeChunk] for a group of 4 positions from their K rows (at a
// chunk's end, the extra rows repeat a real one), or their value sums over the n positions of a
// chunk from the V rows and the softmax's weights [heads, kDecodeChunk].
template <class L, typename T, int kHeads = L::kHeads>
void pass_logits(int64_t heads, const float* q, const T* const* k_rows, int64_t d, float* logits) {
  if (heads < kHeads) {
    if constexpr (kHeads > 1) pass_logits<L, T, kHeads - 1>(heads, q, k_rows, d, logits);
    return;
  }
  group_logits<L, kHeads>(q, k_rows, d, logits);
}
template <class L, typename T, int kHeads = L::kHeads>
void pass_values(int64_t heads, const float* weights, const T* const* v_rows, int64_t n, int64_t d, float* out) {
  if (heads < kHeads) {
    if constexpr (kHeads > 1) pass_values<L, T, kHeads - 1>(heads, weights, v_rows, n, d, out);
    return;
  }
  for (int64_t f = 0; f < d; f += 2 * L::kWidth) group_values<L, kHeads>(weights, v_rows, n, f, d, out);
}

// The largest of x[0..n), n >= 1.
float max_of(const float* x, int64_t n) {
  __m256 peaks = _mm256_set1_ps(x[0]);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) peaks = _mm256_max_ps(peaks, _mm256_loadu_ps(x + i));
  __m128 half = _mm_max_ps(_mm256_castps256_ps128(peaks), _mm256_extractf128_ps(peaks, 1));
  half = _mm_max_ps(half, _mm_movehl_ps(half, half));
  float peak = _mm_cvtss_f32(_mm_max_ss(half, _mm_movehdup_ps(half)));
  for (; i < n; ++i) peak = std::max(peak, x[i]);
  return peak;
}

struct DecodeScratch {
  std::vector<float> q, sums;  // [H, D] in `load_features`' order
};

// decode_positions (below) over registers L.
template <class L, typename T>
void decode_positions_with(const Problem& p, const T* k, const T* v, int64_t s, int64_t t, int64_t p0, int64_t p1,
                           float* out, float* peak, float* total, DecodeScratch& scratch) {
  const int64_t heads = p.num_heads, kv_heads = p.num_kv_heads, d = p.head_dim, group = heads / kv_heads;
  constexpr int64_t kGroup = 2 * L::kWidth;
  scratch.q.resize(heads * d);
  scratch.sums.assign(heads * d, 0.0f);
  float *q = scratch.q.data(), *sums = scratch.sums.data();
  const float* token_q = p.q + t * heads * d;
  for (int64_t f = 0; f < heads * d; f += kGroup)
    for (int64_t slot = 0; slot < kGroup; ++slot) q[f + slot] = token_q[f + arranged_feature<L, T>(slot)];
  const int32_t* table = p.block_tables + s * p.table_width;
  std::fill(peak, peak + heads, -INFINITY);
  std::fill(total, total + heads, 0.0f);
  float logits[L::kHeads * kDecodeChunk];
  // The pool rows of kv head 0 of this chunk's positions and of the next's (n rounded up to whole
  // groups of 4 with copies of the last).
  int64_t rows[2][kDecodeChunk + 3];
  const T *k_rows[kDecodeChunk + 3], *v_rows[kDecodeChunk];
  // The range as kDecodeStreams runs read side by side, a position of each in turn: more reads in
  // flight than one run gives, and the softmax does not mind the order.
  const int64_t run_len = (p1 - p0 + kDecodeStreams - 1) / kDecodeStreams, per_run = kDecodeChunk / kDecodeStreams;
  // Each run's next position as (block table index, offset in the block), stepped without dividing.
  int64_t run_block[kDecodeStreams], run_offset[kDecodeStreams];
  for (int64_t run = 0; run < kDecodeStreams; ++run) {
    run_block[run] = (p0 + run * run_len) / p.block_size;
    run_offset[run] = (p0 + run * run_len) % p.block_size;
  }
  auto chunk_rows = [&](int64_t step, int64_t* chunk) {
    int64_t n = 0;
    for (int64_t i = step; i < std::min(run_len, step + per_run); ++i)
      for (int64_t run = 0; run < kDecodeStreams; ++run) {
        if (p0 + run * run_len + i < p1) chunk[n++] = (table[run_block[run]] * p.block_size + run_offset[run]) * kv_heads;
        if (++run_offset[run] == p.block_size) run_offset[run] = 0, ++run_block[run];
      }
    for (int64_t i = n; i % 4; ++i) chunk[i] = chunk[n - 1];
    return n;
  };
  int64_t next_n = chunk_rows(0, rows[0]);
  for (int64_t step = 0; step < run_len; step += per_run) {
    const int64_t* now = rows[step / per_run % 2];
    int64_t* next = rows[(step / per_run + 1) % 2];
    const int64_t n = next_n;
    next_n = step + per_run < run_len ? chunk_rows(step + per_run, next) : 0;
    for (int64_t h = 0; h < kv_heads; ++h) {
      for (int64_t i = 0; i < (n + 3) / 4 * 4; ++i) k_rows[i] = k + (now[i] + h) * d;
      for (int64_t i = 0; i < n; ++i) v_rows[i] = v + (now[i] + h) * d;
      for (int64_t j0 = h * group; j0 < (h + 1) * group; j0 += L::kHeads) {
        const int64_t pass_heads = std::min<int64_t>(L::kHeads, (h + 1) * group - j0);
        // The group's first pass asks for this kv head's K and V rows of the next chunk, as many
        // positions before each group of logits as the group takes.
        for (int64_t i = 0; i < n; i += 4) {
          if (j0 == h * group && i < next_n) {
            prefetch_rows(k, next + i, std::min<int64_t>(4, next_n - i), h, d);
            prefetch_rows(v, next + i, std::min<int64_t>(4, next_n - i), h, d);
          }
          pass_logits<L>(pass_heads, q + j0 * d, k_rows + i, d, logits + i);
        }
        for (int64_t g = 0; g < pass_heads; ++g) {
          float* head_logits = logits + g * kDecodeChunk;
          const int64_t j = j0 + g;
          if (p.k_scale)
            for (int64_t i = 0; i < n; ++i) head_logits[i] *= p.k_scale[now[i] + h];
          if (p.soft_cap > 0)
            for (int64_t i = 0; i < n; ++i) head_logits[i] = p.soft_cap * std::tanh(head_logits[i] / p.soft_cap);
          const float chunk_peak = max_of(head_logits, n);
          if (chunk_peak > peak[j]) {
            const float rescale = std::exp(peak[j] - chunk_peak);  // 0 at the first chunk
            total[j] *= rescale;
            for (int64_t f = 0; f < d; ++f) sums[j * d + f] *= rescale;
            peak[j] = chunk_peak;
          }
          total[j] += exp_in_place(head_logits, n, peak[j]);
          if (p.v_scale)
            for (int64_t i = 0; i < n; ++i) head_logits[i] *= p.v_scale[now[i] + h];
        }
        pass_values<L>(pass_heads, logits, v_rows, n, d, sums + j0 * d);
      }
    }
  }
  for (int64_t f = 0; f < heads * d; f += kGroup)
    for (int64_t slot = 0; slot < kGroup; ++slot) out[f + arranged_feature<L, T>(slot)] = sums[f + slot];
}

// Positions [p0, p1) of the decode of token t of sequence s, every query head: out[j]
// [D] (zeros on entry) = the sum over those positions of exp(logit - peak[j]) * V row, total[j] =
// the sum of those exponentials, peak[j] = their largest logit (-inf and 0 for no positions). One
// pass, an online softmax, a chunk of positions at a time: for each kv head, its K rows give the
// logits of its query heads, a pass of up to L::kHeads heads at once (so that each K value is
// loaded and converted once per pass, not once per head); a head's sums are rescaled when the
// chunk raises its peak; then the V rows add the chunk's exponentials into the pass's sums, again
// all its heads at once. Callers divide by the total, or merge several ranges first.
template <typename T>
void decode_positions(const Problem& p, const T* k, const T* v, int64_t s, int64_t t, int64_t p0, int64_t p1,
                      float* out, float* peak, float* total, DecodeScratch& scratch) {
#if defined(__AVX512F__)
  if (p.head_dim % (2 * Zmm::kWidth) == 0)
    return decode_positions_with<Zmm>(p, k, v, s, t, p0, p1, out, peak, total, scratch);
#endif
  decode_positions_with<Ymm>(p, k, v, s, t, p0, p1, out, peak, total, scratch);
}

// out [H, D] = the softmax-weighted sum over `parts` position ranges of one decode, from each part's
// unnormalized sums part_out [parts, H, D], peaks and totals [parts, H] (see decode_positions).
void merge_parts(int64_t parts, int64_t heads, int64_t d, const float* part_out, const float* part_peak,
                 const float* part_total, float* out) {
  for (int64_t j = 0; j < heads; ++j) {
    float peak = -INFINITY, total = 0;
    for (int64_t i = 0; i < parts; ++i) peak = std::max(peak, part_peak[i * heads + j]);
    for (int64_t i = 0; i < parts; ++i) {
      const float weight = std::exp(part_peak[i * heads + j] - peak);
      total += weight * part_total[i * heads + j];
      axpy(weight, part_out + (i * heads + j) * d, out + j * d, d);
    }
    for (int64_t f = 0; f < d; ++f) out[j * d + f] /= total;
  }
}

// out[i * out_stride + 0..15] (+)= sum over k < n of a[i * a_i + k * a_k] * b[k * b_k + 0..15], for
// i < kBlockRows: the register-blocked outer product both prefill products are made of. Per k, the
// AVX2 build's two loads of b and four broadcasts of a feed eight FMAs; the AVX-512 build's one load
// of b and eight broadcasts feed eight FMAs of twice the width. The accumulators are named
// variables: as an array GCC stored them to the stack on every iteration (3x slower).
#if defined(__AVX512F__)
// The AVX-512 build's multiply-add per k: Fma takes float32 A and B; DpBf16 takes bfloat16 pairs (a
// (k, k + 1) pair of A broadcast, B holding one such pair per 32-bit lane, pointers and strides in
// bfloat16 elements), so that one vdpbf16ps does the work of two FMAs and n counts pairs.
struct Fma {
  using Elem = float;
  static __m512 load(const float* b) { return _mm512_loadu_ps(b); }
  static __m512 madd(const float* a, __m512 b, __m512 c) { return _mm512_fmadd_ps(_mm512_set1_ps(*a), b, c); }
};
struct DpBf16 {
  using Elem = uint16_t;
  static __m512bh load(const uint16_t* b) { return reinterpret_cast<__m512bh>(_mm512_loadu_si512(b)); }
  static __m512 madd(const uint16_t* a, __m512bh b, __m512 c) {
    int32_t pair;
    std::memcpy(&pair, a, sizeof(pair));
    return _mm512_dpbf16_ps(c, reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair)), b);
  }
};

template <bool kAccumulate, typename Product = Fma>
inline void outer_block(const typename Product::Elem* a, int64_t a_i, int64_t a_k, const typename Product::Elem* b,
                        int64_t b_k, int64_t n, float* out, int64_t out_stride) {
  static_assert(kBlockRows == 8 && kBlockLanes == 16, "outer_block is written out for 8 x 16");
  __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0;
  if (kAccumulate) {
    c0 = _mm512_loadu_ps(out), c1 = _mm512_loadu_ps(out + out_stride), c2 = _mm512_loadu_ps(out + 2 * out_stride);
    c3 = _mm512_loadu_ps(out + 3 * out_stride), c4 = _mm512_loadu_ps(out + 4 * out_stride);
    c5 = _mm512_loadu_ps(out + 5 * out_stride), c6 = _mm512_loadu_ps(out + 6 * out_stride);
    c7 = _mm512_loadu_ps(out + 7 * out_stride);
  }
  for (int64_t k = 0; k < n; ++k, a += a_k, b += b_k) {
    const auto row = Product::load(b);
    c0 = Product::madd(a, row, c0), c1 = Product::madd(a + a_i, row, c1);
    c2 = Product::madd(a + 2 * a_i, row, c2), c3 = Product::madd(a + 3 * a_i, row, c3);
    c4 = Product::madd(a + 4 * a_i, row, c4), c5 = Product::madd(a + 5 * a_i, row, c5);
    c6 = Product::madd(a + 6 * a_i, row, c6), c7 = Product::madd(a + 7 * a_i, row, c7);
  }
  _mm512_storeu_ps(out, c0), _mm512_storeu_ps(out + out_stride, c1), _mm512_storeu_ps(out + 2 * out_stride, c2);
  _mm512_storeu_ps(out + 3 * out_stride, c3), _mm512_storeu_ps(out + 4 * out_stride, c4);
  _mm512_storeu_ps(out + 5 * out_stride, c5), _mm512_storeu_ps(out + 6 * out_stride, c6);
  _mm512_storeu_ps(out + 7 * out_stride, c7);
}
#else
template <bool kAccumulate>
inline void outer_block(const float* a, int64_t a_i, int64_t a_k, const float* b, int64_t b_k, int64_t n, float* out,
                        int64_t out_stride) {
  static_assert(kBlockRows == 4 && kBlockLanes == 2 * kLanes, "outer_block is written out for 4 x 16");
  float *o0 = out, *o1 = out + out_stride, *o2 = out + 2 * out_stride, *o3 = out + 3 * out_stride;
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
  if (kAccumulate) {
    c00 = _mm256_loadu_ps(o0), c01 = _mm256_loadu_ps(o0 + kLanes), c10 = _mm256_loadu_ps(o1);
    c11 = _mm256_loadu_ps(o1 + kLanes), c20 = _mm256_loadu_ps(o2), c21 = _mm256_loadu_ps(o2 + kLanes);
    c30 = _mm256_loadu_ps(o3), c31 = _mm256_loadu_ps(o3 + kLanes);
  }
  for (int64_t k = 0; k < n; ++k, a += a_k, b += b_k) {
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + kLanes);
    const __m256 a0 = _mm256_broadcast_ss(a), a1 = _mm256_broadcast_ss(a + a_i);
    const __m256 a2 = _mm256_broadcast_ss(a + 2 * a_i), a3 = _mm256_broadcast_ss(a + 3 * a_i);
    c00 = _mm256_fmadd_ps(a0, b0, c00), c01 = _mm256_fmadd_ps(a0, b1, c01);
    c10 = _mm256_fmadd_ps(a1, b0, c10), c11 = _mm256_fmadd_ps(a1, b1, c11);
    c20 = _mm256_fmadd_ps(a2, b0, c20), c21 = _mm256_fmadd_ps(a2, b1, c21);
    c30 = _mm256_fmadd_ps(a3, b0, c30), c31 = _mm256_fmadd_ps(a3, b1, c31);
  }
  _mm256_storeu_ps(o0, c00), _mm256_storeu_ps(o0 + kLanes, c01), _mm256_storeu_ps(o1, c10);
  _mm256_storeu_ps(o1 + kLanes, c11), _mm256_storeu_ps(o2, c20), _mm256_storeu_ps(o2 + kLanes, c21);
  _mm256_storeu_ps(o3, c30), _mm256_storeu_ps(o3 + kLanes, c31);
}
#endif

// Positions [c0, c0 + n) of kv head h as float rows [n rounded up to kBlockRows, D] in `rows` (the
// rounding's rows zero).
template <typename T>
void convert_positions(const Problem& p, const T* pool, const float* scales, const int32_t* table, int64_t h,
                       int64_t c0, int64_t n, float* rows) {
  const int64_t d = p.head_dim;
  for (int64_t i = 0; i < n; ++i) {
    float* dst = rows + i * d;
    const float* src = pool_row(pool, scales, pool_slot(p, table, c0 + i) * p.num_kv_heads + h, d, dst);
    if (src != dst) std::memcpy(dst, src, d * sizeof(float));
  }
  std::fill(rows + n * d, rows + whole_blocks(n) * d, 0.0f);
}

struct PrefillScratch {
  std::vector<float> q_t, logits, kv_rows, out_t, last_visible, sum;
  std::vector<uint16_t> q_bf16, p_bf16, v_bf16;  // the bfloat16 paths' operands (AMX tiles or vdpbf16ps pairs)
};

// How a prefill tile takes its two products (see the top of this file).
enum class Products { kFma, kDpBf16, kAmx };

// ---- The FMA loop (every pool dtype and build).

// logits [whole_blocks(kv_len), rows] = K Q^T, Q^T [D, rows] float32, K rows converted to float
// kChunkPositions at a time.
template <typename T>
void fma_logits(const Problem& p, const T* k, const PrefillTile& tile, int64_t h, int64_t rows,
                PrefillScratch& scratch) {
  const int64_t d = p.head_dim, group = p.num_heads / p.num_kv_heads, kv_len = tile.kv_len();
  const int32_t* table = p.block_tables + tile.seq * p.table_width;
  scratch.q_t.assign(d * rows, 0.0f);
  for (int64_t i = 0; i < tile.count; ++i)
    for (int64_t j = 0; j < group; ++j) {
      const float* q = p.q + ((tile.start + i) * p.num_heads + h * group + j) * d;
      for (int64_t f = 0; f < d; ++f) scratch.q_t[f * rows + i * group + j] = q[f];
    }
  scratch.kv_rows.resize((kChunkPositions + kBlockRows) * d);
  float* logits = scratch.logits.data();
  for (int64_t c0 = 0; c0 < kv_len; c0 += kChunkPositions) {
    const int64_t n = std::min(kChunkPositions, kv_len - c0);
    convert_positions(p, k, p.k_scale, table, h, c0, n, scratch.kv_rows.data());
    for (int64_t pos = 0; pos < n; pos += kBlockRows)
      for (int64_t r = 0; r < rows; r += kBlockLanes)
        outer_block<false>(scratch.kv_rows.data() + pos * d, d, 1, scratch.q_t.data() + r, rows, d,
                           logits + (c0 + pos) * rows + r, rows);
  }
}

// out_t [D, rows] = (P V)^T, P the softmax's weights in logits (zero past kv_len), V rows converted
// as K's above.
template <typename T>
void fma_values(const Problem& p, const T* v, const PrefillTile& tile, int64_t h, int64_t rows,
                PrefillScratch& scratch) {
  const int64_t d = p.head_dim, kv_len = tile.kv_len();
  const int32_t* table = p.block_tables + tile.seq * p.table_width;
  scratch.kv_rows.resize((kChunkPositions + kBlockRows) * d);
  scratch.out_t.assign(d * rows, 0.0f);
  for (int64_t c0 = 0; c0 < kv_len; c0 += kChunkPositions) {
    const int64_t n = std::min(kChunkPositions, kv_len - c0);
    convert_positions(p, v, p.v_scale, table, h, c0, n, scratch.kv_rows.data());
    for (int64_t f = 0; f < d; f += kBlockRows)
      for (int64_t r = 0; r < rows; r += kBlockLanes)
        outer_block<true>(scratch.kv_rows.data() + f, 1, d, scratch.logits.data() + c0 * rows + r, rows,
                          whole_blocks(n), scratch.out_t.data() + f * rows + r, rows);
  }
}

using jaxinfer::kBf16TileElems;
using jaxinfer::kBf16TileK;

#if defined(__AVX512F__)
// ---- The bfloat16 paths: AMX, then AVX512-BF16 (bfloat16 pools; see the top of this file).
constexpr int64_t kAmxTile = 16;       // positions, rows or features per tile side

bool amx_serves(const Problem& p) {
  return p.block_size % kAmxTile == 0 && p.head_dim % kBf16TileK == 0 && __builtin_cpu_supports("amx-bf16") &&
         jaxinfer::tile_state_granted();
}

uint16_t to_bf16(float x) {  // round to nearest even (finite x)
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

// dst[c * dst_stride + i] = src[i * src_stride + c] rounded to bfloat16 (to nearest even), for an 8 x 8
// block of floats: an AVX2 transpose in three rounds of shuffles, then one rounding and pack per row.
inline void transpose_to_bf16(const float* src, int64_t src_stride, uint16_t* dst, int64_t dst_stride) {
  __m256 a[kLanes], b[kLanes];
  for (int i = 0; i < kLanes; ++i) a[i] = _mm256_loadu_ps(src + i * src_stride);
  for (int i = 0; i < kLanes; i += 2) b[i] = _mm256_unpacklo_ps(a[i], a[i + 1]), b[i + 1] = _mm256_unpackhi_ps(a[i], a[i + 1]);
  for (int i = 0; i < kLanes; i += 4)
    for (int j = 0; j < 2; ++j)
      a[i + 2 * j] = _mm256_shuffle_ps(b[i + j], b[i + j + 2], 0x44), a[i + 2 * j + 1] = _mm256_shuffle_ps(b[i + j], b[i + j + 2], 0xEE);
  for (int i = 0; i < 4; ++i) {
    b[i] = _mm256_permute2f128_ps(a[i], a[i + 4], 0x20);
    b[i + 4] = _mm256_permute2f128_ps(a[i], a[i + 4], 0x31);
  }
  for (int c = 0; c < kLanes; ++c) {
    const __m256i bits = _mm256_castps_si256(b[c]);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + c * dst_stride),
                     _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1)));
  }
}

// Every tile here is 16 rows of 64 bytes: C (tile 0) 16 x 16 float32, A (1) and B (2) 16 x 32 bfloat16.
void load_tile_config() {
  jaxinfer::TileConfig config;
  for (int t = 0; t < 3; ++t) config.rows[t] = kAmxTile, config.colsb[t] = 64;
  _tile_loadconfig(&config);
}

// logits [padded_len, rows] = K Q^T for positions below kv_len rounded up to 16 (the rest zero): per
// 16 positions (one run of rows inside a block, read in place as the A tile) and 16 rows, the sum
// over head_dim steps of 32 of K tile x Q^T tile, Q^T held as B tiles of (f, f + 1) pairs.
void amx_logits(const Problem& p, const uint16_t* k, const PrefillTile& tile, int64_t h, int64_t rows,
                int64_t padded_len, PrefillScratch& scratch) {
  const int64_t d = p.head_dim, group = p.num_heads / p.num_kv_heads, row_blocks = rows / kAmxTile;
  const int64_t kv_len = tile.kv_len(), computed = (kv_len + kAmxTile - 1) / kAmxTile * kAmxTile;
  const int32_t* table = p.block_tables + tile.seq * p.table_width;
  // B tile (s, b): element (j, r, e) = Q[row b * 16 + r][feature s * 32 + 2 j + e].
  scratch.q_bf16.assign(d / kBf16TileK * row_blocks * kBf16TileElems, 0);
  for (int64_t r = 0; r < tile.count * group; ++r) {
    const float* q = p.q + ((tile.start + r / group) * p.num_heads + h * group + r % group) * d;
    for (int64_t s = 0; s < d / kBf16TileK; ++s) {
      uint16_t* column = scratch.q_bf16.data() + (s * row_blocks + r / kAmxTile) * kBf16TileElems + r % kAmxTile * 2;
      for (int64_t f = 0; f < kBf16TileK; ++f) column[f / 2 * 32 + f % 2] = to_bf16(q[s * kBf16TileK + f]);
    }
  }
  float* logits = scratch.logits.data();
  const int64_t k_stride = p.num_kv_heads * d * static_cast<int64_t>(sizeof(uint16_t));
  for (int64_t pos0 = 0; pos0 < kv_len; pos0 += kAmxTile) {
    // The 16 rows lie in one block (block_size % 16 == 0); those past kv_len are read but masked.
    const uint16_t* keys = k + (pool_slot(p, table, pos0) * p.num_kv_heads + h) * d;
    for (int64_t b = 0; b < row_blocks; ++b) {
      _tile_zero(0);
      for (int64_t s = 0; s < d / kBf16TileK; ++s) {
        _tile_loadd(1, keys + s * kBf16TileK, k_stride);
        _tile_loadd(2, scratch.q_bf16.data() + (s * row_blocks + b) * kBf16TileElems, 64);
        _tile_dpbf16ps(0, 1, 2);
      }
      _tile_stored(0, logits + pos0 * rows + b * kAmxTile, rows * static_cast<int64_t>(sizeof(float)));
    }
  }
  std::fill(logits + computed * rows, logits + padded_len * rows, 0.0f);
}

// V rows of positions 2 * pair and 2 * pair + 1 (pair0 <= pair < pair1) as bfloat16 pairs, kPairColumns
// features at a time: store_pairs into dst(pair, feature block); positions from kv_len on give zeros,
// whatever the pool holds there.
constexpr int64_t kPairColumns = 16;
template <typename Dst>
void store_value_pairs(const Problem& p, const uint16_t* v, const PrefillTile& tile, int64_t h, int64_t pair0,
                       int64_t pair1, Dst dst) {
  const int64_t d = p.head_dim, kv_len = tile.kv_len();
  const int32_t* table = p.block_tables + tile.seq * p.table_width;
  alignas(64) static const uint16_t kZeros[kPairColumns] = {};
  for (int64_t pair = pair0; pair < pair1; ++pair) {
    const uint16_t* rows_of_pair[2];
    for (int e = 0; e < 2; ++e) {
      const int64_t pos = 2 * pair + e;
      rows_of_pair[e] = pos < kv_len ? v + (pool_slot(p, table, pos) * p.num_kv_heads + h) * d : nullptr;
    }
    for (int64_t fb = 0; fb < d / kPairColumns; ++fb) {
      const uint16_t* even = rows_of_pair[0] ? rows_of_pair[0] + fb * kPairColumns : kZeros;
      const uint16_t* odd = rows_of_pair[1] ? rows_of_pair[1] + fb * kPairColumns : kZeros;
      jaxinfer::store_pairs(even, odd, dst(pair, fb));
    }
  }
}

// o [rows, D] = P V, P the softmax's unnormalized weights in logits [padded_len, rows] (zero past
// kv_len): P as A tiles of 32 positions (transposed to [rows, padded_len] bfloat16), V as B tiles of
// (position, position + 1) pairs by 16 features.
void amx_values(const Problem& p, const uint16_t* v, const PrefillTile& tile, int64_t h, int64_t rows,
                int64_t padded_len, PrefillScratch& scratch, float* o) {
  const int64_t d = p.head_dim, chunks = padded_len / kBf16TileK;
  const float* logits = scratch.logits.data();
  scratch.p_bf16.resize(rows * padded_len);
  for (int64_t pos = 0; pos < padded_len; pos += kLanes)
    for (int64_t r = 0; r < rows; r += kLanes)
      transpose_to_bf16(logits + pos * rows + r, rows, scratch.p_bf16.data() + r * padded_len + pos, padded_len);
  // B tile (c, fb): row j holds (V[c * 32 + 2 j][fb * 16 + f], V[c * 32 + 2 j + 1][fb * 16 + f]) per f.
  static_assert(kPairColumns == kAmxTile, "a B tile's row is one store_pairs");
  scratch.v_bf16.resize(chunks * (d / kAmxTile) * kBf16TileElems);
  store_value_pairs(p, v, tile, h, 0, padded_len / 2, [&](int64_t pair, int64_t fb) {
    return scratch.v_bf16.data() + ((pair / kAmxTile * (d / kAmxTile) + fb) * kAmxTile + pair % kAmxTile) * 32;
  });
  for (int64_t b = 0; b < rows / kAmxTile; ++b)
    for (int64_t fb = 0; fb < d / kAmxTile; ++fb) {
      _tile_zero(0);
      for (int64_t c = 0; c < chunks; ++c) {
        _tile_loadd(1, scratch.p_bf16.data() + b * kAmxTile * padded_len + c * kBf16TileK,
                    padded_len * static_cast<int64_t>(sizeof(uint16_t)));
        _tile_loadd(2, scratch.v_bf16.data() + (c * (d / kAmxTile) + fb) * kBf16TileElems, 64);
        _tile_dpbf16ps(0, 1, 2);
      }
      _tile_stored(0, o + b * kAmxTile * d + fb * kAmxTile, d * static_cast<int64_t>(sizeof(float)));
    }
}

// Whether vdpbf16ps takes a bfloat16 pool's prefill products here: K's groups of kBlockRows positions
// are read in place as outer_block's A rows, so they must not cross a block.
bool dp_serves(const Problem& p) { return p.block_size % kBlockRows == 0 && __builtin_cpu_supports("avx512bf16"); }

// logits [whole_blocks(kv_len), rows] = K Q^T: per kBlockRows positions (K rows read in place from
// the pool; those past kv_len are read but masked) and 16 rows, vdpbf16ps over D / 2 feature pairs,
// Q^T held as bfloat16 [D / 2, rows, 2].
void dp_logits(const Problem& p, const uint16_t* k, const PrefillTile& tile, int64_t h, int64_t rows,
               PrefillScratch& scratch) {
  const int64_t d = p.head_dim, group = p.num_heads / p.num_kv_heads, kv_len = tile.kv_len();
  const int32_t* table = p.block_tables + tile.seq * p.table_width;
  scratch.q_bf16.assign(d * rows, 0);
  for (int64_t r = 0; r < tile.count * group; ++r) {
    const float* q = p.q + ((tile.start + r / group) * p.num_heads + h * group + r % group) * d;
    for (int64_t f = 0; f < d; f += kBlockLanes) {  // 8 pairs at a time, rounded to nearest even
      uint16_t pairs[kBlockLanes];
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pairs),
                          reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(q + f))));
      for (int64_t j = 0; j < kBlockLanes / 2; ++j)
        std::memcpy(scratch.q_bf16.data() + ((f / 2 + j) * rows + r) * 2, pairs + 2 * j, 2 * sizeof(uint16_t));
    }
  }
  float* logits = scratch.logits.data();
  const int64_t position_stride = p.num_kv_heads * d;
  for (int64_t pos = 0; pos < kv_len; pos += kBlockRows) {
    const uint16_t* keys = k + (pool_slot(p, table, pos) * p.num_kv_heads + h) * d;
    for (int64_t r = 0; r < rows; r += kBlockLanes)
      outer_block<false, DpBf16>(keys, position_stride, 2, scratch.q_bf16.data() + 2 * r, 2 * rows, d / 2,
                                 logits + pos * rows + r, rows);
  }
}

// out_t [D, rows] = (P V)^T: P, the softmax's weights in logits [padded_len, rows] (zero past kv_len),
// rounded to bfloat16 pairs [padded_len / 2, rows, 2]; V as pairs of positions [pairs, D, 2],
// kChunkPositions at a time; vdpbf16ps over the chunk's pairs per kBlockRows features and 16 rows.
void dp_values(const Problem& p, const uint16_t* v, const PrefillTile& tile, int64_t h, int64_t rows,
               int64_t padded_len, PrefillScratch& scratch) {
  const int64_t d = p.head_dim, kv_len = tile.kv_len();
  const float* logits = scratch.logits.data();
  scratch.p_bf16.resize(padded_len * rows);
  auto weights_bf16 = [&](int64_t pos, int64_t r) {  // 16 rows' weights at one position
    return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(logits + pos * rows + r)));
  };
  for (int64_t pair = 0; pair < padded_len / 2; ++pair)
    for (int64_t r = 0; r < rows; r += kBlockLanes)
      _mm512_storeu_si512(scratch.p_bf16.data() + (pair * rows + r) * 2,
                          jaxinfer::interleave_pairs(weights_bf16(2 * pair, r), weights_bf16(2 * pair + 1, r)));
  scratch.v_bf16.resize(kChunkPositions * d);
  scratch.out_t.assign(d * rows, 0.0f);
  for (int64_t c0 = 0; c0 < kv_len; c0 += kChunkPositions) {
    const int64_t pair0 = c0 / 2, pairs = whole_blocks(std::min(kChunkPositions, kv_len - c0)) / 2;
    store_value_pairs(p, v, tile, h, pair0, pair0 + pairs, [&](int64_t pair, int64_t fb) {
      return scratch.v_bf16.data() + ((pair - pair0) * d + fb * kPairColumns) * 2;
    });
    for (int64_t f = 0; f < d; f += kBlockRows)
      for (int64_t r = 0; r < rows; r += kBlockLanes)
        outer_block<true, DpBf16>(scratch.v_bf16.data() + 2 * f, 2, 2 * d,
                                  scratch.p_bf16.data() + (pair0 * rows + r) * 2, 2 * rows, pairs,
                                  scratch.out_t.data() + f * rows + r, rows);
  }
}
#endif  // __AVX512F__

template <typename T>
Products products_for(const Problem& p) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, uint16_t>) {
    if (amx_serves(p)) return Products::kAmx;
    if (dp_serves(p)) return Products::kDpBf16;
  }
#endif
  return Products::kFma;
}

// The causal softmax down each column of logits [padded_len, rows] (rows % L::kWidth == 0), in
// place and left unnormalized: row r sees positions up to last_visible[r] (>= first_pos), so from
// first_pos on each lane is masked, which also hides the padding positions (past kv_len) from every
// real row; sum[r] gets the row's total. A strip of L::kWidth rows at a time, its peak and total in
// one register down all the positions.
template <class L>
void softmax_columns(float* logits, int64_t padded_len, int64_t rows, int64_t first_pos, const float* last_visible,
                     float* sum) {
  using Floats = typename L::Floats;
  for (int64_t c = 0; c < rows; c += L::kWidth) {
    const Floats last = L::load(last_visible + c);
    Floats peak = L::set1(-INFINITY);
    for (int64_t pos = 0; pos < first_pos; ++pos) peak = L::max(peak, L::load(logits + pos * rows + c));
    for (int64_t pos = first_pos; pos < padded_len; ++pos)
      peak = L::where_visible(pos, last, L::max(peak, L::load(logits + pos * rows + c)), peak);
    Floats total = L::zero();
    for (int64_t pos = 0; pos < padded_len; ++pos) {
      float* x = logits + pos * rows + c;
      Floats e = L::exp_below(L::load(x), peak);
      if (pos >= first_pos) e = L::where_visible(pos, last, e, L::zero());
      L::store(x, e);
      total = L::add(total, e);
    }
    L::store(sum + c, total);
  }
}

// One prefill tile against kv head h (see the top of this file). Row r of the item is query head
// h * group + r % group of token start + r / group.
template <typename T>
void prefill(const Problem& p, const T* k, const T* v, const PrefillTile& tile, int64_t h, PrefillScratch& scratch) {
  const int64_t d = p.head_dim, group = p.num_heads / p.num_kv_heads, rows = kTileTokens * group;
  const int64_t kv_len = tile.kv_len();
  const Products products = products_for<T>(p);
  // The AMX path's P tiles take 32 positions at a time.
  const int64_t padded_len =
      products == Products::kAmx ? (kv_len + kBf16TileK - 1) / kBf16TileK * kBf16TileK : whole_blocks(kv_len);
  scratch.logits.resize(padded_len * rows);
  float* logits = scratch.logits.data();
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, uint16_t>) {
    if (products == Products::kAmx) load_tile_config(), amx_logits(p, k, tile, h, rows, padded_len, scratch);
    if (products == Products::kDpBf16) dp_logits(p, k, tile, h, rows, scratch);
  }
#endif
  if (products == Products::kFma) fma_logits(p, k, tile, h, rows, scratch);
  if (p.soft_cap > 0)
    for (int64_t i = 0; i < kv_len * rows; ++i) logits[i] = p.soft_cap * std::tanh(logits[i] / p.soft_cap);

  scratch.last_visible.resize(rows);
  for (int64_t r = 0; r < rows; ++r) scratch.last_visible[r] = tile.first_pos + r / group;
  scratch.sum.resize(rows);
  float* sum = scratch.sum.data();
  softmax_columns<WidestFloats>(logits, padded_len, rows, tile.first_pos, scratch.last_visible.data(), sum);

  // The weighted sum of V rows: O^T [D, R] (FMA and vdpbf16ps paths) or O [R, D] (AMX, whose tiles
  // store every element), as strides of row and feature.
  int64_t row_stride = 1, feature_stride = rows;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, uint16_t>) {
    if (products == Products::kAmx) {
      scratch.out_t.resize(d * rows);
      amx_values(p, v, tile, h, rows, padded_len, scratch, scratch.out_t.data());
      _tile_release();
      row_stride = d, feature_stride = 1;
    }
    if (products == Products::kDpBf16) dp_values(p, v, tile, h, rows, padded_len, scratch);
  }
#endif
  if (products == Products::kFma) fma_values(p, v, tile, h, rows, scratch);
  for (int64_t i = 0; i < tile.count; ++i)
    for (int64_t j = 0; j < group; ++j) {
      const int64_t r = i * group + j;
      float* out = p.out + ((tile.start + i) * p.num_heads + h * group + j) * d;
      for (int64_t f = 0; f < d; ++f) out[f] = scratch.out_t[r * row_stride + f * feature_stride] / sum[r];
    }
}

template <typename T>
ffi::Error attention(ffi::ThreadPool& pool, const Problem& p, const void* k_data, const void* v_data) {
  auto work = work_of(p);
  if (work.has_error()) return work.error();
  const T *k = static_cast<const T*>(k_data), *v = static_cast<const T*>(v_data);
  const Decode* decodes = work->decodes.data();
  const PrefillTile* tiles = work->tiles.data();
  const int64_t num_decodes = static_cast<int64_t>(work->decodes.size());
  const int64_t num_tiles = static_cast<int64_t>(work->tiles.size());
  int64_t positions = 0, query_tokens = num_decodes;
  for (int64_t i = 0; i < num_decodes; ++i) positions += decodes[i].len;
  for (int64_t i = 0; i < num_tiles; ++i) positions += tiles[i].count * tiles[i].kv_len(), query_tokens += tiles[i].count;
  // Chunks of decodes as the first items (a lone decode split by positions; all decodes in one chunk
  // below kMinPositionsToSplit), then one per (prefill tile, kv head), shared with the pool.
  const int64_t per_chunk = std::max<int64_t>(1, positions >= kMinPositionsToSplit ? num_decodes / kItemsWhenSplit
                                                                                   : num_decodes);
  const bool lone = num_decodes == 1;
  const int64_t decode_items = lone ? kLoneDecodeParts : (num_decodes + per_chunk - 1) / per_chunk;
  const int64_t items = decode_items + num_tiles * p.num_kv_heads;
  if (items == 0) return ffi::Error::Success();
  // A lone decode's parts: part i reads positions [len * i / parts, len * (i + 1) / parts).
  const int64_t heads = p.num_heads, d = p.head_dim;
  std::vector<float> part_out(lone ? kLoneDecodeParts * heads * d : 0), part_peak(lone ? kLoneDecodeParts * heads : 0);
  std::vector<float> part_total(part_peak.size());
  auto item_fn = [&](int64_t item) {
    if (item >= decode_items) {
      PrefillScratch scratch;
      const int64_t index = item - decode_items;
      prefill(p, k, v, tiles[index / p.num_kv_heads], index % p.num_kv_heads, scratch);
      return;
    }
    DecodeScratch scratch;
    if (lone) {
      const Decode& one = decodes[0];
      decode_positions(p, k, v, one.seq, one.token, one.len * item / kLoneDecodeParts,
                       one.len * (item + 1) / kLoneDecodeParts, part_out.data() + item * heads * d,
                       part_peak.data() + item * heads, part_total.data() + item * heads, scratch);
      return;
    }
    std::vector<float> peak(heads), total(heads);
    for (int64_t i = item * per_chunk; i < std::min(num_decodes, (item + 1) * per_chunk); ++i) {
      float* out = p.out + decodes[i].token * heads * d;
      decode_positions(p, k, v, decodes[i].seq, decodes[i].token, 0, decodes[i].len, out,
                       peak.data(), total.data(), scratch);
      for (int64_t j = 0; j < heads; ++j)
        for (int64_t f = 0; f < d; ++f) out[j * d + f] /= total[j];
    }
  };
  if (items > 1)
    jaxinfer::run_on_pool(pool, items, query_tokens, item_fn);
  else
    item_fn(0);
  if (lone) merge_parts(kLoneDecodeParts, heads, d, part_out.data(), part_peak.data(), part_total.data(),
                        p.out + decodes[0].token * heads * d);
  return ffi::Error::Success();
}

ffi::Error PagedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                          ffi::Buffer<ffi::F32> k_scale, ffi::Buffer<ffi::F32> v_scale,
                          ffi::Buffer<ffi::S32> block_tables, ffi::Buffer<ffi::S32> seq_lens,
                          ffi::Buffer<ffi::S32> query_start_loc, float soft_cap, ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = k.dimensions(), td = block_tables.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || td.size() != 2 || qd[2] != kd[3] || qd[2] % (2 * kLanes) ||
      qd[1] % kd[2] || v.element_type() != k.element_type() || seq_lens.element_count() != td[0] ||
      query_start_loc.element_count() != td[0] + 1)
    return ffi::Error::InvalidArgument(
        "jaxinfer_paged_attention: expected q [T, H, D], pools [blocks, block_size, KVH, D] with "
        "H % KVH == 0 and D % 16 == 0, block_tables [S, B], seq_lens [S], query_start_loc [S + 1]");
  const bool scaled = k_scale.element_count() > 0;
  const Problem p{q.typed_data(), scaled ? k_scale.typed_data() : nullptr, scaled ? v_scale.typed_data() : nullptr,
                  block_tables.typed_data(), seq_lens.typed_data(), query_start_loc.typed_data(),
                  out->typed_data(), qd[0], td[0], td[1], kd[0], kd[1], qd[1], kd[2], qd[2], soft_cap};
  std::fill(p.out, p.out + out->element_count(), 0.0f);
  switch (k.element_type()) {
    case ffi::DataType::F32: return attention<float>(pool, p, k.untyped_data(), v.untyped_data());
    case ffi::DataType::BF16: return attention<uint16_t>(pool, p, k.untyped_data(), v.untyped_data());
    case ffi::DataType::S8: return attention<int8_t>(pool, p, k.untyped_data(), v.untyped_data());
    case ffi::DataType::F8E4M3FN: return attention<uint8_t>(pool, p, k.untyped_data(), v.untyped_data());
    default:
      return ffi::Error::InvalidArgument("jaxinfer_paged_attention: K/V storage must be f32, bf16, s8 or f8e4m3fn");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_paged_attention, PagedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("soft_cap")
                                  .Ret<ffi::Buffer<ffi::F32>>());
