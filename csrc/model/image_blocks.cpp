#include "model/image_blocks.h"

#include <stdexcept>

namespace pg4 {

namespace {

// The projector's three LayerNorms are torch's defaults, whose epsilon the file does not store.
constexpr float kLayerNormEps = 1e-5f;

}  // namespace

ImageBlockProjector::ImageBlockProjector(const std::string& path,
                                         const std::vector<TensorEntry>& tensors, float eps,
                                         std::unique_ptr<Ops> ops)
    : weights_(path, tensors), ops_(std::move(ops)), eps_(eps) {
  weights_.place(*ops_);
  patch_embd_ = weights_.get("v.patch_embd.weight");
  position_table_ = weights_.get("v.position_embd.weight");
  projection_ = weights_.get("mm.input_projection.weight");
  if (position_table_.cols() != width() || position_table_.rows() % 2 != 0) {
    throw std::invalid_argument("tensor 'v.position_embd.weight' is not [width, 2 * positions]");
  }
  if (projection_.cols() != width()) {
    throw std::invalid_argument("tensor 'mm.input_projection.weight' does not read the width " +
                                std::to_string(width()));
  }
  ln1_w_ = vector("v.patch_norm.1.weight", block_values());
  ln1_b_ = vector("v.patch_norm.1.bias", block_values());
  patch_bias_ = vector("v.patch_embd.bias", width());
  ln2_w_ = vector("v.patch_norm.2.weight", width());
  ln2_b_ = vector("v.patch_norm.2.bias", width());
  ln3_w_ = vector("v.patch_norm.3.weight", width());
  ln3_b_ = vector("v.patch_norm.3.bias", width());
}

const float* ImageBlockProjector::vector(const std::string& name, int64_t count) const {
  const Weight w = weights_.get(name);
  if (w.type != quant::Type::F32 || w.count() != count) {
    throw std::invalid_argument("tensor '" + name + "' is not F32 of " + std::to_string(count) +
                                " values");
  }
  return w.f32();
}

std::vector<float> ImageBlockProjector::embed(const float* blocks, const int32_t* positions,
                                              int n_blocks) {
  if (n_blocks < 1) throw std::invalid_argument("no image blocks to embed");
  std::vector<int32_t> ids(2 * static_cast<size_t>(n_blocks));
  for (int i = 0; i < n_blocks; ++i) {
    const int32_t column = positions[2 * i], row = positions[2 * i + 1];
    if (column < 0 || column >= this->positions() || row < 0 || row >= this->positions()) {
      throw std::invalid_argument("image block position (" + std::to_string(column) + ", " +
                                  std::to_string(row) + ") is outside the position tables (" +
                                  std::to_string(this->positions()) + " per axis)");
    }
    ids[i] = column;
    ids[n_blocks + i] = this->positions() + row;
  }
  std::lock_guard<std::mutex> lock(embed_mutex_);
  const int n = n_blocks, e = width();
  const size_t in_size = static_cast<size_t>(n) * block_values();
  auto x = ops_->alloc(in_size), h = ops_->alloc(static_cast<size_t>(n) * e),
       position = ops_->alloc(static_cast<size_t>(n) * e),
       y = ops_->alloc(static_cast<size_t>(n) * embedding_dim());
  auto table_ids = ops_->alloc_ids(ids.size());
  ops_->upload(x.get(), blocks, in_size * sizeof(float));
  ops_->upload(table_ids.get(), ids.data(), ids.size() * sizeof(int32_t));
  ops_->layer_norm(x.get(), ln1_w_, ln1_b_, n, block_values(), kLayerNormEps, x.get());
  ops_->matmul(patch_embd_, x.get(), n, h.get());
  ops_->add_cols(h.get(), patch_bias_, n, e);
  ops_->layer_norm(h.get(), ln2_w_, ln2_b_, n, e, kLayerNormEps, h.get());
  for (int axis = 0; axis < 2; ++axis) {
    ops_->get_rows(position_table_, table_ids.get() + static_cast<size_t>(axis) * n, n, 1.0f,
                   position.get());
    ops_->add(h.get(), position.get(), static_cast<size_t>(n) * e);
  }
  ops_->layer_norm(h.get(), ln3_w_, ln3_b_, n, e, kLayerNormEps, h.get());
  ops_->rms_norm(h.get(), nullptr, n, e, eps_, h.get());
  ops_->matmul(projection_, h.get(), n, y.get());
  std::vector<float> result(static_cast<size_t>(n) * embedding_dim());
  ops_->read(y.get(), result.size(), result.data());
  return result;
}

}  // namespace pg4
