// The operations the Gemma 4 forward pass is written against. A backend (CPU, CUDA) implements
// them over memory it owns; the model never touches activations directly. The fused operations
// at the end have default definitions in terms of the primitives, which a backend overrides
// where fusing saves passes over memory or kernel launches.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/weight.h"
#include "gguf/mapped_file.h"
#include "kv/kv_pool.h"
#include "model/config.h"

namespace pg4 {

// The tokens of one forward step: row i is token tokens[i] at position positions[i] of the call's
// sequence seqs[i]; sequence s keeps its full-attention KV in the blocks of its block table
// block_tables[s * table_width ...] and its sliding KV in ring set ring_sets[s]. The logits of
// rows output_rows[0 .. n_outputs) are wanted. Where span_first is not null, row i belongs to
// the span of positions span_first[i] .. span_last[i] of its sequence (both its own position
// for a row in none): the soft tokens of one image, which attend to each other in both
// directions (Gemma 4's unified models); a span lies wholly in one call. The arrays live where
// the backend computes (see Ops::stage).
struct TokenBatch {
  int n = 0;
  const int32_t* tokens = nullptr;
  const int32_t* positions = nullptr;
  const int32_t* seqs = nullptr;
  int n_seq = 0;
  int table_width = 0;
  const int32_t* block_tables = nullptr;
  const int32_t* ring_sets = nullptr;
  int n_outputs = 0;
  const int32_t* output_rows = nullptr;
  const int32_t* span_first = nullptr;
  const int32_t* span_last = nullptr;

  const int32_t* table(int seq) const {
    return block_tables + static_cast<size_t>(seq) * table_width;
  }
};

// One tensor of the model file and whether it must stay in host memory (a table of gigabytes
// of which each step reads a few rows).
struct WeightPlacement {
  Weight* weight;
  bool host_resident;
};

// The rotation of one attention input: NEOX rotation of the first n_rot dims of each head,
// frequencies base^(-2i/n_rot), divided by freq_factors[i] when given.
struct Rope {
  int n_rot = 0;
  float base = 10000.0f;
  const float* freq_factors = nullptr;
};

// One of several products of the same input: y = weight · x (see Ops::matmul_shared).
struct Product {
  const Weight* weight;
  float* y;
};

// The row length of the products' shared input: every weight's width (0 for no products).
// Throws std::invalid_argument when the widths differ.
inline int64_t shared_input_width(const Product* products, int n_products) {
  const int64_t cols = n_products > 0 ? products[0].weight->cols() : 0;
  for (int i = 1; i < n_products; ++i) {
    if (products[i].weight->cols() != cols) {
      throw std::invalid_argument("products of one input need weights of one width, not " +
                                  std::to_string(cols) + " and " +
                                  std::to_string(products[i].weight->cols()));
    }
  }
  return cols;
}

// The keys row i of a batch attends to: positions [first, last] of its sequence. Causal, the
// last `window` positions when window > 0; a row in a span also sees every position of it,
// before and after, however far (its window does not apply inside the span: transformers'
// unified Gemma 4 ORs the span onto the sliding mask). The union stays one range, since the
// span holds the row's own position.
struct AttendedRange {
  int first;
  int last;
};
inline AttendedRange attended_range(const TokenBatch& batch, int i, int window) {
  const int pos = batch.positions[i];
  AttendedRange range{window > 0 ? std::max(0, pos - window + 1) : 0, pos};
  if (batch.span_first != nullptr) {
    range.first = std::min(range.first, batch.span_first[i]);
    range.last = std::max(range.last, batch.span_last[i]);
  }
  return range;
}

class Ops {
 public:
  virtual ~Ops() = default;

  // The device the backend computes on (-1 for host memory); a KV pool must live there.
  virtual int device() const { return -1; }

