// The f32 micro-kernel behind the CPU backend's tiled products: a block of up to kPanelActs
// activations against a panel of up to kPanelRows rows, the activations broadcast one element at
// a time against the rows' elements of the same index (an outer product per step), all
// accumulators in registers.
#pragma once

#include <cstddef>

#include "quant/quant.h"

namespace pg4 {

constexpr int kPanelRows = 32;
constexpr int kPanelActs = 8;

// y[j * y_stride + r] (+ its old value when `accumulate`) = sum over i < k, in order, of
// w[i * w_stride + r] * a[i * kPanelActs + j], for r < n_rows (<= kPanelRows) and j < n_acts
// (<= kPanelActs). Reads only those w elements, writes only those y elements.
using PanelKernelFn = void (*)(int k, const float* w, size_t w_stride, int n_rows, const float* a,
                               int n_acts, float* y, size_t y_stride, bool accumulate);

// The kernel of `isa` or the widest narrower set the build has one for.
PanelKernelFn panel_kernel(quant::Isa isa);

namespace detail {

void panel_kernel_scalar(int k, const float* w, size_t w_stride, int n_rows, const float* a,
                         int n_acts, float* y, size_t y_stride, bool accumulate);
#if defined(__AVX512F__)
void panel_kernel_avx512(int k, const float* w, size_t w_stride, int n_rows, const float* a,
                         int n_acts, float* y, size_t y_stride, bool accumulate);
#endif

}  // namespace detail

}  // namespace pg4
