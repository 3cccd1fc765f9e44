// Paged attention of the decode tokens of a ragged batch on x86 CPUs, as an XLA FFI custom call
// (built, registered and called by cpu_paged_attention.py).
//
//   jaxinfer_paged_decode_attention(
//       q [T, H, D] f32 (already multiplied by sm_scale),
//       k, v [num_blocks, block_size, KVH, D] f32 | bf16 | s8 | f8e4m3fn,
//       k_scale, v_scale [num_blocks, block_size, KVH] f32 for s8/f8e4m3fn storage, [0] otherwise,
//       block_tables [S, B] s32, seq_lens [S] s32, query_start_loc [S + 1] s32;
//       attribute soft_cap f32 (0: none))
//   -> out [T, H, D] f32: for every sequence with exactly one new token (a decode), that token's
//      attention over positions 0..seq_len-1 of its blocks; every other row is zero.
//
// Query head h reads kv head h / (H / KVH). For each decode the kernel makes two passes over the
// sequence's context, position-major so that each pass reads the pool's rows in the order they lie:
// the first computes every head's logits q.k into a [H, seq_len] scratch (each K row converted to
// float once and dotted with its query group), then a softmax per head in float32, and the second
// accumulates the probabilities times each V row into [H, D]. Each K and V element is read once,
// against the XLA path's gathers of whole chunks, loop bookkeeping and partial-softmax merges,
// which cost ~100 us per layer even at short contexts. Decodes are the work items: from
// kMinPositionsToSplit positions in all, chunks of them are shared with XLA's intra-op pool. In a
// microbenchmark (benchmarks/bench_paged_attention.py, warm cache) sharing did not pay below 2048
// positions, since waking a pool thread costs about as much as a short call; inside a decode step,
// where the K/V rows come from memory and the pool wakes for the next matmul anyway, it does from a
// few hundred: a w4a8 SmolLM2 engine at 128-token prompts on the Xeon VM went from 22.6 to 17.2 ms a
// step at batch 8 and from 11.3-11.8 to 8.0-9.7 at batch 2 with the threshold at 2048 -> 128-512.
// A lone decode (batch 1) is split into kLoneDecodeParts items by query heads (a kv head whose group
// straddles the split is read by both): a bfloat16 SmolLM2 batch-1 step went from 17.5-18.0 to
// 16.0-17.8 ms at 128 positions and from 19.3-20.2 to 18.0-18.8 at 512 (A/B, three runs each),
// partly because the pool's other thread is then awake for the output projection that follows.
// Each loop over positions also prefetches the rows one block ahead (batch-8 steps 3-4% faster).
//
// Only positions below seq_len are read, so whatever unused slots hold (NaN included) never
// reaches the result; a block id outside the pool or a context longer than the block table is
// refused with an error rather than read.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_thread_pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 8;  // floats per AVX2 register; the Python side requires D % kLanes == 0
// A call whose decodes read fewer positions than this stays on the calling thread; more are split
// into about kItemsWhenSplit items shared with XLA's intra-op pool (see the top of this file).
constexpr int64_t kMinPositionsToSplit = 256;
constexpr int64_t kItemsWhenSplit = 8;
constexpr int64_t kLoneDecodeParts = 2;

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
  } else {
    const float scale = scales ? scales[index] : 1.0f;
    for (int64_t i = 0; i < d; ++i) scratch[i] = to_float(row[i]) * scale;
    return scratch;
  }
}

// Four accumulators: one chain of dependent FMAs per 64-float row made the kernel latency-bound.
float dot(const float* a, const float* b, int64_t d) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t i = 0;
  for (; i + 4 * kLanes <= d; i += 4 * kLanes)
    for (int u = 0; u < 4; ++u)
      acc[u] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + u * kLanes), _mm256_loadu_ps(b + i + u * kLanes), acc[u]);
  for (; i < d; i += kLanes) acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc[0]);
  const __m256 sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
  const __m128 pairs = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1)));
}

void axpy(float a, const float* x, float* y, int64_t d) {
  const __m256 scale = _mm256_set1_ps(a);
  for (int64_t i = 0; i < d; i += kLanes)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(scale, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
}

// exp(x) for 8 floats x <= 0 (logits minus their maximum), to about 2 ulp: x = n ln2 + r with
// |r| <= ln2 / 2, exp(r) by Cephes' expf polynomial, 2^n through the exponent bits. libm's scalar
// expf was most of the kernel's time at long contexts.
__m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));  // below this exp(x) is under float's normal range
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 poly = _mm256_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(c));
  const __m256 exp_r = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(poly, r), r, r), _mm256_set1_ps(1.0f));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(exp_r, _mm256_castsi256_ps(two_n));
}