  // Makes the model's weights readable where the backend computes, rewriting each Weight's data
  // pointer. They point into `file` (outliving the ops), or into other host memory when it is
  // null.
  virtual void place_weights(const std::vector<WeightPlacement>& weights, const MappedFile* file) {}
  // The largest shapes the model will ask for, so that a backend can take its scratch memory up
  // front (a captured step may not allocate).
  struct Limits {
    int n_batch = 1;
    int64_t max_cols = 1;  // widest matmul input
    int max_heads = 1;     // most query heads of a layer
    int max_head_dim = 1;
    int n_expert_used = 0;
    int64_t n_ff_expert = 0;
  };
  virtual void reserve(const Limits& limits) {}

  // Activation memory of n floats / n ids, owned by the backend.
  virtual std::shared_ptr<float> alloc(size_t n) = 0;
  virtual std::shared_ptr<int32_t> alloc_ids(size_t n) = 0;

  // The batch with its arrays copied to where the backend computes (valid until the next call).
  virtual TokenBatch stage(const TokenBatch& host) { return host; }
  // Runs the step `body` (everything between stage and reading the results), which depends on
  // the host only through `shape`: a backend may record it once per shape and replay it.
  virtual void run_step(const std::vector<int64_t>& shape, const std::function<void()>& body) {
    body();
  }

  // y[t * w.rows() + r] = dot(row r of w, x[t * w.cols() ...]) for t < n_tokens.
  virtual void matmul(const Weight& w, const float* x, int n_tokens, float* y) = 0;
  // out[i] = row ids[i] of table, dequantized, times scale.
  virtual void get_rows(const Weight& table, const int32_t* ids, int n, float scale,
                        float* out) = 0;
  // out = x / rms(x) (* weight when given), per row of dim values; out may alias x.
  virtual void rms_norm(const float* x, const float* weight, int n_rows, int dim, float eps,
                        float* out) = 0;
  // The rotation `rope` of each of the n_head heads of every token, at its position.
  virtual void rope_neox(float* x, const int32_t* positions, int n_tokens, int n_head, int head_dim,
                         const Rope& rope) = 0;
  // out[r][c] = gelu_tanh(gate[r * gate_stride + c]) * up[r * up_stride + c].
  virtual void gelu_mul(const float* gate, int gate_stride, const float* up, int up_stride,
                        int n_rows, int n_cols, float* out) = 0;
  virtual void add(float* x, const float* y, size_t n) = 0;
  virtual void scale(float* x, float s, size_t n) = 0;
  // x = cap * tanh(x / cap)
  virtual void softcap(float* x, float cap, size_t n) = 0;
  virtual void copy(float* dst, const float* src, size_t n) = 0;
  // Copies `bytes` of host memory into backend memory.
  virtual void upload(void* dst, const void* host_src, size_t bytes) = 0;
  // Brings n floats / ids of backend memory to the host.
  virtual void read(const float* src, size_t n, float* host_dst) = 0;
  virtual void read_ids(const int32_t* src, size_t n, int32_t* host_dst) = 0;
  virtual void copy_rows(const float* src, const int32_t* rows, int n_rows, int dim,
                         float* dst) = 0;
  // ids[r] = the index of the largest of row r's n_cols values (the first, on ties), and
  // logprobs[r] its log-probability under the softmax of the row.
  virtual void argmax(const float* x, int n_rows, int n_cols, int32_t* ids, float* logprobs) = 0;

  // Stores the batch's keys and values ([n, n_head_kv * head_dim] each) into the pool.
  virtual void write_kv(const float* k, const float* v, const TokenBatch& batch, int layer,
                        KvPool& pool) = 0;
  // Attention of each batch token over its own sequence's stored keys, scale 1, grouped-query
  // heads: causal (the last `window` positions when window > 0), and over the whole of the
  // token's span where the batch has spans (see attended_range).
  virtual void attention(const float* q, const TokenBatch& batch, const LayerConfig& layer,
                         int window, const KvPool& pool, float* out) = 0;
  // Whether `attention` takes batches with spans (a backend that does not is never given one).
  virtual bool attends_spans() const { return false; }

