// A run-time row count as a compile-time one, for the CPU matmul kernels' .cc files (pallas_kernels.cpu_ffi
// hashes this header with each of them): their inner loops keep one register per activation row,
// so each row count is its own instantiation.
//
// with_row_count<kMax>(rows, fn) calls fn(std::integral_constant<int, R>{}) with R = min(rows, kMax),
// for rows >= 1.

#ifndef JAXINFER_CPU_ROW_COUNT_H_
#define JAXINFER_CPU_ROW_COUNT_H_

#include <cstdint>
#include <type_traits>

namespace jaxinfer {

template <int kMax, typename Fn>
void with_row_count(int64_t rows, Fn&& fn) {
  if constexpr (kMax > 1) {
    if (rows < kMax) return with_row_count<kMax - 1>(rows, fn);
  }
  fn(std::integral_constant<int, kMax>{});
}

}  // namespace jaxinfer

#endif  // JAXINFER_CPU_ROW_COUNT_H_