// row[i] = exp(row[i] - peak) / sum over the row, in place.
void softmax_in_place(float* row, int64_t len) {
  const float peak = *std::max_element(row, row + len);
  const __m256 peaks = _mm256_set1_ps(peak);
  __m256 sums = _mm256_setzero_ps();
  int64_t pos = 0;
  for (; pos + kLanes <= len; pos += kLanes) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(row + pos), peaks));
    _mm256_storeu_ps(row + pos, e);
    sums = _mm256_add_ps(sums, e);
  }
  float lanes[kLanes];
  _mm256_storeu_ps(lanes, sums);
  float total = 0;
  for (const float lane : lanes) total += lane;
  for (; pos < len; ++pos) total += row[pos] = std::exp(row[pos] - peak);
  const float inverse = 1.0f / total;
  for (pos = 0; pos < len; ++pos) row[pos] *= inverse;
}

struct Problem {
  const float* q;  // [T, H, D]
  const float *k_scale, *v_scale;  // [pool rows] or null
  const int32_t *block_tables, *seq_lens, *query_start_loc;
  float* out;  // [T, H, D]
  int64_t num_seqs, table_width, num_blocks, block_size, num_heads, num_kv_heads, head_dim;
  float soft_cap;
};

struct Decode {
  int64_t seq, token, len;
};

// The batch's decodes (sequences with exactly one new token), after checking that each context fits
// its block table and reads only blocks inside the pool.
ffi::ErrorOr<std::vector<Decode>> decodes_of(const Problem& p) {
  std::vector<Decode> decodes;
  for (int64_t s = 0; s < p.num_seqs; ++s) {
    const int64_t start = p.query_start_loc[s], len = p.seq_lens[s];
    if (p.query_start_loc[s + 1] - start != 1 || len < 1) continue;
    if (len > p.table_width * p.block_size)
      return ffi::Error::InvalidArgument("jaxinfer_paged_decode_attention: a context is longer than its block table");
    const int32_t* table = p.block_tables + s * p.table_width;
    for (int64_t i = 0; i < (len + p.block_size - 1) / p.block_size; ++i)
      if (table[i] < 0 || table[i] >= p.num_blocks)
        return ffi::Error::InvalidArgument("jaxinfer_paged_decode_attention: a block id lies outside the pool");
    decodes.push_back({s, start, len});
  }
  return decodes;
}

// The pool slot of position `pos` of a sequence with this block table; its kv heads' rows are
// slot * KVH .. slot * KVH + KVH - 1.
inline int64_t pool_slot(const Problem& p, const int32_t* table, int64_t pos) {
  return table[pos / p.block_size] * p.block_size + pos % p.block_size;
}

// Asks for the pool rows of position `pos` (all kv heads: contiguous), if it is in the context. A
// context's blocks lie anywhere in the pool, so the hardware prefetcher cannot run ahead into the
// next one; walking one block ahead of the loop keeps rows arriving from memory.
template <typename T>
void prefetch_position(const Problem& p, const T* pool, const int32_t* table, int64_t pos, int64_t len) {
  if (pos >= len) return;
  const char* row = reinterpret_cast<const char*>(pool + pool_slot(p, table, pos) * p.num_kv_heads * p.head_dim);
  const int64_t bytes = p.num_kv_heads * p.head_dim * static_cast<int64_t>(sizeof(T));
  for (int64_t line = 0; line < bytes; line += 64) _mm_prefetch(row + line, _MM_HINT_T0);
}

// One decode, query heads [j0, j1): token `t` of sequence `s` over its `len` positions.
template <typename T>
void decode(const Problem& p, const T* k, const T* v, int64_t s, int64_t t, int64_t len, int64_t j0, int64_t j1,
            std::vector<float>& logits, std::vector<float>& row_scratch) {
  const int64_t heads = p.num_heads, kv_heads = p.num_kv_heads, d = p.head_dim, group = heads / kv_heads;
  const int64_t h0 = j0 / group, h1 = (j1 + group - 1) / group;
  logits.resize(heads * len);
  const float* q = p.q + t * heads * d;
  const int32_t* table = p.block_tables + s * p.table_width;
  for (int64_t pos = 0; pos < len; ++pos) {
    const int64_t first_row = pool_slot(p, table, pos) * kv_heads;
    prefetch_position(p, k, table, pos + p.block_size, len);
    for (int64_t h = h0; h < h1; ++h) {
      const float* key = pool_row(k, p.k_scale, first_row + h, d, row_scratch.data());
      for (int64_t j = std::max(h * group, j0); j < std::min((h + 1) * group, j1); ++j)
        logits[j * len + pos] = dot(q + j * d, key, d);
    }
  }
  float* out = p.out + t * heads * d;
  for (int64_t j = j0; j < j1; ++j) {
    float* row = logits.data() + j * len;
    if (p.soft_cap > 0)
      for (int64_t pos = 0; pos < len; ++pos) row[pos] = p.soft_cap * std::tanh(row[pos] / p.soft_cap);
    softmax_in_place(row, len);
  }
  for (int64_t pos = 0; pos < len; ++pos) {
    const int64_t first_row = pool_slot(p, table, pos) * kv_heads;
    prefetch_position(p, v, table, pos + p.block_size, len);
    for (int64_t h = h0; h < h1; ++h) {
      const float* value = pool_row(v, p.v_scale, first_row + h, d, row_scratch.data());
      for (int64_t j = std::max(h * group, j0); j < std::min((h + 1) * group, j1); ++j)
        axpy(logits[j * len + pos], value, out + j * d, d);
    }
  }
}

