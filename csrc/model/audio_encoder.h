// Gemma 4's audio encoder (a Conformer over log-mel frames) and the projection of its output
// into the language model: one soft token per 40 ms of audio.
#pragma once

#include <cmath>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "model/clamped_linear.h"
#include "model/weights.h"
#include "ops/ops.h"

namespace pg4 {

// The encoder's hyperparameters that the tensors do not carry (Gemma 4's values by default).
struct AudioEncoderConfig {
  int n_mel = 128;
  int n_layer = 0;
  int n_head = 0;
  float eps = 1e-6f;
  // Local attention: each frame sees itself and the context_left - 2 frames before it.
  int attention_context_left = 13;
  int attention_chunk_size = 12;
  float attention_logit_cap = 50.0f;
  // The half-step feed-forward blocks add this fraction of their output.
  float residual_weight = 0.5f;
  // Activations are clamped to +-gradient_clipping around the norms.
  float gradient_clipping = 1e10f;
};

class AudioEncoder {
 public:
  // The encoder of an mmproj file's `a.*` and `mm.a.*` tensors, computing with `ops`; throws
  // std::invalid_argument naming a missing or misshapen tensor.
  AudioEncoder(const std::string& path, const std::vector<TensorEntry>& tensors,
               AudioEncoderConfig config, std::unique_ptr<Ops> ops);

  int n_mel() const { return config_.n_mel; }
  int embedding_dim() const { return static_cast<int>(projection_.rows()); }
  // Soft tokens from n_frames log-mel frames: ceil(ceil(n_frames / 2) / 2).
  static int n_tokens(int n_frames) { return ((n_frames + 1) / 2 + 1) / 2; }

  // The embeddings [n_tokens(n_frames)][embedding_dim] of log-mel frames [n_frames][n_mel]
  // (one call at a time: the backend's scratch is shared).
  std::vector<float> encode(const float* features, int n_frames);

 private:
  struct Layer {
    ClampedLinear ffn_up[2], ffn_down[2], q, k, v, out, conv_start, conv_end;
    std::shared_ptr<float> ffn_norm[2], ffn_post_norm[2], attn_pre_norm, attn_post_norm,
        conv_pre_norm, conv_dw, conv_post_norm, out_norm, q_scale, rel;
  };

  ClampedLinear clamped(const std::string& name) const;
  // The tensor `name` as F32 values where the ops compute; `count` checks its size.
  std::shared_ptr<float> values(const std::string& name, int64_t count) const;
  std::shared_ptr<float> upload(const std::vector<float>& host) const;
  void clip(float* x, size_t n);
  void feed_forward(const Layer& layer, int which, float* x, int n, float* h, float* ff,
                    float* scratch);
  void attention(const Layer& layer, float* x, int n, float* h, float* q, float* k, float* v,
                 float* scratch);
  void convolution(const Layer& layer, float* x, int n, float* h, float* wide, float* scratch);

  AudioEncoderConfig config_;
  WeightTable weights_;
  std::unique_ptr<Ops> ops_;
  int n_embd_ = 0, n_ff_ = 0, conv_kernel_ = 0, max_past_ = 0;
  int conv_channels_[2] = {0, 0};
  std::shared_ptr<float> conv_weight_[2], conv_norm_[2];
  Weight input_projection_, output_proj_, projection_;
  std::shared_ptr<float> output_bias_;
  std::vector<Layer> layers_;
  std::mutex encode_mutex_;
};

}  // namespace pg4
