// Internal: the per-instruction-set kernel tables behind vec_dot_fn and vec_dot_multi_fn.
#pragma once

#include <cstddef>
#include <cstdint>

#include "quant/interleaved.h"
#include "quant/quant.h"

// The x86 paths are chosen when the build targets them (-march=native on the build machine).
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define PG4_QUANT_AVX2 1
#endif
#if defined(PG4_QUANT_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__) && \
    defined(__AVX512VL__)
#define PG4_QUANT_AVX512 1
#endif

namespace pg4::quant::detail {

struct Kernels {
  VecDotFn one = nullptr;
  VecDotMultiFn multi = nullptr;
};

// The multi-row product built from a single-row kernel: each activation row in turn, with the
// weight row staying in L1 between them.
template <VecDotFn kOne>
void multi_by_rows(int64_t n, const void* weight_row, const void* acts, size_t act_stride,
                   int n_acts, float* out) {
  const auto* a = static_cast<const uint8_t*>(acts);
  for (int j = 0; j < n_acts; ++j) out[j] = kOne(n, weight_row, a + j * act_stride);
}

template <VecDotFn kOne>
constexpr Kernels single_row_kernels() {
  return {kOne, &multi_by_rows<kOne>};
}

// A fused kernel: Kernel::rows<R>(n, weight_row, acts, act_stride, out) computes the products of
// one weight row with R activation rows, unpacking each weight block once for all of them.
// rows<R> does for every activation row exactly the arithmetic of rows<1>, which is the
// single-row kernel, so a batch of tokens gets the same bits as one token at a time. The kernels
// unroll their loops over the R rows with #pragma GCC unroll: left to itself GCC keeps the
// per-row accumulators in a stack array and stores them on every block (10% slower).
template <typename Kernel>
float fused_one(int64_t n, const void* weight_row, const void* activation_row) {
  float out;
  Kernel::template rows<1>(n, weight_row, static_cast<const uint8_t*>(activation_row), 0, &out);
  return out;
}

// The fewer than 2 * R rows left over, in groups of R, R / 2, ..., 1.
template <typename Kernel, int R>
void fused_remainder(int64_t n, const void* weight_row, const uint8_t* acts, size_t act_stride,
                     int n_acts, float* out) {
  if (n_acts >= R) {
    Kernel::template rows<R>(n, weight_row, acts, act_stride, out);
    acts += R * act_stride;
    out += R;
    n_acts -= R;
  }
  if constexpr (R > 1) {
    fused_remainder<Kernel, R / 2>(n, weight_row, acts, act_stride, n_acts, out);
  }
}

// Kernel::kRows activation rows at a time, as many as its registers hold.
template <typename Kernel>
void fused_multi(int64_t n, const void* weight_row, const void* acts, size_t act_stride, int n_acts,
                 float* out) {
  constexpr int kRows = Kernel::kRows;
  const auto* a = static_cast<const uint8_t*>(acts);
  int j = 0;
  for (; j + kRows <= n_acts; j += kRows) {
    Kernel::template rows<kRows>(n, weight_row, a + j * act_stride, act_stride, out + j);
  }
  fused_remainder<Kernel, kRows / 2>(n, weight_row, a + j * act_stride, act_stride, n_acts - j,
                                     out + j);
}

template <typename Kernel>
constexpr Kernels fused_kernels() {
  return {&fused_one<Kernel>, &fused_multi<Kernel>};
}

// Each returns the kernels of that instruction set for a weight type; empty where it has none.
Kernels scalar_kernels(Type weight_type);
#if defined(PG4_QUANT_AVX2)
Kernels avx2_kernels(Type weight_type);
#endif
#if defined(PG4_QUANT_AVX512)
Kernels avx512_kernels(Type weight_type);
#if defined(__AVX512VNNI__)
InterleavedDotFn avx512_interleaved_kernel(Type weight_type);
#endif
#endif

}  // namespace pg4::quant::detail
