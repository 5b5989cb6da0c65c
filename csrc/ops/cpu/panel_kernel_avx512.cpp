// The AVX-512 micro-kernel: 8 activations x 32 rows in 16 zmm accumulators, two (masked) loads
// of row elements and 8 broadcasts per step of the shared index.
#include "ops/cpu/panel_kernel.h"

#if defined(__AVX512F__)

#include <immintrin.h>

namespace pg4::detail {

namespace {

template <int kActs>
void panel_acts(int k, const float* w, size_t w_stride, __mmask16 low, __mmask16 high,
                const float* a, float* y, size_t y_stride, bool accumulate) {
  __m512 acc[kActs][2];
#pragma GCC unroll 8
  for (int j = 0; j < kActs; ++j) acc[j][0] = acc[j][1] = _mm512_setzero_ps();
  for (int i = 0; i < k; ++i, w += w_stride, a += kPanelActs) {
    const __m512 w0 = _mm512_maskz_loadu_ps(low, w);
    const __m512 w1 = _mm512_maskz_loadu_ps(high, w + 16);
#pragma GCC unroll 8
    for (int j = 0; j < kActs; ++j) {
      const __m512 b = _mm512_set1_ps(a[j]);
      acc[j][0] = _mm512_fmadd_ps(w0, b, acc[j][0]);
      acc[j][1] = _mm512_fmadd_ps(w1, b, acc[j][1]);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < kActs; ++j) {
    float* row = y + j * y_stride;
    if (accumulate) {
      acc[j][0] = _mm512_add_ps(_mm512_maskz_loadu_ps(low, row), acc[j][0]);
      acc[j][1] = _mm512_add_ps(_mm512_maskz_loadu_ps(high, row + 16), acc[j][1]);
    }
    _mm512_mask_storeu_ps(row, low, acc[j][0]);
    _mm512_mask_storeu_ps(row + 16, high, acc[j][1]);
  }
}

}  // namespace

void panel_kernel_avx512(int k, const float* w, size_t w_stride, int n_rows, const float* a,
                         int n_acts, float* y, size_t y_stride, bool accumulate) {
  const __mmask16 low = n_rows >= 16 ? 0xffff : static_cast<__mmask16>((1u << n_rows) - 1);
  const __mmask16 high =
      n_rows >= 32 ? 0xffff : static_cast<__mmask16>((1u << (n_rows > 16 ? n_rows - 16 : 0)) - 1);
  switch (n_acts) {
    case 8:
      return panel_acts<8>(k, w, w_stride, low, high, a, y, y_stride, accumulate);
    case 7:
      return panel_acts<7>(k, w, w_stride, low, high, a, y, y_stride, accumulate);
    case 6:
      return panel_acts<6>(k, w, w_stride, low, high, a, y, y_stride, accumulate);
    case 5:
      return panel_acts<5>(k, w, w_stride, low, high, a, y, y_stride, accumulate);
    case 4:
      return panel_acts<4>(k, w, w_stride, low, high, a, y, y_stride, accumulate);
    case 3:
      return panel_acts<3>(k, w, w_stride, low, high, a, y, y_stride, accumulate);
    case 2:
      return panel_acts<2>(k, w, w_stride, low, high, a, y, y_stride, accumulate);
    case 1:
      return panel_acts<1>(k, w, w_stride, low, high, a, y, y_stride, accumulate);
    default:
      return;
  }
}

}  // namespace pg4::detail

#endif  // __AVX512F__
