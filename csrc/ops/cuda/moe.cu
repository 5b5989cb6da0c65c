// The expert router and the weighted sum of the chosen experts' outputs; the experts' products
// themselves are matmul_experts.
#include <cfloat>

#include "ops/cuda/check.h"
#include "ops/cuda/kernels.h"
#include "ops/cuda/warp.cuh"

namespace pg4::cuda {

namespace {

// One warp per token: softmax over the experts, then k rounds of picking the largest (the lower
// index on ties, as the CPU's sort does), the chosen weights renormalised.
__global__ void route_kernel(const float* logits, int n_tokens, int n_expert, int k,
                             int32_t* expert_ids, float* expert_weights) {
  const int t = blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  if (t >= n_tokens) return;
  const int lane = threadIdx.x % kWarp;
  const float* l = logits + static_cast<int64_t>(t) * n_expert;
  float max_logit = -FLT_MAX;
  for (int e = lane; e < n_expert; e += kWarp) max_logit = fmaxf(max_logit, l[e]);
  max_logit = warp_max(max_logit);
  float total = 0.0f;
  for (int e = lane; e < n_expert; e += kWarp) total += expf(l[e] - max_logit);
  total = warp_sum(total);
  float chosen_sum = 0.0f;
  for (int j = 0; j < k; ++j) {
    float best = -FLT_MAX;
    int best_e = n_expert;
    for (int e = lane; e < n_expert; e += kWarp) {
      bool taken = false;
      for (int i = 0; i < j; ++i) taken |= expert_ids[t * k + i] == e;
      const float p = expf(l[e] - max_logit) / total;
      if (!taken && (p > best || (p == best && e < best_e))) {
        best = p;
        best_e = e;
      }
    }
    warp_argmax(best, best_e);
    if (lane == 0) {
      expert_ids[t * k + j] = best_e;
      expert_weights[t * k + j] = best;
    }
    chosen_sum += best;
    __syncwarp();
  }
  if (lane < k) expert_weights[t * k + lane] /= chosen_sum;
}

__global__ void combine_kernel(const float* y, const int32_t* expert_ids,
                               const float* expert_weights, const float* down_scale, int k, int dim,
                               float* out) {
  const int t = blockIdx.x;
  for (int c = threadIdx.x; c < dim; c += blockDim.x) {
    float sum = 0.0f;
    for (int j = 0; j < k; ++j) {
      const int pair = t * k + j;
      sum += expert_weights[pair] * down_scale[expert_ids[pair]] *
             y[static_cast<int64_t>(pair) * dim + c];
    }
    out[static_cast<int64_t>(t) * dim + c] = sum;
  }
}

}  // namespace

void moe_route(const float* logits, int n_tokens, int n_expert, int k, int32_t* expert_ids,
               float* expert_weights, cudaStream_t stream) {
  if (n_tokens == 0) return;
  constexpr int kWarpsPerBlock = 4;
  route_kernel<<<(n_tokens + kWarpsPerBlock - 1) / kWarpsPerBlock, kWarpsPerBlock * kWarp, 0,
                 stream>>>(logits, n_tokens, n_expert, k, expert_ids, expert_weights);
  check_launch("moe_route");
}

void moe_combine(const float* y, const int32_t* expert_ids, const float* expert_weights,
                 const float* down_scale, int n_tokens, int k, int dim, float* out,
                 cudaStream_t stream) {
  if (n_tokens == 0) return;
  combine_kernel<<<n_tokens, 256, 0, stream>>>(y, expert_ids, expert_weights, down_scale, k, dim,
                                               out);
  check_launch("moe_combine");
}

}  // namespace pg4::cuda
