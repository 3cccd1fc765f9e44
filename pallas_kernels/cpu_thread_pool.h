// Sharing a kernel's work items with XLA's intra-op thread pool (included by the CPU kernels' .cc
// files; pallas_kernels.cpu_ffi hashes this header with each of them).
//
// run_on_pool(pool, items, item_fn) runs item_fn(i) for every i < items, taking items from a shared
// counter on the calling thread and on up to items - 1 pool threads, and returns when all are done.
// A busy pool costs nothing but the calling thread's doing every item itself.

#ifndef JAXINFER_CPU_THREAD_POOL_H_
#define JAXINFER_CPU_THREAD_POOL_H_

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace jaxinfer {

template <typename ItemFn>
void run_on_pool(xla::ffi::ThreadPool& pool, int64_t items, ItemFn item_fn) {
  // Shared with the pool's tasks, which may start after this call has returned: they then find no
  // item left and touch nothing but this state.
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> active{0};
  };
  auto state = std::make_shared<State>();
  auto drain = [state, items, item_fn]() {
    for (int64_t item; (item = state->next.fetch_add(1)) < items;) item_fn(item);
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

}  // namespace jaxinfer

#endif  // JAXINFER_CPU_THREAD_POOL_H_
