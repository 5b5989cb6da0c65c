// The Gemma 4 text model: weights bound to the mapped GGUF, and one forward pass for any batch
// of (sequence slot, position, token), so prefill and decode are the same call.
#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "gguf/mapped_file.h"
#include "kv/kv_cache.h"
#include "model/config.h"
#include "ops/ops.h"

namespace pg4 {

// Where one tensor lies in the file (already validated by the Python loader).
struct TensorEntry {
  std::string name;
  int type_id = 0;
  std::vector<int64_t> shape;  // GGUF order, innermost first
  uint64_t offset = 0;
  uint64_t nbytes = 0;
};

struct ModelOptions {
  int n_ctx = 4096;   // positions per sequence
  int n_slots = 1;    // sequences held at once
  int n_batch = 256;  // most tokens in one forward call
};

class Gemma4Model {
 public:
  Gemma4Model(const std::string& path, const std::vector<TensorEntry>& tensors, ModelConfig config,
              ModelOptions options, std::unique_ptr<Ops> ops);

  const ModelConfig& config() const { return config_; }
  const ModelOptions& options() const { return options_; }
  const KvCache& cache() const { return cache_; }

  // Runs the batch; each slot's tokens must continue that slot at its current length, in
  // order. Returns logits [n_outputs, vocab] for the batch rows listed in output_rows.
  std::vector<float> forward(const std::vector<int32_t>& tokens,
                             const std::vector<int32_t>& positions,
                             const std::vector<int32_t>& slots,
                             const std::vector<int32_t>& output_rows);

  int length(int slot) const;
  void reset(int slot);  // forget a slot's tokens so it can start a new sequence

 private:
  struct LayerWeights {
    Weight attn_norm, wq, q_norm, wk, k_norm, wv, wo, post_attention_norm;
    Weight ffn_norm, ffn_gate, ffn_up, ffn_down, post_ffw_norm, output_scale;
    Weight moe_router, moe_router_scale, moe_gate_up, moe_down, moe_down_scale;
    Weight post_ffw_norm_1, pre_ffw_norm_2, post_ffw_norm_2;
    Weight ple_gate, ple_proj, ple_post_norm;
  };

  Weight tensor(const std::string& name, bool required = true) const;
  void validate_batch(const std::vector<int32_t>& tokens, const std::vector<int32_t>& positions,
                      const std::vector<int32_t>& slots,
                      const std::vector<int32_t>& output_rows) const;
  void run_layer(int il, const TokenBatch& batch);
  void per_layer_inputs(const TokenBatch& batch);

  ModelConfig config_;
  ModelOptions options_;
  MappedFile file_;
  std::unordered_map<std::string, Weight> weights_;
  std::unique_ptr<Ops> ops_;
  KvCache cache_;
  std::mutex forward_mutex_;  // one forward at a time: the scratch buffers are shared

  Weight token_embd_, output_, output_norm_, rope_freqs_;
  Weight ple_token_embd_, ple_model_proj_, ple_proj_norm_;
  std::vector<LayerWeights> layers_;

  // Scratch activations, sized for n_batch tokens.
  std::shared_ptr<float> x_, h_, h2_, q_, k_, v_, attn_, o_, gate_, up_, act_, ffn_, moe_;
  std::shared_ptr<float> ple_, ple_gate_, router_, logits_;
  std::vector<int32_t> expert_ids_;
  std::vector<float> expert_weights_;
};

}  // namespace pg4
