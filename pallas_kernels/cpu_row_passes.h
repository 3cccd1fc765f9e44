// Passes over a matmul's float32 product, row by row, that the CPU matmul kernels' .cc files run in
// the same call as the product (pallas_kernels.cpu_ffi hashes this header with each of them). Each
// replaces the XLA operations over the rows between two kernels:
//
//   add_norm_call: a layer's output projection (o or down), the residual add and the next RMSNorm,
//       (residual + y [M, N] f32, its RMSNorm times the norm weight [M, N] Act)
//   qkv_rope_call: the qkv projection, its split into heads and the rotation of q and k,
//       y [M, kv_heads * (q_per_kv + 2) * D] -> q [M, kv_heads * q_per_kv * D], k, v [M, kv_heads * D] Act
//   swiglu_call: the MLP's gate_up projection and its SwiGLU, y [M, 2F] (gate_i and up_i side by
//       side, jaxinfer.model.llama) -> silu(gate) * up [M, F] Act
//
// Act is the engine's activation dtype, float (float32) or uint16_t (bfloat16 bits). Every product
// value is first rounded to it, as the unfused path's `linear` returns the product; the math after
// that is float32, in the order of jaxinfer.model.layers (`residual_rms_norm`, `apply_rope`).
// Both take the first `live` rows (cpu_row_count.h) and write zeros in the rest.

#ifndef JAXINFER_CPU_ROW_PASSES_H_
#define JAXINFER_CPU_ROW_PASSES_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "cpu_exp.h"
#include "cpu_row_count.h"
#include "cpu_thread_pool.h"
#include "cpu_vec.h"
#include "xla/ffi/api/ffi.h"

