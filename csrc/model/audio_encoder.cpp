#include "model/audio_encoder.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "quant/quant.h"

namespace pg4 {

namespace {

std::invalid_argument error(const std::string& message) { return std::invalid_argument(message); }

std::string layer_prefix(int il) { return "a.blk." + std::to_string(il) + "."; }

}  // namespace

AudioEncoder::AudioEncoder(const std::string& path, const std::vector<TensorEntry>& tensors,
                           AudioEncoderConfig config, std::unique_ptr<Ops> ops)
    : config_(config), weights_(path, tensors), ops_(std::move(ops)) {
  weights_.place(*ops_);
  if (config_.n_layer < 1) throw error("the audio encoder needs at least one layer");
  if (config_.attention_context_left < 2) throw error("attention_context_left must be >= 2");
  input_projection_ = weights_.get("a.input_projection.weight");
  output_proj_ = weights_.get("a.pre_encode.out.weight");
  projection_ = weights_.get("mm.a.input_projection.weight");
  n_embd_ = static_cast<int>(input_projection_.rows());
  if (config_.n_head < 1 || n_embd_ % config_.n_head != 0) {
    throw error("the audio width " + std::to_string(n_embd_) + " does not split into " +
                std::to_string(config_.n_head) + " heads");
  }
  for (int i = 0; i < 2; ++i) {
    const std::string p = "a.conv1d." + std::to_string(i) + ".";
    const Weight w = weights_.get(p + "weight");
    const int in_ch = i == 0 ? 1 : conv_channels_[0];
    if (w.ne[0] != 3 || w.ne[1] != 3 || w.ne[2] != in_ch) {
      throw error("tensor '" + p + "weight' is not a 3x3 convolution of " + std::to_string(in_ch) +
                  " input channels");
    }
    conv_channels_[i] = static_cast<int>(w.ne[3]);
    conv_weight_[i] = values(p + "weight", w.count());
    conv_norm_[i] = values(p + "norm.weight", conv_channels_[i]);
  }
  // Two stride-2 convolutions quarter the mel axis; the projection reads what is left.
  const int64_t flat = input_projection_.cols();
  if (flat % conv_channels_[1] != 0) {
    throw error("a.input_projection.weight is not a multiple of the convolution channels wide");
  }
  if (config_.n_mel < 1 || n_tokens(config_.n_mel) * conv_channels_[1] != flat) {
    throw error("a.input_projection.weight reads " + std::to_string(flat) +
                " values, not what two convolutions leave of " + std::to_string(config_.n_mel) +
                " mel bins");
  }
  if (output_proj_.cols() != n_embd_ || projection_.cols() != output_proj_.rows()) {
    throw error("a.pre_encode.out.weight and mm.a.input_projection.weight do not chain");
  }
  output_bias_ = values("a.pre_encode.out.bias", output_proj_.rows());
  max_past_ = config_.attention_context_left - 2;

  const int head_dim = n_embd_ / config_.n_head;
  // Relative positions: sinusoids of each distance d at the position the attention's context
  // window gives it (d shifted by the half context minus the past horizon).
  const int past_horizon = config_.attention_context_left - 1;
  const int shift = (config_.attention_chunk_size + past_horizon) / 2 - past_horizon;
  const int half = n_embd_ / 2;
  const double increment = std::log(10000.0) / std::max(half - 1, 1);
  std::vector<float> sinusoids(static_cast<size_t>(max_past_ + 1) * n_embd_);
  for (int d = 0; d <= max_past_; ++d) {
    for (int i = 0; i < half; ++i) {
      const float angle = static_cast<float>(d + shift) * std::exp(-increment * i);
      sinusoids[static_cast<size_t>(d) * n_embd_ + i] = std::sin(angle);
      sinusoids[static_cast<size_t>(d) * n_embd_ + half + i] = std::cos(angle);
    }
  }
  auto positions = upload(sinusoids);
  const float q_scale = 1.0f / std::sqrt(static_cast<float>(head_dim)) / std::log(2.0f);

  for (int il = 0; il < config_.n_layer; ++il) {
    const std::string p = layer_prefix(il);
    Layer l;
    for (int s = 0; s < 2; ++s) {
      const std::string suffix = s == 0 ? "" : "_1";
      l.ffn_up[s] = clamped(p + "ffn_up" + suffix);
      l.ffn_down[s] = clamped(p + "ffn_down" + suffix);
      l.ffn_norm[s] = values(p + "ffn_norm" + suffix + ".weight", n_embd_);
      l.ffn_post_norm[s] = values(p + "ffn_post_norm" + suffix + ".weight", n_embd_);
    }
    n_ff_ = std::max(n_ff_, static_cast<int>(l.ffn_up[0].weight.rows()));
    l.q = clamped(p + "attn_q");
    l.k = clamped(p + "attn_k");
    l.v = clamped(p + "attn_v");
    l.out = clamped(p + "attn_out");
    l.conv_start = clamped(p + "conv_pw1");
    l.conv_end = clamped(p + "conv_pw2");
    if (l.conv_start.weight.rows() != 2 * n_embd_) {
      throw error("tensor '" + p + "conv_pw1.weight' is not twice the audio width");
    }
    l.attn_pre_norm = values(p + "attn_pre_norm.weight", n_embd_);
    l.attn_post_norm = values(p + "attn_post_norm.weight", n_embd_);
    l.conv_pre_norm = values(p + "conv_norm.weight", n_embd_);
    l.conv_post_norm = values(p + "norm_conv.weight", n_embd_);
    l.out_norm = values(p + "ln2.weight", n_embd_);
    const Weight dw = weights_.get(p + "conv_dw.weight");
    if (dw.ne[1] != n_embd_) throw error("tensor '" + p + "conv_dw.weight' is not depthwise");
    conv_kernel_ = static_cast<int>(dw.ne[0]);
    l.conv_dw = values(p + "conv_dw.weight", dw.count());
    // llama.cpp's converter stores per_dim_scale already through softplus.
    auto per_dim = values(p + "per_dim_scale.weight", head_dim);
    std::vector<float> scale(per_dim.get(), per_dim.get() + head_dim);
    for (float& s : scale) s *= q_scale;
    l.q_scale = upload(scale);
    const Weight rel = weights_.get(p + "attn_k_rel.weight");
    if (rel.cols() != n_embd_ || rel.rows() != n_embd_) {
      throw error("tensor '" + p + "attn_k_rel.weight' is not square in the audio width");
    }
    l.rel = ops_->alloc(static_cast<size_t>(max_past_ + 1) * n_embd_);
    ops_->matmul(rel, positions.get(), max_past_ + 1, l.rel.get());
    layers_.push_back(std::move(l));
  }
}

ClampedLinear AudioEncoder::clamped(const std::string& name) const {
  ClampedLinear l{weights_.get(name + ".weight"), clamp_bounds(weights_, name)};
  if (l.weight.cols() != n_embd_ && l.weight.rows() != n_embd_) {
    throw error("tensor '" + name + ".weight' does not touch the audio width");
  }
  return l;
}

std::shared_ptr<float> AudioEncoder::values(const std::string& name, int64_t count) const {
  const Weight w = weights_.get(name);
  if (w.count() != count) {
    throw error("tensor '" + name + "' has " + std::to_string(w.count()) + " values, not " +
                std::to_string(count));
  }
  std::vector<float> host(static_cast<size_t>(count));
  for (int64_t r = 0; r < count / w.cols(); ++r) {
    quant::dequantize_row(w.type, w.row(r), host.data() + r * w.cols(), w.cols());
  }
  return upload(host);
}

std::shared_ptr<float> AudioEncoder::upload(const std::vector<float>& host) const {
  auto memory = ops_->alloc(host.size());
  ops_->upload(memory.get(), host.data(), host.size() * sizeof(float));
  return memory;
}

void AudioEncoder::clip(float* x, size_t n) {
  ops_->clamp(x, -config_.gradient_clipping, config_.gradient_clipping, n);
}

void AudioEncoder::feed_forward(const Layer& layer, int which, float* x, int n, float* h, float* ff,
                                float* scratch) {
  const size_t size = static_cast<size_t>(n) * n_embd_;
  ops_->copy(h, x, size);
  clip(h, size);
  ops_->rms_norm(h, layer.ffn_norm[which].get(), n, n_embd_, config_.eps, h);
  layer.ffn_up[which].apply(*ops_, h, n, ff, scratch);
  ops_->silu(ff, static_cast<size_t>(n) * layer.ffn_up[which].weight.rows());
  layer.ffn_down[which].apply(*ops_, ff, n, h, scratch);
  clip(h, size);
  ops_->rms_norm(h, layer.ffn_post_norm[which].get(), n, n_embd_, config_.eps, h);
  ops_->scale(h, config_.residual_weight, size);
  ops_->add(x, h, size);
}

void AudioEncoder::attention(const Layer& layer, float* x, int n, float* h, float* q, float* k,
                             float* v, float* scratch) {
  const size_t size = static_cast<size_t>(n) * n_embd_;
  const int head_dim = n_embd_ / config_.n_head;
  ops_->copy(h, x, size);
  clip(h, size);
  ops_->rms_norm(h, layer.attn_pre_norm.get(), n, n_embd_, config_.eps, h);
  layer.q.apply(*ops_, h, n, q, scratch);
  layer.k.apply(*ops_, h, n, k, scratch);
  layer.v.apply(*ops_, h, n, v, scratch);
  ops_->mul_cols(q, layer.q_scale.get(), n * config_.n_head, head_dim);
  ops_->scale(k, std::log1p(std::exp(1.0f)) / std::log(2.0f), size);
  ops_->local_attention(q, k, v, layer.rel.get(), n, config_.n_head, head_dim, max_past_,
                        config_.attention_logit_cap, h);
  layer.out.apply(*ops_, h, n, q, scratch);
  clip(q, size);
  ops_->rms_norm_add(q, layer.attn_post_norm.get(), n, n_embd_, config_.eps, x);
}

void AudioEncoder::convolution(const Layer& layer, float* x, int n, float* h, float* wide,
                               float* scratch) {
  const size_t size = static_cast<size_t>(n) * n_embd_;
  ops_->rms_norm(x, layer.conv_pre_norm.get(), n, n_embd_, config_.eps, h);
  layer.conv_start.apply(*ops_, h, n, wide, scratch);
  ops_->glu(wide, n, n_embd_, h);
  ops_->depthwise_conv_causal(h, n, n_embd_, layer.conv_dw.get(), conv_kernel_, wide);
  clip(wide, size);
  ops_->rms_norm(wide, layer.conv_post_norm.get(), n, n_embd_, config_.eps, wide);
  ops_->silu(wide, size);
  layer.conv_end.apply(*ops_, wide, n, h, scratch);
  ops_->add(x, h, size);
}

std::vector<float> AudioEncoder::encode(const float* features, int n_frames) {
  if (n_frames < 1) throw error("no log-mel frames to encode");
  std::lock_guard<std::mutex> lock(encode_mutex_);
  // The two subsampling convolutions, each followed by a layer norm over channels and ReLU.
  int height = n_frames, width = config_.n_mel, channels = 1;
  auto x = ops_->alloc(static_cast<size_t>(height) * width);
  ops_->upload(x.get(), features, static_cast<size_t>(height) * width * sizeof(float));
  for (int i = 0; i < 2; ++i) {
    const int out_h = (height + 1) / 2, out_w = (width + 1) / 2;
    auto y = ops_->alloc(static_cast<size_t>(out_h) * out_w * conv_channels_[i]);
    ops_->conv2d_3x3_s2(x.get(), height, width, channels, conv_weight_[i].get(), conv_channels_[i],
                        y.get());
    ops_->layer_norm(y.get(), conv_norm_[i].get(), nullptr, out_h * out_w, conv_channels_[i],
                     config_.eps, y.get());
    ops_->relu(y.get(), static_cast<size_t>(out_h) * out_w * conv_channels_[i]);
    x = std::move(y);
    height = out_h;
    width = out_w;
    channels = conv_channels_[i];
  }
  const int n = height;
  const size_t size = static_cast<size_t>(n) * n_embd_;
  const size_t widest = static_cast<size_t>(n) *
                        std::max({n_ff_, 2 * n_embd_, static_cast<int>(input_projection_.cols()),
                                  static_cast<int>(output_proj_.rows())});
  auto hidden = ops_->alloc(size), h = ops_->alloc(size), q = ops_->alloc(size),
       k = ops_->alloc(size), v = ops_->alloc(size), wide = ops_->alloc(widest),
       scratch = ops_->alloc(widest);
  ops_->matmul(input_projection_, x.get(), n, hidden.get());
  for (const Layer& layer : layers_) {
    feed_forward(layer, 0, hidden.get(), n, h.get(), wide.get(), scratch.get());
    attention(layer, hidden.get(), n, h.get(), q.get(), k.get(), v.get(), scratch.get());
    convolution(layer, hidden.get(), n, h.get(), wide.get(), scratch.get());
    feed_forward(layer, 1, hidden.get(), n, h.get(), wide.get(), scratch.get());
    clip(hidden.get(), size);
    ops_->rms_norm(hidden.get(), layer.out_norm.get(), n, n_embd_, config_.eps, hidden.get());
  }
  // The encoder's output projection, then the embedder into the language model.
  const int out_dim = static_cast<int>(output_proj_.rows());
  ops_->matmul(output_proj_, hidden.get(), n, wide.get());
  ops_->add_cols(wide.get(), output_bias_.get(), n, out_dim);
  ops_->rms_norm(wide.get(), nullptr, n, out_dim, config_.eps, wide.get());
  const int dim = embedding_dim();
  auto out = ops_->alloc(static_cast<size_t>(n) * dim);
  ops_->matmul(projection_, wide.get(), n, out.get());
  std::vector<float> result(static_cast<size_t>(n) * dim);
  ops_->read(out.get(), result.size(), result.data());
  return result;
}

}  // namespace pg4
