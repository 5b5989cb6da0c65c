// The KV store and attention over the paged pool. Attention is one pass with an online softmax
// (flash-decoding): a block per (query token, head, split of the positions), a warp per key
// position at a time with each lane holding head_dim / 32 dims, the splits merged by a second
// kernel. The split count is fixed per launch shape and each split takes its share of the
// positions at run time, so a captured step stays valid as sequences grow.
#include <cfloat>

#include "ops/cuda/check.h"
#include "ops/cuda/kernels.h"
#include "ops/cuda/rope.cuh"
#include "ops/cuda/warp.cuh"

namespace pg4::cuda {

namespace {

constexpr int kAttentionWarps = 4;

// Offset in floats of position pos's row for sequence seq (see KvPool::row_offset).
__device__ __forceinline__ size_t kv_row(const KvView& kv, const TokenBatch& batch, int seq,
                                         int pos) {
  const int block = pos / kv.block_size;
  const size_t stored =
      kv.sliding
          ? static_cast<size_t>(batch.ring_sets[seq]) * kv.ring_blocks + block % kv.ring_blocks
          : static_cast<size_t>(
                batch.block_tables[static_cast<size_t>(seq) * batch.table_width + block]);
  return (stored * kv.block_size + pos % kv.block_size) * kv.row_floats;
}

// One block per (token, kv head).
__global__ void store_kv_kernel(const float* k, const float* v, bool normalise,
                                const float* k_weight, float eps, Rope rope, TokenBatch batch,
                                int n_head_kv, int head_dim, KvView kv) {
  extern __shared__ float row[];
  const int i = blockIdx.x, h = blockIdx.y;
  const int64_t in = (static_cast<int64_t>(i) * n_head_kv + h) * head_dim;
  const int pos = batch.positions[i];
  const size_t at = kv_row(kv, batch, batch.seqs[i], pos) + static_cast<size_t>(h) * head_dim;
  float sum_k = 0.0f, sum_v = 0.0f;
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    sum_k += k[in + d] * k[in + d];
    sum_v += v[in + d] * v[in + d];
  }
  const float inv_k = normalise ? rsqrtf(block_sum(sum_k) / head_dim + eps) : 1.0f;
  const float inv_v = normalise ? rsqrtf(block_sum(sum_v) / head_dim + eps) : 1.0f;
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    row[d] = k[in + d] * inv_k * (normalise ? k_weight[d] : 1.0f);
    kv.values[at + d] = v[in + d] * inv_v;
  }
  __syncthreads();
  rotate_into(row, pos, head_dim, rope, kv.keys + at);
}

template <int kDimsPerLane>
__global__ void __launch_bounds__(kAttentionWarps* kWarp)
    attention_kernel(const float* q, TokenBatch batch, int n_head, int group, KvView kv, int window,
                     int splits, float* partials, float* out) {
  constexpr int kHeadDim = kDimsPerLane * kWarp;
  const int h = blockIdx.x, i = blockIdx.y, split = blockIdx.z;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int seq = batch.seqs[i], pos = batch.positions[i];
  const int first = window > 0 ? max(0, pos - window + 1) : 0;
  const int chunk = (pos - first + splits) / splits;
  const int begin = first + split * chunk, end = min(pos + 1, begin + chunk);

  float qv[kDimsPerLane];
  const float* qh = q + (static_cast<int64_t>(i) * n_head + h) * kHeadDim + lane * kDimsPerLane;
#pragma unroll
  for (int d = 0; d < kDimsPerLane; ++d) qv[d] = qh[d];
  const int kv_offset = (h / group) * kHeadDim + lane * kDimsPerLane;

  float m = -INFINITY, l = 0.0f, acc[kDimsPerLane] = {};
  for (int p = begin + warp; p < end; p += kAttentionWarps) {
    const size_t row = kv_row(kv, batch, seq, p) + kv_offset;
    float dot = 0.0f;
#pragma unroll
    for (int d = 0; d < kDimsPerLane; ++d) dot += qv[d] * kv.keys[row + d];
    const float s = warp_sum(dot);
    const float m_new = fmaxf(m, s);
    const float carry = expf(m - m_new), e = expf(s - m_new);
    l = l * carry + e;
#pragma unroll
    for (int d = 0; d < kDimsPerLane; ++d) acc[d] = acc[d] * carry + e * kv.values[row + d];
    m = m_new;
  }

  // The warps' partial results merged in shared memory.
  __shared__ float warp_m[kAttentionWarps], warp_l[kAttentionWarps];
  __shared__ float warp_acc[kAttentionWarps][kHeadDim];
  if (lane == 0) {
    warp_m[warp] = m;
    warp_l[warp] = l;
  }
#pragma unroll
  for (int d = 0; d < kDimsPerLane; ++d) warp_acc[warp][lane * kDimsPerLane + d] = acc[d];
  __syncthreads();
  float block_m = -INFINITY;
  for (int w = 0; w < kAttentionWarps; ++w) block_m = fmaxf(block_m, warp_m[w]);
  float block_l = 0.0f;
  for (int w = 0; w < kAttentionWarps; ++w) {
    if (warp_l[w] > 0.0f) block_l += warp_l[w] * expf(warp_m[w] - block_m);
  }
  const int64_t head_row = static_cast<int64_t>(i) * n_head + h;
  float* partial = partials + (head_row * splits + split) * (kHeadDim + 2);
  for (int d = threadIdx.x; d < kHeadDim; d += blockDim.x) {
    float sum = 0.0f;
    for (int w = 0; w < kAttentionWarps; ++w) {
      if (warp_l[w] > 0.0f) sum += warp_acc[w][d] * expf(warp_m[w] - block_m);
    }
    if (splits == 1) {
      out[head_row * kHeadDim + d] = sum / block_l;
    } else {
      partial[2 + d] = sum;
    }
  }
  if (splits > 1 && threadIdx.x == 0) {
    partial[0] = block_m;
    partial[1] = block_l;
  }
}