namespace jaxinfer {

// Rows per work item of a pass: a 256-row step makes 8 items.
constexpr int64_t kPassRowsPerItem = 32;

// A scratch buffer for a call's float32 product, kept by the thread between calls.
inline float* product_buffer(int64_t size) {
  thread_local std::vector<float> product;
  product.resize(size);
  return product.data();
}

// How a pass rounds and stores a value in the activation dtype.
template <typename Act>
struct Activation;

template <>
struct Activation<float> {
  static vec::VecF rounded(vec::VecF v) { return v; }
  static void store(float* p, vec::VecF v) { vec::store_f32(p, v); }
};

template <>
struct Activation<uint16_t> {
  static vec::VecF rounded(vec::VecF v) { return vec::bits_as_f32(vec::bf16_bits(v)); }
  static void store(uint16_t* p, vec::VecF v) { vec::store_bf16(p, vec::bf16_bits(v)); }
};

// The float32 product y [m, n] of the first m rows by `product(y)`, then rows(y, r0, r1) over them in
// items of kPassRowsPerItem rows shared with the pool.
template <typename ProductFn, typename RowsFn>
void product_then_rows(xla::ffi::ThreadPool& pool, int64_t m, int64_t n, ProductFn product, RowsFn rows) {
  if (m == 0) return;
  float* y = product_buffer(m * n);
  product(y);
  run_on_pool(pool, (m + kPassRowsPerItem - 1) / kPassRowsPerItem, m,
              [&](int64_t i) { rows(y, i * kPassRowsPerItem, std::min(m, (i + 1) * kPassRowsPerItem)); });
}

// Rows r0 .. r1 - 1: residual_out = residual + rounded(product), normed = its RMSNorm
// (residual_out * rsqrt(mean(residual_out^2) + eps) * norm_w) in Act. n is a multiple of kLane;
// residual_out may be residual itself.
template <typename Act>
void add_norm_rows(const float* product, const float* residual, const float* norm_w, int64_t n, float eps,
                   int64_t r0, int64_t r1, float* residual_out, Act* normed) {
  using namespace vec;
  for (int64_t r = r0; r < r1; ++r) {
    const float *y = product + r * n, *x = residual + r * n;
    float* sum = residual_out + r * n;
    VecF squares = broadcast(0.0f);
    for (int64_t c = 0; c < n; c += kLane) {
      const VecF value = add(load_f32(x + c), Activation<Act>::rounded(load_f32(y + c)));
      store_f32(sum + c, value);
      squares = fmadd(value, value, squares);
    }
    const VecF scale = broadcast(1.0f / std::sqrt(lane_sum(squares) / static_cast<float>(n) + eps));
    for (int64_t c = 0; c < n; c += kLane)
      Activation<Act>::store(normed + r * n + c, mul(mul(load_f32(sum + c), scale), load_f32(norm_w + c)));
  }
}

// The residual add and RMSNorm after a matmul with n outputs of an x with `rows` rows, of which the
// first `live` are computed: checks the residual [rows, n] and norm weight [n] (`target` names the
// call in the error), zeroes the rows from `live` on, runs product(y) on the live rows and then the
// pass.
template <typename Act, typename ProductFn>
xla::ffi::Error add_norm_call(const char* target, xla::ffi::ThreadPool& pool, int64_t rows, int64_t n, int64_t live,
                              xla::ffi::Buffer<xla::ffi::F32>& residual, xla::ffi::AnyBuffer& norm_weight, float eps,
                              float* residual_out, Act* normed, ProductFn product) {
  namespace ffi = xla::ffi;
  const auto rd = residual.dimensions(), nd = norm_weight.dimensions();
  const auto norm_dtype = norm_weight.element_type();
  if (n % vec::kLane != 0 || rd.size() != 2 || rd[0] != rows || rd[1] != n || nd.size() != 1 || nd[0] != n ||
      !(norm_dtype == ffi::DataType::F32 || norm_dtype == ffi::DataType::BF16))
    return ffi::Error::InvalidArgument(std::string(target) + ": expected an f32 residual [M, N] and an f32 or bf16 "
                                       "norm weight [N] for the product's N outputs, N a multiple of the vector width "
                                       "(16 floats with AVX-512, 8 without)");
  std::vector<float> norm_w(n);
  for (int64_t c = 0; c < n; ++c)
    norm_w[c] = norm_dtype == ffi::DataType::F32 ? static_cast<const float*>(norm_weight.untyped_data())[c]
                                                 : vec::bf16_to_f32(static_cast<const uint16_t*>(norm_weight.untyped_data())[c]);
  const float *norm = norm_w.data(), *res = residual.typed_data();
  zero_rows_from(residual_out, live, rows, n);
  zero_rows_from(normed, live, rows, n);
  product_then_rows(pool, live, n, product, [=](const float* y, int64_t r0, int64_t r1) {
    add_norm_rows(y, res, norm, n, eps, r0, r1, residual_out, normed);
  });
  return ffi::Error::Success();
}

// Rows r0 .. r1 - 1 of a grouped qkv product y [M, kv_heads * (q_per_kv + 2) * d] (for each kv
// head: its q_per_kv query heads, then k, then v; jaxinfer.model.llama) -> q, k and v in Act. Every
// value is first rounded to Act; q and k heads are then rotated in float32 by the row's cos and
// sin [M, d / 2] in `apply_rope`'s half-split form (x * cos + roll(x, d / 2) * (-sin, sin)) and
// rounded again. d / 2 is a multiple of kLane.
template <typename Act>
void qkv_rope_rows(const float* y, const float* cos, const float* sin, int64_t kv_heads, int64_t q_per_kv, int64_t d,
                   int64_t r0, int64_t r1, Act* q, Act* k, Act* v) {
  using namespace vec;
  using A = Activation<Act>;
  const int64_t half = d / 2, n = kv_heads * (q_per_kv + 2) * d;
  for (int64_t r = r0; r < r1; ++r) {
    const float *c = cos + r * half, *s = sin + r * half;
    auto rotate = [&](const float* head, Act* out) {
      for (int64_t i = 0; i < half; i += kLane) {
        const VecF first = A::rounded(load_f32(head + i)), second = A::rounded(load_f32(head + half + i));
        const VecF cos_i = load_f32(c + i), sin_i = load_f32(s + i);
        A::store(out + i, sub(mul(first, cos_i), mul(second, sin_i)));
        A::store(out + half + i, add(mul(second, cos_i), mul(first, sin_i)));
      }
    };
    for (int64_t g = 0; g < kv_heads; ++g) {
      const float* group = y + r * n + g * (q_per_kv + 2) * d;
      for (int64_t j = 0; j < q_per_kv; ++j) rotate(group + j * d, q + (r * kv_heads * q_per_kv + g * q_per_kv + j) * d);
      rotate(group + q_per_kv * d, k + (r * kv_heads + g) * d);
      for (int64_t i = 0; i < d; i += kLane) A::store(v + (r * kv_heads + g) * d + i, load_f32(group + (q_per_kv + 1) * d + i));
    }
  }
}

// The qkv split and RoPE after a matmul with n outputs of an x with `rows` rows, of which the first
// `live` are computed: checks cos and sin [rows, D / 2] against n = kv_heads * (q_per_kv + 2) * D
// (`target` names the call in the error), zeroes the rows from `live` on, runs product(y) on the
// live rows and then the pass.
template <typename Act, typename ProductFn>
xla::ffi::Error qkv_rope_call(const char* target, xla::ffi::ThreadPool& pool, int64_t rows, int64_t n, int64_t live,
                              xla::ffi::Buffer<xla::ffi::F32>& cos, xla::ffi::Buffer<xla::ffi::F32>& sin,
                              int64_t kv_heads, int64_t q_per_kv, Act* q, Act* k, Act* v, ProductFn product) {
  namespace ffi = xla::ffi;
  const auto cd = cos.dimensions(), sd = sin.dimensions();
  const int64_t heads = kv_heads * (q_per_kv + 2);
  if (kv_heads < 1 || q_per_kv < 1 || n % heads != 0 || cd.size() != 2 || sd.size() != 2 || cd[0] != rows ||
      sd[0] != rows || sd[1] != cd[1] || n / heads != 2 * cd[1] || cd[1] % vec::kLane != 0)
    return ffi::Error::InvalidArgument(std::string(target) + ": expected a product of kv_heads * (q_per_kv + 2) * D "
                                       "outputs and f32 cos and sin [M, D / 2], D / 2 a multiple of the vector width "
                                       "(16 floats with AVX-512, 8 without)");
  const int64_t d = n / heads;
  const float *c = cos.typed_data(), *s = sin.typed_data();
  zero_rows_from(q, live, rows, kv_heads * q_per_kv * d);
  zero_rows_from(k, live, rows, kv_heads * d);
  zero_rows_from(v, live, rows, kv_heads * d);
  product_then_rows(pool, live, n, product, [=](const float* y, int64_t r0, int64_t r1) {
    qkv_rope_rows(y, c, s, kv_heads, q_per_kv, d, r0, r1, q, k, v);
  });
  return ffi::Error::Success();
}

// Rows r0 .. r1 - 1 of a gate_up product y [M, 2f] -> act [M, f] = silu(gate) * up in Act, gate
// and up first rounded to Act (`jaxinfer.model.layers.swiglu`'s order); f is a multiple of kLane.
template <typename Act>
void swiglu_rows(const float* y, int64_t f, int64_t r0, int64_t r1, Act* act) {
  using namespace vec;
  using A = Activation<Act>;
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t i = 0; i < f; i += kLane) {
      VecF gate, up;
      deinterleave(y + r * 2 * f + 2 * i, &gate, &up);
      gate = A::rounded(gate), up = A::rounded(up);
      A::store(act + r * f + i, mul(mul(gate, sigmoid(gate)), up));
    }
}