  // Softmax over each row of router logits, the top k experts, their weights renormalised.
  virtual void moe_route(const float* logits, int n_tokens, int n_expert, int k,
                         int32_t* expert_ids, float* expert_weights) = 0;
  // out[t] = sum over chosen experts e of weight * down_scale[e] *
  //          down_e(gelu(gate_e x) * up_e x), with gate and up stacked in gate_up.
  virtual void moe_experts(const Weight& gate_up, const Weight& down, const float* down_scale,
                           const float* x, const int32_t* expert_ids, const float* expert_weights,
                           int n_tokens, int k, float* out) = 0;

  // out[r] = a[r] followed by b[r], for n rows of a_dim and b_dim values.
  virtual void concat_rows(const float* a, int a_dim, const float* b, int b_dim, int n,
                           float* out) {
    const size_t width = static_cast<size_t>(a_dim) + b_dim;
    for (int r = 0; r < n; ++r) {
      copy(out + r * width, a + static_cast<size_t>(r) * a_dim, a_dim);
      copy(out + r * width + a_dim, b + static_cast<size_t>(r) * b_dim, b_dim);
    }
  }

  // The centroid-masked output head of the Gemma 4 assistant drafters. Row r of x (n rows of
  // table.cols() values) scores the tokens of the top_k clusters with the highest scores in
  // row r of `scores` (n_clusters values; the lower index first on ties), cluster c being the
  // cluster_size token ids in row c of `clusters`: logits[r][t] = dot(row t of table, x[r])
  // for those tokens, and the lowest of them minus 1 for every other of the table.rows().
  // The default scores every token with matmul and masks on the host.
  virtual void clustered_logits(const Weight& table, const float* x, int n, const float* scores,
                                int n_clusters, int top_k, const int32_t* clusters,
                                int cluster_size, float* logits);

  // Operations of the audio encoder (a Conformer over log-mel frames), on row-major [rows, dim]
  // activations. A backend without them refuses the encoder (see audio_unsupported).

  // out[r] = (x[r] - mean) / sqrt(var + eps) * weight (+ bias where given), per row of dim.
  virtual void layer_norm(const float* x, const float* weight, const float* bias, int n_rows,
                          int dim, float eps, float* out) {
    audio_unsupported("layer_norm");
  }
  // A 3x3 convolution with stride 2 and zero padding 1 on both axes, no bias: x is
  // [height][width][in_ch], weight [out_ch][in_ch][3][3] (PyTorch's order), out
  // [(height + 1) / 2][(width + 1) / 2][out_ch].
  virtual void conv2d_3x3_s2(const float* x, int height, int width, int in_ch, const float* weight,
                             int out_ch, float* out) {
    audio_unsupported("conv2d_3x3_s2");
  }
  // out[t][c] = sum over i < kernel of x[t - kernel + 1 + i][c] * weight[c][i] (x zero before
  // row 0): a causal depthwise convolution over n rows of channels values.
  virtual void depthwise_conv_causal(const float* x, int n, int channels, const float* weight,
                                     int kernel, float* out) {
    audio_unsupported("depthwise_conv_causal");
  }
  // out[r][i] = x[r][i] * sigmoid(x[r][dim + i]): the gated linear unit of rows of 2 * dim.
  virtual void glu(const float* x, int n_rows, int dim, float* out) { audio_unsupported("glu"); }
  // x = x * sigmoid(x), element-wise.
  virtual void silu(float* x, size_t n) { audio_unsupported("silu"); }
  // x = max(x, 0), element-wise.
  virtual void relu(float* x, size_t n) { audio_unsupported("relu"); }
  // x[r][i] *= s[i] for n_rows rows of dim (a per-column scale; also the bias-free half of an
  // affine map).
  virtual void mul_cols(float* x, const float* s, int n_rows, int dim) {
    audio_unsupported("mul_cols");
  }
  // x[r][i] += b[i] for n_rows rows of dim.
  virtual void add_cols(float* x, const float* b, int n_rows, int dim) {
    audio_unsupported("add_cols");
  }
  // Local attention with relative positions over one sequence of n rows of n_head * head_dim:
  // query t sees keys t - max_past .. t (those that exist); the logit of key j is
  // q_t · (k_j + rel[t - j]) (rel: max_past + 1 rows of n_head * head_dim, by distance), capped
  // as cap * tanh(logit / cap); out[t] = the softmax-weighted sum of the v_j.
  virtual void local_attention(const float* q, const float* k, const float* v, const float* rel,
                               int n, int n_head, int head_dim, int max_past, float cap,
                               float* out) {
    audio_unsupported("local_attention");
  }

