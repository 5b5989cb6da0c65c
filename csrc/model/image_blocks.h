// The image input of Gemma 4's unified (12B-style) models: no encoder, each soft token is one
// block of raw pixels, normalised, embedded with a learned 2-D position and projected into the
// language model.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "model/weights.h"
#include "ops/ops.h"

namespace pg4 {

class ImageBlockProjector {
 public:
  // The projector of an mmproj file's v.patch_norm.*, v.patch_embd.*, v.position_embd.weight
  // (given as [width, 2 * positions]: the column table, then the row table) and
  // mm.input_projection.weight, computing with `ops`; `eps` is the final RMS norm's.
  ImageBlockProjector(const std::string& path, const std::vector<TensorEntry>& tensors, float eps,
                      std::unique_ptr<Ops> ops);

  int block_values() const { return static_cast<int>(patch_embd_.cols()); }
  int width() const { return static_cast<int>(patch_embd_.rows()); }
  int positions() const { return static_cast<int>(position_table_.rows()) / 2; }
  int embedding_dim() const { return static_cast<int>(projection_.rows()); }

  // The embeddings [n_blocks][embedding_dim] of blocks [n_blocks][block_values] (each block's
  // values in the file's channel, row, column order) at (column, row) positions [n_blocks][2].
  std::vector<float> embed(const float* blocks, const int32_t* positions, int n_blocks);

 private:
  const float* vector(const std::string& name, int64_t count) const;

  WeightTable weights_;
  std::unique_ptr<Ops> ops_;
  float eps_;
  Weight patch_embd_, position_table_, projection_;
  const float *ln1_w_, *ln1_b_, *patch_bias_, *ln2_w_, *ln2_b_, *ln3_w_, *ln3_b_;
  std::mutex embed_mutex_;
};

}  // namespace pg4
