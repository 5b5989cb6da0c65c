// Internal: the per-instruction-set kernel tables behind vec_dot_fn and vec_dot_multi_fn.
#pragma once

#include <cstddef>
#include <cstdint>

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

// Each returns the kernels of that instruction set for a weight type; empty where it has none.
Kernels scalar_kernels(Type weight_type);
#if defined(PG4_QUANT_AVX2)
Kernels avx2_kernels(Type weight_type);
#endif
#if defined(PG4_QUANT_AVX512)
Kernels avx512_kernels(Type weight_type);
#endif

}  // namespace pg4::quant::detail
