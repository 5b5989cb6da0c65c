// The portable micro-kernel and the choice between kernels.
#include "ops/cpu/panel_kernel.h"

namespace pg4 {

namespace detail {

void panel_kernel_scalar(int k, const float* w, size_t w_stride, int n_rows, const float* a,
                         int n_acts, float* y, size_t y_stride, bool accumulate) {
  float acc[kPanelActs][kPanelRows] = {};
  for (int i = 0; i < k; ++i, w += w_stride, a += kPanelActs) {
    for (int j = 0; j < n_acts; ++j) {
      for (int r = 0; r < n_rows; ++r) acc[j][r] += w[r] * a[j];
    }
  }
  for (int j = 0; j < n_acts; ++j) {
    float* row = y + j * y_stride;
    for (int r = 0; r < n_rows; ++r) row[r] = accumulate ? row[r] + acc[j][r] : acc[j][r];
  }
}

}  // namespace detail

PanelKernelFn panel_kernel(quant::Isa isa) {
#if defined(__AVX512F__)
  if (isa >= quant::Isa::kAvx512) return &detail::panel_kernel_avx512;
#endif
  return &detail::panel_kernel_scalar;
}

}  // namespace pg4
