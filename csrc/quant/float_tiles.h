// Products of float weight rows (F32, F16, BF16) with many activation rows as register tiles:
// up to kTileRows rows against kTileTokens tokens at once, from rows widened to f32. Each
// product is, bit for bit, what the AVX-512 row kernel (dot_float in dot_avx512.cpp) gives: the
// same 64 partial sums over the same elements in the same order, added up the same way; only
// which products share a pass over memory changes. A token's result therefore does not depend on
// how many others share its call, as with the fused quantized kernels.
#pragma once

#include <cstddef>
#include <cstdint>

#include "quant/quant.h"

namespace pg4::quant {

constexpr int kTileRows = 4;
constexpr int kTileTokens = 6;

// y[t * y_stride + r] = the row kernel's dot(w + r * w_stride, a + t * a_stride) over n
// elements, for r < n_rows and t < n_tokens of the kernel's tile.
using FloatTileFn = void (*)(int64_t n, const float* w, size_t w_stride, const float* a,
                             size_t a_stride, float* y, size_t y_stride);
// dst[0, n) = the exact float values of a row of the weight type (and of its activations).
using WidenFn = void (*)(const void* src, float* dst, int64_t n);

struct FloatTileKernels {
  FloatTileFn tiles[kTileRows][kTileTokens];  // [n_rows - 1][n_tokens - 1]
  WidenFn widen;                              // nullptr for F32: its rows are used in place
};

// The tile kernels matching the row kernel of `weight_type` under `isa` for rows of n elements,
// or nullptr where there are none: a weight type other than F32, F16 and BF16, an instruction
// set below AVX-512, or n not a multiple of 16 (the row kernel adds the last elements one by one).
const FloatTileKernels* float_tile_kernels(Type weight_type, Isa isa, int64_t n);

}  // namespace pg4::quant
