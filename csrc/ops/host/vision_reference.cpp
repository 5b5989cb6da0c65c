#include "ops/host/vision_reference.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace pg4::host {

void clamp(float* x, float lo, float hi, size_t n) {
  for (size_t i = 0; i < n; ++i) x[i] = std::min(std::max(x[i], lo), hi);
}

void attention_row(const float* q, const float* k, const float* v, int n_tokens, size_t stride,
                   int head_dim, float scale, float* scores, float* out) {
  float max_score = -std::numeric_limits<float>::infinity();
  for (int s = 0; s < n_tokens; ++s) {
    const float* key = k + s * stride;
    float dot = 0.0f;
    for (int d = 0; d < head_dim; ++d) dot += q[d] * key[d];
    scores[s] = dot * scale;
    max_score = std::max(max_score, scores[s]);
  }
  double total = 0.0;
  for (int s = 0; s < n_tokens; ++s) {
    scores[s] = std::exp(scores[s] - max_score);
    total += scores[s];
  }
  const float inv = static_cast<float>(1.0 / total);
  std::fill(out, out + head_dim, 0.0f);
  for (int s = 0; s < n_tokens; ++s) {
    const float* value = v + s * stride;
    const float w = scores[s] * inv;
    for (int d = 0; d < head_dim; ++d) out[d] += w * value[d];
  }
}

void avg_pool_2d(const float* x, int rows, int cols, int dim, int k, float* out) {
  const int out_cols = cols / k;
  const float inv = 1.0f / static_cast<float>(k * k);
  for (int r = 0; r < rows / k; ++r) {
    for (int c = 0; c < out_cols; ++c) {
      float* dst = out + (static_cast<size_t>(r) * out_cols + c) * dim;
      std::fill(dst, dst + dim, 0.0f);
      for (int dr = 0; dr < k; ++dr) {
        for (int dc = 0; dc < k; ++dc) {
          const float* src = x + (static_cast<size_t>(r * k + dr) * cols + c * k + dc) * dim;
          for (int d = 0; d < dim; ++d) dst[d] += src[d];
        }
      }
      for (int d = 0; d < dim; ++d) dst[d] *= inv;
    }
  }
}

}  // namespace pg4::host
