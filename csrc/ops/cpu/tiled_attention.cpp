#include "ops/cpu/tiled_attention.h"

#include <algorithm>
#include <limits>

#include "ops/cpu/fast_exp.h"

namespace pg4 {

namespace {

// Partial maxima and sums run in this many independent lanes, which GCC keeps in one vector
// (a single running float would be a serial chain it may not reorder).
constexpr int kLanes = 16;

// Scales row[0, n) by `scale` and returns the largest result.
float scale_and_max(float* row, int n, float scale) {
  float lanes[kLanes];
  std::fill(lanes, lanes + kLanes, -std::numeric_limits<float>::infinity());
  int i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      row[i + l] *= scale;
      lanes[l] = std::max(lanes[l], row[i + l]);
    }
  }
  for (; i < n; ++i) {
    row[i] *= scale;
    lanes[0] = std::max(lanes[0], row[i]);
  }
  return *std::max_element(lanes, lanes + kLanes);
}

// Replaces row[0, n) by e^(row - max) and returns their sum.
float exp_and_sum(float* row, int n, float max) {
  float lanes[kLanes] = {};
  int i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      row[i + l] = fast_exp(row[i + l] - max);
      lanes[l] += row[i + l];
    }
  }
  for (; i < n; ++i) {
    row[i] = fast_exp(row[i] - max);
    lanes[0] += row[i];
  }
  float sum = 0.0f;
  for (float lane : lanes) sum += lane;
  return sum;
}

}  // namespace

int padded_keys(int n) { return (n + kPanelRows - 1) / kPanelRows * kPanelRows; }

void pack_key_panels(const float* k, size_t stride, int n, int head_dim, float* panels) {
  for (int p = 0; p < padded_keys(n); p += kPanelRows) {
    float* panel = panels + static_cast<size_t>(p) * head_dim;
    const int keys = std::min(kPanelRows, n - p);
    for (int d = 0; d < head_dim; ++d) {
      float* dst = panel + d * kPanelRows;
      for (int i = 0; i < keys; ++i) dst[i] = k[(p + i) * stride + d];
      std::fill(dst + keys, dst + kPanelRows, 0.0f);
    }
  }
}

size_t attention_scratch_floats(int n, int head_dim) {
  // The scores [query][key], the weights [key][query] and the queries [dim][query].
  return (2 * static_cast<size_t>(padded_keys(n)) + head_dim) * kPanelActs;
}

void attend_queries(PanelKernelFn kernel, const float* q, size_t q_stride, int n_queries,
                    const float* key_panels, const float* v, size_t v_stride, int n, int head_dim,
                    float scale, float* scratch, float* out, size_t out_stride) {
  const int n_pad = padded_keys(n);
  float* scores = scratch;
  float* weights = scores + static_cast<size_t>(n_pad) * kPanelActs;
  float* queries = weights + static_cast<size_t>(n_pad) * kPanelActs;
  for (int d = 0; d < head_dim; ++d) {
    for (int j = 0; j < n_queries; ++j) queries[d * kPanelActs + j] = q[j * q_stride + d];
  }
  for (int p = 0; p < n_pad; p += kPanelRows) {
    kernel(head_dim, key_panels + static_cast<size_t>(p) * head_dim, kPanelRows,
           std::min(kPanelRows, n - p), queries, n_queries, scores + p, n_pad, false);
  }
  for (int j = 0; j < n_queries; ++j) {
    float* row = scores + static_cast<size_t>(j) * n_pad;
    const float max = scale_and_max(row, n, scale);
    const float inv = 1.0f / exp_and_sum(row, n, max);
    for (int s = 0; s < n; ++s) weights[s * kPanelActs + j] = row[s] * inv;
  }
  for (int d = 0; d < head_dim; d += kPanelRows) {
    kernel(n, v + d, v_stride, std::min(kPanelRows, head_dim - d), weights, n_queries, out + d,
           out_stride, false);
  }
}

}  // namespace pg4
