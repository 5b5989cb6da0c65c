// Matrix products with the weights as they lie in the file. Quantized weights meet activations
// converted to int8 blocks (dp4a products, float scales per 16 or 32 elements); float weights
// meet float activations. Decode-sized batches run one warp per weight row, every token of the
// batch against each unpacked unit, so each weight byte is read once per step; larger batches
// run tiles of 64 rows x 64 tokens through shared memory.
#include <algorithm>

#include "ops/cuda/check.h"
#include "ops/cuda/kernels.h"
#include "ops/cuda/quant_units.cuh"
#include "ops/cuda/warp.cuh"

namespace pg4::cuda {

namespace {

constexpr int kWarpsPerBlock = 4;

__global__ void quantize_kernel(const float* x, int64_t n_blocks, ActBlock* out) {
  const int64_t block =
      static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  if (block >= n_blocks) return;
  const int lane = threadIdx.x % kWarp;
  const float v = x[block * kWarp + lane];
  const float amax = warp_max(fabsf(v));
  const float d = amax / 127.0f;
  const int q = amax > 0.0f ? __float2int_rn(v / d) : 0;
  // Sums of each half of 16 lanes.
  int sum = q;
  for (int offset = 8; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  uint32_t word = static_cast<uint32_t>(q & 0xff) << (8 * (lane % 4));
  word |= __shfl_xor_sync(0xffffffffu, word, 1);
  word |= __shfl_xor_sync(0xffffffffu, word, 2);
  ActBlock& a = out[block];
  if (lane % 4 == 0) a.q[lane / 4] = static_cast<int>(word);
  if (lane == 0) {
    a.d = d;
    a.unused = 0.0f;
  }
  if (lane % 16 == 0) a.sum[lane / 16] = d * static_cast<float>(sum);
}

__device__ __forceinline__ float unit_dot(const Unit& u, const ActBlock& a) {
  int s0 = 0, s1 = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    s0 = __dp4a(u.q[i], a.q[i], s0);
    s1 = __dp4a(u.q[i + 4], a.q[i + 4], s1);
  }
  return a.d * (u.m[0] * static_cast<float>(s0) + u.m[1] * static_cast<float>(s1)) +
         u.o[0] * a.sum[0] + u.o[1] * a.sum[1];
}

// What one warp computes: a weight row against a few activation rows. For plain products
// blockIdx.y picks a tile of NT tokens; for expert products it picks the pair, whose expert
// picks the matrix.
struct WarpTask {
  int64_t row;
  const uint8_t* weight_row;
  int64_t first_act;  // activation row of the task's first token
  int64_t first_out;  // output row of the same
  int n_tokens;
};

// The warp's task; false for a warp past the last row.
__device__ __forceinline__ bool warp_task(const uint8_t* w, size_t row_bytes, size_t matrix_bytes,
                                          int64_t rows, const int32_t* expert_ids, int act_div,
                                          int n_tokens, int nt, WarpTask& task) {
  task.row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (task.row >= rows) return false;
  const int slot = blockIdx.y;
  if (expert_ids != nullptr) {
    w += static_cast<size_t>(expert_ids[slot]) * matrix_bytes;
    task.first_act = slot / act_div;
    task.first_out = slot;
    task.n_tokens = 1;
  } else {
    task.first_act = task.first_out = static_cast<int64_t>(slot) * nt;
    task.n_tokens = min(nt, n_tokens - slot * nt);
  }
  task.weight_row = w + task.row * row_bytes;
  return true;
}

// Each lane's partial sums, summed over the warp and stored.
template <int NT>
__device__ __forceinline__ void store_sums(const float (&acc)[NT], const WarpTask& task,
                                           int64_t rows, float* y) {
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const float sum = warp_sum(acc[t]);
    if (threadIdx.x % kWarp == 0 && t < task.n_tokens)
      y[(task.first_out + t) * rows + task.row] = sum;
  }
}

template <quant::Type T, int NT>
__global__ void __launch_bounds__(kWarpsPerBlock* kWarp)
    matvec_quantized(const uint8_t* w, size_t row_bytes, size_t matrix_bytes, int64_t rows,
                     int units, const ActBlock* acts, int n_tokens, const int32_t* expert_ids,
                     int act_div, float* y) {
  WarpTask task;
  if (!warp_task(w, row_bytes, matrix_bytes, rows, expert_ids, act_div, n_tokens, NT, task)) {
    return;
  }
  const ActBlock* act = acts + task.first_act * units;
  float acc[NT] = {};
  // Two units in flight per lane: the loads of the second overlap the first's arithmetic. The
  // sums keep the order of one unit at a time.
  for (int u = threadIdx.x % kWarp; u < units; u += 2 * kWarp) {
    const bool second = u + kWarp < units;
    Unit first_unit, second_unit;
    load_unit<T>(task.weight_row, u, first_unit);
    if (second) load_unit<T>(task.weight_row, u + kWarp, second_unit);
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      if (t >= task.n_tokens) continue;
      const ActBlock* a = act + static_cast<int64_t>(t) * units + u;
      acc[t] += unit_dot(first_unit, a[0]);
      if (second) acc[t] += unit_dot(second_unit, a[kWarp]);
    }
  }
  store_sums(acc, task, rows, y);
}

