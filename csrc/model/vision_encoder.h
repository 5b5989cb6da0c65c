// Gemma 4's vision tower (the `gemma4v` projector of an mmproj file): pixel patches to the rows
// of embeddings that replace an image's soft tokens in the text model. A bias-free patch
// embedding plus learned 2-D position tables, bidirectional transformer layers with 2-D RoPE
// and clamped linears, k×k average pooling, then a scale-free RMSNorm and the projection into
// the text model's width.
#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "model/clamped_linear.h"
#include "model/weights.h"
#include "ops/ops.h"

namespace pg4 {

struct VisionConfig {
  int n_embd = 0;
  int n_ff = 0;
  int n_layer = 0;
  int n_head = 0;
  int head_dim = 0;
  int patch_size = 0;
  int n_pos = 0;    // position-table entries per axis
  int pooling = 0;  // k: k×k patches per soft token
  float eps = 1e-6f;
  float rope_base = 100.0f;
  int projection_dim = 0;
  int max_patches = 0;  // the largest image one call takes (sizes the scratch)
};

struct VisionLayerWeights {
  Weight attn_norm, q_norm, k_norm, attn_post_norm, ffn_norm, ffn_post_norm;
  ClampedLinear wq, wk, wv, wo, gate, up, down;
};

class VisionEncoder {
 public:
  VisionEncoder(const std::string& path, const std::vector<TensorEntry>& tensors,
                VisionConfig config, std::unique_ptr<Ops> ops);

  const VisionConfig& config() const { return config_; }

  struct Output {
    std::vector<float> pooled;      // [soft tokens, n_embd]: the tower's output
    std::vector<float> embeddings;  // [soft tokens, projection_dim]: into the text model
  };
  // The image whose grid_rows × grid_cols patches are `pixels` (row-major over the grid, each
  // patch patch_size² × 3 values in [0, 1] in (row, column, channel) order). The grid's sides
  // must be multiples of the pooling size and within the position tables (std::invalid_argument
  // otherwise).
  Output encode(const std::vector<float>& pixels, int grid_rows, int grid_cols);

 private:
  void run_layer(const VisionLayerWeights& lw, int n);

  VisionConfig config_;
  WeightTable weights_;
  std::unique_ptr<Ops> ops_;
  std::mutex mutex_;  // one image at a time: the scratch buffers are shared
  Weight patch_embd_, position_embd_, projection_;
  std::vector<VisionLayerWeights> layers_;
  std::shared_ptr<float> x_, h_, q_, k_, v_, attn_, gate_, up_, clamped_, pooled_, out_;
  std::shared_ptr<int32_t> pos_x_, pos_y_;
};

}  // namespace pg4