template <typename T>
ffi::Error all_decodes(ffi::ThreadPool& pool, const Problem& p, const void* k, const void* v) {
  auto decodes = decodes_of(p);
  if (decodes.has_error()) return decodes.error();
  if (decodes->empty()) return ffi::Error::Success();
  const Decode* list = decodes->data();
  const int64_t count = static_cast<int64_t>(decodes->size());
  int64_t positions = 0;
  for (int64_t i = 0; i < count; ++i) positions += list[i].len;
  // Chunks of decodes as work items, on the pool's threads as well once there is enough work.
  const int64_t per_item = positions >= kMinPositionsToSplit ? std::max<int64_t>(1, count / kItemsWhenSplit) : count;
  const int64_t head_parts = count == 1 ? kLoneDecodeParts : 1;
  const int64_t items = (count + per_item - 1) / per_item * head_parts;
  auto item_fn = [&p, k, v, list, count, per_item, head_parts](int64_t item) {
    std::vector<float> logits, row_scratch(p.head_dim);
    const int64_t chunk = item / head_parts, part = item % head_parts;
    const int64_t j0 = part * p.num_heads / head_parts, j1 = (part + 1) * p.num_heads / head_parts;
    for (int64_t i = chunk * per_item; i < std::min(count, (chunk + 1) * per_item); ++i)
      decode(p, static_cast<const T*>(k), static_cast<const T*>(v), list[i].seq, list[i].token, list[i].len, j0, j1,
             logits, row_scratch);
  };
  if (items > 1)
    jaxinfer::run_on_pool(pool, items, item_fn);
  else
    item_fn(0);
  return ffi::Error::Success();
}

ffi::Error PagedDecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                                ffi::Buffer<ffi::F32> k_scale, ffi::Buffer<ffi::F32> v_scale,
                                ffi::Buffer<ffi::S32> block_tables, ffi::Buffer<ffi::S32> seq_lens,
                                ffi::Buffer<ffi::S32> query_start_loc, float soft_cap,
                                ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = k.dimensions(), td = block_tables.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || td.size() != 2 || qd[2] != kd[3] || qd[2] % kLanes ||
      qd[1] % kd[2] || v.element_type() != k.element_type() || seq_lens.element_count() != td[0] ||
      query_start_loc.element_count() != td[0] + 1)
    return ffi::Error::InvalidArgument(
        "jaxinfer_paged_decode_attention: expected q [T, H, D], pools [blocks, block_size, KVH, D] with "
        "H % KVH == 0 and D % 8 == 0, block_tables [S, B], seq_lens [S], query_start_loc [S + 1]");
  const bool scaled = k_scale.element_count() > 0;
  const Problem p{q.typed_data(), scaled ? k_scale.typed_data() : nullptr, scaled ? v_scale.typed_data() : nullptr,
                  block_tables.typed_data(), seq_lens.typed_data(), query_start_loc.typed_data(),
                  out->typed_data(), td[0], td[1], kd[0], kd[1], qd[1], kd[2], qd[2], soft_cap};
  std::fill(p.out, p.out + out->element_count(), 0.0f);
  switch (k.element_type()) {
    case ffi::DataType::F32: return all_decodes<float>(pool, p, k.untyped_data(), v.untyped_data());
    case ffi::DataType::BF16: return all_decodes<uint16_t>(pool, p, k.untyped_data(), v.untyped_data());
    case ffi::DataType::S8: return all_decodes<int8_t>(pool, p, k.untyped_data(), v.untyped_data());
    case ffi::DataType::F8E4M3FN: return all_decodes<uint8_t>(pool, p, k.untyped_data(), v.untyped_data());
    default:
      return ffi::Error::InvalidArgument("jaxinfer_paged_decode_attention: K/V storage must be f32, bf16, s8 or "
                                         "f8e4m3fn");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_paged_decode_attention, PagedDecodeAttention,
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
