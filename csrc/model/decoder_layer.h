// The parts of a Gemma 4 decoder layer that the target model and the assistant drafter share:
// their weights, the activations they compute in, the attention output and the feed-forward
// block. Each model projects its own queries (and the target its keys and values).
#pragma once

#include <memory>

#include "kv/kv_pool.h"
#include "model/config.h"
#include "model/weights.h"
#include "ops/ops.h"

namespace pg4 {

struct LayerWeights {
  Weight attn_norm, wq, q_norm, wk, k_norm, wv, wo, post_attention_norm;
  Weight ffn_norm, ffn_gate, ffn_up, ffn_down, post_ffw_norm, output_scale;
  Weight moe_router, moe_router_scale, moe_gate_up, moe_down, moe_down_scale;
  Weight post_ffw_norm_1, pre_ffw_norm_2, post_ffw_norm_2;
  Weight ple_gate, ple_proj, ple_post_norm;
  float output_scale_value = 1.0f;  // read from the file: the model multiplies by it on the host
};

// The weights of layer `index` that every Gemma 4 layer has: norms, queries, attention output,
// dense MLP and the optional output scale.
LayerWeights common_layer_weights(const WeightTable& table, int index);

// Scratch activations of a batch of up to n rows.
struct LayerActivations {
  struct Sizes {
    size_t n = 1, embd = 1, q = 1, kv = 1, ff = 1;  // row widths: residual, queries, K/V, MLP
    int n_expert = 0, n_expert_used = 0;
  };
  LayerActivations(Ops& ops, const Sizes& sizes);

  std::shared_ptr<float> x, h, h2, q, k, v, attn, o, gate, up, act, ffn, moe;
  std::shared_ptr<float> router, expert_weights;
  std::shared_ptr<int32_t> expert_ids;
};

// The rotation of a layer's queries and keys.
inline Rope layer_rope(const LayerConfig& layer, const Weight& rope_freqs) {
  return Rope{layer.n_rot, layer.rope_base, layer.is_sliding ? nullptr : rope_freqs.f32()};
}

// x += post_attention_norm(wo · attention(q)), for queries in a.q already normalised and rotated;
// attention reads the KV of layer.kv_source as Ops::attention does.
void attention_output(Ops& ops, const LayerConfig& layer, const LayerWeights& w,
                      const LayerActivations& a, const TokenBatch& batch, int window,
                      const KvPool& pool, int embd, float eps);

// x += the feed-forward block of x: the GELU-gated MLP, plus the expert mixture on MoE layers.
void feed_forward(Ops& ops, const LayerConfig& layer, const LayerWeights& w,
                  const LayerActivations& a, int n, int embd, float eps, int n_expert,
                  int n_expert_used);

}  // namespace pg4
