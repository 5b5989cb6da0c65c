// The audio input of Gemma 4's unified (12B-style) models: no encoder, each soft token is one
// frame of raw samples, normalised (RMS, no scale) and projected into the language model.
#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "model/weights.h"
#include "ops/ops.h"

namespace pg4 {

class AudioFrameProjector {
 public:
  // The projector of an mmproj file's mm.a.input_projection.weight, computing with `ops`.
  AudioFrameProjector(const std::string& path, const std::vector<TensorEntry>& tensors, float eps,
                      std::unique_ptr<Ops> ops);

  int frame_samples() const { return static_cast<int>(projection_.cols()); }
  int embedding_dim() const { return static_cast<int>(projection_.rows()); }

  // The embeddings [n_frames][embedding_dim] of frames [n_frames][frame_samples].
  std::vector<float> embed(const float* frames, int n_frames);

 private:
  WeightTable weights_;
  std::unique_ptr<Ops> ops_;
  float eps_;
  Weight projection_;
  std::mutex embed_mutex_;
};

}  // namespace pg4