// The SwiGLU after a matmul with n = 2f outputs of an x with `rows` rows, of which the first `live`
// are computed (`target` names the call in the error): zeroes the rows from `live` on, runs
// product(y) on the live rows and then the pass.
template <typename Act, typename ProductFn>
xla::ffi::Error swiglu_call(const char* target, xla::ffi::ThreadPool& pool, int64_t rows, int64_t n, int64_t live,
                            Act* act, ProductFn product) {
  if (n % (2 * vec::kLane) != 0)
    return xla::ffi::Error::InvalidArgument(std::string(target) + ": expected a product of 2F outputs (gate and up), "
                                            "F a multiple of the vector width (16 floats with AVX-512, 8 without)");
  zero_rows_from(act, live, rows, n / 2);
  product_then_rows(pool, live, n, product,
                    [=](const float* y, int64_t r0, int64_t r1) { swiglu_rows(y, n / 2, r0, r1, act); });
  return xla::ffi::Error::Success();
}

// The bindings of the fused calls after a kernel's own operands (`operands`: the ffi::Ffi::Bind()
// chain of its thread pool, x and weight arrays), in the order cpu_row_passes.py passes them: the
// pass's operands, the live-row count, the attributes, the results (kAct: the activations' dtype).
template <xla::ffi::DataType kAct, typename Binding>
auto bind_add_norm(Binding operands) {
  namespace ffi = xla::ffi;
  return std::move(operands).template Arg<ffi::Buffer<ffi::F32>>()
      .template Arg<ffi::AnyBuffer>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Attr<float>("eps")
      .template Ret<ffi::Buffer<ffi::F32>>()
      .template Ret<ffi::Buffer<kAct>>();
}

template <xla::ffi::DataType kAct, typename Binding>
auto bind_qkv_rope(Binding operands) {
  namespace ffi = xla::ffi;
  return std::move(operands).template Arg<ffi::Buffer<ffi::F32>>()
      .template Arg<ffi::Buffer<ffi::F32>>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Attr<int64_t>("kv_heads")
      .template Attr<int64_t>("q_per_kv")
      .template Ret<ffi::Buffer<kAct>>()
      .template Ret<ffi::Buffer<kAct>>()
      .template Ret<ffi::Buffer<kAct>>();
}

template <xla::ffi::DataType kAct, typename Binding>
auto bind_swiglu(Binding operands) {
  namespace ffi = xla::ffi;
  return std::move(operands).template Arg<ffi::Buffer<ffi::S32>>().template Ret<ffi::Buffer<kAct>>();
}

}  // namespace jaxinfer

#endif  // JAXINFER_CPU_ROW_PASSES_H_
