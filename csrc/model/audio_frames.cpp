#include "model/audio_frames.h"

#include <stdexcept>

namespace pg4 {

AudioFrameProjector::AudioFrameProjector(const std::string& path,
                                         const std::vector<TensorEntry>& tensors, float eps,
                                         std::unique_ptr<Ops> ops)
    : weights_(path, tensors), ops_(std::move(ops)), eps_(eps) {
  weights_.place(*ops_);
  projection_ = weights_.get("mm.a.input_projection.weight");
}

std::vector<float> AudioFrameProjector::embed(const float* frames, int n_frames) {
  if (n_frames < 1) throw std::invalid_argument("no audio frames to embed");
  std::lock_guard<std::mutex> lock(embed_mutex_);
  const size_t in_size = static_cast<size_t>(n_frames) * frame_samples();
  const size_t out_size = static_cast<size_t>(n_frames) * embedding_dim();
  auto x = ops_->alloc(in_size), y = ops_->alloc(out_size);
  ops_->upload(x.get(), frames, in_size * sizeof(float));
  ops_->rms_norm(x.get(), nullptr, n_frames, frame_samples(), eps_, x.get());
  ops_->matmul(projection_, x.get(), n_frames, y.get());
  std::vector<float> result(out_size);
  ops_->read(y.get(), out_size, result.data());
  return result;
}

}  // namespace pg4
