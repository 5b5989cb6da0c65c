#include "model/decoder_layer.h"

#include <algorithm>
#include <cmath>
#include <string>

namespace pg4 {

LayerWeights common_layer_weights(const WeightTable& table, int index) {
  const std::string p = "blk." + std::to_string(index) + ".";
  LayerWeights w;
  w.attn_norm = table.get(p + "attn_norm.weight");
  w.wq = table.get(p + "attn_q.weight");
  w.q_norm = table.get(p + "attn_q_norm.weight");
  w.wo = table.get(p + "attn_output.weight");
  w.post_attention_norm = table.get(p + "post_attention_norm.weight");
  w.ffn_norm = table.get(p + "ffn_norm.weight");
  w.ffn_gate = table.get(p + "ffn_gate.weight");
  w.ffn_up = table.get(p + "ffn_up.weight");
  w.ffn_down = table.get(p + "ffn_down.weight");
  w.post_ffw_norm = table.get(p + "post_ffw_norm.weight");
  w.output_scale = table.get(p + "layer_output_scale.weight", false);
  return w;
}

LayerActivations::LayerActivations(Ops& ops, const Sizes& s) {
  const size_t n = s.n;
  x = ops.alloc(n * s.embd);
  h = ops.alloc(n * s.embd);
  h2 = ops.alloc(n * s.embd);
  o = ops.alloc(n * s.embd);
  ffn = ops.alloc(n * s.embd);
  moe = ops.alloc(n * s.embd);
  q = ops.alloc(n * s.q);
  attn = ops.alloc(n * s.q);
  k = ops.alloc(n * s.kv);
  v = ops.alloc(n * s.kv);
  gate = ops.alloc(n * s.ff);
  up = ops.alloc(n * s.ff);
  act = ops.alloc(n * s.ff);
  router = ops.alloc(std::max<size_t>(1, n * s.n_expert));
  expert_ids = ops.alloc_ids(n * std::max(1, s.n_expert_used));
  expert_weights = ops.alloc(n * std::max(1, s.n_expert_used));
}

void attention_output(Ops& ops, const LayerConfig& layer, const LayerWeights& w,
                      const LayerActivations& a, const TokenBatch& batch, int window,
                      const KvPool& pool, int embd, float eps) {
  ops.attention(a.q.get(), batch, layer, window, pool, a.attn.get());
  ops.matmul(w.wo, a.attn.get(), batch.n, a.o.get());
  ops.rms_norm_add(a.o.get(), w.post_attention_norm.f32(), batch.n, embd, eps, a.x.get());
}

void feed_forward(Ops& ops, const LayerConfig& layer, const LayerWeights& w,
                  const LayerActivations& a, int n, int embd, float eps, int n_expert,
                  int n_expert_used) {
  float* x = a.x.get();
  float* h = a.h.get();
  float* ffn = a.ffn.get();
  ops.rms_norm(x, w.ffn_norm.f32(), n, embd, eps, h);
  const Product gate_up[] = {{&w.ffn_gate, a.gate.get()}, {&w.ffn_up, a.up.get()}};
  ops.matmul_shared(h, n, gate_up, 2);
  ops.gelu_mul(a.gate.get(), layer.n_ff, a.up.get(), layer.n_ff, n, layer.n_ff, a.act.get());
  ops.matmul(w.ffn_down, a.act.get(), n, ffn);
  if (layer.is_moe) {
    ops.rms_norm(ffn, w.post_ffw_norm_1.f32(), n, embd, eps, ffn);
    ops.rms_norm(x, w.pre_ffw_norm_2.f32(), n, embd, eps, a.h2.get());
    ops.rms_norm(x, w.moe_router_scale.f32(), n, embd, eps, h);
    ops.scale(h, 1.0f / std::sqrt(static_cast<float>(embd)), static_cast<size_t>(n) * embd);
    ops.matmul(w.moe_router, h, n, a.router.get());
    ops.moe_route(a.router.get(), n, n_expert, n_expert_used, a.expert_ids.get(),
                  a.expert_weights.get());
    ops.moe_experts(w.moe_gate_up, w.moe_down, w.moe_down_scale.f32(), a.h2.get(),
                    a.expert_ids.get(), a.expert_weights.get(), n, n_expert_used, a.moe.get());
    ops.rms_norm_add(a.moe.get(), w.post_ffw_norm_2.f32(), n, embd, eps, ffn);
  }
  ops.rms_norm_add(ffn, w.post_ffw_norm.f32(), n, embd, eps, x);
}

}  // namespace pg4