  // Vision-tower operations. The defaults compute on the host (reading the inputs back and
  // uploading the result), so every backend has them; a backend overrides what it runs often.

  // x = min(max(x, lo), hi), element-wise.
  virtual void clamp(float* x, float lo, float hi, size_t n);
  // Every token attends to every token of the call (no mask): for each of the n_head query
  // heads, out = softmax(scale * q k^T) v over the n_tokens keys and values of its KV head
  // (grouped-query); q and out are [n_tokens, n_head * head_dim], k and v
  // [n_tokens, n_head_kv * head_dim].
  virtual void attention_dense(const float* q, const float* k, const float* v, int n_tokens,
                               int n_head, int n_head_kv, int head_dim, float scale, float* out);
  // The mean of each k×k block of a grid of rows×cols vectors of dim values (row-major, rows
  // and cols multiples of k) into a (rows/k)×(cols/k) grid, row-major.
  virtual void avg_pool_2d(const float* x, int rows, int cols, int dim, int k, float* out);
  // 2-D rotation of each head: its first half rotated (NEOX, base^(-4i/head_dim)) by pos_x, its
  // second half by pos_y.
  virtual void rope_2d(float* x, const int32_t* pos_x, const int32_t* pos_y, int n_tokens,
                       int n_head, int head_dim, float base) {
    const int half = head_dim / 2;
    const Rope rope{half, base, nullptr};
    rope_neox(x, pos_x, n_tokens, n_head, head_dim, rope);
    rope_neox(x + half, pos_y, n_tokens, n_head, head_dim, rope);
  }

  // Fused operations.

  // Each of the n_products products of x with weights of x's width, as matmul computes them
  // (no y may overlap x): a backend converts x for them once.
  virtual void matmul_shared(const float* x, int n_tokens, const Product* products,
                             int n_products) {
    for (int i = 0; i < n_products; ++i) matmul(*products[i].weight, x, n_tokens, products[i].y);
  }

  // x += rms_norm(y) * weight, per row of dim values (y may be overwritten).
  virtual void rms_norm_add(float* y, const float* weight, int n_rows, int dim, float eps,
                            float* x) {
    rms_norm(y, weight, n_rows, dim, eps, y);
    add(x, y, static_cast<size_t>(n_rows) * dim);
  }
  // Each head of x normalised (times weight) then rotated, in place.
  virtual void rms_norm_rope(float* x, const float* weight, const int32_t* positions, int n_tokens,
                             int n_head, int head_dim, float eps, const Rope& rope) {
    rms_norm(x, weight, n_tokens * n_head, head_dim, eps, x);
    rope_neox(x, positions, n_tokens, n_head, head_dim, rope);
  }
  // The keys normalised (times k_weight) and rotated, the values normalised, both stored in the
  // pool; k and v may be overwritten.
  virtual void store_kv(float* k, float* v, const float* k_weight, float eps, const Rope& rope,
                        const TokenBatch& batch, const LayerConfig& layer, KvPool& pool) {
    const int rows = batch.n * layer.n_head_kv;
    rms_norm(k, k_weight, rows, layer.head_dim, eps, k);
    rms_norm(v, nullptr, rows, layer.head_dim, eps, v);
    rope_neox(k, batch.positions, batch.n, layer.n_head_kv, layer.head_dim, rope);
    write_kv(k, v, batch, layer.index, pool);
  }

 protected:
  [[noreturn]] void audio_unsupported(const char* op) const {
    throw std::runtime_error(std::string("the audio encoder's operation ") + op +
                             " is not implemented on this backend; encode audio on the CPU");
  }
};

}  // namespace pg4
