// The CPU backend's products of float weights with batches of tokens as register tiles
// (quant/float_tiles.h): each thread widens a block of its rows to f32 once and passes every
// token over it, six at a time.
#include <algorithm>
#include <vector>

#include "ops/cpu/cpu_ops.h"

namespace pg4 {

namespace {

// The widened block of rows a thread works on stays in L2 (1 MB per core here) beside the
// activations of one tile.
constexpr size_t kBlockBytes = 256 * 1024;
constexpr int64_t kWidenGrain = 16;

}  // namespace

void CpuOps::matmul_tiled(const Weight& w, const quant::FloatTileKernels& kernels,
                          const uint8_t* acts, size_t act_row_bytes, int n_tokens, float* y) {
  constexpr int kRows = quant::kTileRows;
  constexpr int kTokens = quant::kTileTokens;
  const int64_t cols = w.cols();
  const int64_t rows = w.rows();
  const float* a = reinterpret_cast<const float*>(acts);
  size_t a_stride = act_row_bytes / sizeof(float);
  if (kernels.widen != nullptr) {
    widened_acts_.resize(static_cast<size_t>(n_tokens) * cols);
    pool_.parallel_for(n_tokens, kWidenGrain, [&](int64_t begin, int64_t end, int) {
      for (int64_t t = begin; t < end; ++t) {
        kernels.widen(acts + t * act_row_bytes, widened_acts_.data() + t * cols, cols);
      }
    });
    a = widened_acts_.data();
    a_stride = static_cast<size_t>(cols);
  }
  const int64_t fit = static_cast<int64_t>(kBlockBytes / (cols * sizeof(float)));
  const int64_t block = std::max<int64_t>(kRows, fit - fit % kRows);
  // One contiguous band of rows per thread, as in matmul_converted.
  const int64_t threads = pool_.size();
  const int64_t per_thread = (rows + threads - 1) / threads;
  const int64_t grain = (per_thread + kRows - 1) / kRows * kRows;
  pool_.parallel_for(rows, grain, [&](int64_t begin, int64_t end, int) {
    std::vector<float> widened(kernels.widen != nullptr ? block * cols : 0);
    for (int64_t r0 = begin; r0 < end; r0 += block) {
      const int64_t r1 = std::min(end, r0 + block);
      const float* block_rows = reinterpret_cast<const float*>(w.row(r0));
      size_t w_stride = w.row_bytes / sizeof(float);
      if (kernels.widen != nullptr) {
        for (int64_t r = r0; r < r1; ++r)
          kernels.widen(w.row(r), widened.data() + (r - r0) * cols, cols);
        block_rows = widened.data();
        w_stride = static_cast<size_t>(cols);
      }
      for (int t0 = 0; t0 < n_tokens; t0 += kTokens) {
        const int nt = std::min(kTokens, n_tokens - t0);
        for (int64_t r = r0; r < r1; r += kRows) {
          const int nr = static_cast<int>(std::min<int64_t>(kRows, r1 - r));
          kernels.tiles[nr - 1][nt - 1](cols, block_rows + (r - r0) * w_stride, w_stride,
                                        a + t0 * a_stride, a_stride, y + t0 * rows + r,
                                        static_cast<size_t>(rows));
        }
      }
    }
  });
}

}  // namespace pg4
