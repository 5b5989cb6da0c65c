// The CUDA kernels' launchers, one family per file beside this one; each runs on `stream` and
// checks its launch. Shapes follow the Ops interface (ops/ops.h), whose CPU implementation is
// the reference every kernel is tested against.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/weight.h"
#include "ops/ops.h"

namespace pg4::cuda {

// Batches of up to this many tokens are decode steps: the products run one warp per weight row
// and attention splits positions as for one token, so each row's result is the same whatever
// else shares its step.
constexpr int kDecodeBatch = 8;

// Activations converted for the int8 products: 32 values as int8 with their scale d, and
// d * (sum of the quants) of each half, for the formats whose elements carry an offset.
struct alignas(16) ActBlock {
  int q[8];
  float d;
  float sum[2];
  float unused;
};

// matmul.cu
void quantize_activations(const float* x, int64_t n_values, ActBlock* out, cudaStream_t stream);
// y[t * rows + r] = row r of w · token t; acts [n_tokens][cols / 32] for quantized weights.
void matmul_quantized(const Weight& w, const ActBlock* acts, int n_tokens, float* y,
                      cudaStream_t stream);
void matmul_float(const Weight& w, const float* x, int n_tokens, float* y, cudaStream_t stream);
// For each pair p < n_pairs: y[p] = matrix expert_ids[p] of the stacked w · input row p / act_div.
void matmul_experts(const Weight& w, const ActBlock* acts, const float* x, int act_div,
                    const int32_t* expert_ids, int n_pairs, float* y, cudaStream_t stream);

// rows.cu: gathers, element-wise maps, reductions over rows.
void get_rows(const Weight& table, const int32_t* ids, int n, float scale, float* out,
              cudaStream_t stream);
void copy_rows(const float* src, const int32_t* rows, int n_rows, int dim, float* dst,
               cudaStream_t stream);
void gelu_mul(const float* gate, int gate_stride, const float* up, int up_stride, int n_rows,
              int n_cols, float* out, cudaStream_t stream);
void add(float* x, const float* y, size_t n, cudaStream_t stream);
void scale(float* x, float s, size_t n, cudaStream_t stream);
void softcap(float* x, float cap, size_t n, cudaStream_t stream);
void argmax(const float* x, int n_rows, int n_cols, int32_t* ids, float* logprobs,
            cudaStream_t stream);

// norm_rope.cu
// out = x / rms(x) * weight (weight may be null); with add_to, add_to += that instead.
void rms_norm(const float* x, const float* weight, int n_rows, int dim, float eps, float* out,
              float* add_to, cudaStream_t stream);
// Normalises (when norm) then rotates each head in place.
void norm_rope(float* x, const float* weight, bool norm, const int32_t* positions, int n_tokens,
               int n_head, int head_dim, float eps, const Rope& rope, cudaStream_t stream);

// Where a layer's K/V rows live, for the kernels that address the pool.
struct KvView {
  float* keys;
  float* values;
  int row_floats;
  bool sliding;
  int block_size;
  int ring_blocks;
};
KvView kv_view(KvPool& pool, int layer);

// attention.cu
// Writes each token's K and V head rows into the pool: with normalise, the keys normalised times
// k_weight and rotated by rope and the values normalised; without, as they are.
void store_kv(const float* k, const float* v, bool normalise, const float* k_weight, float eps,
              const Rope& rope, const TokenBatch& batch, int n_head_kv, int head_dim,
              const KvView& kv, cudaStream_t stream);
// partials: room for n_tokens * n_head * splits * (head_dim + 2) floats.
void attention(const float* q, const TokenBatch& batch, int n_head, int n_head_kv, int head_dim,
               int window, const KvView& kv, int splits, float* partials, float* out,
               cudaStream_t stream);

// moe.cu
void moe_route(const float* logits, int n_tokens, int n_expert, int k, int32_t* expert_ids,
               float* expert_weights, cudaStream_t stream);
// out[t] = sum over j < k of expert_weights[t k + j] * down_scale[expert] * y[t k + j].
void moe_combine(const float* y, const int32_t* expert_ids, const float* expert_weights,
                 const float* down_scale, int n_tokens, int k, int dim, float* out,
                 cudaStream_t stream);

}  // namespace pg4::cuda
