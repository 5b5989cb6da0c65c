// The host defaults of the vision-tower operations of Ops.
#include <vector>

#include "ops/host/vision_reference.h"
#include "ops/ops.h"

namespace pg4 {

void Ops::clamp(float* x, float lo, float hi, size_t n) {
  std::vector<float> host_x(n);
  read(x, n, host_x.data());
  host::clamp(host_x.data(), lo, hi, n);
  upload(x, host_x.data(), n * sizeof(float));
}

void Ops::attention_dense(const float* q, const float* k, const float* v, int n_tokens, int n_head,
                          int n_head_kv, int head_dim, float scale, float* out) {
  const size_t q_width = static_cast<size_t>(n_head) * head_dim;
  const size_t kv_width = static_cast<size_t>(n_head_kv) * head_dim;
  std::vector<float> hq(n_tokens * q_width), hk(n_tokens * kv_width), hv(n_tokens * kv_width);
  std::vector<float> ho(n_tokens * q_width), scores(n_tokens);
  read(q, hq.size(), hq.data());
  read(k, hk.size(), hk.data());
  read(v, hv.size(), hv.data());
  const int group = n_head / n_head_kv;
  for (int t = 0; t < n_tokens; ++t) {
    for (int h = 0; h < n_head; ++h) {
      const size_t kv_offset = static_cast<size_t>(h / group) * head_dim;
      host::attention_row(hq.data() + t * q_width + h * head_dim, hk.data() + kv_offset,
                          hv.data() + kv_offset, n_tokens, kv_width, head_dim, scale, scores.data(),
                          ho.data() + t * q_width + h * head_dim);
    }
  }
  upload(out, ho.data(), ho.size() * sizeof(float));
}

void Ops::avg_pool_2d(const float* x, int rows, int cols, int dim, int k, float* out) {
  const size_t n_in = static_cast<size_t>(rows) * cols * dim;
  const size_t n_out = n_in / (static_cast<size_t>(k) * k);
  std::vector<float> hx(n_in), ho(n_out);
  read(x, n_in, hx.data());
  host::avg_pool_2d(hx.data(), rows, cols, dim, k, ho.data());
  upload(out, ho.data(), n_out * sizeof(float));
}

}  // namespace pg4
