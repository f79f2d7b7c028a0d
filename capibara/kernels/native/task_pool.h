// Sharing one FFI call's tasks between the calling thread and XLA's intra-op pool:
// the helper of the native kernels whose work is a list of independent tasks
// (paged_attention.cc, quantized_decode.cc).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

namespace capibara::tasks {

inline void pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

// Runs `work->run()` on the calling thread and on up to `num_tasks - 1` pool tasks,
// then waits until `work->done` reaches `work->num_tasks`. `run()` claims tasks from
// an atomic counter, so a pool task that starts late finds nothing left and returns,
// and the caller never waits for a task that has not started (no deadlock when the
// pool is busy: the caller then does it all). `work` is shared with the pool tasks,
// which may still read it after the caller has returned.
template <class Pool, class Work>
void run_shared(Pool& pool, const std::shared_ptr<Work>& work) {
  const int64_t helpers =
      std::min<int64_t>(std::max<int64_t>(0, pool.num_threads()), work->num_tasks - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->run(); });
  work->run();
  while (work->done.load(std::memory_order_acquire) < work->num_tasks) pause();
}

}  // namespace capibara::tasks