__global__ void combine_splits(const float* partials, int splits, int head_dim, float* out) {
  const int64_t head_row = blockIdx.x;
  const float* p = partials + head_row * splits * (head_dim + 2);
  float m = -INFINITY;
  for (int s = 0; s < splits; ++s) {
    if (p[s * (head_dim + 2) + 1] > 0.0f) m = fmaxf(m, p[s * (head_dim + 2)]);
  }
  float l = 0.0f;
  for (int s = 0; s < splits; ++s) {
    const float* part = p + s * (head_dim + 2);
    if (part[1] > 0.0f) l += part[1] * expf(part[0] - m);
  }
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float sum = 0.0f;
    for (int s = 0; s < splits; ++s) {
      const float* part = p + s * (head_dim + 2);
      if (part[1] > 0.0f) sum += part[2 + d] * expf(part[0] - m);
    }
    out[head_row * head_dim + d] = sum / l;
  }
}

}  // namespace

// A pool on a CUDA device stores F32 entries (its constructor refuses any other type).
KvView kv_view(KvPool& pool, int layer) {
  return {reinterpret_cast<float*>(pool.keys(layer)),
          reinterpret_cast<float*>(pool.values(layer)),
          pool.row_elements(layer),
          pool.sliding(layer),
          pool.block_size(),
          pool.ring_blocks()};
}

void store_kv(const float* k, const float* v, bool normalise, const float* k_weight, float eps,
              const Rope& rope, const TokenBatch& batch, int n_head_kv, int head_dim,
              const KvView& kv, cudaStream_t stream) {
  if (batch.n == 0) return;
  store_kv_kernel<<<dim3(batch.n, n_head_kv), 128, head_dim * sizeof(float), stream>>>(
      k, v, normalise, k_weight, eps, rope, batch, n_head_kv, head_dim, kv);
  check_launch("store_kv");
}

void attention(const float* q, const TokenBatch& batch, int n_head, int n_head_kv, int head_dim,
               int window, const KvView& kv, int splits, float* partials, float* out,
               cudaStream_t stream) {
  if (batch.n == 0) return;
  const dim3 grid(n_head, batch.n, splits);
  const int group = n_head / n_head_kv;
  auto launch = [&](auto kernel) {
    kernel<<<grid, kAttentionWarps * kWarp, 0, stream>>>(q, batch, n_head, group, kv, window,
                                                         splits, partials, out);
  };
  switch (head_dim) {
    case 32:
      launch(attention_kernel<1>);
      break;
    case 64:
      launch(attention_kernel<2>);
      break;
    case 128:
      launch(attention_kernel<4>);
      break;
    case 256:
      launch(attention_kernel<8>);
      break;
    case 512:
      launch(attention_kernel<16>);
      break;
    default:
      throw std::invalid_argument("no CUDA attention kernel for head_dim " +
                                  std::to_string(head_dim));
  }
  check_launch("attention");
  if (splits > 1) {
    combine_splits<<<batch.n * n_head, 128, 0, stream>>>(partials, splits, head_dim, out);
    check_launch("combine_splits");
  }
}

}  // namespace pg4::cuda
