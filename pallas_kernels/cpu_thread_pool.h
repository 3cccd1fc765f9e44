// Sharing a kernel's work items among threads (included by the CPU kernels' .cc files;
// pallas_kernels.cpu_ffi hashes this header with each of them).
//
// run_on_pool(pool, items, rows, item_fn) runs item_fn(i) for every i < items, taking items from a
// shared counter on the calling thread and on other threads, and returns when all are done; `rows`
// is the job's activation rows (query tokens for attention).
//
// Decode-sized jobs (kTeamMaxRows) go to a team of our own threads (one per core this process may
// run on, beyond the caller's), which spins for a while after each job before it sleeps: the kernel
// calls of one decode step come tens of microseconds apart, and waking a sleeping thread takes
// about as long as a small matmul itself, so with XLA's intra-op pool (asleep by the time a call
// comes) the calling thread did most items alone. Larger jobs, and a job that finds the team busy
// with another kernel's (XLA can run independent operations on several threads), use XLA's pool.
// Either way a helper that comes late costs nothing but the calling thread's doing more items.

#ifndef JAXINFER_CPU_THREAD_POOL_H_
#define JAXINFER_CPU_THREAD_POOL_H_

#include <immintrin.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace jaxinfer {

// How long an idle team thread spins before it sleeps: longer than the gaps between the kernel
// calls of a step, shorter than the host's work between steps.
constexpr std::chrono::microseconds kTeamSpin{300};
// Jobs of at most this many activation rows (query tokens, for attention) run on the team: the
// calls of decode steps, which stream weights or KV in tens of microseconds each. Larger jobs
// (prefill) keep to XLA's pool: they last long enough that waking it costs nothing, and between
// them XLA's own operations may want every core, which a spinning team thread would take.
constexpr int64_t kTeamMaxRows = 16;

class KernelTeam {
 public:
  // One team per process, shared by every kernel library: a static local of an inline function is
  // a unique symbol (STB_GNU_UNIQUE) that the dynamic linker binds once across libraries.
  static KernelTeam& get() {
    static KernelTeam* team = new KernelTeam();  // never destroyed: its threads live as long as the process
    return *team;
  }

  // Runs the job on the calling thread and the team; false (nothing run) when the team is busy.
  template <typename ItemFn>
  bool try_run(int64_t items, const ItemFn& item_fn) {
    std::unique_lock<std::mutex> busy(run_mutex_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    // An odd generation tells threads still joining the last job to stay out while it is rewritten.
    generation_.fetch_add(1);
    while (active_.load() > 0) _mm_pause();
    items_ = items;
    next_.store(0, std::memory_order_relaxed);
    context_ = &item_fn;
    call_ = [](const void* context, int64_t item) { (*static_cast<const ItemFn*>(context))(item); };
    generation_.fetch_add(1);  // even: the job is open
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      wake_.notify_all();
    }
    drain();
    // Every item has been taken; wait for the threads still finishing theirs.
    while (active_.load() > 0) _mm_pause();
    return true;
  }

 private:
  KernelTeam() {
    cpu_set_t allowed;
    const int cores = sched_getaffinity(0, sizeof(allowed), &allowed) == 0 ? CPU_COUNT(&allowed) : 1;
    for (int t = 1; t < cores; ++t) std::thread([this] { work(); }).detach();
  }

  void drain() {
    for (int64_t item; (item = next_.fetch_add(1)) < items_;) call_(context_, item);
  }

  bool job_open(uint64_t seen) const {
    const uint64_t generation = generation_.load();
    return generation != seen && generation % 2 == 0;
  }

  void work() {
    uint64_t seen = generation_.load();
    for (;;) {
      const auto spin_until = std::chrono::steady_clock::now() + kTeamSpin;
      while (!job_open(seen) && std::chrono::steady_clock::now() < spin_until) {
        for (int i = 0; i < 16 && !job_open(seen); ++i) _mm_pause();
        // Hand the core to any thread waiting for it (XLA's own pool, between our calls): an idle
        // team thread must only cost a core that would otherwise idle too.
        std::this_thread::yield();
      }
      if (!job_open(seen)) {
        std::unique_lock<std::mutex> lock(sleep_mutex_);
        sleepers_.fetch_add(1);
        wake_.wait(lock, [&] { return job_open(seen); });
        sleepers_.fetch_sub(1);
      }
      seen = generation_.load();
      active_.fetch_add(1);
      if (generation_.load() == seen && seen % 2 == 0) drain();  // else the job closed while joining
      active_.fetch_sub(1);
    }
  }

  std::mutex run_mutex_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int64_t> active_{0};
  std::atomic<int64_t> next_{0};
  int64_t items_ = 0;
  const void* context_ = nullptr;
  void (*call_)(const void*, int64_t) = nullptr;
  std::mutex sleep_mutex_;
  std::condition_variable wake_;
  std::atomic<int64_t> sleepers_{0};
};

template <typename ItemFn>
void run_on_pool(xla::ffi::ThreadPool& pool, int64_t items, int64_t rows, ItemFn item_fn) {
  if (items > 1 && rows <= kTeamMaxRows && KernelTeam::get().try_run(items, item_fn)) return;
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
