// The CPU backend's vision-tower operations: the host references spread over the thread pool,
// and dense attention as tiled products (cpu/tiled_attention.h).
#include <algorithm>
#include <vector>

#include "ops/cpu/cpu_ops.h"
#include "ops/cpu/tiled_attention.h"
#include "ops/host/vision_reference.h"

namespace pg4 {

namespace {

constexpr int64_t kClampGrain = 16384;
// Groups of queries handed to a thread at once.
constexpr int64_t kAttentionGrain = 4;

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
  const size_t panels_per_head = static_cast<size_t>(padded_keys(n_tokens)) * head_dim;
  const size_t values_per_head = static_cast<size_t>(n_tokens) * head_dim;
  std::vector<float> key_panels(panels_per_head * n_head_kv);
  // Each head's values gathered too, so that P V streams them contiguously rather than a few
  // cache lines from every row of v.
  std::vector<float> values(values_per_head * n_head_kv);
  pool_.parallel_for(n_head_kv, 1, [&](int64_t begin, int64_t end, int) {
    for (int64_t h = begin; h < end; ++h) {
      pack_key_panels(k + h * head_dim, kv_width, n_tokens, head_dim,
                      key_panels.data() + h * panels_per_head);
      for (int s = 0; s < n_tokens; ++s) {
        std::copy_n(v + s * kv_width + h * head_dim, head_dim,
                    values.data() + h * values_per_head + static_cast<size_t>(s) * head_dim);
      }
    }
  });
  // Work items of kPanelActs queries of one head, a head's items in a row so that its key
  // panels stay in cache between them.
  const PanelKernelFn kernel = panel_kernel(isa_);
  const size_t per_thread = attention_scratch_floats(n_tokens, head_dim);
  std::vector<float> scratch(static_cast<size_t>(pool_.size()) * per_thread);
  const int64_t query_groups = (n_tokens + kPanelActs - 1) / kPanelActs;
  pool_.parallel_for(
      query_groups * n_head, kAttentionGrain, [&](int64_t begin, int64_t end, int thread) {
        float* own = scratch.data() + static_cast<size_t>(thread) * per_thread;
        for (int64_t i = begin; i < end; ++i) {
          const int h = static_cast<int>(i / query_groups);
          const int t = static_cast<int>(i % query_groups) * kPanelActs;
          attend_queries(kernel, q + t * q_width + h * head_dim, q_width,
                         std::min(kPanelActs, n_tokens - t),
                         key_panels.data() + (h / group) * panels_per_head,
                         values.data() + (h / group) * values_per_head, head_dim, n_tokens,
                         head_dim, scale, own, out + t * q_width + h * head_dim, q_width);
        }
      });
}

void CpuOps::avg_pool_2d(const float* x, int rows, int cols, int dim, int k, float* out) {
  host::avg_pool_2d(x, rows, cols, dim, k, out);
}

}  // namespace pg4
