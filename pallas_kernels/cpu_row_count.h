// A run-time row count as a compile-time one, for the CPU matmul kernels' .cc files (pallas_kernels.cpu_ffi
// hashes this header with each of them): their inner loops keep one register per activation row,
// so each row count is its own instantiation.
//
// with_row_count<kMax>(rows, fn) calls fn(std::integral_constant<int, R>{}) with R = min(rows, kMax),
// for rows >= 1.
//
// Live rows: the matmul kernels an engine step calls take a one-element s32 operand `live`, the
// step's real tokens, and compute only the first `live` rows of their M (clamped to [0, M]), writing
// zeros in the rest. A step runs in the smallest compiled shape bucket that holds it (a 150-token
// step in the 256-token bucket), and on a CPU a matmul costs in proportion to its rows, so the
// bucket's padding would otherwise cost as much as real tokens.
//   live_rows(live, m) -> the rows to compute (each handler checks live has one element)
//   zero_rows_from(out, live, m, n) zeros rows live .. m - 1 of a row-major [m, n] output

#ifndef JAXINFER_CPU_ROW_COUNT_H_
#define JAXINFER_CPU_ROW_COUNT_H_

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "xla/ffi/api/ffi.h"

namespace jaxinfer {

template <int kMax, typename Fn>
void with_row_count(int64_t rows, Fn&& fn) {
  if constexpr (kMax > 1) {
    if (rows < kMax) return with_row_count<kMax - 1>(rows, fn);
  }
  fn(std::integral_constant<int, kMax>{});
}

inline int64_t live_rows(xla::ffi::Buffer<xla::ffi::S32> live, int64_t m) {
  return std::clamp<int64_t>(live.typed_data()[0], 0, m);
}

template <typename T>
void zero_rows_from(T* out, int64_t live, int64_t m, int64_t n) {
  std::fill(out + live * n, out + m * n, T{0});
}

}  // namespace jaxinfer

#endif  // JAXINFER_CPU_ROW_COUNT_H_
