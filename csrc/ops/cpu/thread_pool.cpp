#include "ops/cpu/thread_pool.h"

#include <algorithm>
#include <chrono>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define PG4_CPU_RELAX() _mm_pause()
#else
#define PG4_CPU_RELAX() std::this_thread::yield()
#endif

namespace pg4 {

namespace {
// How long an idle worker keeps spinning before it sleeps: long enough to bridge the gaps
// between the operations of one forward step, short enough not to burn a core when idle.
constexpr auto kSpinTime = std::chrono::microseconds(2000);
}  // namespace

ThreadPool::ThreadPool(int n_threads) {
  for (int i = 1; i < std::max(1, n_threads); ++i) {
    workers_.emplace_back([this, i] { worker_loop(i); });
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_.store(true);
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::run_chunks(int thread_index) {
  for (;;) {
    const int64_t begin = next_.fetch_add(job_grain_);
    if (begin >= job_n_) return;
    (*job_)(begin, std::min(job_n_, begin + job_grain_), thread_index);
  }
}

void ThreadPool::worker_loop(int thread_index) {
  uint64_t seen = 0;
  for (;;) {
    const auto spin_until = std::chrono::steady_clock::now() + kSpinTime;
    int spins = 0;
    while (generation_.load(std::memory_order_acquire) == seen && !stop_.load()) {
      PG4_CPU_RELAX();
      if (++spins % 1024 == 0 && std::chrono::steady_clock::now() > spin_until) {
        std::unique_lock<std::mutex> lock(mutex_);
        sleeping_.fetch_add(1);
        wake_.wait(lock, [&] { return stop_.load() || generation_.load() != seen; });
        sleeping_.fetch_sub(1);
        break;
      }
    }
    if (stop_.load()) return;
    seen = generation_.load(std::memory_order_acquire);
    run_chunks(thread_index);
    pending_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

void ThreadPool::parallel_for(int64_t n, int64_t grain,
                              const std::function<void(int64_t, int64_t, int)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  if (workers_.empty() || n <= grain) {
    fn(0, n, 0);
    return;
  }
  job_ = &fn;
  job_n_ = n;
  job_grain_ = grain;
  next_.store(0);
  pending_.store(static_cast<int>(workers_.size()));
  {
    // Publishing under the lock pairs with the sleepers' predicate check: none can miss it.
    std::lock_guard<std::mutex> lock(mutex_);
    generation_.fetch_add(1, std::memory_order_acq_rel);
  }
  if (sleeping_.load() > 0) wake_.notify_all();
  run_chunks(0);
  while (pending_.load(std::memory_order_acquire) != 0) PG4_CPU_RELAX();
  job_ = nullptr;
}

}  // namespace pg4