template <quant::Type T, int NT>
__global__ void __launch_bounds__(kWarpsPerBlock* kWarp)
    matvec_float(const uint8_t* w, size_t row_bytes, size_t matrix_bytes, int64_t rows,
                 int64_t cols, const float* x, int n_tokens, const int32_t* expert_ids, int act_div,
                 float* y) {
  WarpTask task;
  if (!warp_task(w, row_bytes, matrix_bytes, rows, expert_ids, act_div, n_tokens, NT, task)) {
    return;
  }
  const float* in = x + task.first_act * cols;
  float acc[NT] = {};
  for (int64_t j = threadIdx.x % kWarp; j < cols; j += kWarp) {
    const float wj = float_at<T>(task.weight_row, j);
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      if (t < task.n_tokens) acc[t] += wj * in[t * cols + j];
    }
  }
  store_sums(acc, task, rows, y);
}

// The tiled product: a block of 256 threads computes 64 rows x 64 tokens; every thread 4 rows
// (16 apart, so that a quarter-warp's 16-byte shared loads fall in distinct banks) x 4 tokens.
constexpr int kTileRows = 64, kTileTokens = 64, kTileUnits = 4, kTileThreads = 256;

template <quant::Type T>
__global__ void __launch_bounds__(kTileThreads)
    matmul_tiled(const uint8_t* w, size_t row_bytes, int64_t rows, int units, const ActBlock* acts,
                 int n_tokens, float* y) {
  __shared__ Unit weight_tile[kTileUnits][kTileRows];
  __shared__ ActBlock act_tile[kTileUnits][kTileTokens];
  const int tid = threadIdx.x;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int token0 = blockIdx.y * kTileTokens;
  const int tr = tid % 16, tt = tid / 16;
  float acc[4][4] = {};
  for (int u0 = 0; u0 < units; u0 += kTileUnits) {
    {
      const int r = tid / kTileUnits, k = tid % kTileUnits;
      Unit& unit = weight_tile[k][r];
      if (row0 + r < rows && u0 + k < units) {
        load_unit<T>(w + (row0 + r) * row_bytes, u0 + k, unit);
      } else {
        unit = Unit{};
      }
      const int t = tid / kTileUnits;
      ActBlock& a = act_tile[k][t];
      if (token0 + t < n_tokens && u0 + k < units) {
        a = acts[static_cast<int64_t>(token0 + t) * units + u0 + k];
      } else {
        a = ActBlock{};
      }
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kTileUnits; ++k) {
      ActBlock a[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) a[j] = act_tile[k][tt + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const Unit unit = weight_tile[k][tr + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += unit_dot(unit, a[j]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int t = token0 + tt + 16 * j;
    if (t >= n_tokens) continue;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t r = row0 + tr + 16 * i;
      if (r < rows) y[static_cast<int64_t>(t) * rows + r] = acc[i][j];
    }
  }
}

unsigned row_blocks(int64_t rows) {
  return static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

// The token tile of the warp kernels for a batch of n: the next power of two up to 8.
template <typename Fn>
void with_token_tile(int n, Fn&& fn) {
  if (n <= 1) {
    fn.template operator()<1>();
  } else if (n == 2) {
    fn.template operator()<2>();
  } else if (n <= 4) {
    fn.template operator()<4>();
  } else {
    fn.template operator()<kDecodeBatch>();
  }
}

size_t matrix_bytes(const Weight& w) { return static_cast<size_t>(w.ne[1]) * w.row_bytes; }

}  // namespace

void quantize_activations(const float* x, int64_t n_values, ActBlock* out, cudaStream_t stream) {
  const int64_t n_blocks = n_values / kWarp;
  constexpr int kThreads = 256;
  const int64_t per_block = kThreads / kWarp;
  quantize_kernel<<<static_cast<unsigned>((n_blocks + per_block - 1) / per_block), kThreads, 0,
                    stream>>>(x, n_blocks, out);
  check_launch("quantize_activations");
}

void matmul_quantized(const Weight& w, const ActBlock* acts, int n_tokens, float* y,
                      cudaStream_t stream) {
  const int64_t rows = w.rows();
  const int units = static_cast<int>(w.cols() / kWarp);
  if (n_tokens > kDecodeBatch) {
    dispatch_quantized(w.type, [&]<quant::Type T>() {
      const dim3 grid(static_cast<unsigned>((rows + kTileRows - 1) / kTileRows),
                      static_cast<unsigned>((n_tokens + kTileTokens - 1) / kTileTokens));
      matmul_tiled<T>
          <<<grid, kTileThreads, 0, stream>>>(w.data, w.row_bytes, rows, units, acts, n_tokens, y);
    });
  } else {
    dispatch_quantized(w.type, [&]<quant::Type T>() {
      with_token_tile(n_tokens, [&]<int NT>() {
        const dim3 grid(row_blocks(rows), static_cast<unsigned>((n_tokens + NT - 1) / NT));
        matvec_quantized<T, NT><<<grid, kWarpsPerBlock * kWarp, 0, stream>>>(
            w.data, w.row_bytes, 0, rows, units, acts, n_tokens, nullptr, 1, y);
      });
    });
  }
  check_launch("matmul_quantized");
}

void matmul_float(const Weight& w, const float* x, int n_tokens, float* y, cudaStream_t stream) {
  const int64_t rows = w.rows();
  dispatch_float(w.type, [&]<quant::Type T>() {
    with_token_tile(n_tokens, [&]<int NT>() {
      const dim3 grid(row_blocks(rows), static_cast<unsigned>((n_tokens + NT - 1) / NT));
      matvec_float<T, NT><<<grid, kWarpsPerBlock * kWarp, 0, stream>>>(
          w.data, w.row_bytes, 0, rows, w.cols(), x, n_tokens, nullptr, 1, y);
    });
  });
  check_launch("matmul_float");
}

void matmul_experts(const Weight& w, const ActBlock* acts, const float* x, int act_div,
                    const int32_t* expert_ids, int n_pairs, float* y, cudaStream_t stream) {
  const int64_t rows = w.rows();
  const dim3 grid(row_blocks(rows), static_cast<unsigned>(n_pairs));
  if (is_float_type(w.type)) {
    dispatch_float(w.type, [&]<quant::Type T>() {
      matvec_float<T, 1><<<grid, kWarpsPerBlock * kWarp, 0, stream>>>(
          w.data, w.row_bytes, matrix_bytes(w), rows, w.cols(), x, n_pairs, expert_ids, act_div, y);
    });
  } else {
    dispatch_quantized(w.type, [&]<quant::Type T>() {
      matvec_quantized<T, 1><<<grid, kWarpsPerBlock * kWarp, 0, stream>>>(
          w.data, w.row_bytes, matrix_bytes(w), rows, static_cast<int>(w.cols() / kWarp), acts,
          n_pairs, expert_ids, act_div, y);
    });
  }
  check_launch("matmul_experts");
}

}  // namespace pg4::cuda
