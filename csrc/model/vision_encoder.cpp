#include "model/vision_encoder.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace pg4 {

namespace {

std::invalid_argument error(const std::string& message) { return std::invalid_argument(message); }

}  // namespace

VisionEncoder::VisionEncoder(const std::string& path, const std::vector<TensorEntry>& tensors,
                             VisionConfig config, std::unique_ptr<Ops> ops)
    : config_(config), weights_(path, tensors), ops_(std::move(ops)) {
  const VisionConfig& c = config_;
  if (c.n_embd < 1 || c.n_head < 1 || c.head_dim * c.n_head != c.n_embd || c.head_dim % 4 != 0 ||
      c.pooling < 1 || c.max_patches < c.pooling * c.pooling) {
    throw error("inconsistent vision configuration");
  }
  // Clamp ranges are read while the weights are host memory.
  for (int il = 0; il < c.n_layer; ++il) {
    const std::string p = "v.blk." + std::to_string(il) + ".";
    VisionLayerWeights lw;
    lw.wq.bounds = clamp_bounds(weights_, p + "attn_q");
    lw.wk.bounds = clamp_bounds(weights_, p + "attn_k");
    lw.wv.bounds = clamp_bounds(weights_, p + "attn_v");
    lw.wo.bounds = clamp_bounds(weights_, p + "attn_out");
    lw.gate.bounds = clamp_bounds(weights_, p + "ffn_gate");
    lw.up.bounds = clamp_bounds(weights_, p + "ffn_up");
    lw.down.bounds = clamp_bounds(weights_, p + "ffn_down");
    layers_.push_back(lw);
  }
  weights_.place(*ops_);
  patch_embd_ = weights_.get("v.patch_embd.weight");
  position_embd_ = weights_.get("v.position_embd.weight");
  projection_ = weights_.get("mm.input_projection.weight");
  for (int il = 0; il < c.n_layer; ++il) {
    const std::string p = "v.blk." + std::to_string(il) + ".";
    VisionLayerWeights& lw = layers_[il];
    lw.attn_norm = weights_.get(p + "ln1.weight");
    lw.q_norm = weights_.get(p + "attn_q_norm.weight");
    lw.k_norm = weights_.get(p + "attn_k_norm.weight");
    lw.attn_post_norm = weights_.get(p + "attn_post_norm.weight");
    lw.ffn_norm = weights_.get(p + "ln2.weight");
    lw.ffn_post_norm = weights_.get(p + "ffn_post_norm.weight");
    lw.wq.weight = weights_.get(p + "attn_q.weight");
    lw.wk.weight = weights_.get(p + "attn_k.weight");
    lw.wv.weight = weights_.get(p + "attn_v.weight");
    lw.wo.weight = weights_.get(p + "attn_out.weight");
    lw.gate.weight = weights_.get(p + "ffn_gate.weight");
    lw.up.weight = weights_.get(p + "ffn_up.weight");
    lw.down.weight = weights_.get(p + "ffn_down.weight");
  }
  const int patch_values = 3 * c.patch_size * c.patch_size;
  if (patch_embd_.cols() != patch_values || patch_embd_.rows() != c.n_embd ||
      position_embd_.cols() != c.n_embd || position_embd_.rows() != 2 * c.n_pos ||
      projection_.cols() != c.n_embd || projection_.rows() != c.projection_dim) {
    throw error("vision tensors do not match the configuration");
  }

  Ops::Limits limits;
  limits.n_batch = c.max_patches;
  limits.max_cols = std::max<int64_t>(weights_.max_cols(), patch_values);
  limits.max_heads = c.n_head;
  limits.max_head_dim = c.head_dim;
  ops_->reserve(limits);
  const size_t n = static_cast<size_t>(c.max_patches);
  const size_t widest = static_cast<size_t>(std::max({c.n_embd, c.n_ff, patch_values}));
  x_ = ops_->alloc(n * c.n_embd);
  h_ = ops_->alloc(n * widest);
  q_ = ops_->alloc(n * c.n_embd);
  k_ = ops_->alloc(n * c.n_embd);
  v_ = ops_->alloc(n * c.n_embd);
  attn_ = ops_->alloc(n * c.n_embd);
  gate_ = ops_->alloc(n * c.n_ff);
  up_ = ops_->alloc(n * c.n_ff);
  clamped_ = ops_->alloc(n * widest);
  const size_t n_out = n / (static_cast<size_t>(c.pooling) * c.pooling);
  pooled_ = ops_->alloc(n_out * c.n_embd);
  out_ = ops_->alloc(n_out * c.projection_dim);
  pos_x_ = ops_->alloc_ids(n);
  pos_y_ = ops_->alloc_ids(n);
}

