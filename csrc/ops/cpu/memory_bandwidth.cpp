#include "ops/cpu/memory_bandwidth.h"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <vector>

#include "ops/cpu/thread_pool.h"

namespace pg4 {

namespace {

// The sum of n words, in eight independent lanes so that the loop streams rather than waits on
// one chain of additions (the compiler makes them vector lanes).
uint64_t sum_words(const uint64_t* p, size_t n) {
  uint64_t lanes[8] = {};
  for (size_t i = 0; i + 8 <= n; i += 8) {
    for (int l = 0; l < 8; ++l) lanes[l] += p[i + l];
  }
  uint64_t total = 0;
  for (uint64_t lane : lanes) total += lane;
  return total;
}

}  // namespace

double memory_read_bandwidth(int threads, size_t bytes, int passes) {
  if (threads < 1 || passes < 1 || bytes < (1u << 20)) {
    throw std::invalid_argument("memory_read_bandwidth needs threads >= 1, passes >= 1 and 1 MiB");
  }
  ThreadPool pool(threads);
  const size_t words = bytes / sizeof(uint64_t);
  std::unique_ptr<uint64_t[]> buffer(new uint64_t[words]);
  const int64_t band = static_cast<int64_t>((words + threads - 1) / threads);
  std::vector<uint64_t> sums(threads);
  // Each thread writes its own band first, so its pages are its own and faulted in.
  pool.parallel_for(static_cast<int64_t>(words), band, [&](int64_t begin, int64_t end, int) {
    std::fill(buffer.get() + begin, buffer.get() + end, static_cast<uint64_t>(begin));
  });
  double best = 0.0;
  for (int pass = 0; pass < passes; ++pass) {
    const auto start = std::chrono::steady_clock::now();
    pool.parallel_for(static_cast<int64_t>(words), band, [&](int64_t begin, int64_t end, int t) {
      sums[t] += sum_words(buffer.get() + begin, static_cast<size_t>(end - begin));
    });
    const std::chrono::duration<double> taken = std::chrono::steady_clock::now() - start;
    best = std::max(best, static_cast<double>(words * sizeof(uint64_t)) / taken.count());
  }
  // The sums are used, so the reads cannot be optimised away.
  volatile uint64_t sink = 0;
  for (uint64_t s : sums) sink = sink + s;
  return best;
}

}  // namespace pg4
