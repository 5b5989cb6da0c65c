// A fixed set of worker threads that stay alive between operations; the caller takes part.
//
// A decode step is hundreds of short operations, so workers spin for a while on the job
// counter before they sleep: handing out a job then costs an atomic store, not a wake-up.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace pg4 {

class ThreadPool {
 public:
  explicit ThreadPool(int n_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // Runs fn(begin, end, thread_index) over [0, n) in chunks of `grain`, on every thread;
  // returns when all chunks are done. Not reentrant: one caller at a time.
  void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t, int)>& fn);

 private:
  void worker_loop(int thread_index);
  void run_chunks(int thread_index);

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_;
  const std::function<void(int64_t, int64_t, int)>* job_ = nullptr;
  int64_t job_n_ = 0;
  int64_t job_grain_ = 1;
  std::atomic<int64_t> next_{0};
  std::atomic<uint64_t> generation_{0};  // bumped once per job
  std::atomic<int> pending_{0};          // workers still on the current job
  std::atomic<int> sleeping_{0};         // workers blocked on wake_
  std::atomic<bool> stop_{false};
};

}  // namespace pg4