void VisionEncoder::run_layer(const VisionLayerWeights& lw, int n) {
  const VisionConfig& c = config_;
  float* x = x_.get();
  float* h = h_.get();
  ops_->rms_norm(x, lw.attn_norm.f32(), n, c.n_embd, c.eps, h);
  lw.wq.apply(*ops_, h, n, q_.get(), clamped_.get());
  lw.wk.apply(*ops_, h, n, k_.get(), clamped_.get());
  lw.wv.apply(*ops_, h, n, v_.get(), clamped_.get());
  const int heads = n * c.n_head;
  ops_->rms_norm(q_.get(), lw.q_norm.f32(), heads, c.head_dim, c.eps, q_.get());
  ops_->rms_norm(k_.get(), lw.k_norm.f32(), heads, c.head_dim, c.eps, k_.get());
  ops_->rms_norm(v_.get(), nullptr, heads, c.head_dim, c.eps, v_.get());
  ops_->rope_2d(q_.get(), pos_x_.get(), pos_y_.get(), n, c.n_head, c.head_dim, c.rope_base);
  ops_->rope_2d(k_.get(), pos_x_.get(), pos_y_.get(), n, c.n_head, c.head_dim, c.rope_base);
  ops_->attention_dense(q_.get(), k_.get(), v_.get(), n, c.n_head, c.n_head, c.head_dim, 1.0f,
                        attn_.get());
  lw.wo.apply(*ops_, attn_.get(), n, h, clamped_.get());
  ops_->rms_norm_add(h, lw.attn_post_norm.f32(), n, c.n_embd, c.eps, x);

  ops_->rms_norm(x, lw.ffn_norm.f32(), n, c.n_embd, c.eps, h);
  lw.gate.apply(*ops_, h, n, gate_.get(), clamped_.get());
  lw.up.apply(*ops_, h, n, up_.get(), clamped_.get());
  ops_->gelu_mul(gate_.get(), c.n_ff, up_.get(), c.n_ff, n, c.n_ff, gate_.get());
  lw.down.apply(*ops_, gate_.get(), n, h, clamped_.get());
  ops_->rms_norm_add(h, lw.ffn_post_norm.f32(), n, c.n_embd, c.eps, x);
}

VisionEncoder::Output VisionEncoder::encode(const std::vector<float>& pixels, int grid_rows,
                                            int grid_cols) {
  const VisionConfig& c = config_;
  const int k = c.pooling;
  if (grid_rows < k || grid_cols < k || grid_rows % k != 0 || grid_cols % k != 0) {
    throw error("a patch grid of " + std::to_string(grid_rows) + "x" + std::to_string(grid_cols) +
                " is not a whole number of " + std::to_string(k) + "x" + std::to_string(k) +
                " pooling windows");
  }
  if (grid_rows > c.n_pos || grid_cols > c.n_pos) {
    throw error("a patch grid of " + std::to_string(grid_rows) + "x" + std::to_string(grid_cols) +
                " exceeds the position tables' " + std::to_string(c.n_pos) + " entries per side");
  }
  const int n = grid_rows * grid_cols;
  if (n > c.max_patches) {
    throw error(std::to_string(n) + " patches exceed the encoder's limit of " +
                std::to_string(c.max_patches));
  }
  const int p = c.patch_size;
  const int patch_values = 3 * p * p;
  if (pixels.size() != static_cast<size_t>(n) * patch_values) {
    throw error("expected " + std::to_string(n) + " patches of " + std::to_string(patch_values) +
                " values, got " + std::to_string(pixels.size()) + " values");
  }
  // The patch embedding's columns run over (channel, row, column); pixels come as (row, column,
  // channel). The tower sees each value as 2 (x - 0.5).
  std::vector<float> reordered(pixels.size());
  for (int t = 0; t < n; ++t) {
    const float* src = pixels.data() + static_cast<size_t>(t) * patch_values;
    float* dst = reordered.data() + static_cast<size_t>(t) * patch_values;
    for (int y = 0; y < p; ++y) {
      for (int x = 0; x < p; ++x) {
        for (int ch = 0; ch < 3; ++ch) {
          dst[(ch * p + y) * p + x] = 2.0f * (src[(y * p + x) * 3 + ch] - 0.5f);
        }
      }
    }
  }
  std::vector<int32_t> xs(n), ys(n), table_rows(2 * static_cast<size_t>(n));
  for (int t = 0; t < n; ++t) {
    xs[t] = t % grid_cols;
    ys[t] = t / grid_cols;
    table_rows[t] = xs[t];
    table_rows[n + t] = c.n_pos + ys[t];
  }

  std::lock_guard<std::mutex> lock(mutex_);
  float* x = x_.get();
  ops_->upload(clamped_.get(), reordered.data(), reordered.size() * sizeof(float));
  ops_->matmul(patch_embd_, clamped_.get(), n, x);
  // Position rows: the x table's then the y table's, gathered into q_/k_ as scratch.
  ops_->upload(pos_x_.get(), table_rows.data(), static_cast<size_t>(n) * sizeof(int32_t));
  ops_->upload(pos_y_.get(), table_rows.data() + n, static_cast<size_t>(n) * sizeof(int32_t));
  ops_->get_rows(position_embd_, pos_x_.get(), n, 1.0f, q_.get());
  ops_->get_rows(position_embd_, pos_y_.get(), n, 1.0f, k_.get());
  ops_->add(x, q_.get(), static_cast<size_t>(n) * c.n_embd);
  ops_->add(x, k_.get(), static_cast<size_t>(n) * c.n_embd);
  ops_->upload(pos_x_.get(), xs.data(), static_cast<size_t>(n) * sizeof(int32_t));
  ops_->upload(pos_y_.get(), ys.data(), static_cast<size_t>(n) * sizeof(int32_t));

  for (const VisionLayerWeights& lw : layers_) run_layer(lw, n);

  const int n_out = n / (k * k);
  ops_->avg_pool_2d(x, grid_rows, grid_cols, c.n_embd, k, pooled_.get());
  ops_->scale(pooled_.get(), std::sqrt(static_cast<float>(c.n_embd)),
              static_cast<size_t>(n_out) * c.n_embd);
  Output result;
  result.pooled.resize(static_cast<size_t>(n_out) * c.n_embd);
  ops_->read(pooled_.get(), result.pooled.size(), result.pooled.data());
  ops_->rms_norm(pooled_.get(), nullptr, n_out, c.n_embd, c.eps, h_.get());
  ops_->matmul(projection_, h_.get(), n_out, out_.get());
  result.embeddings.resize(static_cast<size_t>(n_out) * c.projection_dim);
  ops_->read(out_.get(), result.embeddings.size(), result.embeddings.data());
  return result;
}

}  // namespace pg4
