// The CUDA backend: every op as kernels on one stream of one device, weights copied to the
// device once (the per-layer-embedding table stays in page-locked host memory), and a forward
// step captured as a CUDA graph per batch shape and replayed.
#pragma once

#include <cuda_runtime.h>

#include <map>
#include <vector>

#include "ops/cuda/kernels.h"
#include "ops/ops.h"

namespace pg4::cuda {

class CudaOps final : public Ops {
 public:
  explicit CudaOps(int device);
  ~CudaOps() override;
  CudaOps(const CudaOps&) = delete;
  CudaOps& operator=(const CudaOps&) = delete;

  int device() const override { return device_; }
  void place_weights(const std::vector<WeightPlacement>& weights, const MappedFile* file) override;
  void reserve(const Limits& limits) override;
  std::shared_ptr<float> alloc(size_t n) override;
  std::shared_ptr<int32_t> alloc_ids(size_t n) override;
  TokenBatch stage(const TokenBatch& host) override;
  void run_step(const std::vector<int64_t>& shape, const std::function<void()>& body) override;

  void matmul(const Weight& w, const float* x, int n_tokens, float* y) override;
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
  void copy_rows(const float* src, const int32_t* rows, int n_rows, int dim, float* dst) override;
  void argmax(const float* x, int n_rows, int n_cols, int32_t* ids, float* logprobs) override;
  void write_kv(const float* k, const float* v, const TokenBatch& batch, int layer,
                KvPool& pool) override;
  void attention(const float* q, const TokenBatch& batch, const LayerConfig& layer, int window,
                 const KvPool& pool, float* out) override;
  void moe_route(const float* logits, int n_tokens, int n_expert, int k, int32_t* expert_ids,
                 float* expert_weights) override;
  void moe_experts(const Weight& gate_up, const Weight& down, const float* down_scale,
                   const float* x, const int32_t* expert_ids, const float* expert_weights,
                   int n_tokens, int k, float* out) override;

  void rms_norm_add(float* y, const float* weight, int n_rows, int dim, float eps,
                    float* x) override;
  void rms_norm_rope(float* x, const float* weight, const int32_t* positions, int n_tokens,
                     int n_head, int head_dim, float eps, const Rope& rope) override;
  void store_kv(float* k, float* v, const float* k_weight, float eps, const Rope& rope,
                const TokenBatch& batch, const LayerConfig& layer, KvPool& pool) override;

 private:
  template <typename T>
  std::shared_ptr<T> device_array(size_t n);
  // acts converted for the quantized products, reusing the last conversion when nothing has
  // been written since (the projections of one input follow one another).
  const ActBlock* converted(const float* x, int n_tokens, int64_t cols);
  void wrote() { converted_x_ = nullptr; }
  void clear_graphs();

  int device_;
  int n_sms_ = 1;
  cudaStream_t stream_ = nullptr;
  bool use_graphs_ = true;

  std::vector<std::shared_ptr<uint8_t>> weights_;        // device copies of the tensors
  std::vector<std::shared_ptr<uint8_t>> pinned_tables_;  // page-locked host-resident tensors

  std::shared_ptr<ActBlock> acts_, expert_acts_;
  std::shared_ptr<float> partials_, expert_hidden_, expert_activated_, expert_out_;
  size_t max_partials_ = 0;
  const float* converted_x_ = nullptr;
  int converted_n_ = 0;
  int64_t converted_cols_ = 0;

  std::shared_ptr<int32_t> staged_;   // the batch's arrays on the device
  std::shared_ptr<int32_t> staging_;  // and their page-locked host copy
  size_t staged_capacity_ = 0;

  std::map<std::vector<int64_t>, cudaGraphExec_t> graphs_;
};

}  // namespace pg4::cuda
