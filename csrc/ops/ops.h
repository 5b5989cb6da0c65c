// The operations the Gemma 4 forward pass is written against. A backend (CPU now, CUDA later)
// implements them over memory it owns; the model never touches activations directly.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "common/weight.h"
#include "kv/kv_pool.h"
#include "model/config.h"

namespace pg4 {

// The tokens of one forward step: row i is token tokens[i] at position positions[i] of the call's
// sequence seqs[i]; sequence s keeps its full-attention KV in the blocks of its block table
// block_tables[s * table_width ...] and its sliding KV in ring set ring_sets[s].
struct TokenBatch {
  int n = 0;
  const int32_t* tokens = nullptr;
  const int32_t* positions = nullptr;
  const int32_t* seqs = nullptr;
  int table_width = 0;
  const int32_t* block_tables = nullptr;
  const int32_t* ring_sets = nullptr;

  const int32_t* table(int seq) const {
    return block_tables + static_cast<size_t>(seq) * table_width;
  }
};

class Ops {
 public:
  virtual ~Ops() = default;

  // Activation memory of n floats, owned by the backend.
  virtual std::shared_ptr<float> alloc(size_t n) = 0;

  // y[t * w.rows() + r] = dot(row r of w, x[t * w.cols() ...]) for t < n_tokens.
  virtual void matmul(const Weight& w, const float* x, int n_tokens, float* y) = 0;
  // out[i] = row ids[i] of table, dequantized, times scale.
  virtual void get_rows(const Weight& table, const int32_t* ids, int n, float scale,
                        float* out) = 0;
  // out = x / rms(x) (* weight when given), per row of dim values; out may alias x.
  virtual void rms_norm(const float* x, const float* weight, int n_rows, int dim, float eps,
                        float* out) = 0;
  // NEOX rotation of the first n_rot dims of each head; freq_factors divide the frequencies.
  virtual void rope_neox(float* x, const int32_t* positions, int n_tokens, int n_head, int head_dim,
                         int n_rot, float base, const float* freq_factors) = 0;
  // out[r][c] = gelu_tanh(gate[r * gate_stride + c]) * up[r * up_stride + c].
  virtual void gelu_mul(const float* gate, int gate_stride, const float* up, int up_stride,
                        int n_rows, int n_cols, float* out) = 0;
  virtual void add(float* x, const float* y, size_t n) = 0;
  virtual void scale(float* x, float s, size_t n) = 0;
  // x = cap * tanh(x / cap)
  virtual void softcap(float* x, float cap, size_t n) = 0;
  virtual void copy(float* dst, const float* src, size_t n) = 0;
  // Brings n floats of backend memory to the host.
  virtual void read(const float* src, size_t n, float* host_dst) = 0;
  virtual void copy_rows(const float* src, const int32_t* rows, int n_rows, int dim,
                         float* dst) = 0;

  // Stores the batch's keys and values ([n, n_head_kv * head_dim] each) into the pool.
  virtual void write_kv(const float* k, const float* v, const TokenBatch& batch, int layer,
                        KvPool& pool) = 0;
  // Causal attention of each batch token over its own sequence's stored keys (the last
  // `window` positions when window > 0), scale 1, grouped-query heads.
  virtual void attention(const float* q, const TokenBatch& batch, const LayerConfig& layer,
                         int window, const KvPool& pool, float* out) = 0;

  // Softmax over each row of router logits, the top k experts, their weights renormalised.
  virtual void moe_route(const float* logits, int n_tokens, int n_expert, int k,
                         int32_t* expert_ids, float* expert_weights) = 0;
  // out[t] = sum over chosen experts e of weight * down_scale[e] *
  //          down_e(gelu(gate_e x) * up_e x), with gate and up stacked in gate_up.
  virtual void moe_experts(const Weight& gate_up, const Weight& down, const float* down_scale,
                           const float* x, const int32_t* expert_ids, const float* expert_weights,
                           int n_tokens, int k, float* out) = 0;
};

}  // namespace pg4
