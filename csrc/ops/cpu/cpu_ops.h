// The CPU backend: every op over host memory, split across a persistent thread pool.
#pragma once

#include <memory>
#include <vector>

#include "ops/cpu/thread_pool.h"
#include "ops/ops.h"
#include "quant/float_tiles.h"
#include "quant/quant.h"

namespace pg4 {

class CpuOps final : public Ops {
 public:
  // Computes with n_threads threads and the kernels of `isa` (or the next narrower set that has
  // one for a type).
  CpuOps(int n_threads, quant::Isa isa);

  int n_threads() const { return pool_.size(); }

  // Keeps an interleaved copy of each matrix that has an interleaved kernel (read from `file`
  // with read calls, so the mapping's pages are never faulted in for them), and the
  // host-resident tables resident.
  void place_weights(const std::vector<WeightPlacement>& weights, const MappedFile* file) override;

  std::shared_ptr<float> alloc(size_t n) override;
  std::shared_ptr<int32_t> alloc_ids(size_t n) override;
  void matmul(const Weight& w, const float* x, int n_tokens, float* y) override;
  // Converts x once per activation format among the weights' formats.
  void matmul_shared(const float* x, int n_tokens, const Product* products,
                     int n_products) override;
  void get_rows(const Weight& table, const int32_t* ids, int n, float scale, float* out) override;
  void rms_norm(const float* x, const float* weight, int n_rows, int dim, float eps,
                float* out) override;
  void rope_neox(float* x, const int32_t* positions, int n_tokens, int n_head, int head_dim,
                 const Rope& rope) override;
  void gelu_mul(const float* gate, int gate_stride, const float* up, int up_stride, int n_rows,
                int n_cols, float* out) override;
  void add(float* x, const float* y, size_t n) override;
  void scale(float* x, float s, size_t n) override;
  void softcap(float* x, float cap, size_t n) override;
  void copy(float* dst, const float* src, size_t n) override;
  void upload(void* dst, const void* host_src, size_t bytes) override;
  void read(const float* src, size_t n, float* host_dst) override;
  void read_ids(const int32_t* src, size_t n, int32_t* host_dst) override;
  void argmax(const float* x, int n_rows, int n_cols, int32_t* ids, float* logprobs) override;
  void copy_rows(const float* src, const int32_t* rows, int n_rows, int dim, float* dst) override;
  void write_kv(const float* k, const float* v, const TokenBatch& batch, int layer,
                KvPool& pool) override;
  void attention(const float* q, const TokenBatch& batch, const LayerConfig& layer, int window,
                 const KvPool& pool, float* out) override;
  bool attends_spans() const override { return true; }
  // Scores only the chosen clusters' tokens.
  void clustered_logits(const Weight& table, const float* x, int n, const float* scores,
                        int n_clusters, int top_k, const int32_t* clusters, int cluster_size,
                        float* logits) override;
  // The vision-tower operations, threaded over elements; dense attention as tiled products over
  // groups of queries (cpu/vision_ops.cpp, cpu/tiled_attention.h).
  void clamp(float* x, float lo, float hi, size_t n) override;
  void attention_dense(const float* q, const float* k, const float* v, int n_tokens, int n_head,
                       int n_head_kv, int head_dim, float scale, float* out) override;
  void avg_pool_2d(const float* x, int rows, int cols, int dim, int k, float* out) override;
  void moe_route(const float* logits, int n_tokens, int n_expert, int k, int32_t* expert_ids,
                 float* expert_weights) override;
  void moe_experts(const Weight& gate_up, const Weight& down, const float* down_scale,
                   const float* x, const int32_t* expert_ids, const float* expert_weights,
                   int n_tokens, int k, float* out) override;
  // The audio encoder's operations (cpu/audio_ops.cpp).
  void layer_norm(const float* x, const float* weight, const float* bias, int n_rows, int dim,
                  float eps, float* out) override;
  void conv2d_3x3_s2(const float* x, int height, int width, int in_ch, const float* weight,
                     int out_ch, float* out) override;
  void depthwise_conv_causal(const float* x, int n, int channels, const float* weight, int kernel,
                             float* out) override;
  void glu(const float* x, int n_rows, int dim, float* out) override;
  void silu(float* x, size_t n) override;
  void relu(float* x, size_t n) override;
  void mul_cols(float* x, const float* s, int n_rows, int dim) override;
  void add_cols(float* x, const float* b, int n_rows, int dim) override;
  void local_attention(const float* q, const float* k, const float* v, const float* rel, int n,
                       int n_head, int head_dim, int max_past, float cap, float* out) override;

 private:
  // The product of w with activations already converted to its activation format.
  void matmul_converted(const Weight& w, const uint8_t* acts, size_t act_row_bytes, int n_tokens,
                        float* y);
  // The product of float weights with a batch as register tiles (cpu/tiled_matmul.cpp).
  void matmul_tiled(const Weight& w, const quant::FloatTileKernels& kernels, const uint8_t* acts,
                    size_t act_row_bytes, int n_tokens, float* y);
  void matmul_interleaved(const Weight& w, const uint8_t* acts, size_t act_row_bytes, int n_tokens,
                          float* y);

  ThreadPool pool_;
  quant::Isa isa_;
  std::vector<std::unique_ptr<uint8_t[]>> interleaved_;  // the interleaved copies of matrices
  std::vector<uint8_t> activation_scratch_;  // activations converted for the current products
  std::vector<float> attention_scratch_;     // per-thread score rows
  std::vector<float> widened_acts_;          // activations widened to f32 for matmul_tiled
};

}  // namespace pg4
