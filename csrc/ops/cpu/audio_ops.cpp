// The CPU backend's operations of the audio encoder: plain loops split over rows.
#include <algorithm>
#include <cmath>
#include <vector>

#include "ops/cpu/cpu_ops.h"

namespace pg4 {

void CpuOps::layer_norm(const float* x, const float* weight, const float* bias, int n_rows, int dim,
                        float eps, float* out) {
  pool_.parallel_for(n_rows, 16, [&](int64_t begin, int64_t end, int) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = x + r * dim;
      float* y = out + r * dim;
      double sum = 0.0;
      for (int i = 0; i < dim; ++i) sum += row[i];
      const float mean = static_cast<float>(sum / dim);
      double squares = 0.0;
      for (int i = 0; i < dim; ++i) squares += double(row[i] - mean) * (row[i] - mean);
      const float inv = 1.0f / std::sqrt(static_cast<float>(squares / dim) + eps);
      for (int i = 0; i < dim; ++i) {
        y[i] = (row[i] - mean) * inv * weight[i] + (bias != nullptr ? bias[i] : 0.0f);
      }
    }
  });
}

void CpuOps::conv2d_3x3_s2(const float* x, int height, int width, int in_ch, const float* weight,
                           int out_ch, float* out) {
  const int out_h = (height + 1) / 2, out_w = (width + 1) / 2;
  // The weights as [ky][kx][in][out], so that the innermost loop runs over outputs.
  std::vector<float> w(static_cast<size_t>(9) * in_ch * out_ch);
  for (int o = 0; o < out_ch; ++o) {
    for (int c = 0; c < in_ch; ++c) {
      for (int tap = 0; tap < 9; ++tap) {
        w[(static_cast<size_t>(tap) * in_ch + c) * out_ch + o] =
            weight[(static_cast<size_t>(o) * in_ch + c) * 9 + tap];
      }
    }
  }
  pool_.parallel_for(static_cast<int64_t>(out_h) * out_w, 4, [&](int64_t begin, int64_t end, int) {
    for (int64_t cell = begin; cell < end; ++cell) {
      const int oy = static_cast<int>(cell / out_w), ox = static_cast<int>(cell % out_w);
      float* y = out + cell * out_ch;
      std::fill(y, y + out_ch, 0.0f);
      for (int ky = 0; ky < 3; ++ky) {
        const int iy = 2 * oy - 1 + ky;
        if (iy < 0 || iy >= height) continue;
        for (int kx = 0; kx < 3; ++kx) {
          const int ix = 2 * ox - 1 + kx;
          if (ix < 0 || ix >= width) continue;
          const float* in = x + (static_cast<size_t>(iy) * width + ix) * in_ch;
          const float* wt = w.data() + static_cast<size_t>(ky * 3 + kx) * in_ch * out_ch;
          for (int c = 0; c < in_ch; ++c) {
            const float value = in[c];
            const float* wc = wt + static_cast<size_t>(c) * out_ch;
            for (int o = 0; o < out_ch; ++o) y[o] += value * wc[o];
          }
        }
      }
    }
  });
}

void CpuOps::depthwise_conv_causal(const float* x, int n, int channels, const float* weight,
                                   int kernel, float* out) {
  pool_.parallel_for(n, 8, [&](int64_t begin, int64_t end, int) {
    for (int64_t t = begin; t < end; ++t) {
      float* y = out + t * channels;
      for (int c = 0; c < channels; ++c) {
        float sum = 0.0f;
        for (int i = 0; i < kernel; ++i) {
          const int64_t src = t - kernel + 1 + i;
          if (src >= 0) sum += x[src * channels + c] * weight[static_cast<size_t>(c) * kernel + i];
        }
        y[c] = sum;
      }
    }
  });
}

void CpuOps::glu(const float* x, int n_rows, int dim, float* out) {
  pool_.parallel_for(n_rows, 16, [&](int64_t begin, int64_t end, int) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = x + r * 2 * dim;
      for (int i = 0; i < dim; ++i) {
        out[r * dim + i] = row[i] / (1.0f + std::exp(-row[dim + i]));
      }
    }
  });
}

void CpuOps::silu(float* x, size_t n) {
  for (size_t i = 0; i < n; ++i) x[i] = x[i] / (1.0f + std::exp(-x[i]));
}

void CpuOps::relu(float* x, size_t n) {
  for (size_t i = 0; i < n; ++i) x[i] = std::max(x[i], 0.0f);
}

void CpuOps::mul_cols(float* x, const float* s, int n_rows, int dim) {
  for (int64_t r = 0; r < n_rows; ++r) {
    for (int i = 0; i < dim; ++i) x[r * dim + i] *= s[i];
  }
}

void CpuOps::add_cols(float* x, const float* b, int n_rows, int dim) {
  for (int64_t r = 0; r < n_rows; ++r) {
    for (int i = 0; i < dim; ++i) x[r * dim + i] += b[i];
  }
}

void CpuOps::local_attention(const float* q, const float* k, const float* v, const float* rel,
                             int n, int n_head, int head_dim, int max_past, float cap, float* out) {
  const int64_t width = static_cast<int64_t>(n_head) * head_dim;
  pool_.parallel_for(static_cast<int64_t>(n) * n_head, 4, [&](int64_t begin, int64_t end, int) {
    std::vector<float> weights(max_past + 1);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / n_head;
      const int h = static_cast<int>(item % n_head);
      const float* qt = q + t * width + h * head_dim;
      const int64_t first = std::max<int64_t>(0, t - max_past);
      float top = -INFINITY;
      for (int64_t j = first; j <= t; ++j) {
        const float* kj = k + j * width + h * head_dim;
        const float* rj = rel + (t - j) * width + h * head_dim;
        float logit = 0.0f;
        for (int i = 0; i < head_dim; ++i) logit += qt[i] * (kj[i] + rj[i]);
        logit = cap * std::tanh(logit / cap);
        weights[j - first] = logit;
        top = std::max(top, logit);
      }
      float total = 0.0f;
      for (int64_t j = first; j <= t; ++j) {
        weights[j - first] = std::exp(weights[j - first] - top);
        total += weights[j - first];
      }
      float* y = out + t * width + h * head_dim;
      std::fill(y, y + head_dim, 0.0f);
      for (int64_t j = first; j <= t; ++j) {
        const float w = weights[j - first] / total;
        const float* vj = v + j * width + h * head_dim;
        for (int i = 0; i < head_dim; ++i) y[i] += w * vj[i];
      }
    }
  });
}

}  // namespace pg4
