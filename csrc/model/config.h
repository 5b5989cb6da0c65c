// Gemma 4 hyper-parameters, derived and validated from GGUF metadata on the Python side.
#pragma once

#include <cstdint>
#include <vector>

namespace pg4 {

struct LayerConfig {
  int index = 0;
  bool is_sliding = false;
  int n_head = 0;
  int n_head_kv = 0;
  int head_dim = 0;
  int n_rot = 0;
  float rope_base = 10000.0f;
  int n_ff = 0;
  bool has_kv = true;
  int kv_source = 0;  // layer whose K/V this layer attends to (itself unless KV is shared)
  bool has_v_proj = true;
  bool is_moe = false;
};

struct ModelConfig {
  int n_layer = 0;
  int n_embd = 0;
  int vocab_size = 0;
  int n_ctx_train = 0;
  float rms_eps = 1e-6f;
  float final_logit_softcap = 0.0f;
  int sliding_window = 0;
  int n_embd_per_layer = 0;
  int n_expert = 0;
  int n_expert_used = 0;
  int n_ff_expert = 0;
  bool has_output = false;
  std::vector<LayerConfig> layers;
};

}  // namespace pg4
