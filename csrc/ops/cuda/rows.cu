// Gathers of rows, element-wise maps and the per-row argmax.
#include <cfloat>

#include "ops/cuda/check.h"
#include "ops/cuda/kernels.h"
#include "ops/cuda/quant_units.cuh"
#include "ops/cuda/warp.cuh"

namespace pg4::cuda {

namespace {

constexpr int kThreads = 256;

unsigned blocks_for(size_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

// One block per gathered row; the table may be host memory mapped for the device (the
// per-layer-embedding table), which these reads then cross the bus for.
template <quant::Type T>
__global__ void get_rows_quantized(const uint8_t* table, size_t row_bytes, int units,
                                   const int32_t* ids, float scale, float* out) {
  const uint8_t* row = table + static_cast<size_t>(ids[blockIdx.x]) * row_bytes;
  float* dst = out + static_cast<int64_t>(blockIdx.x) * units * kWarp;
  for (int u = threadIdx.x; u < units; u += blockDim.x) {
    Unit unit;
    load_unit<T>(row, u, unit);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int e = 4 * i + j;
        const float q = static_cast<float>(static_cast<int8_t>(unit.q[i] >> (8 * j)));
        dst[u * kWarp + e] = (unit.m[e / 16] * q + unit.o[e / 16]) * scale;
      }
    }
  }
}

template <quant::Type T>
__global__ void get_rows_float(const uint8_t* table, size_t row_bytes, int64_t cols,
                               const int32_t* ids, float scale, float* out) {
  const uint8_t* row = table + static_cast<size_t>(ids[blockIdx.x]) * row_bytes;
  float* dst = out + static_cast<int64_t>(blockIdx.x) * cols;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) dst[j] = float_at<T>(row, j) * scale;
}

__global__ void copy_rows_kernel(const float* src, const int32_t* rows, int dim, float* dst) {
  const float* from = src + static_cast<int64_t>(rows[blockIdx.x]) * dim;
  float* to = dst + static_cast<int64_t>(blockIdx.x) * dim;
  for (int j = threadIdx.x; j < dim; j += blockDim.x) to[j] = from[j];
}

// The tanh approximation of GELU as x * sigmoid(2u), like the CPU's.
__device__ __forceinline__ float gelu_tanh(float x) {
  constexpr float kSqrt2OverPi = 0.7978845608028654f;
  const float u = kSqrt2OverPi * (x + 0.044715f * x * x * x);
  return x / (1.0f + __expf(-2.0f * u));
}

__global__ void gelu_mul_kernel(const float* gate, int gate_stride, const float* up, int up_stride,
                                int n_rows, int n_cols, float* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<int64_t>(n_rows) * n_cols) return;
  const int64_t r = i / n_cols, c = i % n_cols;
  out[i] = gelu_tanh(gate[r * gate_stride + c]) * up[r * up_stride + c];
}

__global__ void add_kernel(float* x, const float* y, size_t n) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) x[i] += y[i];
}

__global__ void scale_kernel(float* x, float s, size_t n) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) x[i] *= s;
}

__global__ void softcap_kernel(float* x, float cap, size_t n) {
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) x[i] = cap * tanhf(x[i] / cap);
}

constexpr int kArgmaxThreads = 1024;

// One block per row; ties go to the lower index.
__global__ void __launch_bounds__(kArgmaxThreads)
    argmax_kernel(const float* x, int n_cols, int32_t* ids, float* logprobs) {
  const float* row = x + static_cast<int64_t>(blockIdx.x) * n_cols;
  float best = -FLT_MAX;
  int best_index = n_cols;
  for (int j = threadIdx.x; j < n_cols; j += blockDim.x) {
    const float v = row[j];
    if (v > best) {
      best = v;
      best_index = j;
    }
  }
  warp_argmax(best, best_index);
  __shared__ float values[kWarp];
  __shared__ int indices[kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) {
    values[warp] = best;
    indices[warp] = best_index;
  }
  __syncthreads();
  const int n_warps = blockDim.x / kWarp;
  best = lane < n_warps ? values[lane] : -FLT_MAX;
  best_index = lane < n_warps ? indices[lane] : n_cols;
  warp_argmax(best, best_index);
  // Every warp now holds the maximum; the softmax's normaliser relative to it follows.
  float total = 0.0f;
  for (int j = threadIdx.x; j < n_cols; j += blockDim.x) total += expf(row[j] - best);
  total = block_sum(total);
  if (threadIdx.x == 0) {
    ids[blockIdx.x] = best_index < n_cols ? best_index : 0;
    logprobs[blockIdx.x] = -logf(total);
  }
}

}  // namespace

void get_rows(const Weight& table, const int32_t* ids, int n, float scale, float* out,
              cudaStream_t stream) {
  if (n == 0) return;
  if (is_float_type(table.type)) {
    dispatch_float(table.type, [&]<quant::Type T>() {
      get_rows_float<T>
          <<<n, kThreads, 0, stream>>>(table.data, table.row_bytes, table.cols(), ids, scale, out);
    });
  } else {
    dispatch_quantized(table.type, [&]<quant::Type T>() {
      get_rows_quantized<T><<<n, kThreads, 0, stream>>>(
          table.data, table.row_bytes, static_cast<int>(table.cols() / kWarp), ids, scale, out);
    });
  }
  check_launch("get_rows");
}

void copy_rows(const float* src, const int32_t* rows, int n_rows, int dim, float* dst,
               cudaStream_t stream) {
  if (n_rows == 0) return;
  copy_rows_kernel<<<n_rows, kThreads, 0, stream>>>(src, rows, dim, dst);
  check_launch("copy_rows");
}

void gelu_mul(const float* gate, int gate_stride, const float* up, int up_stride, int n_rows,
              int n_cols, float* out, cudaStream_t stream) {
  const size_t n = static_cast<size_t>(n_rows) * n_cols;
  if (n == 0) return;
  gelu_mul_kernel<<<blocks_for(n), kThreads, 0, stream>>>(gate, gate_stride, up, up_stride, n_rows,
                                                          n_cols, out);
  check_launch("gelu_mul");
}

void add(float* x, const float* y, size_t n, cudaStream_t stream) {
  if (n == 0) return;
  add_kernel<<<blocks_for(n), kThreads, 0, stream>>>(x, y, n);
  check_launch("add");
}

void scale(float* x, float s, size_t n, cudaStream_t stream) {
  if (n == 0) return;
  scale_kernel<<<blocks_for(n), kThreads, 0, stream>>>(x, s, n);
  check_launch("scale");
}

void softcap(float* x, float cap, size_t n, cudaStream_t stream) {
  if (n == 0) return;
  softcap_kernel<<<blocks_for(n), kThreads, 0, stream>>>(x, cap, n);
  check_launch("softcap");
}

void argmax(const float* x, int n_rows, int n_cols, int32_t* ids, float* logprobs,
            cudaStream_t stream) {
  if (n_rows == 0) return;
  argmax_kernel<<<n_rows, kArgmaxThreads, 0, stream>>>(x, n_cols, ids, logprobs);
  check_launch("argmax");
}

}  // namespace pg4::cuda
