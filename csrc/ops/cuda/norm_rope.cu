// RMS normalisation, alone, added into a residual, or followed by the rotary embedding.
#include "ops/cuda/check.h"
#include "ops/cuda/kernels.h"
#include "ops/cuda/rope.cuh"
#include "ops/cuda/warp.cuh"

namespace pg4::cuda {

namespace {

constexpr int kThreads = 256;

// The scale 1 / rms of one row of dim values.
__device__ __forceinline__ float inverse_rms(const float* x, int dim, float eps) {
  float sum = 0.0f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) sum += x[i] * x[i];
  return rsqrtf(block_sum(sum) / dim + eps);
}

__global__ void rms_norm_kernel(const float* x, const float* weight, int dim, float eps, float* out,
                                float* add_to) {
  const int64_t offset = static_cast<int64_t>(blockIdx.x) * dim;
  const float* src = x + offset;
  const float inv = inverse_rms(src, dim, eps);
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    const float v = src[i] * inv * (weight != nullptr ? weight[i] : 1.0f);
    if (add_to != nullptr) {
      add_to[offset + i] += v;
    } else {
      out[offset + i] = v;
    }
  }
}

// One block per head row: normalised into shared memory, then rotated back into place.
__global__ void norm_rope_kernel(float* x, const float* weight, bool norm, const int32_t* positions,
                                 int n_head, int head_dim, float eps, Rope rope) {
  extern __shared__ float row[];
  float* v = x + static_cast<int64_t>(blockIdx.x) * head_dim;
  const float inv = norm ? inverse_rms(v, head_dim, eps) : 1.0f;
  for (int i = threadIdx.x; i < head_dim; i += blockDim.x) {
    row[i] = v[i] * inv * (norm && weight != nullptr ? weight[i] : 1.0f);
  }
  __syncthreads();
  rotate_into(row, positions[blockIdx.x / n_head], head_dim, rope, v);
}

}  // namespace

void rms_norm(const float* x, const float* weight, int n_rows, int dim, float eps, float* out,
              float* add_to, cudaStream_t stream) {
  if (n_rows == 0) return;
  rms_norm_kernel<<<n_rows, kThreads, 0, stream>>>(x, weight, dim, eps, out, add_to);
  check_launch("rms_norm");
}

void norm_rope(float* x, const float* weight, bool norm, const int32_t* positions, int n_tokens,
               int n_head, int head_dim, float eps, const Rope& rope, cudaStream_t stream) {
  if (n_tokens == 0) return;
  norm_rope_kernel<<<n_tokens * n_head, 128, head_dim * sizeof(float), stream>>>(
      x, weight, norm, positions, n_head, head_dim, eps, rope);
  check_launch("norm_rope");
}

}  // namespace pg4::cuda
