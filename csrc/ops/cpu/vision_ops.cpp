// The CPU backend's vision-tower operations: the host references, spread over the thread pool.
#include <algorithm>
#include <vector>

#include "ops/cpu/cpu_ops.h"
#include "ops/host/vision_reference.h"

namespace pg4 {

namespace {

constexpr int64_t kClampGrain = 16384;

}  // namespace

void CpuOps::clamp(float* x, float lo, float hi, size_t n) {
  pool_.parallel_for(static_cast<int64_t>(n), kClampGrain, [&](int64_t b, int64_t e, int) {
    host::clamp(x + b, lo, hi, static_cast<size_t>(e - b));
  });
}

void CpuOps::attention_dense(const float* q, const float* k, const float* v, int n_tokens,
                             int n_head, int n_head_kv, int head_dim, float scale, float* out) {
  const size_t q_width = static_cast<size_t>(n_head) * head_dim;
  const size_t kv_width = static_cast<size_t>(n_head_kv) * head_dim;
  const int group = n_head / n_head_kv;
  // One score row per thread, taken from the pool's count of threads.
  std::vector<float> scores(static_cast<size_t>(pool_.size()) * n_tokens);
  const int64_t rows = static_cast<int64_t>(n_tokens) * n_head;
  pool_.parallel_for(rows, 1, [&](int64_t begin, int64_t end, int thread) {
    float* row_scores = scores.data() + static_cast<size_t>(thread) * n_tokens;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = i / n_head;
      const int h = static_cast<int>(i % n_head);
      const size_t kv_offset = static_cast<size_t>(h / group) * head_dim;
      host::attention_row(q + t * q_width + h * head_dim, k + kv_offset, v + kv_offset, n_tokens,
                          kv_width, head_dim, scale, row_scores, out + t * q_width + h * head_dim);
    }
  });
}

void CpuOps::avg_pool_2d(const float* x, int rows, int cols, int dim, int k, float* out) {
  host::avg_pool_2d(x, rows, cols, dim, k, out);
}

}  // namespace pg4
